package guest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// BenchmarkWorkload runs each workload flat out over a 1 MiB region with a
// dirty ring harvested as it goes; an op is one pass. It reports pages/s and
// ring entries per page touched: about one per page written on hosts that log
// first writes only, a store each on hosts that emulate the guest (PVM), plus
// the record's two stores a pass.
func BenchmarkWorkload(b *testing.B) {
	for _, tt := range []struct {
		name string
		mode Mode
		bpp  int
	}{
		{"write", ModeWrite, 0},
		{"write4", ModeWrite, 4},
		{"read", ModeRead, 0},
	} {
		b.Run(tt.name, func(b *testing.B) {
			p := Params{Mode: tt.mode, RegionBase: MinRegionStart, RegionSize: testRegionSize,
				BytesPerPage: tt.bpp, RecordAddr: RecordAddr(0)}
			m := start(b, p, 4096, 0)
			m.waitPasses(1) // first touches of fresh memory are slow: not measured
			r0, t0 := m.record(), time.Now()
			b.ResetTimer()
			m.waitPasses(r0.Passes + uint64(b.N))
			r1, t1 := m.record(), time.Now()
			b.StopTimer()
			require.NoError(b, m.halt())
			require.NoError(b, m.herr)
			b.ReportMetric(float64(r1.Pages-r0.Pages)/t1.Sub(t0).Seconds(), "pages/s")
			b.ReportMetric(float64(m.entries)/float64(r1.Pages), "entries/page")
			b.ReportMetric(float64(m.recoveries), "recoveries")
		})
	}
}
