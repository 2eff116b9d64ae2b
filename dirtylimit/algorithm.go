package dirtylimit

import (
	"fmt"
	"math"
	"time"
)

// Algorithm chooses how a limited vCPU's penalty is decided.
type Algorithm int

const (
	// Migvisor paces each ring-full: the vCPU sleeps until the pages it dirtied since its last
	// release, at the quota, would have taken; see pace. The default.
	Migvisor Algorithm = iota
	// QEMU is QEMU 10's dirtylimit_set_throttle, step for step: one penalty per vCPU, adjusted once
	// a period from the measured rate. Kept as the exact reference.
	QEMU
)

func (a Algorithm) String() string {
	switch a {
	case Migvisor:
		return "migvisor"
	case QEMU:
		return "qemu"
	}
	return fmt.Sprintf("Algorithm(%d)", int(a))
}

// ParseAlgorithm reads an option value: "migvisor" or "qemu".
func ParseAlgorithm(s string) (Algorithm, error) {
	switch s {
	case "migvisor":
		return Migvisor, nil
	case "qemu":
		return QEMU, nil
	}
	return 0, fmt.Errorf("unknown dirty-limit algorithm %q (want migvisor or qemu)", s)
}

// QEMU's constants (system/dirtylimit.c).
const (
	toleranceMiBps  = 25 // |quota - current| within this: no adjustment
	linearAdjustPct = 50 // further than this from the quota: proportional step, else a fixed one
	throttlePctMax  = 99 // the penalty never exceeds 99 ring-full times
	pageShiftToMiB  = 8  // 4 KiB pages: pages >> 8 = MiB (qemu_target_pages_to_MiB)
	pageSize        = 4096
	defaultPeriod   = 1000 * time.Millisecond // DIRTYLIMIT_CALC_TIME_MS
	// maxPacedSleep bounds one ring-full's sleep, and so how long a stop of the machine waits for
	// a sleeping vCPU, as QEMU's 99 ring-full times does (1.98 s at 800 MiB/s with 4096 entries).
	// Quotas under one pacing step (pacePages) per maxPacedSleep (0.5 MiB/s) are not reached.
	maxPacedSleep    = 2 * time.Second
	microsPerSecond  = 1_000_000
	millisPerSecond  = 1000
	pagesPerMiB      = 1 << pageShiftToMiB
	defaultSamplePgs = 512
)

// rateMiBps is QEMU 10's per-vCPU rate: qemu_target_pages_to_MiB(pages*1000) / ms, integer
// arithmetic throughout.
func rateMiBps(pages uint64, ms int64) uint64 {
	return ((pages * millisPerSecond) >> pageShiftToMiB) / uint64(ms)
}

// ringFullTimeUS is QEMU's dirtylimit_dirty_ring_full_time without its high-water mark: the µs a
// vCPU dirtying rate MiB/s takes to fill a ring of ringPages, the ring counted in whole MiB.
func ringFullTimeUS(ringPages int, rate uint64) uint64 {
	return (uint64(ringPages) >> pageShiftToMiB) * microsPerSecond / rate
}

// withinTolerance is QEMU's dirtylimit_done.
func withinTolerance(quota, current uint64) bool {
	return max(quota, current)-min(quota, current) <= toleranceMiBps
}

// qemuStep is QEMU's dirtylimit_set_throttle: the new per-ring-full penalty (µs) from the current
// one, the quota and the measured rate (MiB/s), and the ring-full time T (µs) QEMU derives from
// its high-water mark. current must be non-zero (QEMU resets the penalty to 0 before it gets here).
func qemuStep(throttle int64, quota, current, ringFullUS uint64) int64 {
	hi, lo := max(quota, current), min(quota, current)
	if (hi-lo)*100/hi > linearAdjustPct {
		// The step is the extra sleep per ring that would remove pct% of the time: T*pct/(100-pct),
		// computed in floating point and truncated, as QEMU does.
		var pct uint64
		if quota < current {
			pct = (current - quota) * 100 / current
		} else {
			pct = (quota - current) * 100 / quota
		}
		step := int64(uint64(float64(ringFullUS*pct) / float64(100-pct)))
		if quota < current {
			throttle += step
		} else {
			throttle -= step
		}
	} else if quota < current {
		throttle += int64(ringFullUS) / 10
	} else {
		throttle -= int64(ringFullUS) / 10
	}
	throttle = min(throttle, int64(ringFullUS)*throttlePctMax)
	return max(throttle, 0)
}

// pagesAt is how long pages take at quota MiB/s, at most maxPacedSleep.
func pagesAt(pages, quota uint64) time.Duration {
	s := float64(pages) / (float64(quota) * pagesPerMiB)
	if s >= maxPacedSleep.Seconds() {
		return maxPacedSleep
	}
	return time.Duration(math.Ceil(s * float64(time.Second)))
}

// pace is migvisor's decision at a ring-full event at now: the vCPU was released at release
// and has dirtied pages since; it may go on once those pages, at the quota, are paid for. It
// returns the sleep and the new release time. The release time carries over from event to event
// (not the moment the vCPU actually woke), so a sleep that overran, pages counted late, or a wake
// before time are paid back at the next event. A vCPU that falls behind its quota (the host
// stalled it, or its exits cost more than the quota leaves near its top speed) keeps at most
// maxPaceCredit of credit to catch up with, so its mean holds the quota without a burst that
// could break a period; no debt beyond maxPacedSleep is kept.
func pace(now, release time.Time, pages, quota uint64) (time.Duration, time.Time) {
	next := release.Add(pagesAt(pages, quota))
	if earliest := now.Add(-maxPaceCredit); next.Before(earliest) {
		next = earliest
	}
	if !next.After(now) {
		return 0, next
	}
	d := min(next.Sub(now), maxPacedSleep)
	return d, now.Add(d)
}

// maxPaceCredit is how far behind its quota a paced vCPU may be and catch up: at most 5% of a
// 1 s period's worth at the quota.
const maxPaceCredit = 50 * time.Millisecond
