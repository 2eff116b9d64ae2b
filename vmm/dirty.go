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
	// handleFull is harvest at a ring-full exit, the vCPU outside KVM_RUN: it also moves on a
	// ring the host left stuck (an error then), and fails with errRingStuck when it cannot.
	handleFull(visit func(page uint64)) (int, error)
}

var errRingStuck = errors.New("the dirty ring is stuck full with nothing to collect")

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

// Collection pacing. Rings are collected by their own vCPU threads between runs: the reaper
// kicks every vCPU in guest mode each interval, and the vCPU harvests its ring, resets and
// runs again. On nested PVM a ring harvested from another thread while its vCPU is inside
// KVM_RUN loses entries within seconds (vmm/kvm's doc), and KVM overruns a ring that fills
// between two collections (kvm-host-notes.md). So collections come at least every
// size/collectBudgetDiv entries at a generous write rate (on those hosts every logged store
// is an entry), never more than collectMaxInterval apart, and more often when a ring got
// more than 1/collectTargetDiv of its size in one collection.
const (
	collectMinInterval = 100 * time.Microsecond
	collectMaxInterval = 1 * time.Millisecond
	collectTargetDiv   = 4
	collectBudgetDiv   = 4         // at most size/4 entries between two collections ...
	collectWorstRate   = 1_000_000 // ... at this many entries per second (measured: ~600k at 2 a page)
	collectQuietGrowth = 4         // interval grows by 1/collectQuietGrowth per quiet collection
	reapPriority       = 1         // SCHED_FIFO priority of the reaper's threads
	reapMaxThreads     = 4
)

func collectIntervalCap(ringSize int) time.Duration {
	d := time.Duration(ringSize/collectBudgetDiv) * time.Second / collectWorstRate
	return min(collectMaxInterval, max(collectMinInterval, d))
}

// reaper is the single producer of dirty pages: it has the rings (or the bitmap) harvested
// and hands each page to the per-vCPU counters and every open DirtyLog.
//
// With a ring it runs one pacing thread per host CPU (up to reapMaxThreads), each pinned to
// its CPU at a real-time priority and sharing one schedule: when the project's hosts stall one
// CPU for milliseconds (they do, even for real-time threads) another carries on kicking.
type reaper struct {
	m         *Machine
	wakes     []chan struct{} // one per thread
	lastRound atomic.Int64    // when the last round of kicks went out (UnixNano)
	interval  atomic.Int64    // between rounds (ns)
	sleeping  atomic.Bool     // a pacing thread waits for a vCPU to enter guest mode
	maxIntvl  time.Duration

	syncMu sync.Mutex // one syncRings at a time

	mu        sync.Mutex // one harvest at a time; guards the fields below
	logs      []*DirtyLog
	sinceFull []int // pages each ring received since that vCPU's last ring-full event
	visitFn   func(page uint64)
	bad       bool // the current harvest met an impossible page
	// last and pages dedupe one harvest: where KVM emulates the guest's stores (nested PVM),
	// every store is an entry, so a page written twice in a row comes twice; hardware logs a
	// page once until the reset. Counting pages, not entries, keeps rates and ring-full
	// events in pages on both.
	last   uint64
	pages  int
	closed bool // the machine is closed: no more harvests

	failSafes atomic.Uint64
	passes    atomic.Uint64
}

func newReaper(m *Machine) *reaper {
	r := &reaper{m: m, sinceFull: make([]int, len(m.cpus)), maxIntvl: collectIntervalCap(m.cfg.DirtyRingSize)}
	r.interval.Store(int64(r.maxIntvl))
	r.visitFn = r.deliver
	return r
}

// start starts the pacing threads (none without a ring: the bitmap is synced on demand).
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

// loop sends the rounds of collection kicks while any vCPU may run, from its own OS thread
// pinned to hostCPU (-1: not pinned). It sleeps with nanosleep: Go timers round
// sub-millisecond sleeps up to about a millisecond. The first thread reports what it could
// not set up.
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
			r.harvest() // what the vCPUs dirtied before they stopped (they are all out now)
			select {
			case <-wake:
				continue
			case <-r.m.done:
				return
			}
		}
		if !r.anyInGuest() {
			// Halted or sleeping vCPUs dirty nothing: wait for one to enter guest mode.
			r.sleeping.Store(true)
			if !r.anyInGuest() {
				select {
				case <-wake:
				case <-r.m.done:
					return
				}
			}
			r.sleeping.Store(false)
			continue
		}
		iv := r.interval.Load()
		now := time.Now().UnixNano()
		if last := r.lastRound.Load(); now-last >= iv*9/10 && r.lastRound.CompareAndSwap(last, now) {
			for _, c := range r.m.cpus {
				if c.inGuest.Load() {
					c.collect.Store(true)
					c.r.kick()
				}
			}
		}
		ts := unix.NsecToTimespec(iv)
		for unix.Nanosleep(&ts, &ts) == unix.EINTR {
		}
		select {
		case <-r.m.done:
			return
		default:
		}
	}
}

