package migration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// end is one side of a test migration.
type end struct {
	m    *fakeMachine
	mig  *Migration
	lim  *fakeLimiter
	logs *logLines
}

func newSource(t *testing.T, pages, cpus int, ring bool) *end {
	fm := newFakeMachine(pages, cpus)
	lim := &fakeLimiter{m: fm, limitRate: 0}
	logs := &logLines{t: t}
	e := &end{m: fm, lim: lim, logs: logs, mig: New(Config{Machine: fm, Limiter: lim, Events: fm.events, DirtyRing: ring,
		Workloads: []byte("idle"), Logf: logs.logf})}
	t.Cleanup(func() { e.mig.Close(); fm.close() })
	return e
}

func newDest(t *testing.T, pages, cpus int) *end {
	fm := newFakeMachine(pages, cpus)
	fm.state = RunInmigrate
	// Garbage where the source has zeros: zero pages must be written, not skipped.
	for i := range fm.mem {
		fm.mem[i] = 0x5a
	}
	e := &end{m: fm, mig: New(Config{Machine: fm, Events: fm.events, Incoming: true,
		Workloads: []byte("idle"), Logf: t.Logf})}
	t.Cleanup(func() { e.mig.Close(); fm.close() })
	return e
}

// migrateTo migrates src to dst, already listening on uri, and waits for both ends to finish.
func migrateTo(t *testing.T, src, dst *end, uri string) {
	t.Helper()
	require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
	wait(t, src.mig.Done())
	wait(t, dst.mig.IncomingDone())
}

func sockPath(t *testing.T) string {
	dir, err := os.MkdirTemp("", "mig")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

func str(s string) *string { return &s }

func wait(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	require.NotNil(t, ch)
	select {
	case <-ch:
	case <-time.After(60 * time.Second):
		t.Fatal("migration did not end")
	}
}

func query(t *testing.T, m *Migration) map[string]any {
	b, err := json.Marshal(m.Query())
	require.NoError(t, err)
	var out map[string]any
	require.NoError(t, json.Unmarshal(b, &out))
	return out
}

// fill gives the guest recognisable contents with zero pages in between.
func fill(mem []byte) {
	for p := 0; p < len(mem)/PageSize; p++ {
		if p%3 == 0 {
			continue
		}
		for i := 0; i < PageSize; i += 512 {
			mem[p*PageSize+i] = byte(p) | 1
		}
	}
}

func enableEvents(t *testing.T, es ...*end) {
	for _, e := range es {
		require.NoError(t, e.mig.SetCapabilities(caps("events", true)))
	}
}

func TestMigrateIdleGuest(t *testing.T) {
	src, dst := newSource(t, 256, 2, true), newDest(t, 256, 2)
	fill(src.m.mem)
	enableEvents(t, src, dst)
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	require.Equal(t, map[string]any{"status": "setup",
		"socket-address": []any{map[string]any{"type": "unix", "path": strings.TrimPrefix(uri, "unix:")}}},
		query(t, dst.mig))
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}), "The incoming migration has already been started")
	migrateTo(t, src, dst, uri)

	require.Equal(t, []string{"MIGRATION setup", "MIGRATION_PASS 1", "MIGRATION active", "STOP",
		"MIGRATION device", "MIGRATION_PASS 2", "MIGRATION completed"}, src.m.events.list())
	require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "RESUME", "MIGRATION completed"},
		dst.m.events.list())
	require.Equal(t, RunPostmigrate, src.m.RunState())
	require.Equal(t, RunRunning, dst.m.RunState())
	require.Equal(t, src.m.mem, dst.m.mem)
	require.Equal(t, "vcpu-state", string(dst.m.loaded))

	q := query(t, src.mig)
	require.Equal(t, "completed", q["status"])
	for _, k := range []string{"setup-time", "downtime", "total-time", "ram"} {
		require.Contains(t, q, k)
	}
	require.NotContains(t, q, "expected-downtime")
	ram := q["ram"].(map[string]any)
	require.EqualValues(t, 256*PageSize, ram["total"])
	require.EqualValues(t, 86, ram["duplicate"], "every third page is zero")
	require.EqualValues(t, 170, ram["normal"])
	require.EqualValues(t, 170*PageSize, ram["normal-bytes"])
	require.EqualValues(t, 2, ram["dirty-sync-count"])
	require.EqualValues(t, 0, ram["remaining"])
	require.EqualValues(t, PageSize, ram["page-size"])
	require.Greater(t, ram["transferred"], float64(170*PageSize))
	require.Len(t, ram, 17)
	require.Equal(t, map[string]any{"status": "completed"}, query(t, dst.mig))

	// postmigrate refuses another migration; cont (Resume) allows it again.
	requireQErr(t, src.mig.Migrate(MigrateArgs{URI: &uri}), "Can't migrate the vm that was paused due to previous migration")
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}), "The incoming migration has already been started")
}

