package dirtylimit

import (
	"testing"
	"time"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

func idx(i int64) *int64 { return &i }

func requireQErr(t *testing.T, desc string, err error) {
	t.Helper()
	require.Equal(t, &qerr.Error{Class: qerr.GenericError, Desc: desc}, err)
}

// newTestLimiter returns a limiter on a fake 2-vCPU machine with a 4096-entry ring (QEMU's
// transcripts ran -smp 2, dirty-ring-size=4096), closed at the end of the test.
func newTestLimiter(t *testing.T, alg Algorithm, ring int) (*Limiter, *fakeMachine, *fakeClock) {
	t.Helper()
	m, clk := newFakeMachine(2, ring), newFakeClock()
	l := NewLimiter(m, Options{Algorithm: alg, Clock: clk})
	t.Cleanup(func() { l.Close() })
	return l, m, clk
}

// step is one request of a scripted session: exactly one of set, cancel or query.
type step struct {
	name   string
	set    bool
	cancel bool
	cpu    *int64
	rate   uint64
	err    string // expected error text, "" for success
	query  []Info // checked when neither set nor cancel
}

func runSteps(t *testing.T, l *Limiter, steps []step) {
	t.Helper()
	for _, s := range steps {
		var err error
		switch {
		case s.set:
			err = l.Set(s.cpu, s.rate)
		case s.cancel:
			err = l.Cancel(s.cpu)
		default:
			require.Equal(t, s.query, l.Query(), s.name)
			continue
		}
		if s.err == "" {
			require.NoError(t, err, s.name)
		} else {
			requireQErr(t, s.err, err)
		}
	}
}

func lim(cpu int64, limit uint64) Info { return Info{CPUIndex: cpu, LimitRate: limit} }

// The requests of testdata/conformance/04-dirty-limit-ring.jsonl with QEMU's answers (current-rate
// 0: the fake clock never ends a period here).
func TestSessionWithRing(t *testing.T) {
	l, _, _ := newTestLimiter(t, Migvisor, 4096)
	runSteps(t, l, []step{
		{name: "q-paused", query: []Info{}},
		{name: "set-paused", set: true, rate: 10},
		{name: "q-paused-after-set", query: []Info{lim(0, 10), lim(1, 10)}},
		{name: "cancel-paused", cancel: true},
		{name: "q-before", query: []Info{}},
		{name: "set-all-100", set: true, rate: 100},
		{name: "set-cpu1-50", set: true, cpu: idx(1), rate: 50},
		{name: "q-after-set-cpu1", query: []Info{lim(0, 100), lim(1, 50)}},
		{name: "set-cpu99", set: true, cpu: idx(99), rate: 50, err: descCPUIndex},
		{name: "set-cpu-minus1", set: true, cpu: idx(-1), rate: 50, err: descCPUIndex},
		{name: "set-cpu2-eq-smp", set: true, cpu: idx(2), rate: 50, err: descCPUIndex},
		{name: "set-cpu99-rate0", set: true, cpu: idx(99), rate: 0, err: descCPUIndex},
		{name: "set-cpu0-rate0", set: true, cpu: idx(0), rate: 0},
		{name: "q-after-cpu0-rate0", query: []Info{lim(1, 50)}},
		{name: "cancel-cpu1", cancel: true, cpu: idx(1)},
		{name: "q-after-cancel-cpu1", query: []Info{}},
		{name: "cancel-cpu1-again", cancel: true, cpu: idx(1)},
		{name: "cancel-all-noargs", cancel: true},
		{name: "cancel-cpu99", cancel: true, cpu: idx(99), err: descCPUIndex},
		{name: "cancel-cpu-minus1", cancel: true, cpu: idx(-1), err: descCPUIndex},
		{name: "set-all-rate0-not-in-service", set: true, rate: 0},
		{name: "set-cpu0-1", set: true, cpu: idx(0), rate: 1},
		{name: "q-cpu0-only", query: []Info{lim(0, 1)}},
		{name: "set-all-200", set: true, rate: 200},
		{name: "q-all-200", query: []Info{lim(0, 200), lim(1, 200)}},
		{name: "cancel-cpu0", cancel: true, cpu: idx(0)},
		{name: "q-cpu1-only", query: []Info{lim(1, 200)}},
		{name: "cancel-all", cancel: true},
		{name: "q-final", query: []Info{}},
		{name: "cancel-all-repeat", cancel: true},
	})
}

// testdata/conformance/04-dirty-limit-noring.jsonl: every set fails on the ring, before the
// index or the rate is looked at; every cancel succeeds.
func TestSessionWithoutRing(t *testing.T) {
	l, _, _ := newTestLimiter(t, Migvisor, 0)
	runSteps(t, l, []step{
		{name: "set-all-100", set: true, rate: 100, err: descNoRing},
		{name: "set-cpu99", set: true, cpu: idx(99), rate: 50, err: descNoRing},
		{name: "set-cpu-minus1", set: true, cpu: idx(-1), rate: 50, err: descNoRing},
		{name: "set-cpu0-rate0", set: true, cpu: idx(0), rate: 0, err: descNoRing},
		{name: "set-all-rate0", set: true, rate: 0, err: descNoRing},
		{name: "cancel-cpu99", cancel: true, cpu: idx(99)},
		{name: "cancel-cpu-minus1", cancel: true, cpu: idx(-1)},
		{name: "cancel-all", cancel: true},
		{name: "q-final", query: []Info{}},
	})
	require.False(t, l.InService())
	requireQErr(t, descNoRing, l.SetAll(1))
}

func TestMigrationRefusesUserRequests(t *testing.T) {
	l, _, _ := newTestLimiter(t, Migvisor, 4096)
	l.SetMigrationActive(true)
	// Not in service: a dirty-limit migration does not stop the user from starting a limit.
	runSteps(t, l, []step{
		{name: "cancel out of service", cancel: true},
		{name: "set out of service", set: true, cpu: idx(0), rate: 10},
		{name: "set in service", set: true, rate: 20, err: descSetMigrating},
		{name: "set rate 0 in service", set: true, cpu: idx(0), rate: 0, err: descSetMigrating},
		{name: "cancel in service", cancel: true, cpu: idx(0), err: descCancelMigrating},
		{name: "index before migration", set: true, cpu: idx(2), rate: 20, err: descCPUIndex},
		{name: "cancel index before migration", cancel: true, cpu: idx(2), err: descCPUIndex},
	})
	require.NoError(t, l.SetAll(30), "the migration's own set passes")
	require.Equal(t, []Info{lim(0, 10), lim(1, 30)}, l.Query(), "the user's tighter limit holds")
	require.NoError(t, l.SetAll(5))
	require.Equal(t, []Info{lim(0, 5), lim(1, 5)}, l.Query(), "the migration's tighter limit holds")
	l.CancelAll()
	require.Equal(t, []Info{lim(0, 10)}, l.Query(), "the user's limit is back as it was")
	require.True(t, l.InService())
	l.SetMigrationActive(false)
	require.NoError(t, l.Cancel(nil))
	require.False(t, l.InService())
	require.NoError(t, l.Set(nil, 5))
	require.NoError(t, l.Cancel(nil))
}

func TestServiceLifecycle(t *testing.T) {
	l, _, clk := newTestLimiter(t, Migvisor, 4096)
	require.False(t, l.InService())
	require.Zero(t, clk.pending(), "no loop before the first limit")

	require.NoError(t, l.Set(idx(1), 10))
	require.True(t, l.InService())
	clk.waitTimers(t, 1) // the loop waits for its first period

	require.NoError(t, l.Set(idx(0), 10))
	require.NoError(t, l.Cancel(idx(1)))
	require.True(t, l.InService(), "vCPU 0 is still limited")
	require.Equal(t, 1, clk.pending())

	require.NoError(t, l.Cancel(idx(0)))
	require.False(t, l.InService())
	require.Zero(t, clk.pending(), "the loop has ended when Cancel returns")

	require.NoError(t, l.Set(nil, 10))
	clk.waitTimers(t, 1)
	require.NoError(t, l.Close())
	require.Zero(t, clk.pending())
	require.Equal(t, []Info{}, l.Query())
	requireQErr(t, descClosed, l.Set(nil, 10))
}

// One period of a flat-out vCPU 0 (1400 MiB/s) and a vCPU 1 at 100 MiB/s, both limited to 100.
func TestPeriodMeasuresAndAdjusts(t *testing.T) {
	for _, tc := range []struct {
		alg          Algorithm
		penaltyUS    uint64 // vCPU 0's after the period
		ringFullTime uint64
	}{
		// hwm 1400: T = 16e6/1400 = 11428; pct = 1300*100/1400 = 92; step = 11428*92/8 = 131422.
		// vCPU 1 is within tolerance. query-migrate: mean rate 750, but the mark says 1400: 11428.
		{QEMU, 131422, 11428},
		// No ring filled, nothing slept; the ring-full time is the mean's own: 16e6/750.
		{Migvisor, 0, 21333},
	} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			l, m, clk := newTestLimiter(t, tc.alg, 4096)
			require.NoError(t, l.Set(nil, 100))
			clk.waitTimers(t, 1)
			m.dirty(0, 1400*pagesPerMiB)
			m.dirty(1, 100*pagesPerMiB)
			clk.Advance(time.Second)
			clk.waitTimers(t, 1)
			require.Equal(t, int64(1), m.harvests.Load(), "the period ends with a harvest")
			require.Equal(t, []Info{{0, 100, 1400}, {1, 100, 100}}, l.Query())
			require.Equal(t, tc.penaltyUS, l.ThrottleTimePerRound())
			require.Equal(t, tc.ringFullTime, l.RingFullTime())
		})
	}
}

