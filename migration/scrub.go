package migration

import (
	"math/bits"
	"slices"
	"time"
)

// What guards against a write the dirty log missed (see the package doc): the scrub while
// precopy runs, and at the stop a check bounded by the downtime budget, made whole once the
// log is known to have missed a write.

// stopCheckShare is the part of downtime-limit the check at the stop may take: it runs beside
// the final send, which the switch-over threshold sized for the whole limit.
const stopCheckShare = 4

// setup makes the first pass's bitmap: every page that may hold data; holes go now as zero
// runs (with zero-page-detection none every page goes whole, as in QEMU).
func (s *sender) setup() error {
	s.bm = make([]uint64, (s.npages+63)/64)
	s.scratch = make([]uint64, len(s.bm))
	s.suspect = make([]uint64, len(s.bm))
	if !s.r.zeroCheck {
		setAllPages(s.bm, s.npages)
		return nil
	}
	s.populated = make([]uint64, len(s.bm))
	s.mach.PopulatedPages(s.populated)
	copy(s.bm, s.populated)
	var zeroes int64
	for p := nextUnmarked(s.bm, 0, s.npages); p < s.npages; {
		end := nextMarked(s.bm, p, min(s.npages, p+maxRunPages))
		if err := s.enc.WriteZeroPages(uint64(p), end-p); err != nil {
			return s.r.ioError("sending zero pages", err)
		}
		s.sums.setRange(p, end, zeroPageSum)
		zeroes += int64(end - p)
		p = nextUnmarked(s.bm, end, s.npages)
	}
	s.duplicate += zeroes
	r := s.r
	r.mu.Lock()
	r.stats.Duplicate = s.duplicate
	r.stats.Transferred = s.enc.Written()
	r.stats.PrecopyBytes = uint64(s.enc.Written())
	r.mu.Unlock()
	return nil
}

// scrub rereads clean pages until the deadline, a chunk at a time from where it left off.
func (s *sender) scrub(until time.Time) {
	if s.populated == nil {
		return
	}
	for time.Now().Before(until) {
		if s.scrubAt >= s.npages {
			s.scrubAt = 0
			clear(s.populated)
			s.mach.PopulatedPages(s.populated)
		}
		lo, hi := s.scrubAt, min(s.scrubAt+checkChunk, s.npages)
		for p := lo; p < hi; p++ {
			w, bit := p/64, uint64(1)<<(p%64)
			if (s.bm[w]|s.suspect[w])&bit != 0 || s.populated[w]&bit == 0 {
				continue // going again anyway, suspected already, or a hole
			}
			if PageSum(s.mem[p*PageSize:(p+1)*PageSize]) != s.sums.sums[p] {
				s.suspect[w] |= bit
				s.suspects++
			}
		}
		s.scrubAt = hi
	}
}

// syncLog is the dirty log's Sync into the bitmap. With suspects it syncs into a scratch
// bitmap first: a suspect the log does not report is a write it missed, and goes again.
func (s *sender) syncLog() int {
	if s.suspects == 0 {
		return s.log.Sync(s.bm)
	}
	clear(s.scratch)
	added := s.log.Sync(s.scratch)
	for i, w := range s.scratch {
		if miss := s.suspect[i] &^ w; miss != 0 {
			if s.missed == 0 {
				s.firstMiss = i*64 + bits.TrailingZeros64(miss)
			}
			s.missed += bits.OnesCount64(miss)
			w |= miss
		}
		s.bm[i] |= w
	}
	clear(s.suspect)
	s.suspects = 0
	return added
}

// startStopCheck starts the check at the stop, once the last sync is done: every populated
// page the final send does not carry, from where the scrub left off, within the downtime
// budget, or all of them with -memory-check all or once the log has missed a write. nil for
// a guest that cannot have changed anything.
func (s *sender) startStopCheck() *memCheck {
	if s.log.Quiet() {
		return nil
	}
	skip := slices.Clone(s.bm)
	if s.populated != nil {
		clear(s.populated)
		s.mach.PopulatedPages(s.populated)
		for i, w := range s.populated {
			skip[i] |= ^w
		}
	}
	var deadline time.Time
	p := s.r.m.paramsNow()
	if s.missed > 0 {
		s.r.m.cfg.Logf("migration to %s: the scrub found %d pages (the first is page %d) that changed without being reported dirty; sent again, all of memory is checked at the stop",
			s.r.addr, s.missed, s.firstMiss)
	}
	if !s.r.m.cfg.CheckAllMemory && s.missed == 0 {
		deadline = s.r.downStart.Add(time.Duration(p.DowntimeLimit) * time.Millisecond / stopCheckShare)
	}
	s.stopSkip = skip
	return checkMemory(s.mem, s.sums.sums, skip, s.scrubAt, deadline)
}

// finishStopCheck waits for the check and sends again what it found changed: memory is
// stopped, so what goes now is what the guest has. A log that missed a write is trusted for
// nothing more: the rest of memory is checked too.
func (s *sender) finishStopCheck(c *memCheck) error {
	res := c.wait()
	s.checked += res.checked
	if len(res.missed) > 0 && !res.whole {
		all := checkMemory(s.mem, s.sums.sums, s.stopSkip, 0, time.Time{}).wait()
		s.checked += all.checked
		res.missed = all.missed
	}
	if len(res.missed) == 0 {
		return nil
	}
	s.r.m.cfg.Logf("migration to %s: %v; sent again, all of memory checked", s.r.addr, missedErr(res.missed))
	s.missed += len(res.missed)
	for _, p := range res.missed {
		if s.bm[p/64]&(1<<(p%64)) == 0 {
			s.bm[p/64] |= 1 << (p % 64)
			s.dirty++
		}
	}
	return s.send(time.Time{}, false)
}

func setAllPages(bm []uint64, npages int) {
	for i := range bm {
		bm[i] = ^uint64(0)
	}
	if rem := npages % 64; rem != 0 {
		bm[len(bm)-1] = 1<<rem - 1
	}
}

// nextMarked is the first page at or after p, before hi, whose bit in bm is set (hi if none).
func nextMarked(bm []uint64, p, hi int) int {
	for p < hi {
		w := bm[p/64] >> (p % 64)
		if w != 0 {
			return min(p+bits.TrailingZeros64(w), hi)
		}
		p = (p/64 + 1) * 64
	}
	return min(p, hi)
}
