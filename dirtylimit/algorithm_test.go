package dirtylimit

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestRateMiBps(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pages uint64
		ms    int64
		want  uint64
	}{
		{"one MiB in a second", 256, 1000, 1},
		{"flat-out vCPU", 358400, 1000, 1400},
		{"under a MiB rounds to 0", 100, 1000, 0},
		// 10.x converts pages*1000 to MiB before dividing: 100000>>8 = 390, /50 = 7 (8.1 said 0).
		{"short period keeps sub-MiB pages", 100, 50, 7},
		{"real elapsed time", 204800, 1001, 799},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, rateMiBps(tc.pages, tc.ms))
		})
	}
}

func TestRingFullTimeUS(t *testing.T) {
	for _, tc := range []struct {
		ring int
		rate uint64
		want uint64
	}{
		{4096, 800, 20000}, // the reference's worked example: 16 MiB at 800 MiB/s
		{4096, 1400, 11428},
		{1024, 800, 5000},
		{65536, 800, 320000},
		{128, 1, 0}, // QEMU counts the ring in whole MiB: under 256 entries it is 0
	} {
		require.Equal(t, tc.want, ringFullTimeUS(tc.ring, tc.rate), "ring %d rate %d", tc.ring, tc.rate)
	}
}

func TestWithinTolerance(t *testing.T) {
	for _, tc := range []struct {
		quota, current uint64
		want           bool
	}{
		{100, 125, true}, {100, 126, false}, {126, 100, false}, {1, 26, true}, {0, 0, true},
	} {
		require.Equal(t, tc.want, withinTolerance(tc.quota, tc.current), "quota %d current %d", tc.quota, tc.current)
	}
}

func TestQEMUStep(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		throttle             int64
		quota, current, ring uint64
		want                 int64
	}{
		// pct = 799*100/800 = 99; step = 20000*99/1 = 1 980 000; cap 99*20000 = 1 980 000.
		{"worked example", 0, 1, 800, 20000, 1980000},
		// 300*100/400 = 75 > 50: step = 20000*75/25 = 60000.
		{"proportional up", 1000, 100, 400, 20000, 61000},
		// pct = 300*100/400 = 75: step = 40000*75/25 = 120000 below 100000, clamped to 0.
		{"proportional down never negative", 100000, 400, 100, 40000, 0},
		// 50*100/150 = 33: fixed step T/10 = 2000.
		{"fixed up", 5000, 100, 150, 20000, 7000},
		{"fixed down", 5000, 150, 100, 20000, 3000},
		// Exactly 50% away is not "more than 50%": fixed step.
		{"50% is fixed", 0, 100, 200, 20000, 2000},
		{"cap", 1979000, 100, 150, 20000, 1980000},
		// pct = 2300/33 = 69; step = 11428*69/31 = 25436.5..., truncated.
		{"step truncated", 0, 10, 33, 11428, 25436},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, qemuStep(tc.throttle, tc.quota, tc.current, tc.ring))
		})
	}
}

func TestPace(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	for _, tc := range []struct {
		name        string
		now, rel    time.Time
		pages       uint64
		quota       uint64
		wantSleep   time.Duration
		wantRelease time.Time
	}{
		// 16 MiB at 100 MiB/s is 160 ms; 11 ms of it were spent filling the ring.
		{"fast vCPU sleeps the rest", ms(11), t0, 4096, 100, 149 * time.Millisecond, ms(160)},
		// 340 ms behind: it keeps 50 ms of credit, no more.
		{"slow vCPU does not sleep", ms(500), t0, 4096, 100, 0, ms(450)},
		// 20 ms behind (a host stall, exits near its top speed): all of it is credit.
		{"a little behind keeps its credit", ms(180), t0, 4096, 100, 0, ms(160)},
		{"credit is spent first", ms(170), ms(150), 256, 100, 0, ms(160)},
		// The last sleep overran by 5 ms (woke at 165): this one is 5 ms shorter.
		{"overrun paid back", ms(176), ms(160), 4096, 100, 144 * time.Millisecond, ms(320)},
		{"no pages no sleep", ms(10), t0, 0, 100, 0, t0},
		{"one MiB at 1 MiB/s", t0, t0, 256, 1, time.Second, ms(1000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, rel := pace(tc.now, tc.rel, tc.pages, tc.quota)
			require.Equal(t, tc.wantSleep, d)
			require.Equal(t, tc.wantRelease, rel)
		})
	}
	t.Run("one ring costs at most maxPacedSleep and leaves no debt", func(t *testing.T) {
		// 16 MiB at 1 MiB/s would be 16 s.
		d, rel := pace(t0, t0, 4096, 1)
		require.Equal(t, maxPacedSleep, d)
		require.Equal(t, t0.Add(maxPacedSleep), rel)
		// The next ring, filled in 10 ms, again costs the most a ring may cost.
		d, rel = pace(rel.Add(10*time.Millisecond), rel, 4096, 1)
		require.Equal(t, maxPacedSleep-10*time.Millisecond, d)
		require.Equal(t, t0.Add(2*maxPacedSleep), rel)
	})
}

func TestParseAlgorithm(t *testing.T) {
	for _, a := range []Algorithm{Migvisor, QEMU} {
		got, err := ParseAlgorithm(a.String())
		require.NoError(t, err)
		require.Equal(t, a, got)
	}
	_, err := ParseAlgorithm("pid")
	require.Error(t, err)
	require.Equal(t, Migvisor, Options{}.Algorithm, "the zero value is migvisor's")
}