func TestMigrateRefusals(t *testing.T) {
	src := newSource(t, 16, 1, false)
	dst := newDest(t, 16, 1)
	uri := "unix:" + sockPath(t)
	for _, tc := range []struct {
		name string
		e    *end
		args MigrateArgs
		want string
	}{
		{"neither", src, MigrateArgs{}, "need either 'uri' or 'channels' argument"},
		{"both", src, MigrateArgs{URI: &uri, Channels: []Channel{}}, "need either 'uri' or 'channels' argument"},
		{"scheme", src, MigrateArgs{URI: str("bogus:x")}, "unknown migration protocol: bogus:x"},
		{"no scheme", src, MigrateArgs{URI: str("/tmp/x")}, "unknown migration protocol: /tmp/x"},
		{"rdma", src, MigrateArgs{URI: str("rdma:1.2.3.4:5")}, "migvisor does not support the rdma migration transport"},
		{"duplicate channel", src, MigrateArgs{Channels: []Channel{{ChannelType: "main"}, {ChannelType: "main"}}}, "Channel list has more than one main entry"},
		{"no main", src, MigrateArgs{Channels: []Channel{}}, "Channel list has no main entry"},
		{"resume", src, MigrateArgs{URI: &uri, Resume: ptr(true)}, "Cannot resume if there is no paused migration"},
		{"inmigrate", dst, MigrateArgs{URI: &uri}, "Guest is waiting for an incoming migration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireQErr(t, tc.e.mig.Migrate(tc.args), tc.want)
			require.Nil(t, tc.e.mig.Done())
		})
	}
	requireQErr(t, src.mig.MigrateIncoming(IncomingArgs{URI: &uri}), "'-incoming' was not specified on the command line")
	for _, tc := range []struct{ params, want string }{
		{`{"mode": "cpr-transfer"}`, "missing 'cpr' migration channel"},
		{`{"mode": "cpr-reboot"}`, "migvisor does not support mode 'cpr-reboot'"},
		{`{"tls-creds": "tls0"}`, "No TLS credentials with id 'tls0'"},
	} {
		t.Run(tc.params, func(t *testing.T) {
			m := newSource(t, 16, 1, false)
			require.NoError(t, m.mig.SetParameters(setParams(t, tc.params)))
			requireQErr(t, m.mig.Migrate(MigrateArgs{URI: &uri}), tc.want)
		})
	}
	t.Run("tls-creds on the destination", func(t *testing.T) {
		d := newDest(t, 16, 1)
		require.NoError(t, d.mig.SetParameters(setParams(t, `{"tls-creds": "tls0"}`)))
		requireQErr(t, d.mig.MigrateIncoming(IncomingArgs{URI: &uri}), "No TLS credentials with id 'tls0'")
		require.Nil(t, d.mig.IncomingDone(), "nothing listens for a plaintext stream")
	})
}

