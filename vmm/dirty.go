package vmm

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// dirtyRing is one vCPU's dirty ring as the reaper sees it, whatever the backend.
type dirtyRing interface {
	// harvest passes every page collected since the last harvest to visit, oldest first, and
	// returns how many it passed. An error means the ring is inconsistent: pages may be lost.
	harvest(visit func(page uint64)) (int, error)
}

// backend is an accelerator: it makes the runners and rings and resets the rings.
type backend interface {
	runner(cpu int) runner
	ring(cpu int) dirtyRing // nil without a ring
	// resetRings re-arms dirty tracking for every page harvested so far (KVM_RESET_DIRTY_RINGS).
	resetRings() error
	// syncBitmap passes every page dirtied since its last call (machines without a ring).
	syncBitmap(visit func(page uint64)) error
	close() error
}

// Reaper pacing. On this project's hosts KVM does not stop a vCPU before its ring overflows:
// a ring that fills up between two passes is overrun and stays out of step with the kernel
// for good (kvm-host-notes.md). So passes come at least every reapBudget worth of entries at
// a generous write rate (every logged store, not every page, takes an entry there), never
// more than reapMaxInterval apart, and more often when the fullest ring got more than
// 1/reapTargetDiv of its size in one pass.
const (
	reapMinInterval = 50 * time.Microsecond
	reapMaxInterval = 1 * time.Millisecond
	reapTargetDiv   = 16
	reapBudgetDiv   = 8         // at most size/8 entries between two passes ...
	reapWorstRate   = 1_000_000 // ... at this many entries per second
	reapPriority    = 1         // SCHED_FIFO priority of the reaper's thread
	reapQuietGrowth = 4         // interval grows by 1/reapQuietGrowth per quiet pass
)

func reapIntervalCap(ringSize int) time.Duration {
	d := time.Duration(ringSize/reapBudgetDiv) * time.Second / reapWorstRate
	return min(reapMaxInterval, max(reapMinInterval, d))
}

// reaper is the single producer of dirty pages: it harvests the rings (or the bitmap) and
// hands each page to the per-vCPU counters and every open DirtyLog.
//
// With a ring it runs one thread per host CPU (up to reapMaxThreads), each pinned to its CPU
// at a real-time priority, taking turns: a vCPU filling its ring is then always on a CPU
// whose reaper preempts it, and when the project's hosts stall one CPU for milliseconds
// (they do, even for real-time threads) the reaper of another CPU carries on.
type reaper struct {
	m     *Machine
	wakes []chan struct{} // one per thread

	mu        sync.Mutex // one pass at a time; guards the fields below
	logs      []*DirtyLog
	sinceFull []int // entries each ring received since that vCPU's last ring-full event
	interval  time.Duration
	maxIntvl  time.Duration
	visitFn   func(page uint64)
	bad       bool // the current pass met an impossible page

	closed bool // the machine is closed: no more passes

	failSafes atomic.Uint64
	passes    atomic.Uint64
}

const reapMaxThreads = 4

func newReaper(m *Machine) *reaper {
	r := &reaper{m: m, sinceFull: make([]int, len(m.cpus)),
		interval: reapMinInterval, maxIntvl: reapIntervalCap(m.cfg.DirtyRingSize)}
	r.visitFn = r.deliver
	return r
}

// start starts the reaper threads (none without a ring: the bitmap is synced on demand).
func (r *reaper) start() {
	if r.m.cfg.DirtyRingSize == 0 {
		return
	}
	var set unix.CPUSet
	cpus := []int{-1} // unpinned if the affinity cannot be read
	if unix.SchedGetaffinity(0, &set) == nil {
		cpus = cpus[:0]
		for c := 0; c < len(set)*64 && len(cpus) < reapMaxThreads; c++ {
			if set.IsSet(c) {
				cpus = append(cpus, c)
			}
		}
	}
	for _, c := range cpus {
		w := make(chan struct{}, 1)
		r.wakes = append(r.wakes, w)
		r.m.wg.Add(1)
		go r.loop(c, w, len(r.wakes) == 1)
	}
}

