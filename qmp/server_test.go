package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/qmp/qmptest"
	"github.com/stretchr/testify/require"
)

const conformance = "../testdata/conformance/"

// argumentErrors are the replies of transcript 02 that come from the real schema's argument
// validation, which the fake catalog does not have.
var argumentErrors = []string{
	"no-args", "missing-arg", "missing-arg2", "extra-arg", "wrong-type-str", "wrong-type-bool",
	"wrong-type-null", "wrong-type-float", "u64-overflow", "cpu-index-str", "cpu-index-i64-overflow",
	"calc-missing", "calc-str", "calc-bad-enum", "caps-missing", "caps-not-list", "caps-no-state",
	"caps-bogus", "param-str", "param-bogus",
}

// The fake server answers QEMU's transcripts byte for byte, member order included.
func TestTranscripts(t *testing.T) {
	for _, tc := range []struct {
		file string
		opts qmptest.Options
	}{
		{"01-negotiation-conn1.jsonl", qmptest.Options{Exact: true}},
		{"01-negotiation-conn2-oob.jsonl", qmptest.Options{Exact: true}},
		{"01-negotiation-conn3.jsonl", qmptest.Options{Exact: true}},
		{"02-protocol-errors.jsonl", qmptest.Options{Exact: true, SkipIDs: argumentErrors}},
		{"08-runstate.jsonl", qmptest.Options{Exact: true}},
		// The same without Exact: the comparison qmptest offers other packages.
		{"02-protocol-errors.jsonl", qmptest.Options{SkipIDs: argumentErrors}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			srv, _ := newFakeServer(t)
			conn, err := net.Dial("unix", serveUnix(t, srv))
			require.NoError(t, err)
			defer conn.Close()
			qmptest.Replay(t, conn, conformance+tc.file, tc.opts)
		})
	}
}

// rawConn is a client that reads the server's output line by line.
type rawConn struct {
	net.Conn
	rd *bufio.Reader
}

func dialRaw(t testing.TB, sock string) *rawConn {
	conn, err := net.Dial("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	c := &rawConn{conn, bufio.NewReader(conn)}
	require.Contains(t, c.line(t), `"QMP"`)
	return c
}

func (c *rawConn) line(t testing.TB) string {
	l, err := c.rd.ReadString('\n')
	require.NoError(t, err)
	require.True(t, strings.HasSuffix(l, "}\r\n"), "%q", l)
	return strings.TrimSuffix(l, "\r\n")
}

func (c *rawConn) send(t testing.TB, s string) {
	_, err := io.WriteString(c, s)
	require.NoError(t, err)
}

func (c *rawConn) negotiate(t testing.TB, enable string) {
	c.send(t, `{"execute": "qmp_capabilities", "arguments": {"enable": [`+enable+`]}}`)
	require.Equal(t, `{"return": {}}`, c.line(t))
}

func TestGreeting(t *testing.T) {
	srv, _ := newFakeServer(t)
	conn, err := net.Dial("unix", serveUnix(t, srv))
	require.NoError(t, err)
	defer conn.Close()
	l, err := bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, `{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}`+"\r\n", l)
}