func (r *reaper) anyInGuest() bool {
	for _, c := range r.m.cpus {
		if c.inGuest.Load() {
			return true
		}
	}
	return false
}

// enteringGuest is called by a vCPU thread that has just set inGuest: it wakes the reaper if
// it went to sleep for want of a running vCPU.
func (r *reaper) enteringGuest() {
	if r.sleeping.Load() {
		r.wakeUp()
	}
}

// adaptLocked halves the interval when a ring got more than its target in one collection
// and lets it grow slowly, up to its cap, when the rings are quiet.
func (r *reaper) adaptLocked(fill int) {
	target := r.m.cfg.DirtyRingSize / collectTargetDiv
	iv := time.Duration(r.interval.Load())
	switch {
	case fill > target:
		iv = max(collectMinInterval, iv/2)
	case fill < target/4:
		iv = min(r.maxIntvl, iv+iv/collectQuietGrowth)
	}
	r.interval.Store(int64(iv))
}

// collect is a vCPU thread collecting its own ring between runs (it was kicked for it).
func (r *reaper) collect(c *vcpu) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.passes.Add(1)
	n := r.harvestLocked(c, false)
	r.resetLocked(n)
	r.adaptLocked(n)
}

// ringFull serves c's ring-full exit on c's thread: harvest (moving on a ring the host left
// stuck), reset, and c's ring-full count starts again. A ring that cannot be moved on is
// returned as an error: the vCPU cannot run with it.
func (r *reaper) ringFull(c *vcpu) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.startHarvest()
	_, err := c.ring.handleFull(r.visitFn)
	if err != nil || r.bad {
		r.failSafeLocked(c.id, err)
	}
	if errors.Is(err, errRingStuck) {
		return err
	}
	r.countLocked(c, r.pages, false)
	r.sinceFull[c.id] = 0
	r.resetLocked(1) // the kernel frees the ring's entries only at a reset
	return nil
}

// harvest is one pass over every ring from the calling goroutine, for when no vCPU runs.
func (r *reaper) harvest() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.passLocked()
}

// syncWait bounds how long a synchronous harvest waits for a kicked vCPU to collect its own
// ring before it harvests that ring itself.
const syncWait = 20 * time.Millisecond