// A guest that keeps writing converges when the link is fast, and both memories end equal.
func TestMigrateBusyGuest(t *testing.T) {
	src, dst := newSource(t, 2048, 2, true), newDest(t, 2048, 2)
	fill(src.m.mem)
	src.m.start(2, 512)
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 0}`)))
	migrateTo(t, src, dst, uri)
	require.Equal(t, "completed", query(t, src.mig)["status"])
	require.Equal(t, src.m.mem, dst.m.mem)
	require.Equal(t, RunRunning, dst.m.RunState())
}

// migrateThrottled runs a migration that cannot converge without throttling: the guest
// dirties far more than max-bandwidth carries.
func migrateThrottled(t *testing.T, src *end, capName string, params string) *end {
	dst := newDest(t, 2048, 2)
	fill(src.m.mem)
	src.m.start(8, 1024) // 2 × 8 pages/ms ≈ 64 MiB/s against 4 MiB/s
	require.NoError(t, src.mig.SetCapabilities(caps(capName, true, "events", true)))
	require.NoError(t, src.mig.SetParameters(setParams(t, params)))
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	migrateTo(t, src, dst, uri)
	require.Equal(t, "completed", query(t, src.mig)["status"])
	require.Equal(t, src.m.mem, dst.m.mem)
	return dst
}

func TestAutoConverge(t *testing.T) {
	src := newSource(t, 2048, 2, true)
	seen := make(chan int64, 1)
	go func() { // watch query-migrate for the throttle while it runs
		for {
			q := src.mig.Query()
			if q.CPUThrottlePercentage != nil {
				seen <- *q.CPUThrottlePercentage
				return
			}
			if q.Status == StatusCompleted || q.Status == StatusFailed {
				close(seen)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	migrateThrottled(t, src, "auto-converge",
		`{"max-bandwidth": 4194304, "cpu-throttle-initial": 99, "throttle-trigger-threshold": 1, "downtime-limit": 50}`)
	require.EqualValues(t, 99, <-seen)
	require.Positive(t, src.m.hooks.Load(), "the sleep is served through the machine's hook")
	require.Nil(t, src.m.hook.Load(), "the hook is removed when the migration ends")
	require.NotContains(t, query(t, src.mig), "cpu-throttle-percentage")
	require.Empty(t, src.lim.list(), "auto-converge leaves the dirty limit alone")
}

func TestDirtyLimitConverges(t *testing.T) {
	src := newSource(t, 2048, 2, true)
	migrateThrottled(t, src, "dirty-limit",
		`{"max-bandwidth": 4194304, "vcpu-dirty-limit": 3, "x-vcpu-dirty-limit-period": 250, "throttle-trigger-threshold": 1, "downtime-limit": 50}`)
	require.Equal(t, []string{"active", "period 250ms", "set 3", "cancel", "inactive", "period 1s"}, src.lim.list())
	q := query(t, src.mig)
	require.NotContains(t, q, "dirty-limit-throttle-time-per-round", "lifted: the limiter is out of service")
}

func TestDirtyLimitLeavesUserLimits(t *testing.T) {
	src := newSource(t, 2048, 2, true)
	src.lim.inService = true // the user set a limit before migrating
	src.lim.limitRate = 0
	src.m.setRate(0)
	dst := newDest(t, 2048, 2)
	require.NoError(t, src.mig.SetCapabilities(caps("dirty-limit", true)))
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
	wait(t, src.mig.Done())
	q := query(t, src.mig)
	require.EqualValues(t, 7, q["dirty-limit-throttle-time-per-round"])
	require.EqualValues(t, 11, q["dirty-limit-ring-full-time"])
	require.Equal(t, []string{"active", "period 1s", "inactive", "period 1s"}, src.lim.list())
	require.True(t, src.lim.InService())
}

func TestSetParametersDuringMigration(t *testing.T) {
	src, dst := newSource(t, 2048, 1, true), newDest(t, 2048, 1)
	fill(src.m.mem)
	require.NoError(t, src.mig.SetCapabilities(caps("dirty-limit", true)))
	require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 1048576}`))) // ~6 s of pages
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
	requireQErr(t, src.mig.SetCapabilities(caps("dirty-limit", false)), "There's a migration process in progress")
	requireQErr(t, src.mig.Migrate(MigrateArgs{URI: str("unix:/tmp/never-used.sock")}), "There's a migration process in progress")
	require.NoError(t, src.mig.SetParameters(setParams(t, `{"x-vcpu-dirty-limit-period": 250}`)))
	require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 0}`))) // and it finishes now
	wait(t, src.mig.Done())
	require.Equal(t, "completed", query(t, src.mig)["status"])
	require.Contains(t, src.lim.list(), "period 250ms")
}

// rawDest accepts one connection and hands it to f (a misbehaving destination).
func rawDest(t *testing.T, f func(net.Conn)) string {
	path := sockPath(t)
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	go func() {
		c, err := l.Accept()
		l.Close()
		if err == nil {
			f(c)
		}
	}()
	return "unix:" + path
}

// acceptHeader reads the header and accepts it on the return path, as a destination does.
func acceptHeader(c net.Conn) (*Decoder, Header, error) {
	d := NewDecoder(c)
	h, err := d.ReadHeader()
	if err == nil {
		err = writeReply(c, nil)
	}
	return d, h, err
}

// readToTrailer decodes a whole stream the way a destination would, and stops there.
func readToTrailer(c net.Conn) {
	d, h, err := acceptHeader(c)
	if err != nil {
		return
	}
	mem := make([]byte, h.Config.MemSize)
	for {
		r, err := d.Next(mem)
		if err != nil || r.Kind == KindTrailer {
			return
		}
	}
}

// requireSourceIntact checks the source after a fault: outcome, guest running, and that it
// can migrate again to a good destination.
func requireSourceIntact(t *testing.T, src *end, status string, resumed bool) {
	t.Helper()
	wait(t, src.mig.Done())
	q := query(t, src.mig)
	require.Equal(t, status, q["status"], "%v", q)
	require.Equal(t, RunRunning, src.m.RunState())
	evs := without(src.m.events.list(), "MIGRATION_PASS")
	require.Equal(t, resumed, strings.Contains(strings.Join(evs, ","), "STOP"), "%v", evs)
	require.Equal(t, resumed, strings.Contains(strings.Join(evs, ","), "RESUME"), "%v", evs)
	if status == StatusFailed {
		require.NotEmpty(t, q["error-desc"])
	}

	dst := newDest(t, len(src.m.mem)/PageSize, src.m.ncpu)
	uri := "unix:" + sockPath(t)
	require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
	require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 0}`)))
	migrateTo(t, src, dst, uri)
	require.Equal(t, "completed", query(t, src.mig)["status"])
	require.Equal(t, src.m.mem, dst.m.mem)
}