func TestDispatch(t *testing.T) {
	srv, _ := newFakeServer(t)
	c := dialRaw(t, serveUnix(t, srv))
	for _, tc := range []struct{ name, send, want string }{
		{"unknown before negotiation", `{"execute": "nope", "id": 1}`,
			`{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`},
		{"envelope errors keep their text", `{"execute": "nope", "x": 1}`,
			`{"error": {"class": "GenericError", "desc": "QMP input member 'x' is unexpected"}}`},
		{"exec-oob before negotiation", `{"exec-oob": "qmp_capabilities"}`,
			`{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}`},
		{"bad capability", `{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}`,
			`{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'x'"}}`},
		{"negotiate", `{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "c"}`,
			`{"return": {}, "id": "c"}`},
		// Members are checked in QEMU's hash order: "execute" before "arguments" before "foo".
		{"first bad member in hash order", `{"foo": 1, "arguments": 2, "execute": 1}`,
			`{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}`},
		{"second bad member in hash order", `{"foo": 1, "arguments": 2, "execute": "e"}`,
			`{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}`},
		{"exec-oob must be a string", `{"exec-oob": 1}`,
			`{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}`},
		{"no OOB", `{"exec-oob": "query-status", "id": "o"}`,
			`{"id": "o", "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}}`},
		{"unknown", `{"execute": "nope"}`,
			`{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`},
		{"result member order", `{"execute": "echo", "arguments": {"running": true, "status": "x", "b": [1.0, 0.1]}}`,
			`{"return": {"status": "x", "running": true, "b": [1, 0.10000000000000001]}}`},
		{"non-ASCII result", `{"execute": "echo", "arguments": {"s": "é\u2028<>&"}}`,
			`{"return": {"s": "\u00E9\u2028<>&"}}`},
		{"non-character in a result", `{"execute": "echo", "arguments": {"s": "\uFFFF"}}`,
			`{"error": {"class": "GenericError", "desc": "JSON parse error, \\uFFFF is not a valid Unicode character"}}`},
		{"handler panic", `{"execute": "boom", "id": 3}`,
			`{"id": 3, "error": {"class": "GenericError", "desc": "internal error: boom"}}`},
		{"schema", `{"execute": "query-qmp-schema"}`,
			`{"return": [{"name": "query-status", "ret-type": "1", "meta-type": "command", "arg-type": "0"}]}`},
		{"commands", `{"execute": "query-commands"}`,
			`{"return": [{"name": "qmp_capabilities"}, {"name": "query-version"}, {"name": "query-commands"}, {"name": "query-qmp-schema"}, {"name": "query-status"}, {"name": "query-kvm"}, {"name": "stop"}, {"name": "cont"}, {"name": "quit"}, {"name": "migrate-pause"}, {"name": "echo"}, {"name": "block"}, {"name": "boom"}, {"name": "getfd"}, {"name": "closefd"}, {"name": "add-fd"}, {"name": "remove-fd"}, {"name": "query-fdsets"}]}`},
		{"id of big integer", `{"execute": "query-kvm", "id": 18446744073709551616}`,
			`{"return": {"enabled": true, "present": true}, "id": 1.8446744073709552e+19}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.send(t, tc.send)
			require.Equal(t, tc.want, c.line(t))
		})
	}
	srv.Emit("X", nil) // the session is still usable after all that
	require.Contains(t, c.line(t), `"event": "X"`)
}

// A numeric id comes back as QEMU 10.0.2 printed it (each want was read from a real QEMU): an
// int64, else a uint64, else a double with %.17g, where glibc writes infinities as inf.
func TestIDNumbers(t *testing.T) {
	srv, _ := newFakeServer(t)
	c := dialRaw(t, serveUnix(t, srv))
	c.negotiate(t, "")
	for _, tc := range []struct{ name, id, want string }{
		{"above a double", "1e400", "inf"},
		{"below a double", "-1e400", "-inf"},
		{"100,000 digits", "1" + strings.Repeat("0", 100000), "inf"},
		{"100,000 digits, negative", "-1" + strings.Repeat("0", 100000), "-inf"},
		{"301 digits", "1" + strings.Repeat("0", 300), "1.0000000000000001e+300"},
		{"largest power of ten", "1e308", "1e+308"},
		{"int64 beyond 53 bits", "9007199254740993", "9007199254740993"},
		{"beyond uint64", "18446744073709551616", "1.8446744073709552e+19"},
		{"beyond int64", "-9223372036854775809", "-9.2233720368547758e+18"},
		{"underflow", "1e-400", "0"},
		{"negative underflow", "-1e-400", "-0"},
		{"negative zero float", "-0.0", "-0"},
		{"negative zero integer", "-0", "0"},
		{"smallest denormal", "4.9e-324", "4.9406564584124654e-324"},
		{"integral float", "1E2", "100"},
		{"float beyond 17 digits", "123456789012345678.0", "1.2345678901234568e+17"},
		{"1e16", "1e16", "10000000000000000"},
		{"small exponent", "1.5e-7", "1.4999999999999999e-07"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.send(t, `{"execute": "query-kvm", "id": `+tc.id+`}`)
			require.Equal(t, `{"return": {"enabled": true, "present": true}, "id": `+tc.want+`}`, c.line(t))
		})
	}
}

func TestHandlerErrors(t *testing.T) {
	srv, _ := newFakeServer(t)
	srv.Handle("echo", func(_ context.Context, args json.RawMessage) (any, error) {
		if strings.Contains(string(args), "typed") {
			return nil, fmt.Errorf("wrapped: %w", qerr.New(qerr.DeviceNotFound, "no such device"))
		}
		return nil, fmt.Errorf("plain")
	})
	c := dialRaw(t, serveUnix(t, srv))
	c.negotiate(t, "")
	c.send(t, `{"execute": "echo", "arguments": {"typed": 1}}{"execute": "echo"}`)
	require.Equal(t, `{"error": {"class": "DeviceNotFound", "desc": "no such device"}}`, c.line(t))
	require.Equal(t, `{"error": {"class": "GenericError", "desc": "plain"}}`, c.line(t))
}

func TestMissing(t *testing.T) {
	srv, _ := newFakeServer(t)
	require.Empty(t, srv.Missing())
	srv.Handle("not-in-schema", func(context.Context, json.RawMessage) (any, error) { return nil, nil })
	srv2 := NewServer(fakeCatalog{}, Version{})
	require.Equal(t, []string{"block", "boom", "cont", "echo", "migrate-pause", "query-kvm", "query-status", "quit", "stop"}, srv2.Missing())
	require.Equal(t, []string{"not-in-schema"}, srv.Missing())
}

// Events reach negotiated sessions only, and an event emitted by a handler precedes its reply.
func TestEvents(t *testing.T) {
	srv, _ := newFakeServer(t)
	sock := serveUnix(t, srv)
	a, b := dialRaw(t, sock), dialRaw(t, sock)
	a.negotiate(t, "")

	srv.Emit("EARLY", map[string]int{"n": 1})
	require.Contains(t, a.line(t), `"event": "EARLY", "data": {"n": 1}}`)
	b.negotiate(t, "") // its first message after the greeting is this reply, not EARLY

	a.send(t, `{"execute": "cont", "id": "c"}`)
	require.Regexp(t, `^\{"timestamp": \{"seconds": \d+, "microseconds": \d+\}, "event": "RESUME"\}$`, a.line(t))
	require.Equal(t, `{"return": {}, "id": "c"}`, a.line(t))
	require.Contains(t, b.line(t), `"event": "RESUME"`)
}

// With oob enabled an exec-oob command overtakes a running in-band one; without, it waits.
func TestOutOfBand(t *testing.T) {
	t.Run("oob", func(t *testing.T) {
		srv, vm := newFakeServer(t)
		c := dialRaw(t, serveUnix(t, srv))
		c.negotiate(t, `"oob"`)
		c.send(t, `{"execute": "block", "id": "slow"}{"exec-oob": "migrate-pause", "id": "fast"}`)
		<-vm.started
		require.Contains(t, c.line(t), `"id": "fast"`)
		close(vm.release)
		require.Equal(t, `{"return": "released", "id": "slow"}`, c.line(t))
	})
	t.Run("in band", func(t *testing.T) {
		srv, vm := newFakeServer(t)
		c := dialRaw(t, serveUnix(t, srv))
		c.negotiate(t, "")
		c.send(t, `{"execute": "block", "id": "slow"}{"exec-oob": "migrate-pause", "id": "fast"}`)
		<-vm.started
		close(vm.release)
		require.Equal(t, `{"return": "released", "id": "slow"}`, c.line(t))
		require.Equal(t, `{"id": "fast", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}`, c.line(t))
	})
}

// A client that disconnects while its command runs cancels the command's context and leaves
// the others alone; Close then finds nothing left running.
func TestDisconnectMidCommand(t *testing.T) {
	srv, _ := newFakeServer(t)
	started, canceled := make(chan struct{}), make(chan struct{})
	srv.Handle("block", func(ctx context.Context, _ json.RawMessage) (any, error) {
		close(started)
		<-ctx.Done()
		close(canceled)
		return nil, ctx.Err()
	})
	sock := serveUnix(t, srv)
	c := dialRaw(t, sock)
	c.negotiate(t, "")
	c.send(t, `{"execute": "block"}{"execute": "query-status"}`)
	<-started
	require.NoError(t, c.Close())
	<-canceled

	other, err := Dial(context.Background(), "unix", sock)
	require.NoError(t, err)
	defer other.Close()
	var st struct{ Status string }
	require.NoError(t, other.Execute(context.Background(), "query-status", nil, &st))
	require.Equal(t, "prelaunch", st.Status)
}

// Close delivers what running commands produce: quit's SHUTDOWN and reply, then EOF.
func TestCloseFlushes(t *testing.T) {
	srv, vm := newFakeServer(t)
	sock := serveUnix(t, srv)
	c := dialRaw(t, sock)
	c.negotiate(t, "")
	closed := make(chan error)
	go func() {
		<-vm.quit
		closed <- srv.Close()
	}()
	c.send(t, `{"execute": "quit", "id": "q"}`)
	require.Contains(t, c.line(t), `"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}`)
	require.Equal(t, `{"return": {}, "id": "q"}`, c.line(t))
	require.NoError(t, <-closed)
	rest, err := io.ReadAll(c.rd)
	require.NoError(t, err)
	require.Empty(t, string(rest))
}

// A client that never reads is dropped once its output exceeds the limit; the others get
// every event.
func TestSlowClient(t *testing.T) {
	srv, _ := newFakeServer(t)
	srv.OutputLimit = 64 << 10
	sock := serveUnix(t, srv)
	slow := dialRaw(t, sock)
	slow.negotiate(t, "")
	good, err := Dial(context.Background(), "unix", sock)
	require.NoError(t, err)
	defer good.Close()

	payload := map[string]string{"pad": strings.Repeat("x", 1000)}
	const batches, perBatch = 400, 16
	for range batches {
		for range perBatch {
			srv.Emit("TICK", payload)
		}
		// Pace the events to the good client, which must never be behind by the limit.
		for range perBatch {
			require.Equal(t, "TICK", (<-good.Events()).Name)
		}
	}
	n := 0
	for {
		_, err := slow.rd.ReadString('\n')
		if err != nil {
			break
		}
		n++
	}
	require.Less(t, n, batches*perBatch)
	require.NoError(t, good.Execute(context.Background(), "query-status", nil, nil))
}

func TestConcurrentClients(t *testing.T) {
	srv, _ := newFakeServer(t)
	sock := serveUnix(t, srv)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			c, err := Dial(context.Background(), "unix", sock)
			if !assertNoError(t, err) {
				return
			}
			defer c.Close()
			var inner sync.WaitGroup
			for j := range 4 {
				inner.Go(func() {
					for k := range 50 {
						want := fmt.Sprintf("%d-%d-%d", i, j, k)
						var got struct{ V string }
						if assertNoError(t, c.Execute(context.Background(), "echo", map[string]string{"v": want}, &got)) && got.V != want {
							t.Errorf("got %q, want %q", got.V, want)
						}
					}
				})
			}
			inner.Wait()
		})
	}
	wg.Wait()
}

