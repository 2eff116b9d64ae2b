package main

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A replay of what libvirt's qemu driver sends for `virsh migrate --live` between two QEMU
// 10 processes, written from libvirt's src/qemu/qemu_migration.c, qemu_migration_params.c
// and qemu_monitor_json.c: the capabilities go as the whole list libvirt knows (with
// pause-before-switchover on the source), TLS parameters are cleared and the bandwidth set,
// libvirt connects the migration socket itself and hands it over with getfd, migrates to
// fd:migrate, answers pre-switchover with migrate-continue, polls query-migrate, runs the
// destination with cont, and finally puts capabilities and parameters back as it found them.

// libvirtCaps are the capabilities of libvirt's qemuMigrationCapability that QEMU 10 offers,
// in libvirt's order; libvirt sends all of them at every migration.
var libvirtCaps = []string{
	"xbzrle", "auto-converge", "rdma-pin-all", "events", "postcopy-ram", "pause-before-switchover",
	"late-block-activate", "multifd", "dirty-bitmaps", "return-path", "zero-copy-send",
	"postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
}

// libvirtUnlimited is libvirt's "no bandwidth limit": QEMU_DOMAIN_MIG_BANDWIDTH_MAX MiB/s.
const libvirtUnlimited = uint64(1<<63-1) / (1 << 20) * (1 << 20)

// monitor is libvirt's side of a QMP socket: one command at a time, events kept as they come,
// a descriptor sent as SCM_RIGHTS with the command that claims it.
type monitor struct {
	t      *testing.T
	name   string
	conn   *net.UnixConn
	rd     *bufio.Reader
	events []map[string]any
}

func openMonitor(t *testing.T, p *inProcess, name string) *monitor {
	c := p.dial(t).(*net.UnixConn)
	m := &monitor{t: t, name: name, conn: c, rd: bufio.NewReader(c)}
	m.read() // greeting
	m.ok("qmp_capabilities", nil)
	return m
}

func (m *monitor) read() map[string]any {
	m.t.Helper()
	require.NoError(m.t, m.conn.SetReadDeadline(time.Now().Add(60*time.Second)))
	line, err := m.rd.ReadBytes('\n')
	require.NoError(m.t, err, "%s: no answer", m.name)
	var v map[string]any
	require.NoError(m.t, json.Unmarshal(line, &v), "%s: %s", m.name, line)
	return v
}

// exec sends a command (with fd as ancillary data if not nil) and returns its reply.
func (m *monitor) exec(cmd string, args any, fd *os.File) map[string]any {
	m.t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	require.NoError(m.t, err)
	var oob []byte
	if fd != nil {
		oob = syscall.UnixRights(int(fd.Fd()))
	}
	_, _, err = m.conn.WriteMsgUnix(b, oob, nil)
	require.NoError(m.t, err)
	for {
		v := m.read()
		if _, ok := v["event"]; ok {
			m.events = append(m.events, v)
			continue
		}
		return v
	}
}

func (m *monitor) ok(cmd string, args any) any {
	m.t.Helper()
	r := m.exec(cmd, args, nil)
	require.Contains(m.t, r, "return", "%s: %s %v: %v", m.name, cmd, args, r)
	return r["return"]
}

// event waits for MIGRATION status (polling query-migrate meanwhile, as libvirt does) and
// returns the MIGRATION statuses seen so far.
func (m *monitor) migrationStatus(want string) []string {
	m.t.Helper()
	for deadline := time.Now().Add(90 * time.Second); ; {
		var seen []string
		for _, ev := range m.events {
			if ev["event"] == "MIGRATION" {
				seen = append(seen, ev["data"].(map[string]any)["status"].(string))
			}
		}
		for _, s := range seen {
			if s == want {
				return seen
			}
		}
		require.True(m.t, time.Now().Before(deadline), "%s: no MIGRATION %s; saw %v", m.name, want, seen)
		q := m.ok("query-migrate", nil).(map[string]any)
		require.NotEqual(m.t, "failed", q["status"], "%s: %v", m.name, q)
		time.Sleep(10 * time.Millisecond)
	}
}

func capList(on ...string) []map[string]any {
	out := make([]map[string]any, len(libvirtCaps))
	for i, c := range libvirtCaps {
		out[i] = map[string]any{"capability": c, "state": strings.Contains(" "+strings.Join(on, " ")+" ", " "+c+" ")}
	}
	return out
}

func runState(m *monitor) string {
	return m.ok("query-status", nil).(map[string]any)["status"].(string)
}

