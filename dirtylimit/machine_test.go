package dirtylimit_test

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/vmm"
	"github.com/migvisor/migvisor/vmm/kvm"
)

// The whole path on real machines, KVM and soft: two vCPUs write flat out; limiting one holds it
// near its quota and leaves the other at full speed; cancelling gives it its speed back, and
// the throttle stops with nothing left running. Bounds are loose (a loaded host slows
// everything): they tell a limited vCPU from a free one, the accuracy report measures.
func TestLimitOnRealMachine(t *testing.T) {
	if testing.Short() {
		t.Skip("runs machines for seconds")
	}
	accels := []string{vmm.AccelSoft}
	if err := kvm.Available(); err == nil {
		accels = append(accels, vmm.AccelKVM)
	} else {
		t.Logf("no KVM (%v): the soft backend only", err)
	}
	const quota = 20 // MiB/s
	for _, accel := range accels {
		t.Run(accel, func(t *testing.T) {
			m, err := vmm.New(vmm.Config{MemSize: 128 << 20, CPUs: 2, Accel: accel, DirtyRingSize: 4096,
				Workloads: []vmm.Workload{{Mode: vmm.ModeWrite, Size: 32 << 20}, {Mode: vmm.ModeWrite, Size: 32 << 20}},
				Logf:      t.Logf})
			require.NoError(t, err)
			defer m.Close()
			lim := dirtylimit.NewLimiter(m, dirtylimit.Options{})
			defer lim.Close()
			require.NoError(t, m.Cont())
			goroutines := runtime.NumGoroutine()

			free := rates(m, 500*time.Millisecond)
			require.Greater(t, free[0], 4.0*quota, "the writer runs well above the quota when free")

			cpu0 := int64(0)
			require.NoError(t, lim.Set(&cpu0, quota))
			time.Sleep(300 * time.Millisecond) // let pacing take hold
			limited := rates(m, time.Second)
			require.InDelta(t, quota, limited[0], quota*0.5, "the limited vCPU holds near its quota")
			require.Greater(t, limited[1], 4.0*quota, "the unlimited vCPU beside it keeps going")
			info := lim.Query()
			require.Len(t, info, 1)
			require.EqualValues(t, quota, info[0].LimitRate)

			require.NoError(t, lim.Cancel(&cpu0))
			require.False(t, lim.InService(), "no vCPU limited: the throttle stops")
			require.Empty(t, lim.Query())
			again := rates(m, 500*time.Millisecond)
			require.Greater(t, again[0], 4.0*quota, "cancel gives the writer its speed back")
			require.LessOrEqual(t, runtime.NumGoroutine(), goroutines, "the throttle left nothing running")
		})
	}
}

// rates measures each vCPU's dirty rate (MiB/s of pages its ring received) over d.
func rates(m *vmm.Machine, d time.Duration) []float64 {
	m.Harvest()
	start, t0 := []uint64{m.DirtyPages(0), m.DirtyPages(1)}, time.Now()
	time.Sleep(d)
	m.Harvest()
	s := time.Since(t0).Seconds()
	return []float64{
		float64(m.DirtyPages(0)-start[0]) / 256 / s,
		float64(m.DirtyPages(1)-start[1]) / 256 / s,
	}
}

