package controller

import (
	"fmt"
	"time"
)

// TimeoutAction is what happens at the completion timeout.
type TimeoutAction string

const (
	TimeoutAbort TimeoutAction = "abort" // migrate_cancel
	TimeoutPause TimeoutAction = "pause" // stop the source guest so that the migration completes
)

// ParseTimeoutAction reads an -on-timeout value.
func ParseTimeoutAction(s string) (TimeoutAction, error) {
	switch a := TimeoutAction(s); a {
	case TimeoutAbort, TimeoutPause:
		return a, nil
	}
	return "", fmt.Errorf("unknown timeout action %q (abort or pause)", s)
}

// Sample is one look at the running migration.
type Sample struct {
	Elapsed time.Duration `json:"elapsed-ns"` // since migrate
	MigrationInfo
	// LimitTotal is the sum of the dirty limits the controller holds (MB/s), 0 for none.
	LimitTotal uint64 `json:"limit-total,omitempty"`
	// Workload is x-query-workload on the source, where it exists.
	Workload []WorkloadStat `json:"workload,omitempty"`
}

// DowntimeStep is one of Nova's downtime steps: from After on, the downtime limit is Downtime.
type DowntimeStep struct {
	After    time.Duration
	Downtime time.Duration
}

// DowntimeSteps is Nova's schedule: steps+1 limits rising evenly from downtime/steps to
// downtime, one every delayPerGiB × the guest's GiB.
func DowntimeSteps(downtime time.Duration, steps int, delayPerGiB time.Duration, memory uint64) []DowntimeStep {
	if steps < 1 {
		return []DowntimeStep{{0, downtime}}
	}
	delay := time.Duration(float64(delayPerGiB) * float64(memory) / (1 << 30))
	base := downtime / time.Duration(steps)
	offset := (downtime - base) / time.Duration(steps)
	out := make([]DowntimeStep, steps+1)
	for i := range out {
		out[i] = DowntimeStep{After: delay * time.Duration(i), Downtime: base + offset*time.Duration(i)}
	}
	out[steps].Downtime = downtime // no rounding short of the goal
	return out
}

// Decision is something the Escalator wants done.
type Decision struct {
	Kind     string        // "set-downtime", "tighten-limit", "stall", "abort", "pause"
	Reason   string        //
	Downtime time.Duration // set-downtime
	Limits   []VCPURate    // tighten-limit: the new limits
}

// EscalatorConfig is what the Escalator watches for.
type EscalatorConfig struct {
	Steps             []DowntimeStep
	ProgressTimeout   time.Duration // 0: no stall detection
	CompletionTimeout time.Duration // 0: none
	OnTimeout         TimeoutAction
	Limits            []VCPURate // the plan's dirty limits; nil when there are none
	// Fallback are dirty limits to put on at the first stall when there are none yet.
	Fallback []VCPURate
}

// Escalator turns a migration's samples into decisions. It is pure: the same samples give the
// same decisions, whatever the clock says.
type Escalator struct {
	cfg          EscalatorConfig
	step         int // next downtime step to take
	lowest       uint64
	lastProgress time.Duration
	seen         bool
	timedOut     bool
	stallSaid    bool
}

// NewEscalator starts watching; the first downtime step is taken by the first sample.
func NewEscalator(cfg EscalatorConfig) *Escalator {
	cfg.Limits = append([]VCPURate(nil), cfg.Limits...)
	return &Escalator{cfg: cfg}
}

// Limits are the dirty limits as they stand.
func (e *Escalator) Limits() []VCPURate { return e.cfg.Limits }

// Observe takes one sample and returns what to do now.
func (e *Escalator) Observe(s Sample) []Decision {
	var out []Decision
	if Terminal(s.Status) {
		return nil
	}
	for e.step < len(e.cfg.Steps) && s.Elapsed >= e.cfg.Steps[e.step].After {
		st := e.cfg.Steps[e.step]
		e.step++
		// Take only the latest step that is due: a late sample skips the ones in between.
		if e.step < len(e.cfg.Steps) && s.Elapsed >= e.cfg.Steps[e.step].After {
			continue
		}
		out = append(out, Decision{Kind: "set-downtime", Downtime: st.Downtime,
			Reason: fmt.Sprintf("downtime step %d of %d at %s", e.step, len(e.cfg.Steps), st.After.Round(time.Millisecond))})
	}
	if s.Status != "active" {
		return out // setup has no byte counts yet; device and later are past help
	}
	if c := e.cfg.CompletionTimeout; c > 0 && s.Elapsed > c && !e.timedOut {
		e.timedOut = true
		kind := "abort"
		if e.cfg.OnTimeout == TimeoutPause {
			kind = "pause"
		}
		out = append(out, Decision{Kind: kind, Reason: fmt.Sprintf("not completed after the completion timeout of %s", c.Round(time.Millisecond))})
		return out
	}
	// KubeVirt's progress: the lowest remaining seen so far; no new low for the progress
	// timeout is a stall.
	rem := s.RAM.Remaining
	if !e.seen || rem < e.lowest {
		e.seen, e.lowest, e.lastProgress = true, rem, s.Elapsed
		return out
	}
	if e.cfg.ProgressTimeout == 0 || s.Elapsed-e.lastProgress <= e.cfg.ProgressTimeout {
		return out
	}
	why := fmt.Sprintf("stall: remaining has not gone below %s for %s (pass %d)",
		FormatBytes(float64(e.lowest)), (s.Elapsed - e.lastProgress).Round(time.Millisecond), s.RAM.DirtySyncCount)
	// Start a new progress window from here either way.
	e.lowest, e.lastProgress = rem, s.Elapsed
	if len(e.cfg.Limits) == 0 && len(e.cfg.Fallback) > 0 {
		e.cfg.Limits, e.cfg.Fallback = e.cfg.Fallback, nil
		return append(out, Decision{Kind: "tighten-limit", Limits: e.cfg.Limits, Reason: why + "; putting the dirty limit on the vCPUs that dirty"})
	}
	tighter, changed := halve(e.cfg.Limits)
	if !changed {
		if !e.stallSaid {
			e.stallSaid = true
			out = append(out, Decision{Kind: "stall", Reason: why + "; no dirty limit left to tighten"})
		}
		return out
	}
	e.cfg.Limits = tighter
	out = append(out, Decision{Kind: "tighten-limit", Limits: tighter, Reason: why + "; halving the dirty limits"})
	return out
}

// halve halves every limit down to QEMU's smallest, 1 MB/s.
func halve(limits []VCPURate) ([]VCPURate, bool) {
	out := make([]VCPURate, len(limits))
	changed := false
	for i, l := range limits {
		out[i] = VCPURate{CPU: l.CPU, Rate: max(1, l.Rate/2)}
		changed = changed || out[i].Rate != l.Rate
	}
	return out, changed
}