func assertNoError(t testing.TB, err error) bool {
	if err != nil {
		t.Error(err)
		return false
	}
	return true
}

func TestSeveralListeners(t *testing.T) {
	srv, _ := newFakeServer(t)
	sock := serveUnix(t, srv)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	for _, addr := range []struct{ network, addr string }{{"unix", sock}, {"tcp", l.Addr().String()}} {
		c, err := Dial(context.Background(), addr.network, addr.addr)
		require.NoError(t, err)
		require.NoError(t, c.Execute(context.Background(), "query-kvm", nil, nil))
		require.NoError(t, c.Close())
	}
	require.NoError(t, srv.Close())
	require.NoError(t, <-served)
}

func TestServeAfterClose(t *testing.T) {
	srv, _ := newFakeServer(t)
	require.NoError(t, srv.Close())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	require.NoError(t, srv.Serve(l))
	_, err = l.Accept()
	require.ErrorIs(t, err, net.ErrClosed, "Serve closes a listener it cannot use")
	srv.Emit("NOBODY", nil) // harmless
	require.NoError(t, srv.Close())
}

// A listener failing for good ends Serve with its error.
func TestServeListenerError(t *testing.T) {
	srv, _ := newFakeServer(t)
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	require.NoError(t, l.Close())
	require.ErrorIs(t, srv.Serve(l), net.ErrClosed)
}