// calc-dirty-rate on real machines, with and without a ring: each mode QEMU allows there
// measures close to the writer's real rate, and the other is refused with QEMU's error. The
// writer sweeps a region larger than it covers in one measurement, so the distinct pages that
// page-sampling and dirty-bitmap count and the ring entries dirty-ring counts are all its page
// rate. The truth is what the writer wrote during each measurement, read from its region.
func TestMeterOnRealMachine(t *testing.T) {
	if testing.Short() {
		t.Skip("runs machines for seconds")
	}
	accels := []string{vmm.AccelSoft}
	if err := kvm.Available(); err == nil {
		accels = append(accels, vmm.AccelKVM)
	} else {
		t.Logf("no KVM (%v): the soft backend only", err)
	}
	const (
		region = 32 << 20
		rate   = 64 << 20 // bytes/s: a pass every 500 ms
		calcMS = 250      // 16 MiB of the region's 32 per measurement: page-sampling sees 256 dirty samples
	)
	maxSamples := int64(16384) // page-sampling's best precision: 1024 samples of 64 MiB
	for _, accel := range accels {
		for _, ring := range []int{4096, 0} {
			t.Run(fmt.Sprintf("%s/ring=%d", accel, ring), func(t *testing.T) {
				m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 2, Accel: accel, DirtyRingSize: ring,
					Workloads: []vmm.Workload{{Mode: vmm.ModeWrite, Size: region, Rate: rate}}, Initial: vmm.Running, Logf: t.Logf})
				require.NoError(t, err)
				defer m.Close()
				mt := dirtylimit.NewMeter(m, dirtylimit.Options{NewDirtyLog: func() dirtylimit.DirtyLog { return m.NewDirtyLog() }})
				defer mt.Close()

				allowed, refused := dirtylimit.DirtyRing, dirtylimit.DirtyBitmap
				if ring == 0 {
					allowed, refused = refused, allowed
				}
				err = mt.Calc(dirtylimit.CalcArgs{CalcTime: calcMS, Unit: dirtylimit.Millisecond, Mode: refused})
				var qe *qerr.Error
				require.ErrorAs(t, err, &qe)
				require.Equal(t, fmt.Sprintf("mode %s is not enabled, use other method instead.", refused), qe.Desc)

				passEnd(t, m) // the first pass also faults the region in on KVM's side
				got := map[dirtylimit.Mode]dirtylimit.RateInfo{}
				truth := map[dirtylimit.Mode]float64{}
				for _, a := range []dirtylimit.CalcArgs{
					{CalcTime: calcMS, Unit: dirtylimit.Millisecond, Mode: dirtylimit.PageSampling, SamplePages: &maxSamples},
					{CalcTime: calcMS, Unit: dirtylimit.Millisecond, Mode: allowed},
				} {
					t0, p0 := time.Now(), written(m)
					require.NoError(t, mt.Calc(a))
					for mt.Query("").Status != dirtylimit.Measured {
						time.Sleep(time.Millisecond)
					}
					truth[a.Mode] = float64(written(m)-p0) / 256 / time.Since(t0).Seconds()
					got[a.Mode] = mt.Query("")
				}
				t.Logf("page-sampling %d MiB/s (writer %.1f), %s %d MiB/s (writer %.1f)",
					*got[dirtylimit.PageSampling].DirtyRate, truth[dirtylimit.PageSampling], allowed, *got[allowed].DirtyRate, truth[allowed])
				for mode, info := range got {
					tol := 0.2
					if mode == dirtylimit.PageSampling {
						// Binomial noise: 4 sigma of the dirty samples it can expect (16 a MiB).
						tol = max(0.35, 4/math.Sqrt(truth[mode]*calcMS/1000*16))
					}
					require.InEpsilon(t, truth[mode], float64(*info.DirtyRate), tol, "%s against the writer's real rate", mode)
				}
				if ring != 0 {
					v := got[dirtylimit.DirtyRing].VcpuDirtyRate
					require.Len(t, v, 2)
					require.InEpsilon(t, truth[allowed], float64(v[0].DirtyRate), 0.2, "the writer's own rate")
					require.Zero(t, v[1].DirtyRate, "the idle vCPU dirties nothing")
				} else {
					require.Nil(t, got[dirtylimit.DirtyBitmap].VcpuDirtyRate, "without a ring there are no per-vCPU rates")
					require.Zero(t, m.DirtyPages(0), "nor per-vCPU counters")
				}
			})
		}
	}
}

// written is how many pages vCPU 0's write workload has written so far, exactly, from what it
// left in its region: in pass k it stores k+1 in every dword, sweeping up from the region's start,
// so page 0 tells the pass and the first page still holding the value before it the position.
func written(m *vmm.Machine) uint64 {
	w := m.WorkloadStats()[0]
	mem := m.Memory()[w.RegionStart : w.RegionStart+w.RegionSize]
	n := uint64(len(mem)) / vmm.PageSize
	at := func(p uint64) uint32 { return binary.LittleEndian.Uint32(mem[p*vmm.PageSize:]) }
	v := at(0)
	pos := uint64(sort.Search(int(n), func(p int) bool { return at(uint64(p)) != v }))
	return uint64(v-1)*n + pos
}

// passEnd waits for vCPU 0's workload to finish a pass and returns when it saw it and the passes
// done: the record's page count is exact there.
func passEnd(t *testing.T, m *vmm.Machine) (time.Time, uint64) {
	t.Helper()
	start := m.WorkloadStats()[0].Passes
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if p := m.WorkloadStats()[0].Passes; p != start {
			return time.Now(), p
		}
	}
	t.Fatal("the writer finished no pass in a minute")
	return time.Time{}, 0
}
