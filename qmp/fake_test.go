package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

// fakeCatalog knows a handful of commands: those without arguments, qmp_capabilities, and
// "echo", which takes any arguments.
type fakeCatalog struct{}

var fakeCommands = []string{
	"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
	"query-status", "query-kvm", "stop", "cont", "quit", "migrate-pause", "echo", "block", "boom",
	"getfd", "closefd", "add-fd", "remove-fd", "query-fdsets",
}

func (fakeCatalog) Exists(cmd string) bool   { return slices.Contains(fakeCommands, cmd) }
func (fakeCatalog) AllowOOB(cmd string) bool { return cmd == "migrate-pause" || cmd == "block" }
func (fakeCatalog) CommandNames() []string   { return fakeCommands }
func (fakeCatalog) Introspect() json.RawMessage {
	return json.RawMessage(`[{"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"}]`)
}

func (fakeCatalog) Validate(cmd string, args json.RawMessage) (json.RawMessage, error) {
	if args == nil || cmd == "echo" || strings.Contains(cmd, "fd") {
		if args == nil {
			args = json.RawMessage("{}")
		}
		return args, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(args, &m); err != nil {
		return nil, err
	}
	for k, v := range m {
		if cmd != "qmp_capabilities" || k != "enable" {
			return nil, qerr.Generic("Parameter '%s' is unexpected", k)
		}
		var caps []string
		if err := json.Unmarshal(v, &caps); err != nil {
			return nil, qerr.Generic("Invalid parameter type for 'enable', expected: array")
		}
		for _, c := range caps {
			if c != "oob" {
				return nil, qerr.Generic("Parameter 'null' does not accept value '%s'", c)
			}
		}
	}
	return args, nil
}

// fakeVM answers the fake commands like QEMU started with -S.
type fakeVM struct {
	srv     *Server
	mu      sync.Mutex
	status  string        // QEMU's run state
	quit    chan struct{} // closed by quit
	started chan struct{} // block has started
	release chan struct{} // block may return
}

func newFakeServer(t testing.TB) (*Server, *fakeVM) {
	srv := NewServer(fakeCatalog{}, Version{Major: 10, Minor: 0, Micro: 2, Package: "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"})
	srv.onPanic = func(r any) { t.Errorf("server panicked: %v", r) }
	vm := &fakeVM{srv: srv, status: "prelaunch", quit: make(chan struct{}), started: make(chan struct{}, 16), release: make(chan struct{})}
	srv.Handle("query-status", func(context.Context, json.RawMessage) (any, error) {
		vm.mu.Lock()
		defer vm.mu.Unlock()
		return struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}{vm.status, vm.status == "running"}, nil
	})
	srv.Handle("query-kvm", func(context.Context, json.RawMessage) (any, error) {
		return map[string]bool{"enabled": true, "present": true}, nil
	})
	srv.Handle("stop", func(context.Context, json.RawMessage) (any, error) {
		vm.mu.Lock()
		defer vm.mu.Unlock()
		if vm.status == "running" {
			vm.status = "paused"
			srv.Emit("STOP", nil)
		}
		return nil, nil
	})
	srv.Handle("cont", func(context.Context, json.RawMessage) (any, error) {
		vm.mu.Lock()
		defer vm.mu.Unlock()
		if vm.status != "running" {
			vm.status = "running"
			srv.Emit("RESUME", nil)
		}
		return nil, nil
	})
	var quitOnce sync.Once
	srv.Handle("quit", func(context.Context, json.RawMessage) (any, error) {
		srv.Emit("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})
		quitOnce.Do(func() { close(vm.quit) })
		return nil, nil
	})
	srv.Handle("migrate-pause", func(context.Context, json.RawMessage) (any, error) {
		return nil, errors.New("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
	})
	srv.Handle("echo", func(_ context.Context, args json.RawMessage) (any, error) {
		return args, nil
	})
	srv.Handle("block", func(ctx context.Context, _ json.RawMessage) (any, error) {
		select {
		case vm.started <- struct{}{}:
		default: // nobody is watching
		}
		select {
		case <-vm.release:
			return "released", nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	srv.Handle("boom", func(context.Context, json.RawMessage) (any, error) {
		panic("boom")
	})
	return srv, vm
}

// serveUnix serves srv on a fresh unix socket and returns its path; the server is closed at
// the end of the test.
func serveUnix(t testing.TB, srv *Server) string {
	dir, err := os.MkdirTemp("", "qmp")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		require.NoError(t, srv.Close())
		require.NoError(t, <-served)
	})
	return sock
}

// fakeListener hands out what the test queues: connections, or errors as Accept's result.
type fakeListener struct {
	accepts chan acceptResult
	closed  chan struct{}
	once    sync.Once
}

type acceptResult struct {
	conn net.Conn
	err  error
}

func newFakeListener() *fakeListener {
	return &fakeListener{accepts: make(chan acceptResult), closed: make(chan struct{})}
}

func (l *fakeListener) Accept() (net.Conn, error) {
	select {
	case r := <-l.accepts:
		return r.conn, r.err
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *fakeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *fakeListener) Addr() net.Addr { return &net.UnixAddr{Name: "fake", Net: "unix"} }

// logLines collects what the server logs.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

// matching returns the lines that contain s.
func (l *logLines) matching(s string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return out
}
