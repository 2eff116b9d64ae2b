package controller

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPredict(t *testing.T) {
	for _, tc := range []struct {
		name          string
		memory, dirty uint64
		bandwidth     uint64
		downtime      time.Duration
		passes        int
		minT, maxT    time.Duration
	}{
		{name: "idle guest: one pass", memory: 512 << 20, bandwidth: 128 << 20, downtime: 300 * time.Millisecond,
			passes: 2, minT: 4 * time.Second, maxT: 4 * time.Second},
		{name: "dirty at a quarter of the link", memory: 512 << 20, dirty: 32 << 20, bandwidth: 128 << 20,
			downtime: 300 * time.Millisecond, passes: 3, minT: 5 * time.Second, maxT: 6 * time.Second},
		{name: "dirty faster than the link", memory: 512 << 20, dirty: 200 << 20, bandwidth: 128 << 20,
			downtime: 300 * time.Millisecond},
		{name: "a working set under the downtime budget", memory: 32 << 20, dirty: 1 << 30, bandwidth: 128 << 20,
			downtime: 300 * time.Millisecond, passes: 2, minT: 250 * time.Millisecond, maxT: 500 * time.Millisecond},
		{name: "no bandwidth", memory: 1 << 20, downtime: time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			passes, d := Predict(tc.memory, tc.bandwidth, tc.dirty, tc.downtime)
			require.Equal(t, tc.passes, passes)
			if tc.passes > 0 {
				require.GreaterOrEqual(t, d, tc.minT)
				require.LessOrEqual(t, d, tc.maxT)
			}
		})
	}
}

func TestMakePlan(t *testing.T) {
	ring := Offer{Capabilities: map[string]bool{"auto-converge": false, "events": false}, Ring: true, DirtyLimit: true,
		VCPUs: 2, Memory: 512 << 20}
	noRing := ring
	noRing.Ring, noRing.DirtyLimit = false, false
	refused := ring
	refused.DirtyLimit = false
	// The busy scenario: vCPU 0 rewrites its region, vCPU 1 reads (its record page aside).
	busy := Rates{Mode: "dirty-ring", Total: 801, VCPU: []VCPURate{{0, 800}, {1, 1}}}
	busyWhole := Rates{Mode: "dirty-bitmap", Total: 208}
	quiet := Rates{Mode: "dirty-ring", Total: 10, VCPU: []VCPURate{{0, 10}, {1, 0}}}
	const bw = 128 << 20
	for _, tc := range []struct {
		name     string
		policy   Policy
		offer    Offer
		rates    Rates
		strategy Strategy
		limits   []VCPURate
		fallback []VCPURate
		throttle int64
		err      string
	}{
		{name: "auto, quiet guest: precopy, a limit ready for a stall", policy: PolicyAuto, offer: ring, rates: quiet,
			strategy: StrategyPrecopy, fallback: []VCPURate{{0, 10}}},
		{name: "auto, quiet guest without a ring: precopy", policy: PolicyAuto, offer: noRing, rates: Rates{Mode: "dirty-bitmap", Total: 10},
			strategy: StrategyPrecopy},
		// 128 MiB/s × 0.25 = 32 MB/s for all; the reader's 1 counts, the writer gets the rest.
		{name: "auto, busy guest with a ring: dirty limit on the writer only", policy: PolicyAuto, offer: ring, rates: busy,
			strategy: StrategyDirtyLimit, limits: []VCPURate{{0, 31}}},
		{name: "auto, two writers share the budget by their rates", policy: PolicyAuto, offer: ring,
			rates:    Rates{Mode: "dirty-ring", Total: 900, VCPU: []VCPURate{{0, 600}, {1, 300}, {2, 0}}},
			strategy: StrategyDirtyLimit, limits: []VCPURate{{0, 21}, {1, 10}}},
		{name: "auto, busy guest without a ring: auto-converge at the throttle it needs", policy: PolicyAuto, offer: noRing,
			rates: busyWhole, strategy: StrategyAutoConverge, throttle: 85},
		{name: "auto, set-vcpu-dirty-limit refused: auto-converge", policy: PolicyAuto, offer: refused, rates: busy,
			strategy: StrategyAutoConverge, throttle: 97},
		{name: "precopy, busy guest: precopy all the same", policy: PolicyPrecopy, offer: ring, rates: busy, strategy: StrategyPrecopy},
		{name: "auto-converge with a ring", policy: PolicyAutoConverge, offer: ring, rates: busy, strategy: StrategyAutoConverge, throttle: 97},
		{name: "dirty-limit without a ring", policy: PolicyDirtyLimit, offer: noRing, rates: busyWhole, err: "no dirty ring"},
		{name: "dirty-limit refused", policy: PolicyDirtyLimit, offer: refused, rates: busy, err: "refuses set-vcpu-dirty-limit"},
		{name: "auto-converge not offered", policy: PolicyAutoConverge, offer: Offer{Memory: 1 << 30}, rates: busyWhole,
			err: "no auto-converge capability"},
		{name: "dirty-limit with a quiet guest: nothing to limit", policy: PolicyDirtyLimit, offer: ring,
			rates: Rates{Mode: "dirty-ring", Total: 0, VCPU: []VCPURate{{0, 0}, {1, 0}}}, strategy: StrategyPrecopy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := MakePlan(tc.policy, tc.offer, tc.rates, bw, 300*time.Millisecond)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.strategy, p.Strategy, p.Reason)
			require.Equal(t, tc.limits, p.Limits)
			require.Equal(t, tc.fallback, p.Fallback)
			require.Equal(t, tc.throttle, p.ThrottleInitial)
			require.NotEmpty(t, p.Reason)
			if p.Strategy == StrategyDirtyLimit {
				require.LessOrEqual(t, p.PredictedDirtyRate, uint64(bw/4>>20), "the limits fit the link")
				require.NotZero(t, p.PredictedPasses, "a dirty-limit plan converges")
			}
		})
	}
}
