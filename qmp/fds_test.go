package qmp

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// sendWithFD writes msg with fd as SCM_RIGHTS ancillary data, as libvirt sends getfd.
func sendWithFD(t *testing.T, c *rawConn, msg string, fd *os.File) {
	t.Helper()
	_, _, err := c.Conn.(*net.UnixConn).WriteMsgUnix([]byte(msg), syscall.UnixRights(int(fd.Fd())), nil)
	require.NoError(t, err)
}

func TestFileDescriptors(t *testing.T) {
	srv, _ := newFakeServer(t)
	taken := make(chan *os.File, 1)
	srv.Handle("echo", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a struct{ Name string }
		require.NoError(t, json.Unmarshal(args, &a))
		f, err := SessionFDs(ctx).Take(a.Name)
		if err != nil {
			return nil, err
		}
		taken <- f
		return nil, nil
	})
	sock := serveUnix(t, srv)
	c := dialRaw(t, sock)
	c.negotiate(t, "")

	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()

	steps := []struct {
		name, send, want string
		fd               bool
	}{
		{"getfd without a descriptor", `{"execute": "getfd", "arguments": {"fdname": "m"}}`,
			`{"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}`, false},
		{"name starting with a digit", `{"execute": "getfd", "arguments": {"fdname": "1m"}}`,
			`{"error": {"class": "GenericError", "desc": "Parameter 'fdname' expects a name not starting with a digit"}}`, true},
		{"the descriptor was used up", `{"execute": "getfd", "arguments": {"fdname": "m"}}`,
			`{"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}`, false},
		{"getfd", `{"execute": "getfd", "arguments": {"fdname": "m"}}`, `{"return": {}}`, true},
		{"same name again replaces it", `{"execute": "getfd", "arguments": {"fdname": "m"}}`, `{"return": {}}`, true},
		{"closefd unknown", `{"execute": "closefd", "arguments": {"fdname": "x"}}`,
			`{"error": {"class": "GenericError", "desc": "File descriptor named 'x' not found"}}`, false},
		{"take unknown", `{"execute": "echo", "arguments": {"Name": "x"}}`,
			`{"error": {"class": "GenericError", "desc": "File descriptor named 'x' has not been found"}}`, false},
		{"take", `{"execute": "echo", "arguments": {"Name": "m"}}`, `{"return": {}}`, false},
		{"taken is gone", `{"execute": "closefd", "arguments": {"fdname": "m"}}`,
			`{"error": {"class": "GenericError", "desc": "File descriptor named 'm' not found"}}`, false},
		{"getfd to keep", `{"execute": "getfd", "arguments": {"fdname": "kept"}}`, `{"return": {}}`, true},
		{"getfd to close", `{"execute": "getfd", "arguments": {"fdname": "c"}}`, `{"return": {}}`, true},
		{"closefd", `{"execute": "closefd", "arguments": {"fdname": "c"}}`, `{"return": {}}`, false},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			if st.fd {
				sendWithFD(t, c, st.send, w)
			} else {
				c.send(t, st.send)
			}
			require.Equal(t, st.want, c.line(t))
		})
	}
	f := <-taken
	_, err = f.Write([]byte("x"))
	require.NoError(t, err, "the taken descriptor is the pipe passed")
	f.Close()
	buf := make([]byte, 1)
	_, err = io.ReadFull(r, buf)
	require.NoError(t, err)

	// Another client has a table of its own.
	c2 := dialRaw(t, sock)
	c2.negotiate(t, "")
	c2.send(t, `{"execute": "closefd", "arguments": {"fdname": "kept"}}`)
	require.Equal(t, `{"error": {"class": "GenericError", "desc": "File descriptor named 'kept' not found"}}`, c2.line(t))

	// The session's end closes "kept": once ours is closed too, the pipe reports EOF.
	w.Close()
	c.Close()
	require.NoError(t, r.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = r.Read(buf)
	require.ErrorIs(t, err, io.EOF)
}

func TestFdsets(t *testing.T) {
	srv, _ := newFakeServer(t)
	c := dialRaw(t, serveUnix(t, srv))
	c.negotiate(t, "")
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	defer f.Close()

	add := func(args string) (set, fd int64) {
		sendWithFD(t, c, `{"execute": "add-fd", "arguments": {`+args+`}}`, f)
		var rep struct {
			Return struct {
				Set int64 `json:"fdset-id"`
				FD  int64 `json:"fd"`
			} `json:"return"`
		}
		l := c.line(t)
		require.NoError(t, json.Unmarshal([]byte(l), &rep), l)
		return rep.Return.Set, rep.Return.FD
	}
	c.send(t, `{"execute": "add-fd"}`)
	require.Equal(t, `{"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}`, c.line(t))
	sendWithFD(t, c, `{"execute": "add-fd", "arguments": {"fdset-id": -1}}`, f)
	require.Equal(t, `{"error": {"class": "GenericError", "desc": "Parameter 'fdset-id' expects a non-negative value"}}`, c.line(t))

	s0, a := add(`"opaque": "one"`)
	require.Equal(t, int64(0), s0)
	s5, b := add(`"fdset-id": 5`)
	require.Equal(t, int64(5), s5)
	s1, e := add(``)
	require.Equal(t, int64(1), s1, "the lowest free id")
	_, d := add(`"fdset-id": 5, "opaque": "two"`)

	c.send(t, `{"execute": "query-fdsets"}`)
	n := strconv.FormatInt
	// Members in QEMU's hash order, sets and descriptors in the order QEMU's prepending leaves.
	require.Equal(t, `{"return": [{"fds": [{"fd": `+n(b, 10)+`}, {"fd": `+n(d, 10)+`, "opaque": "two"}], "fdset-id": 5}, {"fds": [{"fd": `+
		n(e, 10)+`}], "fdset-id": 1}, {"fds": [{"fd": `+n(a, 10)+`, "opaque": "one"}], "fdset-id": 0}]}`, c.line(t))

	for _, tc := range []struct{ send, want string }{
		{`{"execute": "remove-fd", "arguments": {"fdset-id": 7}}`, `{"error": {"class": "GenericError", "desc": "File descriptor named 'fdset-id:7' not found"}}`},
		{`{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": 999}}`, `{"error": {"class": "GenericError", "desc": "File descriptor named 'fdset-id:5, fd:999' not found"}}`},
		{`{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": ` + n(b, 10) + `}}`, `{"return": {}}`},
		{`{"execute": "remove-fd", "arguments": {"fdset-id": 0}}`, `{"return": {}}`},
		{`{"execute": "remove-fd", "arguments": {"fdset-id": 1}}`, `{"return": {}}`},
		{`{"execute": "query-fdsets"}`, `{"return": [{"fds": [{"fd": ` + n(d, 10) + `, "opaque": "two"}], "fdset-id": 5}]}`},
	} {
		c.send(t, tc.send)
		require.Equal(t, tc.want, c.line(t), tc.send)
	}
}
