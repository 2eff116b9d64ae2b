package dirtylimit_test

import (
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/dirtylimit"
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
