package migration

import (
	"sync"
	"sync/atomic"
	"time"
)

// throttleSlice is QEMU's CPU_THROTTLE_TIMESLICE: a throttled vCPU runs this long, then
// sleeps p/(1-p) of it.
const throttleSlice = 10 * time.Millisecond

// throttle is auto-converge's CPU throttle. A ticker asks every vCPU to sleep once per
// period; the sleep is served on the vCPU's own thread, in the machine's ring-full hook,
// which Kick makes it run.
type throttle struct {
	mach    Machine
	pct     atomic.Int64
	stop    chan struct{}
	pending []atomic.Bool
	wg      sync.WaitGroup
}

func startThrottle(mach Machine, pct int64) *throttle {
	t := &throttle{mach: mach, stop: make(chan struct{}), pending: make([]atomic.Bool, mach.NumCPUs())}
	t.pct.Store(pct)
	mach.SetRingFullHook(t.hook)
	t.wg.Add(1)
	go t.tick()
	return t
}

func (t *throttle) tick() {
	defer t.wg.Done()
	for {
		p := t.pct.Load()
		period := time.Duration(float64(throttleSlice) / (1 - float64(p)/100))
		select {
		case <-t.stop:
			return
		case <-time.After(period):
		}
		for cpu := range t.pending {
			t.pending[cpu].Store(true)
			t.mach.Kick(cpu)
		}
	}
}

// hook runs on vCPU cpu's thread.
func (t *throttle) hook(cpu int) {
	if cpu < 0 || cpu >= len(t.pending) || !t.pending[cpu].Swap(false) {
		return
	}
	p := float64(t.pct.Load()) / 100
	sleep := time.Duration(p / (1 - p) * float64(throttleSlice))
	timer := time.NewTimer(sleep)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-t.stop: // the throttle ended (or the guest is being stopped): run again at once
	}
}

func (t *throttle) end() {
	close(t.stop)
	t.wg.Wait()
	t.mach.SetRingFullHook(nil)
}

// throttleDown is mig_throttle_guest_down: cpu-throttle-initial the first time, then
// cpu-throttle-increment (or less with tailslow) up to max-cpu-throttle; clamped to 1..99.
func (r *sourceRun) throttleDown(p Parameters, dirtyBytes, threshold int64) {
	var next int64
	if r.throttle == nil {
		next = int64(p.CPUThrottleInitial)
	} else {
		now := r.throttle.pct.Load()
		inc := int64(p.CPUThrottleIncrement)
		if p.CPUThrottleTailslow && dirtyBytes > 0 {
			cpuNow := 100 - now
			cpuIdeal := int64(float64(cpuNow) * (float64(threshold) / float64(dirtyBytes)))
			inc = min(cpuNow-cpuIdeal, inc)
		}
		next = min(now+inc, int64(p.MaxCPUThrottle))
	}
	next = max(1, min(next, 99))
	if r.throttle == nil {
		r.throttle = startThrottle(r.m.cfg.Machine, next)
	} else {
		r.throttle.pct.Store(next)
	}
	r.mu.Lock()
	r.throttlePct = next
	r.mu.Unlock()
}

func (r *sourceRun) stopThrottle() {
	if r.throttle == nil {
		return
	}
	r.throttle.end()
	r.throttle = nil
	r.mu.Lock()
	r.throttlePct = 0
	r.mu.Unlock()
}

// dirtyLimitGuest is migration_dirty_limit_guest: every vCPU is held to vcpu-dirty-limit,
// re-applied when the parameter changed. The limiter layers it over the user's limits (a vCPU
// keeps the tighter of the two), and lifting it at the end gives the user's back as they were,
// where QEMU overwrites them and leaves its own in place.
func (r *sourceRun) dirtyLimitGuest(p Parameters) {
	l := r.m.cfg.Limiter
	if r.dlApplied && r.dlQuota == p.VCPUDirtyLimit {
		return
	}
	if err := l.SetAll(p.VCPUDirtyLimit); err != nil {
		r.m.cfg.Logf("migration: cannot limit the dirty rate: %v", err)
		return
	}
	r.dlApplied, r.dlQuota = true, p.VCPUDirtyLimit
}

// liftLimits undoes what the migration did to the dirty-limit service.
func (r *sourceRun) liftLimits() {
	if !r.dirtyLimit {
		return
	}
	l := r.m.cfg.Limiter
	if r.dlApplied {
		l.CancelAll()
		r.dlApplied = false
	}
	l.SetMigrationActive(false)
	l.SetPeriod(defaultDLPer)
}
