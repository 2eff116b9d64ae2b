package dirtylimit

import (
	"sync"
	"time"
)

// Machine is what the dirty limit and the dirty-rate meter need of a machine; *vmm.Machine
// satisfies it.
type Machine interface {
	NumCPUs() int
	RingSize() int                 // dirty-ring entries per vCPU, 0 = no ring
	DirtyPages(cpu int) uint64     // cumulative pages harvested from cpu's ring; safe from any goroutine
	Harvest()                      // one synchronous reaper pass
	KVM() bool                     // informational: the limit needs a ring, not KVM (see Set)
	Memory() []byte                // guest RAM, for page sampling
	SetRingFullHook(func(cpu int)) // h runs on the vCPU's thread at each ring-full event
}

// Options configure a Limiter or a Meter; the zero value is migvisor's algorithm on real time.
type Options struct {
	Algorithm Algorithm
	Clock     Clock // nil: real time
	// NewDirtyLog, when set, gives calc-dirty-rate's dirty-bitmap mode its own view of the pages
	// dirtied (on a machine without a ring). Adapt *vmm.Machine with
	// func() dirtylimit.DirtyLog { return m.NewDirtyLog() }.
	NewDirtyLog func() DirtyLog
}

func (o Options) clock() Clock {
	if o.Clock == nil {
		return realClock{}
	}
	return o.Clock
}

// Info is one entry of query-vcpu-dirty-limit (QEMU's DirtyLimitInfo).
type Info struct {
	CPUIndex    int64  `json:"cpu-index"`
	LimitRate   uint64 `json:"limit-rate"`   // MB/s (MiB/s, as QEMU counts)
	CurrentRate uint64 `json:"current-rate"` // MB/s over the last period
}

type vcpu struct {
	enabled bool
	quota   uint64 // MiB/s
	rate    uint64 // MiB/s over the last period
	// penaltyUS is the sleep per ring-full: QEMU's throttle_us_per_full; with Migvisor the mean
	// sleep per ring-full over the last period that had one (for query-migrate).
	penaltyUS int64

	// Migvisor's pacing, touched by the vCPU's thread at each ring-full.
	release   time.Time
	pagesMark uint64
	sleptUS   int64
	rings     int64
}

// Limiter is the per-vCPU dirty page rate limit (set/cancel/query-vcpu-dirty-limit and the
// dirty-limit migration capability).
type Limiter struct {
	m   Machine
	alg Algorithm
	clk Clock

	mu        sync.Mutex
	cpus      []vcpu
	userQuota []uint64 // set-vcpu-dirty-limit's quota per vCPU, MiB/s (0: none)
	migQuota  uint64   // the migration's quota for every vCPU (0: none)
	limited   int
	migrating bool          // a dirty-limit migration runs: user Set/Cancel are refused
	period    time.Duration // the measurement period
	maxRate   uint64        // QEMU's high-water mark of measured rates (never reset)
	wake      chan struct{} // closed to cut every penalty short
	stop      chan struct{} // non-nil while in service: closed to end the loop
	done      chan struct{} // closed by the loop when it has ended
	closed    bool
}

// NewLimiter returns the dirty limit of m, out of service, and installs its ring-full hook
// (RingFull) on m.
func NewLimiter(m Machine, opt Options) *Limiter {
	l := &Limiter{
		m:         m,
		alg:       opt.Algorithm,
		clk:       opt.clock(),
		cpus:      make([]vcpu, m.NumCPUs()),
		userQuota: make([]uint64, m.NumCPUs()),
		period:    defaultPeriod,
		wake:      make(chan struct{}),
	}
	m.SetRingFullHook(l.RingFull)
	if fp, ok := m.(ringFullPager); ok {
		// QEMU's algorithm sleeps once per full ring; migvisor's paces every pacePages, so a
		// quota is held within a period even when it is a fraction of a ring per second.
		n := 0
		if l.alg == Migvisor {
			n = pacePages
		}
		fp.SetRingFullPages(n)
	}
	return l
}

// ringFullPager is a machine whose ring-full events can come more often than once a ring
// (*vmm.Machine): SetRingFullPages(0) means once a ring.
type ringFullPager interface{ SetRingFullPages(n int) }

// pacePages is how often migvisor's algorithm paces a limited vCPU: every MiB it dirties.
const pacePages = 256

// Algorithm reports the algorithm in use.
func (l *Limiter) Algorithm() Algorithm { return l.alg }

func (l *Limiter) validIndex(i int64) bool { return i >= 0 && i < int64(len(l.cpus)) }

// Set is set-vcpu-dirty-limit: limit one vCPU (cpuIndex non-nil) or all to rate MiB/s; rate 0
// cancels. QEMU demands KVM with a dirty ring; migvisor's software backend has a ring too, so only
// a machine without a ring is refused, with QEMU's text.
func (l *Limiter) Set(cpuIndex *int64, rate uint64) error { return l.set(cpuIndex, rate, false) }

// Cancel is cancel-vcpu-dirty-limit. Without a ring it does nothing, as QEMU.
func (l *Limiter) Cancel(cpuIndex *int64) error { return l.cancel(cpuIndex, false) }

// SetAll is the migration thread's set: every vCPU is held to at most rate (0 lifts it), over
// whatever the user set, and a running migration does not refuse it. A vCPU the user limited
// more tightly keeps the user's quota.
func (l *Limiter) SetAll(rate uint64) error { return l.set(nil, rate, true) }

// CancelAll lifts the migration's limit: every vCPU is back to what the user set, if anything.
func (l *Limiter) CancelAll() { l.cancel(nil, true) }

func (l *Limiter) set(cpuIndex *int64, rate uint64, migration bool) error {
	if l.m.RingSize() == 0 {
		return generic(descNoRing)
	}
	if cpuIndex != nil && !l.validIndex(*cpuIndex) {
		return generic(descCPUIndex)
	}
	if rate == 0 {
		l.mu.Lock()
		refused := !migration && l.refusedLocked()
		l.mu.Unlock()
		if refused {
			return generic(descSetMigrating)
		}
		return l.cancel(cpuIndex, migration)
	}
	l.mu.Lock()
	if !migration && l.refusedLocked() {
		l.mu.Unlock()
		return generic(descSetMigrating)
	}
	if l.closed {
		l.mu.Unlock()
		return generic(descClosed)
	}
	l.setQuotaLocked(cpuIndex, rate, migration)
	done := l.applyLocked()
	l.mu.Unlock()
	if done != nil {
		<-done
	}
	return nil
}

func (l *Limiter) cancel(cpuIndex *int64, migration bool) error {
	if l.m.RingSize() == 0 {
		return nil
	}
	if cpuIndex != nil && !l.validIndex(*cpuIndex) {
		return generic(descCPUIndex)
	}
	l.mu.Lock()
	if !migration && l.refusedLocked() {
		l.mu.Unlock()
		return generic(descCancelMigrating)
	}
	l.setQuotaLocked(cpuIndex, 0, migration)
	done := l.applyLocked()
	l.wakeLocked()
	l.mu.Unlock()
	if done != nil {
		<-done
	}
	return nil
}

// setQuotaLocked records a quota (0: none) of the user's, for one vCPU or all, or the migration's.
func (l *Limiter) setQuotaLocked(cpuIndex *int64, rate uint64, migration bool) {
	switch {
	case migration:
		l.migQuota = rate
	case cpuIndex != nil:
		l.userQuota[*cpuIndex] = rate
	default:
		for i := range l.userQuota {
			l.userQuota[i] = rate
		}
	}
}

// applyLocked makes every vCPU's limit the tighter of the user's and the migration's quotas,
// putting the limiter in or out of service as needed. It returns a channel to wait on, outside
// the lock, when the loop is being stopped.
func (l *Limiter) applyLocked() chan struct{} {
	quota := func(i int) uint64 {
		u, m := l.userQuota[i], l.migQuota
		if u == 0 || (m != 0 && m < u) {
			return m
		}
		return u
	}
	limit := false
	for i := range l.cpus {
		limit = limit || quota(i) != 0
	}
	if limit && l.stop == nil {
		l.startLocked()
	}
	for i := range l.cpus {
		if q := quota(i); q != 0 {
			l.enableLocked(i, q)
		} else {
			l.disableLocked(i)
		}
	}
	if l.limited == 0 && l.stop != nil {
		return l.stopLocked()
	}
	return nil
}