func TestFaults(t *testing.T) {
	t.Run("connection refused", func(t *testing.T) {
		src := newSource(t, 64, 1, false)
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("unix:" + sockPath(t))}))
		requireSourceIntact(t, src, StatusFailed, false)
	})
	t.Run("destination dies mid-stream", func(t *testing.T) {
		// Far more memory than the socket buffers hold: the source is still sending.
		src := newSource(t, 8192, 1, false)
		fill(src.m.mem)
		uri := rawDest(t, func(c net.Conn) {
			if d, _, err := acceptHeader(c); err == nil {
				io.CopyN(io.Discard, d.r, 100000)
			}
			c.Close()
		})
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		requireSourceIntact(t, src, StatusFailed, false)
	})
	t.Run("destination dies after the guest stopped", func(t *testing.T) {
		src := newSource(t, 64, 1, false)
		fill(src.m.mem)
		uri := rawDest(t, func(c net.Conn) { readToTrailer(c); c.Close() })
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		requireSourceIntact(t, src, StatusFailed, true)
	})
	// libvirt sets return-path on both ends so that the source learns of a failure at the
	// destination; on sockets migvisor always has that, whatever the capability says.
	for _, rp := range []bool{true, false} {
		t.Run(fmt.Sprintf("refusal reaches the source with return-path %v", rp), func(t *testing.T) {
			src, dst := newSource(t, 64, 1, false), newDest(t, 128, 1)
			require.NoError(t, src.mig.SetCapabilities(caps("return-path", rp)))
			require.NoError(t, dst.mig.SetCapabilities(caps("return-path", rp, "late-block-activate", rp)))
			uri := "unix:" + sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
			require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
			wait(t, src.mig.Done())
			require.Contains(t, query(t, src.mig)["error-desc"], "the destination refused the migration")
			wait(t, dst.mig.IncomingDone())
			require.Equal(t, RunInmigrate, dst.m.RunState())
			requireSourceIntact(t, src, StatusFailed, false)
		})
	}
	t.Run("another machine", func(t *testing.T) {
		src, dst := newSource(t, 64, 1, false), newDest(t, 128, 1)
		uri := "unix:" + sockPath(t)
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		wait(t, src.mig.Done())
		require.Equal(t, "the destination refused the migration: migration stream: the source has 262144 bytes of memory, this machine has 524288",
			query(t, src.mig)["error-desc"])
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, RunInmigrate, dst.m.RunState())
		requireSourceIntact(t, src, StatusFailed, false)
	})
	t.Run("cancel while active", func(t *testing.T) {
		src, dst := newSource(t, 2048, 1, false), newDest(t, 2048, 1)
		enableEvents(t, src)
		fill(src.m.mem)
		require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 1048576}`)))
		uri := "unix:" + sockPath(t)
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		for query(t, src.mig)["status"] != "active" {
			time.Sleep(time.Millisecond)
		}
		require.NoError(t, src.mig.Cancel())
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, RunInmigrate, dst.m.RunState())
		requireSourceIntact(t, src, StatusCancelled, false)
		evs := without(src.m.events.list(), "MIGRATION_PASS")
		require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "MIGRATION cancelling", "MIGRATION cancelled"}, evs[:4])
	})
	t.Run("cancel while the destination verifies", func(t *testing.T) {
		src := newSource(t, 64, 1, false)
		enableEvents(t, src)
		stalled := make(chan struct{})
		uri := rawDest(t, func(c net.Conn) { readToTrailer(c); close(stalled); io.Copy(io.Discard, c) })
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		<-stalled
		require.Equal(t, "device", query(t, src.mig)["status"])
		require.Equal(t, RunFinishMigrate, src.m.RunState())
		require.NoError(t, src.mig.Cancel())
		requireSourceIntact(t, src, StatusCancelled, true)
		evs := without(src.m.events.list(), "MIGRATION_PASS")
		require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION device",
			"MIGRATION cancelling", "RESUME", "MIGRATION cancelled"}, evs[:7])
	})
	t.Run("cancel an exec migration", func(t *testing.T) {
		src := newSource(t, 1024, 1, false)
		fill(src.m.mem)
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("exec:sleep 60")})) // never reads
		for query(t, src.mig)["status"] != "active" {
			time.Sleep(time.Millisecond)
		}
		require.NoError(t, src.mig.Cancel())
		requireSourceIntact(t, src, StatusCancelled, false)
	})
	t.Run("exec command fails", func(t *testing.T) {
		for _, tc := range []struct {
			name, cmd string
			pages     int
			want      string
			stopped   bool // the failure came after the stop
		}{
			{"after reading", "cat >/dev/null; echo oops >&2; exit 3", 16,
				`migration command failed: the command ended with exit status 3; its stderr: "oops"`, true},
			// More than a pipe holds: the source must find the command gone.
			{"without reading", "echo cannot >&2; exit 4", 1024,
				`the migration command stopped reading the stream (write |1: broken pipe); the command ended with exit status 4; its stderr: "cannot"`, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				src := newSource(t, tc.pages, 1, false)
				fill(src.m.mem)
				require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("exec:" + tc.cmd)}))
				wait(t, src.mig.Done())
				require.Contains(t, query(t, src.mig)["error-desc"], tc.want)
				requireSourceIntact(t, src, StatusFailed, tc.stopped)
			})
		}
	})
	t.Run("destination gone in the device phase", func(t *testing.T) {
		src := newSource(t, 64, 1, false)
		src.m.cpu = make([]byte, 32<<20) // more than both socket buffers: still going out at the close
		uri := rawDest(t, func(c net.Conn) {
			acceptHeader(c)
			b := make([]byte, 64<<10)
			for src.m.RunState() != RunFinishMigrate {
				if _, err := c.Read(b); err != nil {
					break
				}
			}
			c.Close()
		})
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		wait(t, src.mig.Done())
		require.Regexp(t, `^sending (the last pages \(\d+-\d+\)|the vCPU state|the memory digest) \(device phase\): .*(broken pipe|connection reset)`,
			query(t, src.mig)["error-desc"])
		requireSourceIntact(t, src, StatusFailed, true)
	})
	t.Run("exec command of the destination fails", func(t *testing.T) {
		dst := newDest(t, 16, 1)
		no := false
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("exec:echo gone >&2; exit 5"), ExitOnError: &no}))
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, `the migration command's stream ended: the command ended with exit status 5; its stderr: "gone"`,
			query(t, dst.mig)["error-desc"])
	})
	t.Run("cancel during setup", func(t *testing.T) {
		src := newSource(t, 64, 1, false)
		// A listener that never accepts: the connection stays in the backlog.
		path := sockPath(t)
		l, err := net.Listen("unix", path)
		require.NoError(t, err)
		defer l.Close()
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("unix:" + path)}))
		require.NoError(t, src.mig.Cancel())
		requireSourceIntact(t, src, StatusCancelled, false)
	})
	t.Run("destination keeps waiting without exit-on-error", func(t *testing.T) {
		dst := newDest(t, 64, 1)
		uri := rawDest(t, func(net.Conn) {})
		path := sockPath(t)
		no := false
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("unix:" + path), ExitOnError: &no}))
		c, err := net.Dial("unix", path)
		require.NoError(t, err)
		c.Write([]byte("QEVM garbage"))
		c.Close()
		wait(t, dst.mig.IncomingDone())
		require.Contains(t, query(t, dst.mig)["error-desc"], "not a migvisor migration stream")
		_ = uri
		src := newSource(t, 64, 1, false)
		fill(src.m.mem)
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("unix:" + path)}))
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: str("unix:" + path)}))
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, src.m.mem, dst.m.mem)
		require.Equal(t, RunRunning, dst.m.RunState())
	})
}

