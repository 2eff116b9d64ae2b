package migration

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestTransportErrorsAsQEMU: every text here is what QEMU 10.0.2 answers for the same URI
// (migrate-incoming's error, or query-migrate's error-desc after migrate).
func TestTransportErrorsAsQEMU(t *testing.T) {
	dir := t.TempDir()
	long := "/tmp/" + strings.Repeat("x", 120)
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, []byte("keep"), 0o644))
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).AddrPort().Port()

	t.Run("parse", func(t *testing.T) {
		for _, tc := range []struct{ uri, want string }{
			{"bogus:foo", "unknown migration protocol: bogus:foo"},
			{"nocolon", "unknown migration protocol: nocolon"},
			{"unix:", "invalid Unix socket address"},
			{"tcp:127.0.0.1", "error parsing address '127.0.0.1'"},
			{"tcp::", "error parsing port in address ':'"},
		} {
			t.Run(tc.uri, func(t *testing.T) {
				_, err := ParseURI(tc.uri)
				requireQErr(t, err, tc.want)
			})
		}
	})
	t.Run("listen", func(t *testing.T) {
		for _, tc := range []struct{ name, uri, want string }{
			{"too long", "unix:" + long, "UNIX socket path '" + long + "' is too long"},
			{"no directory", "unix:/nonexistent/dir/s.sock", "Failed to bind socket to /nonexistent/dir/s.sock: No such file or directory"},
			{"a directory", "unix:" + dir, "Failed to unlink socket " + dir + ": Is a directory"},
			// QEMU would unlink the file; migvisor keeps it, and says what bind says.
			{"a file", "unix:" + file, "Failed to bind socket to " + file + ": Address already in use"},
			{"foreign address", "tcp:192.0.2.1:5555", "Failed to bind socket: Cannot assign requested address"},
			{"port in use", "tcp:127.0.0.1:" + itoa(busyPort), "Failed to find an available port: Address already in use"},
			{"unknown host", "tcp:nohost.invalid:5555", "address resolution failed for nohost.invalid:5555: Name or service not known"},
			{"bad port", "tcp:127.0.0.1:abc", "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype"},
			{"no file", "file:/nonexistent/f", "Could not open '/nonexistent/f': No such file or directory"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				a, err := ParseURI(tc.uri)
				require.NoError(t, err)
				_, err = listen(a)
				requireQErr(t, err, tc.want)
			})
		}
		b, err := os.ReadFile(file)
		require.NoError(t, err)
		require.Equal(t, "keep", string(b))
	})
	t.Run("dial", func(t *testing.T) {
		for _, tc := range []struct{ name, uri, want string }{
			{"too long", "unix:" + long, "UNIX socket path '" + long + "' is too long"},
			{"no socket", "unix:/nonexistent/dir/s.sock", "Failed to connect to '/nonexistent/dir/s.sock': No such file or directory"},
			{"a directory", "unix:" + dir, "Failed to connect to '" + dir + "': Connection refused"},
			{"refused", "tcp:127.0.0.1:1", "Failed to connect to '127.0.0.1:1': Connection refused"},
			{"unknown host", "tcp:nohost.invalid:5555", "address resolution failed for nohost.invalid:5555: Name or service not known"},
			{"no directory for the file", "file:/nonexistent/f", "Could not create '/nonexistent/f': No such file or directory"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				a, err := ParseURI(tc.uri)
				require.NoError(t, err)
				_, err = dial(t.Context(), a)
				requireQErr(t, err, tc.want)
			})
		}
	})
}

// TestFailedListenLeavesSetup: after a migrate-incoming whose transport could not be opened,
// QEMU 10's query-migrate shows setup and another migrate-incoming is refused; a URI that does
// not parse leaves nothing behind.
func TestFailedListenLeavesSetup(t *testing.T) {
	dst := newDest(t, 16, 1)
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("bogus:x")}), "unknown migration protocol: bogus:x")
	require.Empty(t, query(t, dst.mig))
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("unix:/nonexistent/dir/s")}),
		"Failed to bind socket to /nonexistent/dir/s: No such file or directory")
	require.Equal(t, map[string]any{"status": "setup"}, query(t, dst.mig))
	requireQErr(t, dst.mig.MigrateIncoming(IncomingArgs{URI: str("unix:" + sockPath(t))}), "Illegal migration incoming state: setup")
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }
