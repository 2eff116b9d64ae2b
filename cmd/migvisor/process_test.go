package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/qmp"
)

// migvisorBin builds the daemon once per test binary so tests can run it as a real process.
var migvisorBin = func() func(t *testing.T) string {
	var path string
	var err error
	var built bool
	return func(t *testing.T) string {
		t.Helper()
		if !built {
			built = true
			dir, derr := os.MkdirTemp("", "migvisor-bin-")
			if derr != nil {
				err = derr
			} else {
				path = filepath.Join(dir, "migvisor")
				out, berr := exec.Command("go", "build", "-o", path, ".").CombinedOutput()
				if berr != nil {
					err = berr
					t.Logf("%s", out)
				}
			}
		}
		require.NoError(t, err)
		return path
	}
}()

// syncBuffer is a process's stderr, read by the test while the process writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startProcess runs migvisor with args and waits until its QMP socket exists.
func startProcess(t *testing.T, sock string, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(migvisorBin(t), args...)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return cmd, stderr
		}
		if time.Now().After(deadline) {
			t.Fatalf("migvisor did not create %s; stderr: %s", sock, stderr)
		}
	}
}

func TestProcessSocketAndSignal(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	cmd, stderr := startProcess(t, sock, "-accel", "kvm:soft", "-S", "-qmp", "unix:"+sock+",server=on,wait=off")

	fi, err := os.Stat(sock)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the QMP socket must be private to its owner")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, "unix", sock)
	require.NoError(t, err)
	defer c.Close()
	var status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	require.NoError(t, c.Execute(ctx, "query-status", nil, &status))
	require.Equal(t, "prelaunch", status.Status)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case ev := <-c.Events():
		require.Equal(t, "SHUTDOWN", ev.Name)
		var data map[string]any
		require.NoError(t, json.Unmarshal(ev.Data, &data))
		require.Equal(t, map[string]any{"guest": false, "reason": "host-signal"}, data)
	case <-ctx.Done():
		t.Fatal("no SHUTDOWN event after SIGTERM")
	}
	require.NoError(t, cmd.Wait(), "stderr: %s", stderr.String())
	_, err = os.Lstat(sock)
	require.True(t, os.IsNotExist(err), "the socket file must be removed on exit")
}

func TestProcessQuit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	cmd, stderr := startProcess(t, sock, "-accel", "kvm:soft", "-qmp", "unix:"+sock+",server=on,wait=off")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, "unix", sock)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Execute(ctx, "quit", nil, nil), "the quit reply must reach the client before exit")
	require.NoError(t, cmd.Wait(), "stderr: %s", stderr.String())
}

func TestProcessRefusesSocketPath(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "precious")
	require.NoError(t, os.WriteFile(file, []byte("keep me"), 0o644))
	sub := filepath.Join(dir, "sub")
	require.NoError(t, os.Mkdir(sub, 0o755))
	long := filepath.Join(dir, strings.Repeat("x", 120))
	for _, tc := range []struct {
		name, path, want string
	}{
		{"regular file", file, file + " exists and is a regular file, not a socket; not removing it"},
		{"directory", sub, sub + " exists and is a directory, not a socket; not removing it"},
		{"too long", long, fmt.Sprintf("unix socket path '%s' is too long (%d bytes, at most 107)", long, len(long))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(migvisorBin(t), "-accel", "soft", "-qmp", "unix:"+tc.path+",server=on,wait=off").CombinedOutput()
			require.Error(t, err)
			require.Contains(t, string(out), tc.want)
		})
	}
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	require.Equal(t, "keep me", string(b))
	fi, err := os.Stat(sub)
	require.NoError(t, err)
	require.True(t, fi.IsDir())
}

// TestProcessIncomingFailureLoggedOnce: a failed incoming migration ends the daemon (exit-on-error)
// with one line saying why.
func TestProcessIncomingFailureLoggedOnce(t *testing.T) {
	for _, tc := range []struct{ name, uri, want string }{
		{"bad stream", "exec:echo garbage", "incoming migration failed: migration stream: not a migvisor migration stream"},
		{"cannot listen", "unix:/nonexistent/dir/s.sock", "-incoming unix:/nonexistent/dir/s.sock: Failed to bind socket to /nonexistent/dir/s.sock: No such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "m.sock")
			out, err := exec.Command(migvisorBin(t), "-accel", "soft", "-incoming", tc.uri,
				"-qmp", "unix:"+sock+",server=on,wait=off").CombinedOutput()
			require.Error(t, err)
			require.Contains(t, string(out), tc.want)
			require.Equal(t, 1, strings.Count(string(out), "\n"), "one line: %s", out)
		})
	}
}

func TestProcessBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown", []string{"-frobnicate"}, "-frobnicate: invalid option"},
		{"bad ring", []string{"-accel", "kvm,dirty-ring-size=1000"}, "dirty-ring-size must be a power of two."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(migvisorBin(t), tc.args...).CombinedOutput()
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee)
			require.NotEqual(t, 0, ee.ExitCode())
			require.Contains(t, string(out), tc.want)
		})
	}
}