// corruptingProxy forwards a stream to the destination at dpath, decoding it as it goes, and
// lets corrupt change the bytes of one record: it is called with each record (and its raw
// bytes, to edit in place) until it returns true. The return path is forwarded untouched.
func corruptingProxy(t *testing.T, dpath string, corrupt func(r Record, b []byte) bool) string {
	return rawDest(t, func(c net.Conn) {
		defer c.Close()
		d, err := net.Dial("unix", dpath)
		if err != nil {
			return
		}
		defer d.Close()
		go io.Copy(c, d)
		var seen bytes.Buffer // what the decoder read from the source, at offsets dec.n counts
		dec := NewDecoder(io.TeeReader(c, &seen))
		sent := 0
		forward := func() error {
			_, err := d.Write(seen.Bytes()[sent:dec.n])
			sent = int(dec.n)
			return err
		}
		h, err := dec.ReadHeader()
		if err != nil || forward() != nil {
			return
		}
		mem := make([]byte, h.Config.MemSize)
		done := false
		for {
			start := int(dec.n)
			r, err := dec.Next(mem)
			if err != nil {
				return
			}
			if !done {
				done = corrupt(r, seen.Bytes()[start:dec.n])
			}
			if forward() != nil {
				return
			}
			if r.Kind == KindTrailer {
				io.Copy(d, dec.r) // the go-ahead, if the destination accepted
				return
			}
		}
	})
}

