package qmptest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// recorder collects what Replay reports instead of failing the test.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper()             {}
func (r *recorder) Logf(string, ...any) {}
func (r *recorder) Errorf(format string, a ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, a...))
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "v10"}, "capabilities": ["oob"]}}`

// transcript writes a transcript: ">" lines are sends, others are recvs.
func transcript(t *testing.T, lines ...string) string {
	var b strings.Builder
	for _, l := range lines {
		dir, data := "recv", l+"\r\n"
		if s, ok := strings.CutPrefix(l, ">"); ok {
			dir, data = "send", s+"\n"
		}
		j, err := json.Marshal(Line{dir, data})
		require.NoError(t, err)
		b.Write(j)
		b.WriteByte('\n')
	}
	path := filepath.Join(t.TempDir(), "t.jsonl")
	require.NoError(t, os.WriteFile(path, []byte(b.String()), 0o644))
	return path
}

// scripted is a server that writes out[0] at once and out[i] after reading its i-th line.
func scripted(t *testing.T, out ...[]string) net.Conn {
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close() })
	go func() {
		defer server.Close()
		rd := bufio.NewReader(server)
		for i, msgs := range out {
			if i > 0 {
				if _, err := rd.ReadString('\n'); err != nil {
					return
				}
			}
			for _, m := range msgs {
				if _, err := server.Write([]byte(m + "\r\n")); err != nil {
					return
				}
			}
		}
	}()
	return client
}

func TestReplay(t *testing.T) {
	const stop = `{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`
	for _, tc := range []struct {
		name   string
		lines  []string   // the transcript
		server [][]string // what the server says
		opts   Options
		errs   []string // substrings of the expected reports, in order
	}{
		{
			name:   "same, other member order, other version and timestamp",
			lines:  []string{greeting, `>{"execute": "stop", "id": 1}`, stop, `{"return": {}, "id": 1}`},
			server: [][]string{{`{"QMP": {"capabilities": ["oob"], "version": {"qemu": {"micro": 0, "minor": 1, "major": 10}, "package": ""}}}`}, {`{"timestamp": {"seconds": 9, "microseconds": 9}, "event": "STOP"}`, `{"id": 1, "return": {}}`}},
		},
		{
			name:   "event after the reply that caused it",
			lines:  []string{greeting, `>{"execute": "stop", "id": 1}`, stop, `{"return": {}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {}, "id": 1}`, stop}},
		},
		{
			name:   "replies matched by id",
			lines:  []string{greeting, `>{"execute": "a", "id": "a"}{"exec-oob": "b", "id": "b"}`, `{"return": 1, "id": "a"}`, `{"return": 2, "id": "b"}`},
			server: [][]string{{greeting}, {`{"return": 2, "id": "b"}`, `{"return": 1, "id": "a"}`}},
		},
		{
			name:   "different value",
			lines:  []string{greeting, `>{"execute": "q", "id": 1}`, `{"return": {"status": "running", "n": 1}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"status": "paused", "n": 1, "x": 2}, "id": 1}`}},
			errs:   []string{`q: return.status: want "running", got "paused"`, `return.x: unexpected 2`},
		},
		{
			name:   "ignored keys keep their type",
			lines:  []string{greeting, `>{"execute": "q", "id": 1}`, `{"return": [{"thread-id": 5, "cpu": 0}, {"thread-id": 6, "cpu": 1}], "id": 1}`},
			server: [][]string{{greeting}, {`{"return": [{"thread-id": 7, "cpu": 0}, {"thread-id": "x", "cpu": 1}], "id": 1}`}},
			opts:   Options{IgnoreKeys: []string{"thread-id"}},
			errs:   []string{`return[1].thread-id: want a number, got a string`},
		},
		{
			name:   "ignore by command and path",
			lines:  []string{greeting, `>{"execute": "query-migrate", "id": 1}`, `{"return": {"ram": {"total": 5}}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"ram": {"total": 6}}, "id": 1}`}},
			opts:   Options{Ignore: func(msg, path string) bool { return msg == "query-migrate" && path == "return.ram.total" }},
		},
		{
			name:   "selected ids",
			lines:  []string{greeting, `>{"execute": "a", "id": "a"}`, `{"return": 1, "id": "a"}`, `>{"execute": "b", "id": "b"}`, `{"return": 1, "id": "b"}`},
			server: [][]string{{greeting}, {`{"return": 9, "id": "a"}`}, {`{"return": 8, "id": "b"}`}},
			opts:   Options{OnlyIDs: []string{"b"}},
			errs:   []string{"b: return: want 1, got 8"},
		},
		{
			name:   "skipped ids",
			lines:  []string{greeting, `>{"execute": "a", "id": "a"}`, `{"return": 1, "id": "a"}`},
			server: [][]string{{greeting}, {`{"return": 9, "id": "a"}`}},
			opts:   Options{SkipIDs: []string{"a"}},
		},
		{
			name:   "exact",
			lines:  []string{greeting, `>{"execute": "a"}`, `{"return": {"x": 1, "y": 2}}`},
			server: [][]string{{greeting}, {`{"return": {"y": 2, "x": 1}}`}},
			opts:   Options{Exact: true},
			errs:   []string{`got "{\"return\": {\"y\": 2, \"x\": 1}}\r\n", want "{\"return\": {\"x\": 1, \"y\": 2}}\r\n"`},
		},
		{
			name:   "missing reply ends the replay",
			lines:  []string{greeting, `>{"execute": "a", "id": 1}`, `{"return": {}, "id": 1}`, `>{"execute": "b"}`},
			server: [][]string{{greeting}, {}},
			opts:   Options{Timeout: 50 * time.Millisecond},
			errs:   []string{"t.jsonl:3: no matching message"},
		},
		{
			name:   "polled query matches on a later answer",
			lines:  []string{greeting, `>{"execute": "query-x", "id": 1}`, `{"return": {"status": "done"}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"status": "busy"}, "id": 1}`}, {`{"return": {"status": "done"}, "id": 1}`}},
			opts:   Options{Poll: func(cmd string) bool { return cmd == "query-x" }, PollInterval: time.Millisecond},
		},
		{
			name:   "polled query reports the last answer when time runs out",
			lines:  []string{greeting, `>{"execute": "query-x", "id": 1}`, `{"return": {"status": "done"}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"status": "busy"}, "id": 1}`}, {`{"return": {"status": "stuck"}, "id": 1}`}},
			opts:   Options{Poll: func(cmd string) bool { return cmd == "query-x" }, PollInterval: 30 * time.Millisecond, Timeout: 20 * time.Millisecond},
			errs:   []string{`return.status: want "done", got "stuck"`},
		},
		{
			name:   "members the server may add",
			lines:  []string{greeting, `>{"execute": "q", "id": 1}`, `{"return": {"a": 1}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"a": 1, "b": 2, "c": 3}, "id": 1}`}},
			opts:   Options{MayAdd: func(msg, path string) bool { return msg == "q" && path == "return.b" }},
			errs:   []string{"return.c: unexpected 3"},
		},
		{
			name:   "rewritten paths",
			lines:  []string{greeting, `>{"execute": "a", "arguments": {"uri": "unix:/run/qmp-test/x"}, "id": 1}`, `{"return": {"path": "/run/qmp-test/x"}, "id": 1}`},
			server: [][]string{{greeting}, {`{"return": {"path": "/tmp/x"}, "id": 1}`}},
			opts:   Options{Rewrite: func(s string) string { return strings.ReplaceAll(s, "/run/qmp-test/", "/tmp/") }},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{TB: t}
			Replay(rec, scripted(t, tc.server...), transcript(t, tc.lines...), tc.opts)
			require.Len(t, rec.errs, len(tc.errs), "%q", rec.errs)
			for i, want := range tc.errs {
				require.Contains(t, rec.errs[i], want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	lines, err := Load("../../testdata/conformance/08-runstate.jsonl")
	require.NoError(t, err)
	require.Equal(t, "recv", lines[0].Dir)
	require.Equal(t, Line{"send", "{\"execute\": \"qmp_capabilities\"}\n"}, lines[1])

	bad := filepath.Join(t.TempDir(), "bad.jsonl")
	require.NoError(t, os.WriteFile(bad, []byte(`{"dir": "sideways", "data": ""}`), 0o644))
	_, err = Load(bad)
	require.ErrorContains(t, err, "sideways")
}

// Two connections interleaved step by step, as a migration's two ends are.
func TestPlayer(t *testing.T) {
	a := transcript(t, greeting, `>{"execute": "x", "id": "a1"}`, `{"return": 1, "id": "a1"}`, `>{"execute": "y", "id": "a2"}`, `{"return": 2, "id": "a2"}`)
	b := transcript(t, greeting, `>{"execute": "z", "id": "b1"}`, `{"return": 3, "id": "b1"}`)

	// b's server answers only once a has sent its second request.
	aSent := make(chan struct{})
	aClient, aServer := net.Pipe()
	defer aClient.Close()
	go func() {
		defer aServer.Close()
		rd := bufio.NewReader(aServer)
		aServer.Write([]byte(greeting + "\r\n"))
		rd.ReadString('\n')
		aServer.Write([]byte(`{"return": 1, "id": "a1"}` + "\r\n"))
		rd.ReadString('\n')
		close(aSent)
		aServer.Write([]byte(`{"return": 2, "id": "a2"}` + "\r\n"))
	}()
	bClient, bServer := net.Pipe()
	defer bClient.Close()
	go func() {
		defer bServer.Close()
		bServer.Write([]byte(greeting + "\r\n"))
		bufio.NewReader(bServer).ReadString('\n')
		<-aSent
		bServer.Write([]byte(`{"return": 3, "id": "b1"}` + "\r\n"))
	}()

	rec := &recorder{TB: t}
	pa, pb := NewPlayer(rec, aClient, a, Options{}), NewPlayer(rec, bClient, b, Options{})
	require.True(t, pa.Until("a1"))
	pa.Rest()
	pb.Rest()
	require.Empty(t, rec.errs)

	require.False(t, NewPlayer(rec, scripted(t, []string{greeting}), a, Options{Timeout: time.Millisecond}).Until("nope"))
	require.NotEmpty(t, rec.errs)
}
