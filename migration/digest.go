package migration

import (
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
)

// digestChunk is how many page checksums one chunk hash of the digest covers (16 KiB of
// checksums, 16 MiB of memory).
const digestChunk = 4096

// pageSums is the checksum of every page as it went out or came in, with a hash of each
// chunk of them kept up to date lazily: a digest rehashes only the chunks that changed since
// the last one, so that digesting memory at the stop costs what the final send touched, not
// what memory holds (SHA-256 over the checksums of 16 GiB is some 50 ms here).
type pageSums struct {
	sums   []uint32
	hashes []Digest
	stale  []uint64 // one bit a chunk
}

func newPageSums(pages int) *pageSums {
	chunks := (pages + digestChunk - 1) / digestChunk
	p := &pageSums{sums: make([]uint32, pages), hashes: make([]Digest, chunks), stale: make([]uint64, (chunks+63)/64)}
	setAllPages(p.stale, chunks)
	return p
}

func (p *pageSums) set(page int, sum uint32) {
	p.sums[page] = sum
	c := page / digestChunk
	p.stale[c/64] |= 1 << (c % 64)
}

// setRange gives pages [lo, hi) the same checksum (a zero run's). A whole chunk of zero pages
// takes its hash as a constant: the holes of a large idle guest cost no hashing at either end.
func (p *pageSums) setRange(lo, hi int, sum uint32) {
	for q := lo; q < hi; q++ {
		p.sums[q] = sum
	}
	for c := lo / digestChunk; lo < hi && c <= (hi-1)/digestChunk; c++ {
		clo, chi := c*digestChunk, (c+1)*digestChunk
		if sum == zeroPageSum && clo >= lo && chi <= hi {
			p.hashes[c] = zeroChunkHash
			p.stale[c/64] &^= 1 << (c % 64)
			continue
		}
		p.stale[c/64] |= 1 << (c % 64)
	}
}

// zeroChunkHash is the hash of a whole chunk of zero pages.
var zeroChunkHash = func() Digest {
	b := make([]byte, 0, 4*digestChunk)
	for range digestChunk {
		b = binary.BigEndian.AppendUint32(b, zeroPageSum)
	}
	return sha256.Sum256(b)
}()

// refresh rehashes the chunks that changed.
func (p *pageSums) refresh() {
	var buf [4 * digestChunk]byte
	for i, w := range p.stale {
		for w != 0 {
			c := i*64 + bits.TrailingZeros64(w)
			w &= w - 1
			lo, hi := c*digestChunk, min((c+1)*digestChunk, len(p.sums))
			b := buf[:0]
			for _, s := range p.sums[lo:hi] {
				b = binary.BigEndian.AppendUint32(b, s)
			}
			p.hashes[c] = sha256.Sum256(b)
		}
		p.stale[i] = 0
	}
}

// digest is the stream's digest of a memory of size bytes whose pages have these checksums.
func (p *pageSums) digest(size uint64) Digest {
	p.refresh()
	h := sha256.New()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], size)
	h.Write(b[:])
	for _, c := range p.hashes {
		h.Write(c[:])
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// DigestOf combines the page checksums of a memory of size bytes: SHA-256 over the size (u64)
// and, for each chunk of digestChunk pages, SHA-256 over their checksums (u32 each).
func DigestOf(size uint64, sums []uint32) Digest {
	p := newPageSums(len(sums))
	copy(p.sums, sums)
	return p.digest(size)
}