// refusedLocked is QEMU's !dirtylimit_is_allowed() for a caller that is not the migration.
func (l *Limiter) refusedLocked() bool { return l.migrating && l.stop != nil }

func (l *Limiter) enableLocked(i int, quota uint64) {
	v := &l.cpus[i]
	if v.enabled && v.quota == quota {
		return
	}
	if !v.enabled {
		l.limited++
	}
	// Pacing starts afresh: the pages dirtied before this limit are not charged to it.
	v.enabled, v.quota = true, quota
	v.release, v.pagesMark = l.clk.Now(), l.m.DirtyPages(i)
	l.wakeLocked()
}

func (l *Limiter) disableLocked(i int) {
	v := &l.cpus[i]
	if v.enabled {
		l.limited--
	}
	// QEMU keeps a cancelled vCPU's throttle_us_per_full (and shows it in query-migrate); a
	// cancelled limit leaves nothing here.
	*v = vcpu{rate: v.rate}
}

// startLocked puts the limiter in service: current rates read 0 until the first period ends.
func (l *Limiter) startLocked() {
	for i := range l.cpus {
		l.cpus[i] = vcpu{}
	}
	l.stop, l.done = make(chan struct{}), make(chan struct{})
	go l.loop(l.stop, l.done)
}

// stopLocked takes the limiter out of service; the caller waits on the returned channel, without
// the lock, for the loop to end.
func (l *Limiter) stopLocked() chan struct{} {
	close(l.stop)
	done := l.done
	l.stop, l.done = nil, nil
	return done
}

func (l *Limiter) wakeLocked() {
	close(l.wake)
	l.wake = make(chan struct{})
}

// loop is QEMU's dirtyrate-stat thread: measure every vCPU over a period, then adjust.
func (l *Limiter) loop(stop, done chan struct{}) {
	defer close(done)
	n := len(l.cpus)
	start, end := make([]uint64, n), make([]uint64, n)
	for {
		l.mu.Lock()
		period := l.period
		l.mu.Unlock()
		t0 := l.clk.Now()
		for i := range start {
			start[i] = l.m.DirtyPages(i)
		}
		t := l.clk.NewTimer(period)
		select {
		case <-stop:
			t.Stop()
			return
		case <-t.C():
		}
		l.m.Harvest()
		ms := l.clk.Now().Sub(t0).Milliseconds()
		for i := range end {
			end[i] = l.m.DirtyPages(i)
		}
		l.endPeriod(stop, start, end, ms)
	}
}

// endPeriod stores the period's rates and, with QEMU's algorithm, adjusts the penalties
// (dirtylimit_process).
func (l *Limiter) endPeriod(stop chan struct{}, start, end []uint64, ms int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stop != stop || ms <= 0 {
		return
	}
	for i := range l.cpus {
		v := &l.cpus[i]
		v.rate = rateMiBps(end[i]-start[i], ms)
		if !v.enabled {
			continue
		}
		switch l.alg {
		case QEMU:
			if withinTolerance(v.quota, v.rate) {
				continue
			}
			if v.rate == 0 {
				v.penaltyUS = 0
				continue
			}
			v.penaltyUS = qemuStep(v.penaltyUS, v.quota, v.rate, l.ringFullTimeLocked(v.rate))
		case Migvisor:
			if v.rings > 0 {
				v.penaltyUS = v.sleptUS / v.rings
				v.sleptUS, v.rings = 0, 0
			}
		}
	}
}

// ringFullTimeLocked is QEMU's dirtylimit_dirty_ring_full_time: it feeds the high-water mark and
// divides by it, so a vCPU once seen fast keeps a short ring-full time for ever.
func (l *Limiter) ringFullTimeLocked(rate uint64) uint64 {
	l.maxRate = max(l.maxRate, rate)
	return ringFullTimeUS(l.m.RingSize(), l.maxRate)
}

