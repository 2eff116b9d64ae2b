package dirtylimit

import (
	"encoding/json"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const testMemMiB = 16

// newTestMeter returns a meter on a fake 2-vCPU machine with 16 MiB of memory, a ring of the given
// size and, without a ring, a dirty log the test fills.
func newTestMeter(t *testing.T, ring int) (*Meter, *fakeMachine, *fakeClock, *fakeLog) {
	t.Helper()
	m, clk, log := newFakeMachine(2, ring), newFakeClock(), &fakeLog{}
	m.mem = make([]byte, testMemMiB<<20)
	opt := Options{Clock: clk}
	if ring == 0 {
		opt.NewDirtyLog = func() DirtyLog { return log }
	}
	mt := NewMeter(m, opt)
	t.Cleanup(func() { mt.Close() })
	return mt, m, clk, log
}

func pages(n int64) *int64 { return &n }

func TestCalcChecks(t *testing.T) {
	for _, tc := range []struct {
		name string
		ring int
		args CalcArgs
		err  string
	}{
		{"0 s", 4096, CalcArgs{CalcTime: 0}, descCalcTime},
		{"61 s", 4096, CalcArgs{CalcTime: 61}, descCalcTime},
		{"-1 s", 4096, CalcArgs{CalcTime: -1}, descCalcTime},
		{"max int64 s", 4096, CalcArgs{CalcTime: math.MaxInt64}, descCalcTime},
		// 2^63/1000+1 s would wrap to a small positive ms in QEMU's arithmetic.
		{"wrapping s", 4096, CalcArgs{CalcTime: 9223372036854776}, descCalcTime},
		{"49 ms", 4096, CalcArgs{CalcTime: 49, Unit: Millisecond}, descCalcTime},
		{"60001 ms", 4096, CalcArgs{CalcTime: 60001, Unit: Millisecond}, descCalcTime},
		{"time before sample-pages", 4096, CalcArgs{CalcTime: 0, SamplePages: pages(1), Mode: DirtyRing}, descCalcTime},
		{"sample-pages with dirty-ring", 4096, CalcArgs{CalcTime: 1, SamplePages: pages(256), Mode: DirtyRing}, descSampleMode},
		{"sample-pages with dirty-bitmap", 0, CalcArgs{CalcTime: 1, SamplePages: pages(256), Mode: DirtyBitmap}, descSampleMode},
		{"mode before sample range", 4096, CalcArgs{CalcTime: 1, SamplePages: pages(1), Mode: DirtyRing}, descSampleMode},
		{"sample-pages 127", 4096, CalcArgs{CalcTime: 1, SamplePages: pages(127)}, descSampleRange},
		{"sample-pages 16385", 4096, CalcArgs{CalcTime: 1, SamplePages: pages(16385)}, descSampleRange},
		{"bad mode", 4096, CalcArgs{CalcTime: 1, Mode: "bogus"}, "Parameter 'mode' does not accept value 'bogus'"},
		{"bad unit", 4096, CalcArgs{CalcTime: 1, Unit: "minute"}, "Parameter 'calc-time-unit' does not accept value 'minute'"},
		{"50 ms", 4096, CalcArgs{CalcTime: 50, Unit: Millisecond}, ""},
		{"60000 ms", 4096, CalcArgs{CalcTime: 60000, Unit: Millisecond}, ""},
		{"60 s", 4096, CalcArgs{CalcTime: 60, Unit: Second}, ""},
		{"sample-pages 128", 4096, CalcArgs{CalcTime: 1, SamplePages: pages(128), Mode: PageSampling}, ""},
		{"sample-pages 16384", 0, CalcArgs{CalcTime: 1, SamplePages: pages(16384)}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt, _, _, _ := newTestMeter(t, tc.ring)
			err := mt.Calc(tc.args)
			if tc.err == "" {
				require.NoError(t, err)
				return
			}
			requireQErr(t, tc.err, err)
			require.Equal(t, Unstarted, mt.Query("").Status, "a refused request changes nothing")
		})
	}
	t.Run("bitmap needs a dirty log", func(t *testing.T) {
		mt := NewMeter(newFakeMachine(1, 0), Options{Clock: newFakeClock()})
		requireQErr(t, "mode dirty-bitmap is not enabled, use other method instead.", mt.Calc(CalcArgs{CalcTime: 1, Mode: DirtyBitmap}))
	})
}

