package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestListenNeverShowsAnotherMode binds under umask 000 while another goroutine stats the path
// as fast as it can: every time the path exists it must already be a 0600 socket.
func TestListenNeverShowsAnotherMode(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	path := filepath.Join(t.TempDir(), "qmp.sock")
	var stop atomic.Bool
	var seen, bad atomic.Int64
	var badMode atomic.Value
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			fi, err := os.Lstat(path)
			if err != nil {
				continue
			}
			seen.Add(1)
			if fi.Mode() != os.ModeSocket|0o600 {
				bad.Add(1)
				badMode.Store(fi.Mode().String())
			}
		}
	}()
	for range 200 {
		l, err := Listen(path, 0o600)
		require.NoError(t, err)
		require.NoError(t, l.Close())
	}
	stop.Store(true)
	wg.Wait()
	require.Zero(t, bad.Load(), "the socket was seen with mode %v", badMode.Load())
	entries, err := os.ReadDir(filepath.Dir(path))
	require.NoError(t, err)
	require.Empty(t, entries, "nothing is left behind: no socket, no private directory")
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	long := filepath.Join(dir, strings.Repeat("x", MaxPath-len(dir)-1)) // exactly MaxPath bytes
	for _, tc := range []struct {
		name string
		path string
	}{
		{"short path", filepath.Join(dir, "a.sock")},
		{"longest path: bound through the directory's descriptor", long},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Listen(tc.path, 0o600)
			require.NoError(t, err)
			fi, err := os.Lstat(tc.path)
			require.NoError(t, err)
			require.Equal(t, os.ModeSocket|0o600, fi.Mode())
			require.Equal(t, tc.path, l.Addr().String())
			go func() {
				if c, err := l.Accept(); err == nil {
					c.Write([]byte("hi"))
					c.Close()
				}
			}()
			c, err := net.Dial("unix", tc.path)
			require.NoError(t, err)
			b := make([]byte, 2)
			_, err = c.Read(b)
			require.NoError(t, err)
			require.Equal(t, "hi", string(b))
			c.Close()
			require.NoError(t, l.Close())
			_, err = os.Lstat(tc.path)
			require.ErrorIs(t, err, os.ErrNotExist, "closing removes the socket")
		})
	}
	require.Len(t, long, MaxPath)
}

func TestListenRefuses(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, []byte("keep"), 0o644))
	sub := filepath.Join(dir, "sub")
	require.NoError(t, os.Mkdir(sub, 0o755))
	tooLong := filepath.Join(dir, strings.Repeat("y", MaxPath))

	t.Run("too long", func(t *testing.T) {
		_, err := Listen(tooLong, 0o600)
		var tl *PathTooLongError
		require.ErrorAs(t, err, &tl)
		require.Contains(t, err.Error(), "is too long")
		require.Contains(t, err.Error(), "at most 107")
	})
	for _, p := range []string{file, sub} {
		t.Run("existing "+filepath.Base(p), func(t *testing.T) {
			_, err := Listen(p, 0o600)
			require.ErrorIs(t, err, syscall.EADDRINUSE)
		})
	}
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	require.Equal(t, "keep", string(b), "an existing file is never replaced")
	fi, err := os.Stat(sub)
	require.NoError(t, err)
	require.True(t, fi.IsDir())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 2, "no private directory is left behind")
}