// syncRings is a synchronous pass while vCPUs may run: each vCPU in guest mode is kicked to
// collect its own ring (so rings are not harvested under running vCPUs, see the pacing
// comment), and the other rings, or the bitmap, are harvested here.
func (r *reaper) syncRings() {
	m := r.m
	if m.cfg.DirtyRingSize == 0 {
		r.harvest()
		return
	}
	r.syncMu.Lock() // a vCPU answers one request at a time
	defer r.syncMu.Unlock()
	done := make(chan int, len(m.cpus)) // buffered: a late answer never blocks its vCPU
	asked := make([]bool, len(m.cpus))
	pending := 0
	for _, c := range m.cpus {
		if c.inGuest.Load() {
			c.syncDone.Store(&done)
			c.collect.Store(true)
			c.r.kick()
			asked[c.id] = true
			pending++
		}
	}
	timeout := time.NewTimer(syncWait)
	defer timeout.Stop()
	for pending > 0 {
		select {
		case id := <-done:
			asked[id] = false
			pending--
		case <-timeout.C:
			pending = 0
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.passes.Add(1)
	total := 0
	for _, c := range m.cpus {
		if !c.inGuest.Load() || asked[c.id] {
			total += r.harvestLocked(c, true)
		}
	}
	r.resetLocked(total)
}

// passLocked harvests every ring (or syncs the bitmap), hands the pages on and resets the
// rings: every page a pass delivered is re-armed when it returns, so a consumer may then read
// the pages' contents (DirtyLog.Sync, Harvest). Rings of running vCPUs are harvested from
// this thread too, which nested PVM occasionally punishes (handleFull then recovers, failing
// safe); consumers sync rarely compared with the collections.
func (r *reaper) passLocked() {
	m := r.m
	if r.closed {
		return
	}
	r.passes.Add(1)
	if m.cfg.DirtyRingSize == 0 {
		r.startHarvest()
		if err := m.be.syncBitmap(r.visitFn); err != nil || r.bad {
			r.failSafeLocked(-1, err)
		}
		return
	}
	total := 0
	for _, c := range m.cpus {
		total += r.harvestLocked(c, true)
	}
	r.resetLocked(total)
}

// harvestLocked takes c's ring's new entries and accounts for them; a ring-full event kicks
// the vCPU for its hook (kick) or, on the vCPU's own thread, marks it due.
func (r *reaper) harvestLocked(c *vcpu, kick bool) int {
	r.startHarvest()
	n, err := c.ring.harvest(r.visitFn)
	if err == nil && n >= r.m.cfg.DirtyRingSize {
		// KVM should have stopped the vCPU before its ring was full; where it did not
		// (kvm-host-notes.md), it may have written over entries not yet harvested.
		err = errRingOverrun
	}
	if err != nil || r.bad {
		r.failSafeLocked(c.id, err)
	}
	r.countLocked(c, r.pages, kick)
	return n
}

// startHarvest begins one ring's harvest: nothing seen yet.
func (r *reaper) startHarvest() {
	r.bad, r.last, r.pages = false, ^uint64(0), 0
}

func (r *reaper) countLocked(c *vcpu, n int, kick bool) {
	if n == 0 {
		return
	}
	c.dirty.Add(uint64(n))
	r.sinceFull[c.id] += n
	if r.sinceFull[c.id] >= r.m.ringFullPages() {
		r.sinceFull[c.id] = 0
		if kick {
			r.m.Kick(c.id)
		} else {
			c.hookPending.Store(true)
		}
	}
}

func (r *reaper) resetLocked(harvested int) {
	if harvested == 0 {
		return
	}
	if err := r.m.be.resetRings(); err != nil {
		r.failSafeLocked(-1, err)
	}
}

// deliver hands one harvested page to every open DirtyLog.
func (r *reaper) deliver(page uint64) {
	if page == r.last {
		return
	}
	r.last = page
	r.pages++
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
// page that could be among them becomes dirty in every DirtyLog, so migration resends it. A
// vCPU's ring holds only what that vCPU wrote, and its program writes only its record and
// region; for the machine (the bitmap, a failed reset) that is all of memory.
func (r *reaper) failSafeLocked(cpu int, err error) {
	n := r.failSafes.Add(1)
	what, marked := "of the machine", "all guest memory"
	if cpu >= 0 {
		what, marked = fmt.Sprintf("of vCPU %d", cpu), fmt.Sprintf("the memory vCPU %d writes", cpu)
	}
	if n&(n-1) == 0 { // a broken ring can repeat this at a high rate: log 1, 2, 4, 8... times
		r.m.logf("dirty tracking %s inconsistent (%v): marking %s dirty (%d times so far)", what, err, marked, n)
	}
	for _, d := range r.logs {
		if cpu < 0 {
			d.setAll()
			continue
		}
		for _, rg := range r.m.lay.writable(cpu) {
			d.setRange(rg.start/PageSize, (rg.start+rg.size+PageSize-1)/PageSize)
		}
	}
}

var errRingOverrun = errors.New("every entry of the ring was dirty: KVM may have overwritten some")

// Harvest runs one synchronous pass over every ring (or the dirty bitmap), serialised with the
// collections.
func (m *Machine) Harvest() { m.rp.syncRings() }

// DirtyFailSafes counts the times dirty tracking was found inconsistent and every page it may
// have lost was marked dirty instead.
func (m *Machine) DirtyFailSafes() uint64 { return m.rp.failSafes.Load() }

// DirtyLog is one consumer's view of dirtied pages (migration's bitmap): it accumulates the
// pages dirtied from its creation on, independently of every other view.
type DirtyLog struct {
	r      *reaper
	bits   []uint64 // under r.mu
	starts uint64   // the machine's starts when the view opened, ^0 if its vCPUs ran then
}

// NewDirtyLog opens a view that collects the pages dirtied from now on.
func (m *Machine) NewDirtyLog() *DirtyLog {
	m.mu.Lock()
	starts := m.starts
	if m.run {
		starts = ^uint64(0)
	}
	m.mu.Unlock()
	r := m.rp
	r.syncRings() // what was dirtied before belongs to the views already open
	r.mu.Lock()
	defer r.mu.Unlock()
	d := &DirtyLog{r: r, bits: make([]uint64, (m.pages+63)/64), starts: starts}
	r.logs = append(r.logs, d)
	return d
}

// Quiet reports that no vCPU has run since the view opened, so no page can have been
// dirtied whatever the rings say: a consumer that checks memory against the log may skip it.
func (d *DirtyLog) Quiet() bool {
	m := d.r.m
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.run && m.starts == d.starts
}

// Sync harvests, then ORs the pages the view accumulated into dst (one bit per page, page 0
// in bit 0 of dst[0]), clears the view and returns how many bits of dst it newly set.
func (d *DirtyLog) Sync(dst []uint64) int {
	r := d.r
	r.syncRings()
	r.mu.Lock()
	defer r.mu.Unlock()
	if d.bits == nil || r.closed { // after Close, with memory gone, there is nothing to send
		return 0
	}
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

// setRange marks pages [lo, hi) dirty.
func (d *DirtyLog) setRange(lo, hi uint64) {
	for p := lo; p < hi && p < d.r.m.pages; p++ {
		d.bits[p/64] |= 1 << (p % 64)
	}
}

func (d *DirtyLog) setAll() {
	for i := range d.bits {
		d.bits[i] = ^uint64(0)
	}
	if tail := d.r.m.pages % 64; tail != 0 {
		d.bits[len(d.bits)-1] = 1<<tail - 1
	}
}

// DirtyPages is the number of pages harvested from cpu's ring so far, a page written twice in a
// row counted once (0 without a ring).
func (m *Machine) DirtyPages(cpu int) uint64 { return m.cpus[cpu].dirty.Load() }
