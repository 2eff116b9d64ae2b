package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// MaxPath is the longest path a unix socket address holds: sun_path's 108 bytes less the NUL.
const MaxPath = len(unix.RawSockaddrUnix{}.Path) - 1

// PathTooLongError is a socket path longer than MaxPath (bind reports only EINVAL).
type PathTooLongError struct{ Path string }

func (e *PathTooLongError) Error() string {
	return fmt.Sprintf("unix socket path '%s' is too long (%d bytes, at most %d)", e.Path, len(e.Path), MaxPath)
}

// CheckPath returns a *PathTooLongError for a path no unix socket address can hold.
func CheckPath(path string) error {
	if len(path) > MaxPath {
		return &PathTooLongError{Path: path}
	}
	return nil
}

// Listen listens on a new unix socket at path with the given mode (see the package comment).
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	if err := CheckPath(path); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".migvisor-sock-") // created 0700
	if err != nil {
		return nil, err
	}
	defer os.Remove(dir)
	tmp := filepath.Join(dir, "s")
	bind := tmp
	if len(bind) > MaxPath {
		// The private directory made the path too long: bind through the directory's
		// descriptor instead, which resolves to the same place.
		d, err := os.Open(dir)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		bind = fmt.Sprintf("/proc/self/fd/%d/s", d.Fd())
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: bind, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
		l.Close()
		os.Remove(tmp)
		if errors.Is(err, unix.EEXIST) {
			err = syscall.EADDRINUSE // something appeared at path meanwhile: never replace it
		}
		return nil, &net.OpError{Op: "listen", Net: "unix", Addr: &net.UnixAddr{Name: path, Net: "unix"},
			Err: os.NewSyscallError("bind", err)}
	}
	fi, err := os.Lstat(path)
	if err != nil {
		l.Close()
		return nil, err
	}
	return &listener{UnixListener: l, path: path, fi: fi}, nil
}

// listener reports the path it was renamed to and removes it on close.
type listener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
}

func (l *listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *listener) Close() error {
	err := l.UnixListener.Close()
	if fi, serr := os.Lstat(l.path); serr == nil && os.SameFile(fi, l.fi) {
		os.Remove(l.path)
	}
	return err
}