// RingFull is the ring-full hook NewLimiter installs: it runs on cpu's thread and sleeps the
// vCPU's penalty, cut short by any change of limits, Wake or Close. A machine that needs another
// hook too can install its own and call this from it.
func (l *Limiter) RingFull(cpu int) {
	d, wake := l.penalty(cpu)
	if d <= 0 {
		return
	}
	t := l.clk.NewTimer(d)
	select {
	case <-t.C():
	case <-wake:
		t.Stop()
	}
}

// penalty decides the sleep of cpu at a ring-full event now.
func (l *Limiter) penalty(cpu int) (time.Duration, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stop == nil || cpu < 0 || cpu >= len(l.cpus) || !l.cpus[cpu].enabled {
		return 0, nil
	}
	v := &l.cpus[cpu]
	if l.alg == QEMU {
		return time.Duration(v.penaltyUS) * time.Microsecond, l.wake
	}
	pages := l.m.DirtyPages(cpu)
	d, release := pace(l.clk.Now(), v.release, pages-v.pagesMark, v.quota)
	v.release, v.pagesMark = release, pages
	v.sleptUS += d.Microseconds()
	v.rings++
	return d, l.wake
}

// Query is query-vcpu-dirty-limit: the limited vCPUs in index order, [] out of service.
func (l *Limiter) Query() []Info {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := []Info{}
	if l.stop == nil {
		return out
	}
	for i, v := range l.cpus {
		if v.enabled {
			out = append(out, Info{CPUIndex: int64(i), LimitRate: v.quota, CurrentRate: v.rate})
		}
	}
	return out
}

// InService reports whether any vCPU is limited (QEMU's dirtylimit_in_service).
func (l *Limiter) InService() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stop != nil
}

// SetMigrationActive tells the limiter whether a migration with the dirty-limit capability is
// running; while it is and the limiter is in service, Set and Cancel are refused.
func (l *Limiter) SetMigrationActive(active bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.migrating = active
}

// SetPeriod sets the measurement period from the next period on (x-vcpu-dirty-limit-period
// during a dirty-limit migration); d <= 0 restores the default 1000 ms.
func (l *Limiter) SetPeriod(d time.Duration) {
	if d <= 0 {
		d = defaultPeriod
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.period = d
}

// ThrottleTimePerRound is query-migrate's dirty-limit-throttle-time-per-round: the largest sleep
// per ring-full over the vCPUs, µs.
func (l *Limiter) ThrottleTimePerRound() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var m int64
	for _, v := range l.cpus {
		m = max(m, v.penaltyUS)
	}
	return uint64(m)
}

// RingFullTime is query-migrate's dirty-limit-ring-full-time: the µs to fill a ring at the mean
// rate of the vCPUs, 0 when they dirty nothing. With QEMU's algorithm it is QEMU's figure, high-water
// mark included (and feeding it); with migvisor's, the mean rate's own.
func (l *Limiter) RingFullTime() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var sum uint64
	for _, v := range l.cpus {
		sum += v.rate
	}
	if sum == 0 || len(l.cpus) == 0 {
		return 0
	}
	avg := sum / uint64(len(l.cpus))
	if l.alg == QEMU {
		return l.ringFullTimeLocked(avg)
	}
	if avg == 0 {
		return 0
	}
	return ringFullTimeUS(l.m.RingSize(), avg)
}

// Wake cuts short every penalty being slept now, without changing any limit: call it before
// pausing the machine so that no vCPU holds the pause up.
func (l *Limiter) Wake() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.wakeLocked()
}

// Close cancels every limit, ends the loop and wakes every sleeping vCPU; later calls to RingFull
// return at once.
func (l *Limiter) Close() error {
	l.mu.Lock()
	l.closed = true
	clear(l.userQuota)
	l.migQuota = 0
	for i := range l.cpus {
		l.disableLocked(i)
	}
	var done chan struct{}
	if l.stop != nil {
		done = l.stopLocked()
	}
	l.wakeLocked()
	l.mu.Unlock()
	if done != nil {
		<-done
	}
	return nil
}
