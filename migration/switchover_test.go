package migration

import (
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// waitStatus polls query-migrate until m reaches status.
func waitStatus(t *testing.T, m *Migration, status string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		q := query(t, m)
		if q["status"] == status {
			return
		}
		require.True(t, time.Now().Before(deadline), "still %v", q)
	}
}

func TestPauseBeforeSwitchover(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cancel bool
	}{{"continue", false}, {"cancel", true}} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newSource(t, 256, 2, true), newDest(t, 256, 2)
			fill(src.m.mem)
			enableEvents(t, src, dst)
			require.NoError(t, src.mig.SetCapabilities(caps("pause-before-switchover", true)))
			requireQErr(t, src.mig.Continue(StatusPreSwitchover), "Migration not in expected state: none")
			uri := "unix:" + sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
			require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))

			waitStatus(t, src.mig, StatusPreSwitchover)
			require.Equal(t, RunFinishMigrate, src.m.RunState(), "the vCPUs stop before pre-switchover")
			require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION pre-switchover"},
				without(src.m.events.list(), "MIGRATION_PASS"))
			requireQErr(t, src.mig.Continue(StatusActive), "Migration not in expected state: pre-switchover")
			requireQErr(t, src.mig.SetCapabilities(caps("events", true)), "There's a migration process in progress")
			q := query(t, src.mig)
			require.Contains(t, q, "ram")
			require.Contains(t, q, "expected-downtime")

			if tc.cancel {
				require.NoError(t, src.mig.Cancel())
				wait(t, src.mig.Done())
				require.Equal(t, "cancelled", query(t, src.mig)["status"])
				require.Equal(t, RunRunning, src.m.RunState(), "cancel from pre-switchover leaves the guest running")
				require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION pre-switchover",
					"MIGRATION cancelling", "RESUME", "MIGRATION cancelled"}, without(src.m.events.list(), "MIGRATION_PASS"))
				return
			}
			time.Sleep(20 * time.Millisecond) // the downtime counts the wait, from the stop
			require.NoError(t, src.mig.Continue(StatusPreSwitchover))
			wait(t, src.mig.Done())
			wait(t, dst.mig.IncomingDone())
			require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION pre-switchover",
				"MIGRATION device", "MIGRATION completed"}, without(src.m.events.list(), "MIGRATION_PASS"))
			q = query(t, src.mig)
			require.Equal(t, "completed", q["status"])
			require.GreaterOrEqual(t, q["downtime"], float64(20))
			require.Equal(t, src.m.mem, dst.m.mem)
			requireQErr(t, src.mig.Continue(StatusPreSwitchover), "Migration not in expected state: completed")
		})
	}
}

// TestFDTransport migrates over a connected socket pair handed to both ends by name, as
// libvirt passes them with getfd.
func TestFDTransport(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	table := func(name string, f *os.File) FDSource {
		return func(n string) (*os.File, error) {
			if n != name || f == nil {
				return nil, errFDNotFound(n)
			}
			g := f
			f = nil
			return g, nil
		}
	}
	src, dst := newSource(t, 256, 2, true), newDest(t, 256, 2)
	fill(src.m.mem)
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("fd:nope"), FDs: table("in", b)}),
		"File descriptor named 'nope' has not been found")
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{
		Channels: []Channel{{ChannelType: "main", Addr: Address{Transport: "socket", Type: "fd", Str: "in"}}},
		FDs:      table("in", b)}))
	out := table("out", a)
	requireQErr(t, src.mig.Migrate(MigrateArgs{URI: str("fd:in"), FDs: out}), "File descriptor named 'in' has not been found")
	require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("fd:out"), FDs: out}))
	wait(t, src.mig.Done())
	wait(t, dst.mig.IncomingDone())
	require.Equal(t, "completed", query(t, src.mig)["status"])
	require.Equal(t, src.m.mem, dst.m.mem)
}

func TestFDTransportRefusals(t *testing.T) {
	src := newSource(t, 16, 1, false)
	reg, err := os.CreateTemp(t.TempDir(), "f")
	require.NoError(t, err)
	give := func(string) (*os.File, error) { return reg, nil }
	requireQErr(t, src.mig.Migrate(MigrateArgs{URI: str("fd:f"), FDs: give}),
		"fd: migration to a file is not supported. Use file: instead.")
	requireQErr(t, src.mig.Migrate(MigrateArgs{URI: str("fd:3")}), "File descriptor named '3' has not been found")
	dst := newDest(t, 16, 1)
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("fd:3x")}), "Invalid file descriptor number '3x'")
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("fd:name")}), "File descriptor named 'name' has not been found")
}