func (r *reaper) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
}

func (r *reaper) wakeUp() {
	for _, w := range r.wakes {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// loop runs passes while any vCPU may run, on its own OS thread pinned to hostCPU (-1: not
// pinned), and sleeps with nanosleep: Go timers round sub-millisecond sleeps up to about a
// millisecond. The first thread reports what it could not set up.
func (r *reaper) loop(hostCPU int, wake chan struct{}, first bool) {
	defer r.m.wg.Done()
	runtime.LockOSThread()
	// The thread keeps its affinity and priority and dies with the goroutine (no
	// UnlockOSThread).
	if hostCPU >= 0 {
		var set unix.CPUSet
		set.Set(hostCPU)
		unix.SchedSetaffinity(0, &set)
	}
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: reapPriority}
	if err := unix.SchedSetAttr(0, &attr, 0); err != nil && first {
		r.m.logf("dirty ring reaper runs without real-time priority (%v): under CPU contention a ring may overflow", err)
	}
	for {
		if !r.m.running() {
			r.harvest() // pages dirtied just before the stop
			select {
			case <-wake:
				continue
			case <-r.m.done:
				return
			}
		}
		interval := r.maxIntvl
		if r.mu.TryLock() { // else another thread is at it
			r.adapt(r.passLocked())
			interval = r.interval
			r.mu.Unlock()
		}
		ts := unix.NsecToTimespec(int64(interval))
		for unix.Nanosleep(&ts, &ts) == unix.EINTR {
		}
		select {
		case <-r.m.done:
			return
		default:
		}
	}
}

// adapt halves the interval when the fullest ring got more than its target in one pass and
// lets it grow slowly, up to its cap, when the rings are quiet.
func (r *reaper) adapt(fill int) {
	target := r.m.cfg.DirtyRingSize / reapTargetDiv
	switch {
	case fill > target:
		r.interval = max(reapMinInterval, r.interval/2)
	case fill < target/4:
		r.interval = min(r.maxIntvl, r.interval+r.interval/reapQuietGrowth)
	}
}

// harvest is one pass; it returns the most entries taken from a single ring.
func (r *reaper) harvest() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.passLocked()
}

// ringFull serves a vCPU whose ring filled up (a real KVM_EXIT_DIRTY_RING_FULL or the soft
// ring's): one pass, and the vCPU's ring-full count starts again. It returns the entries
// taken from that vCPU's ring.
func (r *reaper) ringFull(cpu int) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	before := r.m.cpus[cpu].dirty.Load()
	r.passLocked()
	r.sinceFull[cpu] = 0
	return r.m.cpus[cpu].dirty.Load() - before
}

// passLocked harvests every ring, hands the pages on and resets the rings: every page a pass
// delivered is re-armed when it returns, so a consumer may then read the pages' contents
// (DirtyLog.Sync, Harvest). Resetting at every pass, rather than every so many entries, keeps
// the most room in the rings: on the project's hosts nothing else stops KVM from overrunning
// one.
func (r *reaper) passLocked() int {
	m := r.m
	if r.closed {
		return 0
	}
	r.passes.Add(1)
	if m.cfg.DirtyRingSize == 0 {
		r.bad = false
		if err := m.be.syncBitmap(r.visitFn); err != nil || r.bad {
			r.failSafeLocked(-1, err)
		}
		return 0
	}
	total, fullest := 0, 0
	for _, c := range m.cpus {
		r.bad = false
		n, err := c.ring.harvest(r.visitFn)
		if err == nil && n >= m.cfg.DirtyRingSize {
			// KVM should have stopped the vCPU before its ring was full; where it did not
			// (kvm-host-notes.md), it may have written over entries not yet harvested.
			err = errRingOverrun
		}
		if err != nil || r.bad {
			r.failSafeLocked(c.id, err)
		}
		if n == 0 {
			continue
		}
		total += n
		fullest = max(fullest, n)
		c.dirty.Add(uint64(n))
		r.sinceFull[c.id] += n
		if r.sinceFull[c.id] >= m.cfg.DirtyRingSize {
			r.sinceFull[c.id] = 0
			m.Kick(c.id)
		}
	}
	if total > 0 {
		if err := m.be.resetRings(); err != nil {
			r.failSafeLocked(-1, err)
		}
	}
	return fullest
}

