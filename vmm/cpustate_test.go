package vmm

import (
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/vmm/kvm"
	"github.com/stretchr/testify/require"
)

// A machine loaded with another's memory and vCPU state carries on where it stopped.
func TestSaveLoadCPU(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		cfg := Config{Accel: accel, Initial: Running,
			Workloads: []Workload{{Mode: ModeWrite, Size: 64 * PageSize}, {Mode: ModeRead, Size: 32 * PageSize}}}
		src := newMachine(t, cfg)
		_, err := src.SaveCPU()
		require.Equal(t, qerr.Generic(errNotPaused), err)
		waitFor(t, "some passes", func() bool { return src.WorkloadStats()[0].Passes > 3 })
		require.NoError(t, src.Pause(FinishMigrate))
		blob, err := src.SaveCPU()
		require.NoError(t, err)
		at := src.WorkloadStats()

		cfg.Initial = InMigrate
		dst := newMachine(t, cfg)
		require.Error(t, dst.LoadCPU(blob[:len(blob)-1]))
		require.Error(t, dst.LoadCPU(append([]byte("XXXX"), blob[4:]...)))
		copy(dst.Memory(), src.Memory())
		require.NoError(t, dst.LoadCPU(blob))
		require.Equal(t, at, dst.WorkloadStats()[:2], "the records came with the memory")
		require.NoError(t, dst.Resume())
		waitFor(t, "progress", func() bool {
			s := dst.WorkloadStats()
			return s[0].Passes > at[0].Passes+2 && s[1].Passes > at[1].Passes+2
		})
		require.NoError(t, dst.Stop())
		for cpu, s := range dst.WorkloadStats() {
			// Pages and passes go on from the saved values, so a restart from zero would show.
			// The stop may fall between a pass's pages being published and the pass counted.
			full := s.Pages / (s.RegionSize / PageSize)
			require.Contains(t, []uint64{full, full - 1}, s.Passes, "vCPU %d", cpu)
			require.Greater(t, s.Pages, at[cpu].Pages, "vCPU %d", cpu)
		}
	})
}

// State saved by one accelerator restarts the workloads on the other at the progress their
// records show.
func TestLoadCPUAcrossAccelerators(t *testing.T) {
	if err := kvm.Available(); err != nil {
		t.Skipf("KVM is not usable here: %v", err)
	}
	for _, pair := range [][2]string{{AccelSoft, AccelKVM}, {AccelKVM, AccelSoft}} {
		t.Run(pair[0]+"-to-"+pair[1], func(t *testing.T) {
			w := []Workload{{Mode: ModeWrite, Size: 64 * PageSize}}
			src := newMachine(t, Config{Accel: pair[0], CPUs: 1, Initial: Running, Workloads: w})
			waitFor(t, "some passes", func() bool { return src.WorkloadStats()[0].Passes > 3 })
			require.NoError(t, src.Pause(FinishMigrate))
			blob, err := src.SaveCPU()
			require.NoError(t, err)
			at := src.WorkloadStats()[0]

			dst := newMachine(t, Config{Accel: pair[1], CPUs: 1, Initial: InMigrate, Workloads: w})
			copy(dst.Memory(), src.Memory())
			require.NoError(t, dst.LoadCPU(blob))
			require.NoError(t, dst.Resume())
			waitFor(t, "progress", func() bool { return dst.WorkloadStats()[0].Passes > at.Passes+2 })
		})
	}
}
