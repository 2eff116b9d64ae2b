package vmm

import (
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

func TestRunStateTransitions(t *testing.T) {
	type step struct {
		do      func(m *Machine) error
		state   RunState
		events  []string
		autoRun bool
	}
	cont := func(m *Machine) error { return m.Cont() }
	stop := func(m *Machine) error { return m.Stop() }
	pause := func(to RunState) func(m *Machine) error {
		return func(m *Machine) error { return m.Pause(to) }
	}
	set := func(to RunState) func(m *Machine) error {
		return func(m *Machine) error { m.SetRunState(to); return nil }
	}
	resume := func(m *Machine) error { return m.Resume() }
	for _, tc := range []struct {
		name    string
		initial RunState
		steps   []step
	}{
		{"qmp stop and cont (08-runstate)", Prelaunch, []step{
			{stop, Prelaunch, nil, false},
			{cont, Running, []string{"RESUME"}, false},
			{cont, Running, nil, false},
			{stop, Paused, []string{"STOP"}, false},
			{stop, Paused, nil, false},
			{cont, Running, []string{"RESUME"}, false},
		}},
		{"migration source completes", Running, []step{
			{pause(FinishMigrate), FinishMigrate, []string{"STOP"}, false},
			{set(PostMigrate), PostMigrate, nil, false},
			{stop, PostMigrate, nil, false},
			{cont, Running, []string{"RESUME"}, false},
		}},
		{"migration source cancelled", Running, []step{
			{pause(FinishMigrate), FinishMigrate, []string{"STOP"}, false},
			{resume, Running, []string{"RESUME"}, false},
			{resume, Running, nil, false},
		}},
		{"pause while paused is silent", Paused, []step{
			{pause(FinishMigrate), FinishMigrate, nil, false},
		}},
		{"destination: cont and stop during inmigrate set autostart", InMigrate, []step{
			{cont, InMigrate, nil, true},
			{stop, InMigrate, nil, false},
			{cont, InMigrate, nil, true},
			{resume, Running, []string{"RESUME"}, true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := &events{}
			initial := tc.initial
			if initial == Paused {
				initial = Running
			}
			m := newMachine(t, Config{Accel: AccelSoft, CPUs: 2, Initial: initial, Events: ev,
				Workloads: []Workload{{Mode: ModeWrite, Size: 1 << 20}}})
			if tc.initial == Paused {
				require.NoError(t, m.Stop())
				ev.take()
			}
			for i, s := range tc.steps {
				require.NoError(t, s.do(m), "step %d", i)
				require.Equal(t, s.state, m.RunState(), "step %d", i)
				require.Equal(t, s.events, ev.take(), "step %d", i)
				require.Equal(t, s.autoRun, m.Autostart(), "step %d", i)
			}
		})
	}
}

func TestContNeedsReset(t *testing.T) {
	ev := &events{}
	m := newMachine(t, Config{Accel: AccelSoft, Initial: Running, Events: ev})
	m.SetRunState(Shutdown)
	require.Equal(t, qerr.Generic("Resetting the Virtual Machine is required"), m.Cont())
	require.Equal(t, Shutdown, m.RunState())
	require.Empty(t, ev.take())
}

// The vCPUs run exactly in the running state: a stopped workload makes no progress.
func TestVCPUsRunOnlyWhenRunning(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m := newMachine(t, Config{Accel: accel, Initial: Prelaunch,
			Workloads: []Workload{{Mode: ModeWrite, Size: 1 << 20}, {Mode: ModeRead, Size: 1 << 20}}})
		require.Zero(t, m.WorkloadStats()[0].Pages)
		for range 5 {
			require.NoError(t, m.Cont())
			before := m.WorkloadStats()
			waitFor(t, "progress", func() bool {
				now := m.WorkloadStats()
				return now[0].Pages > before[0].Pages && now[1].Pages > before[1].Pages
			})
			require.NoError(t, m.Stop())
			stopped := m.WorkloadStats()
			m.Harvest()
			for cpu, s := range m.WorkloadStats() {
				require.Equal(t, stopped[cpu].Pages, s.Pages, "stopped vCPU %d made progress", cpu)
			}
		}
	})
}

// After Close the machine answers harmlessly.
func TestAfterClose(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m, err := New(Config{Accel: accel, MemSize: 8 << 20, CPUs: 1, DirtyRingSize: testRing(accel), Initial: Running,
			Workloads: []Workload{{Mode: ModeWrite}}})
		require.NoError(t, err)
		log := m.NewDirtyLog()
		require.NoError(t, m.Close())
		require.NoError(t, m.Close())
		require.Nil(t, m.WorkloadStats())
		m.Harvest()
		require.Zero(t, log.Sync(make([]uint64, 32)))
		require.NoError(t, m.Stop())
	})
}