// Accept errors other than a closed listener do not end Serve: it pauses and tries again, and
// logs the burst once and the recovery once.
func TestServeRetriesAcceptErrors(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ECONNABORTED} {
		t.Run(errno.Error(), func(t *testing.T) {
			srv, _ := newFakeServer(t)
			var log logLines
			srv.Logf = log.logf
			l := newFakeListener()
			served := make(chan error, 1)
			go func() { served <- srv.Serve(l) }()

			acceptErr := &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", errno)}
			client, server := socketPair(t)
			defer client.Close()
			for _, r := range []acceptResult{{err: acceptErr}, {err: acceptErr}, {err: acceptErr}, {conn: server}} {
				select {
				case l.accepts <- r:
				case err := <-served:
					t.Fatalf("Serve returned %v after %v", err, acceptErr)
				}
			}
			c := &rawConn{client, bufio.NewReader(client)}
			require.Contains(t, c.line(t), `"QMP"`)
			c.negotiate(t, "")

			require.NoError(t, srv.Close())
			require.NoError(t, <-served)
			require.Len(t, log.matching(errno.Error()), 1, "one line for the burst: %q", log.lines)
			require.Len(t, log.matching("again, after 3 failures"), 1, "%q", log.lines)
		})
	}
}

// With MaxSessions clients connected, a further client waits unaccepted, as behind a QEMU
// chardev that has its client, while the others work; it is greeted once one leaves.
func TestMaxSessions(t *testing.T) {
	srv, _ := newFakeServer(t)
	srv.MaxSessions = 2
	var log logLines
	srv.Logf = log.logf
	atLimit := make(chan struct{}, 1)
	srv.onLimit = func() {
		select {
		case atLimit <- struct{}{}:
		default:
		}
	}
	sock := serveUnix(t, srv)
	a, b := dialRaw(t, sock), dialRaw(t, sock)
	<-atLimit

	third, err := net.Dial("unix", sock) // queued by the kernel, not accepted
	require.NoError(t, err)
	defer third.Close()
	_, err = io.WriteString(third, `{"execute": "qmp_capabilities"}{"execute": "query-kvm", "id": 3}`)
	require.NoError(t, err)
	a.negotiate(t, "")
	b.negotiate(t, "")
	srv.mu.Lock()
	n := len(srv.sessions)
	srv.mu.Unlock()
	require.Equal(t, 2, n, "Serve waits at the limit")

	require.NoError(t, a.Close())
	c := &rawConn{third, bufio.NewReader(third)}
	require.Contains(t, c.line(t), `"QMP"`)
	require.Equal(t, `{"return": {}}`, c.line(t))
	require.Equal(t, `{"return": {"enabled": true, "present": true}, "id": 3}`, c.line(t))
	b.send(t, `{"execute": "query-kvm"}`)
	require.Equal(t, `{"return": {"enabled": true, "present": true}}`, b.line(t))
	require.Len(t, log.matching("2 clients connected, the most allowed"), 1, "%q", log.lines)
}

