package migration

import (
	"fmt"
	"math/bits"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
)

// checkChunk is how many pages a worker of a pageSummer takes at a time: small enough that
// the workers finish together, large enough that taking one costs nothing.
const checkChunk = 256

// touched receives the bytes eachPage loads ahead, so that the compiler keeps the loads.
var touched atomic.Uint32

// pageSummer hands the pages of mem that skip (one bit per page, nil for none) does not mark
// to any number of goroutines, a chunk at a time.
type pageSummer struct {
	mem  []byte
	skip []uint64
	next atomic.Int64
}

// work checksums chunks of pages, calling f(p, PageSum(page p)), until none is left.
func (ps *pageSummer) work(f func(p int, sum uint32)) {
	n := len(ps.mem) / PageSize
	var lines byte
	for {
		lo := int(ps.next.Add(checkChunk)) - checkChunk
		if lo >= n {
			break
		}
		lines += eachPage(ps.mem, lo, min(lo+checkChunk, n), ps.skip, func(p int, page []byte) { f(p, PageSum(page)) })
	}
	touched.Add(uint32(lines))
}

// stop leaves the pages not yet handed out: every worker returns after its current chunk.
func (ps *pageSummer) stop() { ps.next.Store(int64(len(ps.mem) / PageSize)) }

// sumWorkers is how many goroutines reread memory: one per CPU the process may use.
func sumWorkers(pages int) int {
	return min(runtime.GOMAXPROCS(0), max(pages/checkChunk, 1))
}

// eachPage calls f on each page of [lo, hi) that skip does not mark. Hardware prefetchers
// stop at page boundaries, so a page read by a checksum loop alone arrives one line after
// another; loading one byte of every line of the next page first puts all its lines on their
// way at once, which makes a pass over memory not in cache about four times faster
// (BenchmarkMemoryDigest). It returns the sum of the bytes loaded ahead.
func eachPage(mem []byte, lo, hi int, skip []uint64, f func(p int, page []byte)) byte {
	var lines byte
	next := nextUnmarked(skip, lo, hi)
	for p := next; p < hi; p = next {
		next = nextUnmarked(skip, p+1, hi)
		if next < hi {
			ahead := mem[next*PageSize : (next+1)*PageSize]
			for i := 0; i < PageSize; i += 64 {
				lines += ahead[i]
			}
		}
		f(p, mem[p*PageSize:(p+1)*PageSize])
	}
	return lines
}

// nextUnmarked is the first page at or after p, before hi, whose bit in bm is clear (hi if
// none); a nil bm marks nothing.
func nextUnmarked(bm []uint64, p, hi int) int {
	for bm != nil && p < hi {
		w := ^bm[p/64] >> (p % 64)
		if w != 0 {
			return min(p+bits.TrailingZeros64(w), hi)
		}
		p = (p/64 + 1) * 64
	}
	return min(p, hi)
}

// memCheck rereads guest memory once the vCPUs are stopped and the final sync is done, beside
// the final send: every page that send does not carry must still hold what was last sent of
// it, or the guest wrote it and the dirty log never reported it. The pages the final send
// carries are read from stopped memory by the sender itself, so that once the check passes
// the sender's page checksums are those of memory as it stopped. The check runs on all CPUs
// but one while the sender sends, and on the sender's too once it waits.
type memCheck struct {
	pages  pageSummer
	sent   []uint32
	missed []missedPages // per worker; the waiter is worker 0
	wg     sync.WaitGroup
}

type missedPages struct{ n, first int }

// checkMemory starts the check of mem against sent (the checksum of what was last sent of
// each page); final marks the pages the final send is about to carry.
func checkMemory(mem []byte, sent []uint32, final []uint64) *memCheck {
	workers := sumWorkers(len(sent))
	// A copy: the sender clears its bits as it goes.
	c := &memCheck{pages: pageSummer{mem: mem, skip: slices.Clone(final)}, sent: sent,
		missed: make([]missedPages, workers)}
	for w := 1; w < workers; w++ {
		c.wg.Go(func() { c.work(w) })
	}
	return c
}

func (c *memCheck) work(w int) {
	m := &c.missed[w]
	c.pages.work(func(p int, sum uint32) {
		if sum != c.sent[p] {
			if m.n == 0 || p < m.first {
				m.first = p
			}
			m.n++
		}
	})
}

// wait takes part in the check until it is done, then names the first page the dirty log
// missed, if any.
func (c *memCheck) wait() error {
	c.work(0)
	c.wg.Wait()
	n, first := 0, 0
	for _, m := range c.missed {
		if m.n > 0 && (n == 0 || m.first < first) {
			first = m.first
		}
		n += m.n
	}
	if n > 0 {
		return fmt.Errorf("%d pages changed without being reported dirty (the first is page %d): not sending a stale guest", n, first)
	}
	return nil
}

// abandon ends the check of a failed migration; it returns once no worker reads memory, so
// that the guest may run again.
func (c *memCheck) abandon() {
	c.pages.stop()
	c.wg.Wait()
}