// A bit flipped in any kind of record on the way is refused by the destination, which never
// loads the vCPU state nor runs the guest, and the source resumes its guest.
func TestCorruptStreamRefused(t *testing.T) {
	// Byte offsets in a RAM record: tag, flags, first page (u64), count (u32).
	const ramFirstLow = 9
	for _, tc := range []struct {
		name    string
		corrupt func(r Record, b []byte) bool
		want    error
	}{
		{"RAM header", func(r Record, b []byte) bool {
			// The run moves one page down, inside memory: only a digest can tell.
			if r.Kind != KindPages || r.First%2 == 0 {
				return false
			}
			b[ramFirstLow] ^= 1
			return true
		}, ErrStreamDigestMismatch},
		{"RAM payload", func(r Record, b []byte) bool {
			if r.Kind != KindPages {
				return false
			}
			b[ramHeaderLen+200] ^= 0x10
			return true
		}, ErrDigestMismatch},
		{"EOS", func(r Record, b []byte) bool {
			if r.Kind != KindEndOfSection {
				return false
			}
			b[len(b)-1] ^= 1
			return true
		}, ErrStreamDigestMismatch},
		{"CPU", func(r Record, b []byte) bool {
			if r.Kind != KindCPU {
				return false
			}
			b[len(b)-1] ^= 1
			return true
		}, ErrStreamDigestMismatch},
		{"END memory digest", func(r Record, b []byte) bool {
			if r.Kind != KindTrailer {
				return false
			}
			b[1] ^= 1
			return true
		}, ErrStreamDigestMismatch},
		{"END stream digest", func(r Record, b []byte) bool {
			if r.Kind != KindTrailer {
				return false
			}
			b[len(b)-1] ^= 0x80
			return true
		}, ErrStreamDigestMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newSource(t, 64, 1, false), newDest(t, 64, 1)
			enableEvents(t, dst)
			fill(src.m.mem)
			dpath := sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("unix:" + dpath)}))
			var corrupted atomic.Bool
			uri := corruptingProxy(t, dpath, func(r Record, b []byte) bool {
				ok := tc.corrupt(r, b)
				if ok {
					corrupted.Store(true)
				}
				return ok
			})
			require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
			wait(t, dst.mig.IncomingDone())
			require.True(t, corrupted.Load(), "the stream had no such record")
			q := query(t, dst.mig)
			require.Equal(t, "failed", q["status"])
			require.Equal(t, tc.want.Error(), q["error-desc"])
			require.Equal(t, RunInmigrate, dst.m.RunState(), "never runs a half-received guest")
			require.Zero(t, dst.m.resumes)
			require.Nil(t, dst.m.loaded, "the vCPU state of a refused stream is not loaded")
			require.Equal(t, []string{"MIGRATION setup", "MIGRATION active", "MIGRATION failed"}, dst.m.events.list())
			wait(t, src.mig.Done())
			require.Equal(t, "the destination refused the migration: "+tc.want.Error(), query(t, src.mig)["error-desc"])
			requireSourceIntact(t, src, StatusFailed, true)
		})
	}
}

func TestExitOnErrorCallsIncomingFailed(t *testing.T) {
	fm := newFakeMachine(64, 1)
	fm.state = RunInmigrate
	failed := make(chan error, 1)
	mig := New(Config{Machine: fm, Incoming: true, IncomingFailed: func(err error) { failed <- err }})
	path := sockPath(t)
	require.NoError(t, mig.StartIncoming("unix:"+path))
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	c.Close()
	require.ErrorContains(t, <-failed, "truncated after 0 bytes")
	requireQErr(t, mig.MigrateIncoming(IncomingArgs{URI: str("unix:" + path)}), "The incoming migration has already been started")
}