// What no client can be told reaches Logf, one line for each failure however often it recurs:
// a client dropped for not reading, a handler's panic, an event that cannot be marshalled.
func TestLogf(t *testing.T) {
	srv, _ := newFakeServer(t)
	srv.OutputLimit = 64 << 10
	var log logLines
	srv.Logf = log.logf
	sock := serveUnix(t, srv)
	slow := dialRaw(t, sock) // never reads
	slow.negotiate(t, "")
	c := dialRaw(t, sock)
	c.negotiate(t, "")

	for range 3 {
		c.send(t, `{"execute": "boom"}`)
		require.Contains(t, c.line(t), "internal error: boom")
		srv.Emit("BAD", map[string]any{"f": func() {}})
	}
	// Beyond what the socket buffers, the slow client's output passes the limit; more follows.
	pad := map[string]string{"pad": strings.Repeat("x", 16<<10)}
	for range 256 {
		srv.Emit("TICK", pad)
		require.Contains(t, c.line(t), `"event": "TICK"`)
	}
	require.Len(t, log.matching("handler panicked: boom"), 1, "%q", log.lines)
	require.Len(t, log.matching("event BAD dropped"), 1, "%q", log.lines)
	require.Len(t, log.matching("dropped: more than 65536 bytes of output waiting"), 1, "%q", log.lines)
}
