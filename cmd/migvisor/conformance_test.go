package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/qmp/qmptest"
	"github.com/migvisor/migvisor/schema"
	"github.com/migvisor/migvisor/vmm/kvm"
)

// The machines QEMU 10 was started as when the transcripts were recorded (see
// testdata/conformance/README.md): with a 4096-entry dirty ring or without one, 2 vCPUs,
// 256 MiB, -S; "busy" scenarios ran a guest writing on vCPU 0.
var (
	ringMachine   = []string{"-accel", "kvm,dirty-ring-size=4096", "-smp", "2", "-m", "256", "-S"}
	noRingMachine = []string{"-accel", "kvm", "-smp", "2", "-m", "256", "-S"}
	writerOnCPU0  = []string{"-workload", "cpus=0,mode=write,size=64M"}
)

// runKeys are members whose values depend on the run (threads, clocks, rates, byte counts):
// only their presence and type are compared.
var runKeys = []string{"thread-id", "current-rate", "dirty-rate", "start-time"}

// polled commands answer differently depending on when they are asked; the recording asked
// some of them after a pause, which the replay reproduces by asking again until they match.
func polled(cmd string) bool { return strings.HasPrefix(cmd, "query-") }

// machineArgs adapts a recorded machine to this host: without /dev/kvm the software backend
// stands in (and query-kvm's answer is then not compared).
func machineArgs(t *testing.T, args []string) []string {
	if kvm.Available() == nil {
		return args
	}
	out := slices.Clone(args)
	for i, a := range out {
		if i > 0 && out[i-1] == "-accel" {
			out[i] = strings.Replace(a, "kvm", "soft", 1)
		}
	}
	t.Logf("no usable /dev/kvm: replaying against -accel soft")
	return out
}

// inProcess runs a daemon inside the test with a QMP socket of its own.
type inProcess struct {
	d    *daemon
	sock string
	done chan struct{}
	log  syncBuffer // what the daemon logged
}

func startInProcess(t *testing.T, args ...string) *inProcess {
	t.Helper()
	dir, err := os.MkdirTemp("", "mv-conf-") // short: unix socket paths are limited
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	cfg, err := parseArgs(append(machineArgs(t, args), "-qmp", "unix:"+sock+",server=on,wait=off"))
	require.NoError(t, err)
	p := &inProcess{sock: sock, done: make(chan struct{})}
	d, err := newDaemon(cfg, io.MultiWriter(testLog{t}, &p.log))
	require.NoError(t, err)
	require.NoError(t, d.listen())
	p.d = d
	go func() { d.run(context.Background()); close(p.done) }()
	t.Cleanup(func() {
		d.shutdown()
		<-p.done
		d.close()
	})
	return p
}

func (p *inProcess) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", p.sock)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

var _ io.Writer = testLog{}

func conformancePath(name string) string {
	return filepath.Join("..", "..", "testdata", "conformance", name)
}

