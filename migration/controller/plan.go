package controller

import (
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// Policy is what the user allows the controller to do.
type Policy string

const (
	PolicyAuto         Policy = "auto"          // precopy, else dirty limit, else auto-converge
	PolicyPrecopy      Policy = "precopy"       // never throttle
	PolicyAutoConverge Policy = "auto-converge" // QEMU's CPU throttle on every vCPU
	PolicyDirtyLimit   Policy = "dirty-limit"   // a dirty limit on the dirtying vCPUs (needs a ring)
)

// ParsePolicy reads a -policy value.
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case PolicyAuto, PolicyPrecopy, PolicyAutoConverge, PolicyDirtyLimit:
		return p, nil
	}
	return "", fmt.Errorf("unknown policy %q (auto, precopy, auto-converge or dirty-limit)", s)
}

// Strategy is what a plan does.
type Strategy string

const (
	StrategyPrecopy      Strategy = "precopy"
	StrategyDirtyLimit   Strategy = "dirty-limit"
	StrategyAutoConverge Strategy = "auto-converge"
)

// Offer is what the source offers, as Probe found it.
type Offer struct {
	Capabilities map[string]bool `json:"capabilities"` // offered capabilities and their state
	Ring         bool            `json:"dirty-ring"`
	DirtyLimit   bool            `json:"dirty-limit"` // set-vcpu-dirty-limit is accepted
	VCPUs        int             `json:"vcpus"`
	Memory       uint64          `json:"memory"` // bytes
	Workload     bool            `json:"x-query-workload"`
}

// Rates is a measured dirty rate, in MB/s as QEMU counts them (MiB per second).
type Rates struct {
	Mode  string     `json:"mode"` // the calc-dirty-rate mode used
	Total uint64     `json:"dirty-rate"`
	VCPU  []VCPURate `json:"vcpu-dirty-rate,omitempty"` // dirty-ring mode only
}

// VCPURate is one vCPU's dirty rate (MB/s), or its dirty limit in a plan.
type VCPURate struct {
	CPU  int    `json:"id"`
	Rate uint64 `json:"dirty-rate"`
}

// Plan is what the controller decided before migrate.
type Plan struct {
	Strategy  Strategy `json:"strategy"`
	Reason    string   `json:"reason"`
	Bandwidth uint64   `json:"max-bandwidth"` // bytes/s
	// Limits are the per-vCPU dirty limits (MB/s) of the dirty-limit strategy.
	Limits []VCPURate `json:"limits,omitempty"`
	// ThrottleInitial and ThrottleIncrement are auto-converge's cpu-throttle-initial and
	// cpu-throttle-increment (percent).
	ThrottleInitial   int64 `json:"cpu-throttle-initial,omitempty"`
	ThrottleIncrement int64 `json:"cpu-throttle-increment,omitempty"`
	// Fallback are the dirty limits to put on if precopy stalls after all (auto policy, ring).
	Fallback []VCPURate `json:"fallback-limits,omitempty"`
	// The prediction, with the planned dirty rate: passes (0: it does not converge) and time.
	PredictedDirtyRate uint64        `json:"predicted-dirty-rate"`
	PredictedPasses    int           `json:"predicted-passes"`
	PredictedTime      time.Duration `json:"predicted-time-ns"`
}

// Planning constants.
const (
	// maxConvergePasses is how many passes precopy may take and still count as converging.
	maxConvergePasses = 6
	// safetyFactor scales the measured rate for the convergence test: a short calc-dirty-rate
	// misses what the guest dirties while a migration runs beside it.
	safetyFactor = 2
	// targetRatio is the share of the bandwidth the throttled guest may dirty: each pass then
	// leaves a quarter of the last one to send.
	targetRatio = 0.25
	// writerShare: a vCPU dirtying less than this share of the total (or under 1 MB/s) is a
	// reader and is never limited.
	writerShare = 0.05
	// QEMU's bounds for cpu-throttle-initial, and the increment the controller uses.
	throttleMin, throttleMax, throttleIncrement = 1, 99, 10
)

// Predict runs the precopy model: the first pass sends all of memory, each later one what the
// guest dirtied (dirty bytes/s, at most memory) while the last pass was sent, until what is
// left fits in bandwidth × downtime. It returns the passes and the time, or 0 passes when it
// does not converge within maxConvergePasses.
func Predict(memory, bandwidth, dirty uint64, downtime time.Duration) (int, time.Duration) {
	if bandwidth == 0 {
		return 0, 0
	}
	b := float64(bandwidth)
	threshold := b * downtime.Seconds()
	left := float64(memory)
	var secs float64
	for pass := 1; pass <= maxConvergePasses; pass++ {
		t := left / b
		secs += t
		left = math.Min(float64(dirty)*t, float64(memory))
		if left <= threshold {
			return pass + 1, time.Duration((secs + left/b) * float64(time.Second))
		}
	}
	return 0, 0
}

