package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

// go-qemu's SocketMonitor, as management tools use it, drives the server.
func TestGoQemuSocketMonitor(t *testing.T) {
	srv, _ := newFakeServer(t)
	mon, err := goqmp.NewSocketMonitor("unix", serveUnix(t, srv), 10*time.Second)
	require.NoError(t, err)
	require.NoError(t, mon.Connect())
	defer mon.Disconnect()
	require.Equal(t, "10.0.2", mon.Version.String())
	require.Equal(t, []string{"oob"}, mon.Capabilities)

	events, err := mon.Events(context.Background())
	require.NoError(t, err)
	got := make(chan string, 2)
	go func() {
		for e := range events {
			got <- e.Event
		}
	}()

	out, err := mon.Run([]byte(`{"execute": "query-status"}`))
	require.NoError(t, err)
	require.JSONEq(t, `{"return": {"status": "prelaunch", "running": false}}`, string(out))

	_, err = mon.Run([]byte(`{"execute": "cont"}`))
	require.NoError(t, err)
	require.Equal(t, "RESUME", <-got)

	_, err = mon.Run([]byte(`{"execute": "no-such-command"}`))
	require.EqualError(t, err, "The command no-such-command has not been found")
}

func TestClient(t *testing.T) {
	srv, vm := newFakeServer(t)
	sock := serveUnix(t, srv)
	ctx := context.Background()
	c, err := Dial(ctx, "unix", sock)
	require.NoError(t, err)
	defer c.Close()
	require.JSONEq(t, `{"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}`, string(c.Greeting()))

	t.Run("result", func(t *testing.T) {
		var v struct {
			QEMU    struct{ Major, Minor, Micro int }
			Package string
		}
		require.NoError(t, c.Execute(ctx, "query-version", nil, &v))
		require.Equal(t, 10, v.QEMU.Major)
		var echoed map[string]any
		require.NoError(t, c.Execute(ctx, "echo", map[string]any{"a": []int{1}}, &echoed))
		require.Equal(t, map[string]any{"a": []any{1.0}}, echoed)
	})
	t.Run("QMP error", func(t *testing.T) {
		err := c.Execute(ctx, "nope", nil, nil)
		var qe *qerr.Error
		require.ErrorAs(t, err, &qe)
		require.Equal(t, &qerr.Error{Class: qerr.CommandNotFound, Desc: "The command nope has not been found"}, qe)
	})
	t.Run("events", func(t *testing.T) {
		require.NoError(t, c.Execute(ctx, "cont", nil, nil))
		e := <-c.Events()
		require.Equal(t, "RESUME", e.Name)
		require.Nil(t, e.Data)
		require.False(t, e.Timestamp.IsZero())
		srv.Emit("DATA", map[string]int{"n": 7})
		e = <-c.Events()
		require.JSONEq(t, `{"n": 7}`, string(e.Data))
	})
	t.Run("context ends first", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error)
		go func() { done <- c.Execute(cctx, "block", nil, nil) }()
		<-vm.started
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		vm.release <- struct{}{} // the late reply is discarded
		require.NoError(t, c.Execute(ctx, "query-status", nil, nil))
	})
	t.Run("without negotiation", func(t *testing.T) {
		raw, err := DialRaw(ctx, "unix", sock)
		require.NoError(t, err)
		defer raw.Close()
		err = raw.Execute(ctx, "query-status", nil, nil)
		require.Equal(t, &qerr.Error{Class: qerr.CommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}, err)
		require.NoError(t, raw.Execute(ctx, "qmp_capabilities", map[string]any{"enable": []string{"oob"}}, nil))
		require.NoError(t, raw.Execute(ctx, "query-status", nil, nil))
	})
	t.Run("closed", func(t *testing.T) {
		d, err := Dial(ctx, "unix", sock)
		require.NoError(t, err)
		require.NoError(t, d.Close())
		require.ErrorIs(t, d.Execute(ctx, "query-status", nil, nil), ErrClosed)
		_, open := <-d.Events()
		require.False(t, open)
	})
}

// A consumer that does not keep up loses the oldest events, never the connection.
func TestClientEventsDropOldest(t *testing.T) {
	srv, _ := newFakeServer(t)
	c, err := Dial(context.Background(), "unix", serveUnix(t, srv))
	require.NoError(t, err)
	defer c.Close()
	const n = EventBuffer + 100
	for i := range n {
		srv.Emit("E", map[string]int{"i": i})
	}
	// The reply comes after every event, so all have been read (or dropped) by then.
	require.NoError(t, c.Execute(context.Background(), "query-status", nil, nil))
	var first struct{ I int }
	require.NoError(t, json.Unmarshal((<-c.Events()).Data, &first))
	require.Equal(t, n-EventBuffer, first.I)
	require.Len(t, c.Events(), EventBuffer-1)
}

func TestDialErrors(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Dial(ctx, "unix", "/nonexistent/qmp.sock")
	require.Error(t, err)
	require.False(t, errors.Is(err, ErrClosed))
}

// A reply followed at once by the end of the connection (quit's) is still the answer: the
// client must not report the hang-up instead.
func TestClientReplyThenHangup(t *testing.T) {
	for i := 0; i < 50; i++ {
		client, server := net.Pipe()
		go func() {
			defer server.Close()
			server.Write([]byte(`{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""}, "capabilities": []}}` + "\r\n"))
			dec := json.NewDecoder(server)
			var req struct{ ID string }
			if dec.Decode(&req) == nil {
				fmt.Fprintf(server, `{"return": {"bye": true}, "id": "%s"}`+"\r\n", req.ID)
			}
		}()
		c, err := NewClient(context.Background(), client)
		require.NoError(t, err)
		var out map[string]bool
		require.NoError(t, c.Execute(context.Background(), "quit", nil, &out))
		require.True(t, out["bye"])
		c.Close()
	}
}