func TestQEMUHighWaterMarkIsNeverReset(t *testing.T) {
	l, m, clk := newTestLimiter(t, QEMU, 4096)
	require.NoError(t, l.Set(idx(0), 100))
	clk.waitTimers(t, 1)
	m.dirty(0, 1600*pagesPerMiB)
	clk.Advance(time.Second)
	clk.waitTimers(t, 1)
	require.NoError(t, l.Cancel(nil))
	require.Zero(t, l.ThrottleTimePerRound(), "a cancelled limit leaves no penalty")

	// A later, slower vCPU still gets the ring-full time of the fastest ever seen:
	// T = 16e6/1600 = 10000; 300 vs 100: pct 66, step = 10000*66/34 = 19411.
	require.NoError(t, l.Set(idx(0), 100))
	clk.waitTimers(t, 1)
	m.dirty(0, 300*pagesPerMiB)
	clk.Advance(time.Second)
	clk.waitTimers(t, 1)
	require.Equal(t, uint64(19411), l.ThrottleTimePerRound())
}

func TestSetPeriod(t *testing.T) {
	l, m, clk := newTestLimiter(t, Migvisor, 4096)
	require.NoError(t, l.Set(idx(0), 100))
	clk.waitTimers(t, 1)
	l.SetPeriod(500 * time.Millisecond) // from the next period on
	m.dirty(0, 500*pagesPerMiB)
	clk.Advance(time.Second)
	clk.waitTimers(t, 1)
	require.Equal(t, uint64(500), l.Query()[0].CurrentRate)

	m.dirty(0, 500*pagesPerMiB)
	clk.Advance(500 * time.Millisecond)
	clk.waitTimers(t, 1)
	require.Equal(t, uint64(1000), l.Query()[0].CurrentRate, "500 MiB in 500 ms")

	l.SetPeriod(0)
	clk.Advance(500 * time.Millisecond) // ends the 500 ms period; the next is 1 s
	clk.waitTimers(t, 1)
	m.dirty(0, 1000*pagesPerMiB)
	clk.Advance(500 * time.Millisecond)
	clk.waitTimers(t, 1)
	clk.Advance(500 * time.Millisecond)
	clk.waitTimers(t, 1)
	require.Equal(t, uint64(1000), l.Query()[0].CurrentRate, "1000 MiB over the default 1 s")
}

