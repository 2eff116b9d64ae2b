package qmp

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/migvisor/migvisor/qmp/qmptest"
	"github.com/stretchr/testify/require"
)

// socketPair returns both ends of a connected unix stream socket; unlike net.Pipe, the
// client end can shut down its writing half.
func socketPair(t testing.TB) (client *net.UnixConn, server net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		require.NoError(t, err)
		return c
	}
	return conn(fds[0]).(*net.UnixConn), conn(fds[1])
}

// FuzzServerInput feeds arbitrary bytes to a negotiated session: the server must not panic,
// and everything it writes must be well-formed QMP.
func FuzzServerInput(f *testing.F) {
	paths, err := filepath.Glob(conformance + "*.jsonl")
	require.NoError(f, err)
	for _, p := range paths {
		lines, err := qmptest.Load(p)
		require.NoError(f, err)
		for _, l := range lines {
			if l.Dir == "send" {
				f.Add([]byte(l.Data))
			}
		}
	}
	for _, s := range []string{
		"\xff{'execute': 'echo', 'arguments': {'\\u0000': [1e400, -0, \"\\ud83d\\ude00\"]}}",
		`{"exec-oob": "block"}{"execute": "block"}{"execute": "boom", "id": [{}]}`,
		`{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}{"exec-oob": "migrate-pause", "id": 1}`,
		"[[[[{\"a\": \"\x01\"}]]]]]]]] }}} \"\xc0\x80\"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		srv, vm := newFakeServer(t)
		// "block" must not wait for a hang-up that more input than the server reads ahead
		// would keep it from seeing.
		close(vm.release)
		client, server := socketPair(t)
		defer client.Close()
		require.True(t, srv.reserveSlot())
		srv.start(server)

		out := make(chan []byte)
		go func() {
			b, _ := io.ReadAll(client)
			out <- b
		}()
		_, err := client.Write(append([]byte(`{"execute": "qmp_capabilities"}`), in...))
		require.NoError(t, err)
		require.NoError(t, client.CloseWrite())
		output := <-out
		require.NoError(t, srv.Close())

		require.True(t, len(output) == 0 || bytes.HasSuffix(output, []byte("\r\n")), "%q", output)
		for _, msg := range bytes.Split(bytes.TrimSuffix(output, []byte("\r\n")), []byte("\r\n")) {
			var m map[string]json.RawMessage
			require.NoError(t, json.Unmarshal(withoutInf(msg), &m), "%q", msg)
			n := 0
			for _, k := range []string{"QMP", "return", "error", "event"} {
				if m[k] != nil {
					n++
				}
			}
			require.Equal(t, 1, n, "%q", msg)
			for _, c := range msg {
				require.True(t, c >= 0x20 && c < 0x7F, "non-ASCII or control byte in %q", msg)
			}
		}
	})
}

// withoutInf turns the infinities QEMU prints (inf, -inf: not JSON) outside strings into a JSON
// number, so that the rest of a message can be checked with encoding/json.
func withoutInf(msg []byte) []byte {
	var out []byte
	inString := false
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		switch {
		case inString && c == '\\':
			out = append(out, c, msg[i+1])
			i++
			continue
		case c == '"':
			inString = !inString
		case !inString && bytes.HasPrefix(msg[i:], []byte("inf")):
			out = append(out, "1e999"...)
			i += len("inf") - 1
			continue
		}
		out = append(out, c)
	}
	return out
}