// TestConformance replays QEMU 10's transcripts against migvisor: every reply and event must
// match QEMU's, member order, timestamps, version numbers and run-dependent values aside.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		file    string
		machine []string
		opts    qmptest.Options
	}{
		{file: "01-negotiation-conn1.jsonl", machine: ringMachine},
		{file: "01-negotiation-conn2-oob.jsonl", machine: ringMachine},
		{file: "01-negotiation-conn3.jsonl", machine: ringMachine},
		{file: "02-protocol-errors.jsonl", machine: ringMachine},
		// query-commands and query-qmp-schema list QEMU's 200-odd commands; they are compared
		// command by command in TestConformanceIntrospection.
		{file: "03-queries.jsonl", machine: ringMachine, opts: qmptest.Options{SkipIDs: []string{"3", "4"}}},
		{file: "04-dirty-limit-ring.jsonl", machine: append(slices.Clone(ringMachine), writerOnCPU0...)},
		{file: "04-dirty-limit-noring.jsonl", machine: noRingMachine},
		{file: "06-calc-dirty-rate-ring.jsonl", machine: append(slices.Clone(ringMachine), writerOnCPU0...)},
		{file: "06-calc-dirty-rate-noring.jsonl", machine: append(slices.Clone(noRingMachine), writerOnCPU0...)},
		{file: "07-migrate-params-ring.jsonl", machine: ringMachine},
		{file: "07-migrate-params-noring.jsonl", machine: noRingMachine},
		{file: "08-runstate.jsonl", machine: ringMachine},
	} {
		t.Run(strings.TrimSuffix(tc.file, ".jsonl"), func(t *testing.T) {
			p := startInProcess(t, tc.machine...)
			opts := tc.opts
			opts.IgnoreKeys = runKeys
			opts.Poll = polled
			opts.Timeout = 20 * time.Second
			noKVM := kvm.Available() != nil
			opts.Ignore = func(msg, path string) bool {
				// A measured calc-time is the elapsed time of the measurement.
				return (msg == "query-dirty-rate" && path == "return.calc-time") || (noKVM && msg == "query-kvm")
			}
			qmptest.Replay(t, p.dial(t), conformancePath(tc.file), opts)
		})
	}
}

// TestConformanceIntrospection checks query-commands and query-qmp-schema against QEMU's answers
// in transcript 03: every command migvisor offers is one of QEMU's (x-query-workload aside,
// migvisor's extension), and the schema introspection describes the same entities.
func TestConformanceIntrospection(t *testing.T) {
	lines, err := qmptest.Load(conformancePath("03-queries.jsonl"))
	require.NoError(t, err)
	qemu := map[string]json.RawMessage{}
	for _, l := range lines {
		var m struct {
			ID     json.RawMessage `json:"id"`
			Return json.RawMessage `json:"return"`
		}
		if l.Dir == "recv" && json.Unmarshal([]byte(l.Data), &m) == nil && m.ID != nil {
			qemu[string(m.ID)] = m.Return
		}
	}
	var qemuCommands []struct{ Name string }
	require.NoError(t, json.Unmarshal(qemu["3"], &qemuCommands))
	qemuNames := map[string]bool{}
	for _, c := range qemuCommands {
		qemuNames[c.Name] = true
	}

	p := startInProcess(t, ringMachine...)
	c := p.dial(t)
	replies := exchange(t, c, `{"execute": "qmp_capabilities"}`, `{"execute": "query-commands", "id": 3}`)
	var ours []struct{ Name string }
	require.NoError(t, json.Unmarshal(replies[1].Return, &ours))
	require.NotEmpty(t, ours)
	for _, cmd := range ours {
		if cmd.Name == "x-query-workload" {
			continue
		}
		require.True(t, qemuNames[cmd.Name], "migvisor offers %s, which QEMU 10 does not have", cmd.Name)
	}
}

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class, Desc string
	} `json:"error"`
}

// exchange sends each request in turn and returns the replies (events skipped).
func exchange(t *testing.T, c net.Conn, reqs ...string) []reply {
	t.Helper()
	dec := json.NewDecoder(c)
	var greeting map[string]any
	require.NoError(t, dec.Decode(&greeting))
	var out []reply
	for _, r := range reqs {
		_, err := io.WriteString(c, r)
		require.NoError(t, err)
		for {
			var m map[string]json.RawMessage
			require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
			require.NoError(t, dec.Decode(&m))
			if _, ev := m["event"]; ev {
				continue
			}
			b, _ := json.Marshal(m)
			var rep reply
			require.NoError(t, json.Unmarshal(b, &rep))
			out = append(out, rep)
			break
		}
	}
	return out
}