// Which mode a machine allows (QEMU's dirtyrate.c, and transcripts 06-calc-dirty-rate-ring /
// -noring): dirty-ring only with a ring, dirty-bitmap only without one, page-sampling (the
// default) on both.
func TestCalcModeRules(t *testing.T) {
	for _, tc := range []struct {
		mode    Mode
		ring    int
		allowed bool
	}{
		{"", 4096, true},
		{"", 0, true},
		{PageSampling, 4096, true},
		{PageSampling, 0, true},
		{DirtyRing, 4096, true},
		{DirtyRing, 0, false},
		{DirtyBitmap, 4096, false},
		{DirtyBitmap, 0, true},
	} {
		t.Run(fmt.Sprintf("%s/ring=%d", tc.mode, tc.ring), func(t *testing.T) {
			mt, _, _, _ := newTestMeter(t, tc.ring)
			err := mt.Calc(CalcArgs{CalcTime: 1, Mode: tc.mode})
			if !tc.allowed {
				requireQErr(t, "mode "+string(tc.mode)+" is not enabled, use other method instead.", err)
				require.Equal(t, Unstarted, mt.Query("").Status)
				return
			}
			require.NoError(t, err)
			want := tc.mode
			if want == "" {
				want = PageSampling
			}
			info := mt.Query("")
			require.Equal(t, Measuring, info.Status)
			require.Equal(t, want, info.Mode)
		})
	}
}

func TestBusyComesFirst(t *testing.T) {
	mt, _, clk, _ := newTestMeter(t, 4096)
	require.NoError(t, mt.Calc(CalcArgs{CalcTime: 1}))
	requireQErr(t, descBusy, mt.Calc(CalcArgs{CalcTime: 1}))
	requireQErr(t, descBusy, mt.Calc(CalcArgs{CalcTime: 0}))
	clk.waitTimers(t, 1)
	clk.Advance(time.Second)
	require.Eventually(t, func() bool { return mt.Query("").Status == Measured }, 10*time.Second, 50*time.Microsecond)
	require.NoError(t, mt.Calc(CalcArgs{CalcTime: 1}), "a measured rate can be measured again")
}

// measure runs one calc-dirty-rate on the fake clock: dirty runs while the measurement waits.
func measure(t *testing.T, mt *Meter, clk *fakeClock, args CalcArgs, wait time.Duration, dirty func()) {
	t.Helper()
	require.NoError(t, mt.Calc(args))
	clk.waitTimers(t, 1)
	dirty()
	clk.Advance(wait)
	require.Eventually(t, func() bool { return mt.Query("").Status == Measured }, 10*time.Second, 50*time.Microsecond)
}

func jsonOf(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return string(b)
}

