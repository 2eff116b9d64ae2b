package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/qmp"
)

// probeRate is the dirty limit (MB/s) that Probe sets to learn whether set-vcpu-dirty-limit
// works: high enough to hold back no guest.
const probeRate = 1 << 20

// Probe learns what ep offers. It measures nothing and leaves ep as it found it.
func Probe(ctx context.Context, ep *qmp.Client) (Offer, error) {
	var o Offer
	var caps []capability
	if err := ep.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return o, fmt.Errorf("query-migrate-capabilities: %w", err)
	}
	o.Capabilities = make(map[string]bool, len(caps))
	for _, c := range caps {
		o.Capabilities[c.Capability] = c.State
	}
	var cpus []struct {
		CPUIndex int `json:"cpu-index"`
	}
	if err := ep.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return o, fmt.Errorf("query-cpus-fast: %w", err)
	}
	o.VCPUs = len(cpus)
	var mem struct {
		BaseMemory uint64 `json:"base-memory"`
	}
	if err := ep.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
		return o, fmt.Errorf("query-memory-size-summary: %w", err)
	}
	o.Memory = mem.BaseMemory
	var cmds []struct {
		Name string `json:"name"`
	}
	if err := ep.Execute(ctx, "query-commands", nil, &cmds); err != nil {
		return o, fmt.Errorf("query-commands: %w", err)
	}
	has := func(name string) bool {
		return slices.ContainsFunc(cmds, func(c struct {
			Name string `json:"name"`
		}) bool {
			return c.Name == name
		})
	}
	o.Workload = has("x-query-workload")
	var kvm struct {
		Enabled bool `json:"enabled"`
	}
	if has("query-kvm") {
		if err := ep.Execute(ctx, "query-kvm", nil, &kvm); err != nil {
			return o, fmt.Errorf("query-kvm: %w", err)
		}
	}
	// A ring exists where calc-dirty-rate accepts dirty-ring mode (QEMU refuses it with
	// "mode dirty-ring is not enabled" otherwise); the shortest measurement QEMU allows.
	if has("calc-dirty-rate") {
		ring, err := startCalc(ctx, ep, "dirty-ring", 50*time.Millisecond)
		if err != nil {
			return o, err
		}
		if ring {
			if _, err := waitCalc(ctx, ep); err != nil {
				return o, err
			}
		}
		o.Ring = ring
	}
	if o.Ring && has("set-vcpu-dirty-limit") {
		ok, err := probeDirtyLimit(ctx, ep)
		if err != nil {
			return o, err
		}
		o.DirtyLimit = ok
	}
	return o, nil
}

// probeDirtyLimit sets a limit on vCPU 0 and takes it back: the user's own limit if there is
// one (setting it again changes nothing), a limit that holds nothing back otherwise.
func probeDirtyLimit(ctx context.Context, ep *qmp.Client) (bool, error) {
	user, err := queryLimits(ctx, ep)
	if err != nil {
		return false, err
	}
	rate, had := user[0]
	if !had {
		rate = probeRate
	}
	err = ep.Execute(ctx, "set-vcpu-dirty-limit", map[string]any{"cpu-index": 0, "dirty-rate": rate}, nil)
	var qe *qerr.Error
	if errors.As(err, &qe) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !had {
		if err := ep.Execute(ctx, "cancel-vcpu-dirty-limit", map[string]any{"cpu-index": 0}, nil); err != nil {
			return false, fmt.Errorf("cancel-vcpu-dirty-limit after the probe: %w", err)
		}
	}
	return true, nil
}

// queryLimits is query-vcpu-dirty-limit as vCPU → limit (MB/s).
func queryLimits(ctx context.Context, ep *qmp.Client) (map[int]uint64, error) {
	var ls []vcpuLimit
	if err := ep.Execute(ctx, "query-vcpu-dirty-limit", nil, &ls); err != nil {
		return nil, fmt.Errorf("query-vcpu-dirty-limit: %w", err)
	}
	out := make(map[int]uint64, len(ls))
	for _, l := range ls {
		out[l.CPU] = l.LimitRate
	}
	return out, nil
}

// startCalc starts calc-dirty-rate in mode for d. It reports false when the endpoint refuses
// the mode; a measurement already running is waited for first.
func startCalc(ctx context.Context, ep *qmp.Client, mode string, d time.Duration) (bool, error) {
	args := map[string]any{"calc-time": d.Milliseconds(), "calc-time-unit": "millisecond", "mode": mode}
	for {
		err := ep.Execute(ctx, "calc-dirty-rate", args, nil)
		var qe *qerr.Error
		if errors.As(err, &qe) && qe.Desc == "the dirty rate is already being measured." {
			if _, err := waitCalc(ctx, ep); err != nil {
				return false, err
			}
			continue
		}
		if errors.As(err, &qe) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("calc-dirty-rate: %w", err)
		}
		return true, nil
	}
}

// waitCalc polls query-dirty-rate until the measurement is done.
func waitCalc(ctx context.Context, ep *qmp.Client) (dirtyRateInfo, error) {
	for {
		var info dirtyRateInfo
		if err := ep.Execute(ctx, "query-dirty-rate", nil, &info); err != nil {
			return info, fmt.Errorf("query-dirty-rate: %w", err)
		}
		if info.Status != "measuring" {
			return info, nil
		}
		select {
		case <-ctx.Done():
			return info, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Measure measures ep's dirty rate over d: per vCPU where it has a ring, else the whole
// guest's (dirty-bitmap mode, or page-sampling where that is refused too).
func Measure(ctx context.Context, ep *qmp.Client, ring bool, d time.Duration) (Rates, error) {
	modes := []string{"dirty-bitmap", "page-sampling"}
	if ring {
		modes = append([]string{"dirty-ring"}, modes...)
	}
	for _, mode := range modes {
		ok, err := startCalc(ctx, ep, mode, d)
		if err != nil {
			return Rates{}, err
		}
		if !ok {
			continue
		}
		info, err := waitCalc(ctx, ep)
		if err != nil {
			return Rates{}, err
		}
		if info.DirtyRate == nil {
			return Rates{}, fmt.Errorf("calc-dirty-rate (%s) measured nothing: status %s", mode, info.Status)
		}
		r := Rates{Mode: mode, Total: uint64(max(0, *info.DirtyRate))}
		for _, v := range info.VCPU {
			r.VCPU = append(r.VCPU, VCPURate{CPU: v.ID, Rate: uint64(max(0, v.DirtyRate))})
		}
		return r, nil
	}
	return Rates{}, errors.New("calc-dirty-rate is refused in every mode")
}