func TestTransports(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		out, in func() (MigrateArgs, IncomingArgs)
	}{
		{"file", func() (MigrateArgs, IncomingArgs) {
			f := filepath.Join(dir, "saved")
			return MigrateArgs{URI: str("file:" + f)}, IncomingArgs{URI: str("file:" + f)}
		}, nil},
		{"file channel with offset", func() (MigrateArgs, IncomingArgs) {
			a := Address{Transport: "file", Filename: filepath.Join(dir, "saved2"), Offset: 4096}
			ch := []Channel{{ChannelType: "main", Addr: a}}
			return MigrateArgs{Channels: ch}, IncomingArgs{Channels: ch}
		}, nil},
		{"exec", func() (MigrateArgs, IncomingArgs) {
			f := filepath.Join(dir, "piped")
			return MigrateArgs{URI: str("exec:cat > " + f)}, IncomingArgs{URI: str("exec:cat " + f)}
		}, nil},
		{"exec channel", func() (MigrateArgs, IncomingArgs) {
			f := filepath.Join(dir, "piped2")
			return MigrateArgs{Channels: []Channel{{ChannelType: "main", Addr: Address{Transport: "exec", Args: []string{"/bin/sh", "-c", "cat > " + f}}}}},
				IncomingArgs{Channels: []Channel{{ChannelType: "main", Addr: Address{Transport: "exec", Args: []string{"cat", f}}}}}
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, in := tc.out()
			src := newSource(t, 128, 1, false)
			fill(src.m.mem)
			require.NoError(t, src.mig.Migrate(out))
			wait(t, src.mig.Done())
			require.Equal(t, "completed", query(t, src.mig)["status"], "%v", query(t, src.mig))
			dst := newDest(t, 128, 1)
			require.NoError(t, dst.mig.MigrateIncoming(in))
			wait(t, dst.mig.IncomingDone())
			require.Equal(t, "completed", query(t, dst.mig)["status"], "%v", query(t, dst.mig))
			require.Equal(t, src.m.mem, dst.m.mem)
		})
	}
	t.Run("tcp", func(t *testing.T) {
		src, dst := newSource(t, 128, 1, false), newDest(t, 128, 1)
		fill(src.m.mem)
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("tcp:127.0.0.1:0")}))
		sa := dst.mig.Query().SocketAddress
		require.Len(t, sa, 1)
		require.Equal(t, "inet", sa[0].Type)
		require.Equal(t, "127.0.0.1", sa[0].Host)
		require.NoError(t, src.mig.Migrate(MigrateArgs{Channels: []Channel{{ChannelType: "main",
			Addr: Address{Transport: "socket", Type: "inet", Host: "127.0.0.1", Port: sa[0].Port}}}}))
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, src.m.mem, dst.m.mem)
	})
	t.Run("paused with -S", func(t *testing.T) {
		src, dst := newSource(t, 16, 1, false), newDest(t, 16, 1)
		dst.mig.cfg.Autostart = func() bool { return false }
		uri := "unix:" + sockPath(t)
		require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
		require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
		wait(t, dst.mig.IncomingDone())
		require.Equal(t, RunPaused, dst.m.RunState())
		require.Zero(t, dst.m.resumes)
	})
}

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		uri  string
		want Address
	}{
		{"unix:/run/x.sock", Address{Transport: "socket", Type: "unix", Path: "/run/x.sock"}},
		{"tcp:localhost:4444", Address{Transport: "socket", Type: "inet", Host: "localhost", Port: "4444"}},
		{"tcp::4444", Address{Transport: "socket", Type: "inet", Host: "", Port: "4444"}},
		{"tcp:[::1]:4444", Address{Transport: "socket", Type: "inet", Host: "::1", Port: "4444"}},
		{"exec:gzip -c > f", Address{Transport: "exec", Args: []string{"/bin/sh", "-c", "gzip -c > f"}}},
		{"file:/x,offset=0x1000", Address{Transport: "file", Filename: "/x", Offset: 4096}},
	} {
		t.Run(tc.uri, func(t *testing.T) {
			got, err := ParseURI(tc.uri)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
	_, err := ParseURI("tcp:nohost")
	require.Error(t, err)
}

func BenchmarkTransport(b *testing.B) {
	for _, tc := range []struct{ name, uri string }{
		{"unix", "unix:"}, {"tcp", "tcp:127.0.0.1:0"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			uri := tc.uri
			if uri == "unix:" {
				dir := b.TempDir()
				uri += filepath.Join(dir, "s")
			}
			a, err := ParseURI(uri)
			require.NoError(b, err)
			l, err := listen(a)
			require.NoError(b, err)
			if sa := l.addresses(); a.Type == "inet" {
				a.Port = sa[0].Port
			}
			got := make(chan int64)
			go func() {
				c, err := l.accept()
				if err != nil {
					got <- 0
					return
				}
				n, _ := io.Copy(io.Discard, c)
				got <- n
			}()
			out, err := dial(b.Context(), a)
			require.NoError(b, err)
			chunk := bytes.Repeat([]byte{1}, 1<<20)
			b.SetBytes(int64(len(chunk)))
			for b.Loop() {
				if _, err := out.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			out.finish()
			<-got
		})
	}
}

// BenchmarkMigrateIdle migrates an idle guest (two thirds of its pages non-zero) over a unix
// socket, without a bandwidth limit: throughput end to end and downtime. With the default
// downtime-limit (300 ms) the guest stops with what the link carries in 300 ms still to send,
// and the downtime is mostly that send; with 20 ms nearly all memory went out before the stop,
// and the downtime is mostly the check of all memory against what was sent.
func BenchmarkMigrateIdle(b *testing.B) {
	for _, bc := range []struct {
		size          int
		downtimeLimit uint64
	}{{512 << 20, 300}, {512 << 20, 20}, {1 << 30, 300}, {1 << 30, 20}} {
		b.Run(fmt.Sprintf("%dMiB/downtime-limit=%d", bc.size>>20, bc.downtimeLimit), func(b *testing.B) {
			size := bc.size
			pages := size / PageSize
			srcM := newFakeMachine(pages, 1)
			fill(srcM.mem)
			src := New(Config{Machine: srcM})
			require.NoError(b, src.SetParameters(&SetParameters{MaxBandwidth: ptr(uint64(0)),
				DowntimeLimit: ptr(bc.downtimeLimit)}))
			dstM := newFakeMachine(pages, 1)
			b.SetBytes(int64(size))
			var downtime int64
			for b.Loop() {
				dstM.state = RunInmigrate
				dst := New(Config{Machine: dstM, Incoming: true})
				uri := "unix:" + filepath.Join(b.TempDir(), "s")
				require.NoError(b, dst.MigrateIncoming(IncomingArgs{URI: &uri}))
				srcM.state = RunRunning
				require.NoError(b, src.Migrate(MigrateArgs{URI: &uri}))
				<-src.Done()
				<-dst.IncomingDone()
				q := src.Query()
				require.Equal(b, StatusCompleted, q.Status, q.ErrorDesc)
				downtime += *q.Downtime
			}
			b.ReportMetric(float64(downtime)/float64(b.N), "downtime-ms")
		})
	}
}

// Pages the dirty log never reported are found (by the scrub while precopy waits for its
// bandwidth, and at the stop, which then checks all of memory) and sent again: the
// destination runs the guest's real memory, and the source says what the log missed.
func TestMissedPagesAreSentAgain(t *testing.T) {
	for _, tc := range []struct {
		name      string
		bandwidth string
	}{{"scrubbed while precopy waits", "8388608"}} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newSource(t, 512, 1, false), newDest(t, 512, 1)
			fill(src.m.mem)
			src.m.lossy.Store(true)
			src.m.start(4, 512)
			// 2 MiB at 8 MiB/s: the guest writes pages already sent for a quarter of a second.
			require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": `+tc.bandwidth+`}`)))
			uri := "unix:" + sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
			migrateTo(t, src, dst, uri)
			q := query(t, src.mig)
			require.Equal(t, "completed", q["status"], q["error-desc"])
			require.Equal(t, src.m.mem, dst.m.mem)
			require.Contains(t, src.logs.String(), "changed without being reported dirty")
		})
	}
}