// ringFull runs the hook as the vCPU's thread would and returns a channel closed when it returns.
func ringFull(l *Limiter, cpu int) chan struct{} {
	done := make(chan struct{})
	go func() {
		l.RingFull(cpu)
		close(done)
	}()
	return done
}

func requireBlocked(t *testing.T, done chan struct{}) {
	t.Helper()
	select {
	case <-done:
		t.Fatal("the vCPU should still be sleeping")
	default:
	}
}

func TestHookSleepsThroughClock(t *testing.T) {
	t.Run("migvisor paces the ring", func(t *testing.T) {
		l, m, clk := newTestLimiter(t, Migvisor, 4096)
		require.NoError(t, l.Set(idx(0), 100))
		clk.waitTimers(t, 1)
		clk.Advance(11 * time.Millisecond)
		m.dirty(0, 4096) // 16 MiB: 160 ms at 100 MiB/s, of which 11 are spent
		done := ringFull(l, 0)
		clk.waitTimers(t, 2)
		clk.Advance(148 * time.Millisecond)
		requireBlocked(t, done)
		clk.Advance(time.Millisecond)
		<-done
		clk.Advance(841 * time.Millisecond) // end of the period
		clk.waitTimers(t, 1)
		require.Equal(t, uint64(149000), l.ThrottleTimePerRound())
	})
	t.Run("qemu sleeps its penalty", func(t *testing.T) {
		l, m, clk := newTestLimiter(t, QEMU, 4096)
		require.NoError(t, l.Set(idx(0), 1))
		clk.waitTimers(t, 1)
		<-ringFull(l, 0) // no penalty before the first period
		m.dirty(0, 800*pagesPerMiB)
		clk.Advance(time.Second)
		clk.waitTimers(t, 1)
		require.Equal(t, uint64(1980000), l.ThrottleTimePerRound()) // the worked example
		done := ringFull(l, 0)
		clk.waitTimers(t, 2)
		clk.Advance(1979999 * time.Microsecond)
		requireBlocked(t, done)
		clk.Advance(time.Microsecond)
		<-done
	})
	t.Run("unlimited vCPU runs on", func(t *testing.T) {
		l, m, clk := newTestLimiter(t, Migvisor, 4096)
		require.NoError(t, l.Set(idx(0), 1))
		clk.waitTimers(t, 1)
		m.dirty(1, 4096)
		<-ringFull(l, 1)
		require.Equal(t, 1, clk.pending())
	})
	for _, tc := range []struct {
		name string
		cut  func(l *Limiter)
	}{
		{"cancel wakes", func(l *Limiter) { l.Cancel(idx(0)) }},
		{"a new quota wakes", func(l *Limiter) { l.Set(idx(0), 500) }},
		{"Wake wakes", func(l *Limiter) { l.Wake() }},
		{"Close wakes", func(l *Limiter) { l.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, m, clk := newTestLimiter(t, Migvisor, 4096)
			require.NoError(t, l.Set(nil, 1))
			clk.waitTimers(t, 1)
			m.dirty(0, 4096)
			done := ringFull(l, 0)
			clk.waitTimers(t, 2)
			tc.cut(l)
			<-done
		})
	}
	t.Run("installed on the machine", func(t *testing.T) {
		l, m, clk := newTestLimiter(t, Migvisor, 4096)
		require.NoError(t, l.Set(nil, 1))
		clk.waitTimers(t, 1)
		m.dirty(0, 4096)
		done := make(chan struct{})
		go func() { (*m.hook.Load())(0); close(done) }()
		clk.waitTimers(t, 2)
		clk.Advance(maxPacedSleep)
		<-done
	})
}

// pagedMachine is a fake machine whose ring-full events can come every n pages.
type pagedMachine struct {
	*fakeMachine
	every int
}

func (m *pagedMachine) SetRingFullPages(n int) { m.every = n }

// Migvisor's algorithm asks for an event every MiB, so it paces in steps smaller than a ring;
// QEMU's keeps one event a ring, as QEMU sleeps once per ring-full.
func TestLimiterPacingStep(t *testing.T) {
	for _, tc := range []struct {
		alg  Algorithm
		want int
	}{{Migvisor, pacePages}, {QEMU, 0}} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			m := &pagedMachine{fakeMachine: newFakeMachine(2, 4096), every: -1}
			l := NewLimiter(m, Options{Algorithm: tc.alg, Clock: newFakeClock()})
			defer l.Close()
			require.Equal(t, tc.want, m.every)
		})
	}
}