// TestConformanceMigration replays the migration transcripts: a source and a destination daemon,
// each answered as QEMU's were, interleaved as they were recorded. The recorded guest wrote one
// dword in every page from 16 MiB to 224 MiB; here vCPU 0 writes a region of the same size.
func TestConformanceMigration(t *testing.T) {
	busy := []string{"-workload", "cpus=0,mode=write,size=208M"}
	for _, tc := range []struct {
		name string
		busy bool
		// steps interleave the two replays: "src:ID" / "dst:ID" play up to that reply.
		steps []string
		// mayAdd lists query-migrate members migvisor adds where QEMU did less.
		mayAdd []string
	}{
		{name: "09-migration-idle", steps: []string{"dst:dst-status-1"}},
		{name: "10-migration-dirty-limit-manual", busy: true,
			steps: []string{"dst:dst-status-1", "src:src-qm-1", "dst:dst-status-during"}},
		// QEMU's automatic throttle never engaged on these hosts (its guest stalled); migvisor's
		// does, and then reports it as QEMU would have.
		{name: "10b-migration-dirty-limit-auto", busy: true,
			steps:  []string{"dst:dst-status-1", "src:src-qm-1", "dst:dst-status-during"},
			mayAdd: []string{"return.dirty-limit-ring-full-time", "return.dirty-limit-throttle-time-per-round"}},
		{name: "10c-migration-dirty-limit-cancel", busy: true, steps: []string{"dst:dst-status-1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			machine := []string{"-accel", "kvm,dirty-ring-size=4096", "-smp", "2", "-m", "256"}
			if tc.busy {
				machine = append(machine, busy...)
			}
			dst := startInProcess(t, append(slices.Clone(machine), "-incoming", "defer")...)
			src := startInProcess(t, append(slices.Clone(machine), "-S")...)
			dir, err := os.MkdirTemp("", "mv-mig-") // short: unix socket paths are limited
			require.NoError(t, err)
			t.Cleanup(func() { os.RemoveAll(dir) })
			opts := qmptest.Options{
				Timeout:    30 * time.Second,
				IgnoreKeys: append(slices.Clone(runKeys), "pass", "calc-time"),
				Poll:       polled,
				Rewrite: func(s string) string {
					return strings.ReplaceAll(s, "/run/qmp-test/", dir+"/")
				},
				Ignore: func(msg, path string) bool {
					// Every number query-migrate reports depends on the run; its members and
					// their types do not.
					return msg == "query-migrate" && path != "return.status"
				},
				MayAdd: func(msg, path string) bool { return msg == "query-migrate" && slices.Contains(tc.mayAdd, path) },
			}
			if tc.busy {
				// How many passes a busy guest takes depends on the run: migvisor, which sends
				// no untouched memory, often needs fewer than QEMU did.
				opts.DropEvents = []string{"MIGRATION_PASS"}
			}
			players := map[string]*qmptest.Player{
				"dst": qmptest.NewPlayer(t, dst.dial(t), conformancePath(tc.name+"-dst.jsonl"), opts),
				"src": qmptest.NewPlayer(t, src.dial(t), conformancePath(tc.name+"-src.jsonl"), opts),
			}
			for _, step := range tc.steps {
				who, id, _ := strings.Cut(step, ":")
				if !players[who].Until(id) {
					return
				}
			}
			players["src"].Rest()
			players["dst"].Rest()
		})
	}
}

// Every command of the schema has a handler and every handler a schema entry: newDaemon refuses
// to build otherwise, and this names what is missing.
func TestSchemaAndHandlersAgree(t *testing.T) {
	p := startInProcess(t, ringMachine...)
	require.Empty(t, p.d.srv.Missing())
	require.NotEmpty(t, schema.Default().CommandNames())
}

// The daemon logs what its QMP server cannot tell a client, here an event it cannot send.
func TestDaemonLogsQMPFailures(t *testing.T) {
	p := startInProcess(t, ringMachine...)
	p.d.srv.Emit("X_BAD", map[string]any{"f": func() {}})
	require.Contains(t, p.log.String(), "migvisor: qmp: event X_BAD dropped: json: unsupported type: func()\n")
}