// The check of memory at the stop is skipped only for a guest that did not run at all during
// the migration: one resumed in the middle, whose writes the (broken) dirty log misses, is
// checked, and what the log missed is sent again.
func TestStoppedGuestIsCheckedOnceItRuns(t *testing.T) {
	for _, tc := range []struct {
		name   string
		resume bool
	}{{"stopped throughout", false}, {"resumed during the migration", true}} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newSource(t, 8192, 1, false), newDest(t, 8192, 1)
			fill(src.m.mem)
			src.m.lossy.Store(true)
			src.m.start(4, 512)
			src.m.SetRunState(RunPaused)
			require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 16777216}`)))
			uri := "unix:" + sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
			require.NoError(t, src.mig.Migrate(MigrateArgs{URI: &uri}))
			if tc.resume {
				require.Eventually(t, func() bool { return src.mig.Query().RAM != nil && src.mig.Query().RAM.Transferred > 0 },
					10*time.Second, time.Millisecond)
				require.NoError(t, src.m.Resume())
			}
			wait(t, src.mig.Done())
			wait(t, dst.mig.IncomingDone())
			q := query(t, src.mig)
			require.Equal(t, "completed", q["status"], q["error-desc"])
			require.Equal(t, src.m.mem, dst.m.mem)
		})
	}
}

// A guest that was stopped on the source stays stopped on the destination, as QEMU carries the
// run state over; a running one runs.
func TestSourceRunStateCarriesOver(t *testing.T) {
	for _, tc := range []struct {
		src, want string
	}{{RunPaused, RunPaused}, {"prelaunch", RunPaused}, {RunRunning, RunRunning}} {
		t.Run(tc.src, func(t *testing.T) {
			// 32 MiB at 64 MiB/s with a 2 s downtime budget: QEMU's rule would stop the guest
			// with most of memory still to send.
			src, dst := newSource(t, 8192, 1, true), newDest(t, 8192, 1)
			fill(src.m.mem)
			require.NoError(t, src.mig.SetParameters(setParams(t, `{"max-bandwidth": 67108864, "downtime-limit": 2000}`)))
			src.m.SetRunState(tc.src)
			uri := "unix:" + sockPath(t)
			require.NoError(t, dst.mig.MigrateIncoming(IncomingArgs{URI: &uri}))
			migrateTo(t, src, dst, uri)
			q := query(t, src.mig)
			require.Equal(t, "completed", q["status"])
			require.Equal(t, tc.want, dst.m.RunState())
			require.Equal(t, src.m.mem, dst.m.mem)
			if tc.src != RunRunning {
				// Nothing dirties a stopped guest: all of memory went before the stop, which
				// carried only the vCPU state.
				require.Less(t, q["ram"].(map[string]any)["downtime-bytes"], float64(PageSize))
			}
		})
	}
}