// MakePlan decides the strategy from what the source offers, its measured dirty rates, the
// bandwidth (bytes/s) and the downtime. It fails only where the policy asks for what the
// source cannot do.
func MakePlan(policy Policy, offer Offer, rates Rates, bandwidth uint64, downtime time.Duration) (Plan, error) {
	p := Plan{Strategy: StrategyPrecopy, Bandwidth: bandwidth, PredictedDirtyRate: rates.Total}
	dirty := rates.Total << 20
	p.PredictedPasses, p.PredictedTime = Predict(offer.Memory, bandwidth, dirty, downtime)
	converges := p.PredictedPasses > 0
	if n, _ := Predict(offer.Memory, bandwidth, dirty*safetyFactor, downtime); n == 0 {
		converges = false
	}
	rateText := fmt.Sprintf("the guest dirties %d MB/s (%s) against %s", rates.Total, rates.Mode, FormatRate(float64(bandwidth)))

	switch policy {
	case PolicyPrecopy:
		p.Reason = "policy precopy"
		if !converges {
			p.Reason += "; " + rateText + ": precopy is not predicted to converge"
		}
		return p, nil
	case PolicyAuto:
		if converges {
			p.Reason = rateText + ": precopy converges"
			if offer.Ring && offer.DirtyLimit {
				if dl, _ := planDirtyLimit(p, offer, rates, bandwidth, downtime, ""); dl.Strategy == StrategyDirtyLimit {
					p.Fallback = dl.Limits
					p.Reason += "; at a stall, a dirty limit on the vCPUs that dirty"
				}
			}
			return p, nil
		}
		if offer.Ring && offer.DirtyLimit {
			return planDirtyLimit(p, offer, rates, bandwidth, downtime, rateText+": precopy does not converge")
		}
		why := "no dirty ring"
		if offer.Ring {
			why = "set-vcpu-dirty-limit refused"
		}
		return planAutoConverge(p, offer, rates, bandwidth, downtime, rateText+": precopy does not converge, "+why)
	case PolicyDirtyLimit:
		if !offer.Ring {
			return p, fmt.Errorf("policy dirty-limit: the source has no dirty ring (start it with -accel kvm,dirty-ring-size=N)")
		}
		if !offer.DirtyLimit {
			return p, fmt.Errorf("policy dirty-limit: the source refuses set-vcpu-dirty-limit")
		}
		return planDirtyLimit(p, offer, rates, bandwidth, downtime, "policy dirty-limit; "+rateText)
	case PolicyAutoConverge:
		if _, ok := offer.Capabilities["auto-converge"]; !ok {
			return p, fmt.Errorf("policy auto-converge: the source has no auto-converge capability")
		}
		return planAutoConverge(p, offer, rates, bandwidth, downtime, "policy auto-converge; "+rateText)
	}
	return p, fmt.Errorf("unknown policy %q", policy)
}

// planDirtyLimit limits each writer in proportion to its rate so that all vCPUs together
// dirty at most targetRatio of the bandwidth; readers keep their speed.
func planDirtyLimit(p Plan, offer Offer, rates Rates, bandwidth uint64, downtime time.Duration, why string) (Plan, error) {
	p.Strategy = StrategyDirtyLimit
	budget := uint64(float64(bandwidth) * targetRatio / (1 << 20)) // MB/s
	var writers []VCPURate
	var writersSum, others uint64
	for _, v := range rates.VCPU {
		if v.Rate >= 1 && float64(v.Rate) >= writerShare*float64(rates.Total) {
			writers = append(writers, v)
			writersSum += v.Rate
		} else {
			others += v.Rate
		}
	}
	if len(writers) == 0 {
		// No per-vCPU picture (or nothing dirties): precopy is all there is to do.
		p.Strategy = StrategyPrecopy
		p.Reason = why + "; but no vCPU dirties on its own: precopy"
		return p, nil
	}
	left := uint64(len(writers)) // at least 1 MB/s each: QEMU's smallest limit
	if budget > others+left {
		left = budget - others
	}
	planned := others
	for _, w := range writers {
		l := max(1, uint64(float64(left)*float64(w.Rate)/float64(writersSum)))
		l = min(l, w.Rate)
		p.Limits = append(p.Limits, VCPURate{CPU: w.CPU, Rate: l})
		planned += l
	}
	sort.Slice(p.Limits, func(i, j int) bool { return p.Limits[i].CPU < p.Limits[j].CPU })
	p.PredictedDirtyRate = planned
	p.PredictedPasses, p.PredictedTime = Predict(offer.Memory, bandwidth, planned<<20, downtime)
	var names []string
	for _, l := range p.Limits {
		names = append(names, fmt.Sprintf("vCPU %d %d MB/s", l.CPU, l.Rate))
	}
	p.Reason = fmt.Sprintf("%s; dirty limit %s (the others untouched) so that %d MB/s fits %s",
		why, strings.Join(names, ", "), planned, FormatRate(float64(bandwidth)))
	return p, nil
}

// planAutoConverge starts the throttle where the measured rate needs it: running the vCPUs
// (100-p)% of the time must bring the rate to targetRatio of the bandwidth.
func planAutoConverge(p Plan, offer Offer, rates Rates, bandwidth uint64, downtime time.Duration, why string) (Plan, error) {
	p.Strategy = StrategyAutoConverge
	target := float64(bandwidth) * targetRatio
	need := 0.0
	if d := float64(rates.Total << 20); d > target {
		need = 1 - target/d
	}
	p.ThrottleInitial = min(throttleMax, max(throttleMin, int64(math.Ceil(need*100))))
	p.ThrottleIncrement = throttleIncrement
	p.PredictedDirtyRate = uint64(float64(rates.Total) * float64(100-p.ThrottleInitial) / 100)
	p.PredictedPasses, p.PredictedTime = Predict(offer.Memory, bandwidth, p.PredictedDirtyRate<<20, downtime)
	p.Reason = fmt.Sprintf("%s; auto-converge from a %d%% throttle (+%d%%)", why, p.ThrottleInitial, p.ThrottleIncrement)
	return p, nil
}

// FormatRate prints bytes/s with a binary unit.
func FormatRate(bps float64) string { return FormatBytes(bps) + "/s" }

// FormatBytes prints a byte count with a binary unit.
func FormatBytes(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	}
	return fmt.Sprintf("%.0f B", b)
}