// deliver hands one harvested page to every open DirtyLog.
func (r *reaper) deliver(page uint64) {
	if page >= r.m.pages {
		r.bad = true
		return
	}
	w, b := page/64, uint64(1)<<(page%64)
	for _, d := range r.logs {
		d.bits[w] |= b
	}
}

func (r *reaper) failSafe(cpu int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failSafeLocked(cpu, err)
}

// failSafeLocked handles a ring (cpu, or -1 for the machine) that may have lost pages: every
// page becomes dirty in every DirtyLog, so migration resends all of memory.
func (r *reaper) failSafeLocked(cpu int, err error) {
	n := r.failSafes.Add(1)
	if n&(n-1) == 0 { // a broken ring can repeat this at a high rate: log 1, 2, 4, 8... times
		what := fmt.Sprintf("of vCPU %d", cpu)
		if cpu < 0 {
			what = "of the machine"
		}
		r.m.logf("dirty tracking %s inconsistent (%v): marking all guest memory dirty (%d times so far)", what, err, n)
	}
	for _, d := range r.logs {
		d.setAll()
	}
}

var errRingOverrun = errors.New("every entry of the ring was dirty: KVM may have overwritten some")

// Harvest runs one synchronous pass over every ring (or the dirty bitmap), serialised with the
// reaper.
func (m *Machine) Harvest() { m.rp.harvest() }

// DirtyFailSafes counts the times dirty tracking was found inconsistent and every page was
// marked dirty instead.
func (m *Machine) DirtyFailSafes() uint64 { return m.rp.failSafes.Load() }

// DirtyLog is one consumer's view of dirtied pages (migration's bitmap): it accumulates the
// pages dirtied from its creation on, independently of every other view.
type DirtyLog struct {
	r    *reaper
	bits []uint64 // under r.mu
}

// NewDirtyLog opens a view that collects the pages dirtied from now on.
func (m *Machine) NewDirtyLog() *DirtyLog {
	r := m.rp
	r.mu.Lock()
	defer r.mu.Unlock()
	r.passLocked() // what was dirtied before belongs to the views already open
	d := &DirtyLog{r: r, bits: make([]uint64, (m.pages+63)/64)}
	r.logs = append(r.logs, d)
	return d
}

// Sync harvests, then ORs the pages the view accumulated into dst (one bit per page, page 0
// in bit 0 of dst[0]), clears the view and returns how many bits of dst it newly set.
func (d *DirtyLog) Sync(dst []uint64) int {
	r := d.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if d.bits == nil {
		return 0
	}
	r.passLocked()
	n := 0
	for i, w := range d.bits[:min(len(d.bits), len(dst))] {
		if w == 0 {
			continue
		}
		n += bits.OnesCount64(w &^ dst[i])
		dst[i] |= w
		d.bits[i] = 0
	}
	return n
}

// Close stops the view; Sync then adds nothing.
func (d *DirtyLog) Close() {
	r := d.r
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, l := range r.logs {
		if l == d {
			r.logs = append(r.logs[:i], r.logs[i+1:]...)
			break
		}
	}
	d.bits = nil
}

func (d *DirtyLog) setAll() {
	for i := range d.bits {
		d.bits[i] = ^uint64(0)
	}
	if tail := d.r.m.pages % 64; tail != 0 {
		d.bits[len(d.bits)-1] = 1<<tail - 1
	}
}

// DirtyPages is the number of pages harvested from cpu's ring so far (0 without a ring).
func (m *Machine) DirtyPages(cpu int) uint64 { return m.cpus[cpu].dirty.Load() }