func TestLibvirtMigration(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cancel bool
	}{{"migrate", false}, {"cancel", true}} {
		t.Run(tc.name, func(t *testing.T) {
			machine := []string{"-accel", "kvm,dirty-ring-size=4096", "-smp", "2", "-m", "256",
				"-workload", "cpus=0,mode=write,size=64M,rate=64M", "-workload", "cpus=1,mode=read"}
			dstP := startInProcess(t, append(machine, "-S", "-incoming", "defer")...)
			srcP := startInProcess(t, machine...)
			src, dst := openMonitor(t, srcP, "src"), openMonitor(t, dstP, "dst")

			// Process start (qemuMigrationCapsCheck): the capabilities QEMU has, events on.
			for _, m := range []*monitor{src, dst} {
				have := map[string]bool{}
				for _, c := range m.ok("query-migrate-capabilities", nil).([]any) {
					have[c.(map[string]any)["capability"].(string)] = true
				}
				for _, c := range libvirtCaps {
					require.True(t, have[c], c)
				}
				m.ok("migrate-set-capabilities", map[string]any{"capabilities": []any{map[string]any{"capability": "events", "state": true}}})
			}
			srcParams := src.ok("query-migrate-parameters", nil)
			srcCaps := src.ok("query-migrate-capabilities", nil)

			// Destination (qemuMigrationDstPrepare*, qemuMigrationDstRun).
			dstParams := dst.ok("query-migrate-parameters", nil)
			dst.ok("migrate-set-capabilities", map[string]any{"capabilities": capList("events", "late-block-activate")})
			dst.ok("migrate-set-parameters", map[string]any{"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
			dst.ok("migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"})
			q := dst.ok("query-migrate", nil).(map[string]any)
			addr := q["socket-address"].([]any)[0].(map[string]any)
			port := addr["port"].(string)

			// Source (qemuMigrationSrcRun): parameters, capabilities, the socket, migrate.
			src.ok("migrate-set-capabilities", map[string]any{"capabilities": capList("events", "pause-before-switchover")})
			src.ok("migrate-set-parameters", map[string]any{"tls-creds": "", "tls-hostname": "", "tls-authz": "",
				"max-bandwidth": libvirtUnlimited})
			conn, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
			require.NoError(t, err)
			f, err := conn.(*net.TCPConn).File()
			require.NoError(t, err)
			conn.Close()
			r := src.exec("getfd", map[string]any{"fdname": "migrate"}, nil)
			require.Equal(t, "No file descriptor supplied via SCM_RIGHTS", r["error"].(map[string]any)["desc"])
			r = src.exec("getfd", map[string]any{"fdname": "migrate"}, f)
			require.Contains(t, r, "return", "%v", r)
			f.Close() // libvirt's copy: the daemon holds its own
			src.ok("migrate", map[string]any{"detach": true, "resume": false, "uri": "fd:migrate"})
			r = src.exec("closefd", map[string]any{"fdname": "migrate"}, nil)
			require.Equal(t, "File descriptor named 'migrate' not found", r["error"].(map[string]any)["desc"], "migrate took it")

			seen := src.migrationStatus("pre-switchover")
			require.Equal(t, []string{"setup", "active", "pre-switchover"}, seen)
			require.Equal(t, "finish-migrate", runState(src), "the source stops before pre-switchover")
			r = src.exec("migrate-continue", map[string]any{"state": "active"}, nil)
			require.Equal(t, "Migration not in expected state: pre-switchover", r["error"].(map[string]any)["desc"])

			if tc.cancel {
				src.ok("migrate_cancel", nil)
				require.Equal(t, []string{"setup", "active", "pre-switchover", "cancelling", "cancelled"}, src.migrationStatus("cancelled"))
				require.Equal(t, "running", runState(src), "a cancel in pre-switchover leaves the guest running")
			} else {
				src.ok("migrate-continue", map[string]any{"state": "pre-switchover"})
				require.Equal(t, []string{"setup", "active", "pre-switchover", "device", "completed"}, src.migrationStatus("completed"))
				q := src.ok("query-migrate", nil).(map[string]any)
				require.Equal(t, "completed", q["status"])
				require.Contains(t, q, "downtime")
				require.Equal(t, "postmigrate", runState(src))

				dst.migrationStatus("completed")
				require.Equal(t, "paused", runState(dst), "-S: the destination waits for libvirt's cont")
				dst.ok("cont", nil)
				require.Equal(t, "running", runState(dst))
				// The destination's guest runs: its pages-touched counter moves on.
				touched := func() float64 {
					return dst.ok("x-query-workload", nil).([]any)[0].(map[string]any)["pages"].(float64)
				}
				before := touched()
				for deadline := time.Now().Add(30 * time.Second); touched() == before; time.Sleep(10 * time.Millisecond) {
					require.True(t, time.Now().Before(deadline), "the destination's guest does not run")
				}
			}

			// qemuMigrationParamsReset: the whole list back as it was, the parameters too. After
			// a cancel libvirt kills the destination (whose incoming migration failed).
			resets := []struct {
				mon    *monitor
				params any
			}{{src, srcParams}, {dst, dstParams}}
			if tc.cancel {
				resets = resets[:1]
			}
			for _, m := range resets {
				m.mon.ok("migrate-set-capabilities", map[string]any{"capabilities": capList("events")})
				m.mon.ok("migrate-set-parameters", m.params)
				require.Equal(t, m.params, m.mon.ok("query-migrate-parameters", nil), m.mon.name)
			}
			require.Equal(t, srcCaps, src.ok("query-migrate-capabilities", nil))
		})
	}
}