func TestQueryShapes(t *testing.T) {
	t.Run("unstarted", func(t *testing.T) {
		mt, _, _, _ := newTestMeter(t, 4096)
		require.JSONEq(t, `{"status": "unstarted", "sample-pages": 0, "mode": "page-sampling",
			"calc-time-unit": "second", "start-time": 0, "calc-time": 0}`, jsonOf(t, mt.Query("")))
	})
	t.Run("measuring dirty-ring reports the requested sample-pages", func(t *testing.T) {
		mt, _, _, _ := newTestMeter(t, 4096)
		require.NoError(t, mt.Calc(CalcArgs{CalcTime: 1, Mode: DirtyRing}))
		require.JSONEq(t, `{"status": "measuring", "sample-pages": 512, "mode": "dirty-ring",
			"calc-time-unit": "second", "start-time": 1795678691, "calc-time": 1}`, jsonOf(t, mt.Query("")))
	})
	t.Run("measuring in ms", func(t *testing.T) {
		mt, _, _, _ := newTestMeter(t, 4096)
		require.NoError(t, mt.Calc(CalcArgs{CalcTime: 60000, Unit: Millisecond}))
		require.JSONEq(t, `{"status": "measuring", "sample-pages": 512, "mode": "page-sampling",
			"calc-time-unit": "millisecond", "start-time": 1795678691, "calc-time": 60000}`, jsonOf(t, mt.Query(Millisecond)))
		require.Equal(t, int64(60), mt.Query("").CalcTime)
	})
	t.Run("measured dirty-ring", func(t *testing.T) {
		mt, m, clk, _ := newTestMeter(t, 4096)
		measure(t, mt, clk, CalcArgs{CalcTime: 1, Mode: DirtyRing}, time.Second, func() { m.dirty(0, 191*pagesPerMiB) })
		require.JSONEq(t, `{"vcpu-dirty-rate": [{"dirty-rate": 191, "id": 0}, {"dirty-rate": 0, "id": 1}],
			"status": "measured", "sample-pages": 0, "dirty-rate": 191, "mode": "dirty-ring",
			"calc-time-unit": "second", "start-time": 1795678691, "calc-time": 1}`, jsonOf(t, mt.Query("")))
		require.Equal(t, int64(2), m.harvests.Load(), "one harvest at each end")
	})
	t.Run("measured page-sampling keeps sample-pages", func(t *testing.T) {
		mt, _, clk, _ := newTestMeter(t, 4096)
		measure(t, mt, clk, CalcArgs{CalcTime: 500, Unit: Millisecond, SamplePages: pages(256)}, 500*time.Millisecond, func() {})
		require.JSONEq(t, `{"status": "measured", "sample-pages": 256, "dirty-rate": 0, "mode": "page-sampling",
			"calc-time-unit": "second", "start-time": 1795678691, "calc-time": 0}`, jsonOf(t, mt.Query(Second)))
		require.Equal(t, int64(500), mt.Query(Millisecond).CalcTime)
	})
}

func TestPageSampling(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mem   int
		dirty bool
		wait  time.Duration
		want  int64
	}{
		{"every page written", testMemMiB << 20, true, time.Second, testMemMiB},
		{"nothing written", testMemMiB << 20, false, time.Second, 0},
		// The sample is taken over 16 MiB in 1.6 s: 16*1000/1600 = 10.
		{"elapsed time counts", testMemMiB << 20, true, 1600 * time.Millisecond, 10},
		{"too small to sample", 64 << 10, true, time.Second, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt, m, clk, _ := newTestMeter(t, 4096)
			m.mem = make([]byte, tc.mem)
			measure(t, mt, clk, CalcArgs{CalcTime: 1}, tc.wait, func() {
				if tc.dirty {
					for p := 0; p < len(m.mem); p += pageSize {
						m.mem[p+100]++
					}
				}
			})
			got := mt.Query(Millisecond)
			require.Equal(t, tc.want, *got.DirtyRate)
			require.Equal(t, tc.wait.Milliseconds(), got.CalcTime)
		})
	}
}

func TestDirtyBitmap(t *testing.T) {
	mt, _, clk, log := newTestMeter(t, 0)
	log.mark(1, 2, 3) // before the measurement starts: the first sync drops them
	measure(t, mt, clk, CalcArgs{CalcTime: 1, Mode: DirtyBitmap}, time.Second, func() {
		for p := range 2560 { // 10 MiB
			log.mark(p)
		}
		log.mark(7) // twice dirtied, once counted
	})
	got := mt.Query("")
	require.Equal(t, int64(10), *got.DirtyRate)
	require.Zero(t, got.SamplePages)
	require.Nil(t, got.VcpuDirtyRate)
	require.True(t, log.isClosed())
}

func TestMeterClose(t *testing.T) {
	mt, _, clk, _ := newTestMeter(t, 4096)
	require.NoError(t, mt.Calc(CalcArgs{CalcTime: 60}))
	clk.waitTimers(t, 1)
	require.NoError(t, mt.Close())
	require.Zero(t, clk.pending(), "the measurement has stopped")
	requireQErr(t, descBusy, mt.Calc(CalcArgs{CalcTime: 1}))
}
