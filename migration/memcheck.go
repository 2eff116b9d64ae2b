package migration

import (
	"fmt"
	"math/bits"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
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
// the final send: a page that send does not carry must still hold what was last sent of it,
// or the guest wrote it and the dirty log never reported it. Pages skip marks (the final
// send's, which the sender reads from stopped memory itself, and holes, which are zero and
// were sent as zero) are not read. The check starts at a chunk of the caller's choosing (where
// the precopy scrub left off, so that the pages verified longest ago come first) and, given a
// deadline, hands out no chunk after it: what the downtime affords is checked, not all of
// memory. The check runs on all CPUs but one while the sender sends, and on the sender's too
// once it waits.
type memCheck struct {
	mem      []byte
	sent     []uint32
	skip     []uint64
	chunks   int
	start    int // first chunk
	next     atomic.Int64
	cut      atomic.Bool // the deadline stopped the check before its end
	deadline time.Time   // zero: check everything
	missed   [][]int     // per worker; the waiter is worker 0
	checked  []int       // pages each worker read
	wg       sync.WaitGroup
}

// checkResult is what a check found.
type checkResult struct {
	missed  []int // pages that differ from what was sent, ascending
	checked int   // pages read
	whole   bool  // every chunk was checked
}

// checkMemory starts the check of mem against sent (the checksum of what was last sent of each
// page), skipping the pages skip marks (the caller must not change it until wait or abandon
// returns), from the chunk holding page from on, until deadline (zero: no deadline).
func checkMemory(mem []byte, sent []uint32, skip []uint64, from int, deadline time.Time) *memCheck {
	workers := sumWorkers(len(sent))
	chunks := (len(sent) + checkChunk - 1) / checkChunk
	c := &memCheck{mem: mem, sent: sent, skip: skip, chunks: chunks, deadline: deadline,
		missed: make([][]int, workers), checked: make([]int, workers)}
	if chunks > 0 {
		c.start = from / checkChunk % chunks
	}
	for w := 1; w < workers; w++ {
		c.wg.Go(func() { c.work(w) })
	}
	return c
}

func (c *memCheck) work(w int) {
	n := len(c.sent)
	var lines byte
	for {
		k := int(c.next.Add(1)) - 1
		if k >= c.chunks {
			break
		}
		if !c.deadline.IsZero() && time.Now().After(c.deadline) {
			c.cut.Store(true)
			c.next.Store(int64(c.chunks)) // the others stop too
			break
		}
		lo := (c.start + k) % c.chunks * checkChunk
		lines += eachPage(c.mem, lo, min(lo+checkChunk, n), c.skip, func(p int, page []byte) {
			c.checked[w]++
			if PageSum(page) != c.sent[p] {
				c.missed[w] = append(c.missed[w], p)
			}
		})
	}
	touched.Add(uint32(lines))
}

// wait takes part in the check until it is done and reports what it found.
func (c *memCheck) wait() checkResult {
	c.work(0)
	c.wg.Wait()
	var res checkResult
	for w := range c.missed {
		res.missed = append(res.missed, c.missed[w]...)
		res.checked += c.checked[w]
	}
	slices.Sort(res.missed)
	res.whole = !c.cut.Load()
	return res
}

// abandon ends the check of a failed migration; it returns once no worker reads memory, so
// that the guest may run again.
func (c *memCheck) abandon() {
	c.next.Store(int64(c.chunks))
	c.wg.Wait()
}

// missedErr words pages the dirty log did not report.
func missedErr(missed []int) error {
	return fmt.Errorf("%d pages changed without being reported dirty (the first is page %d)", len(missed), missed[0])
}
