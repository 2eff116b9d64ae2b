package qmp

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkRoundTrip is one query-status-like command and its reply, with the package's
// client, over a unix socket.
func BenchmarkRoundTrip(b *testing.B) {
	srv, _ := newFakeServer(b)
	c, err := Dial(context.Background(), "unix", serveUnix(b, srv))
	require.NoError(b, err)
	defer c.Close()
	var st struct {
		Status  string
		Running bool
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEventFanout is one event with a small payload sent to N clients, until each has
// read it.
func BenchmarkEventFanout(b *testing.B) {
	for _, n := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			srv, _ := newFakeServer(b)
			srv.OutputLimit = 1 << 30 // the readers are measured, not dropped
			sock := serveUnix(b, srv)
			var ready, done sync.WaitGroup
			counts := make(chan int, n)
			start := make(chan int)
			for range n {
				conn, err := net.Dial("unix", sock)
				require.NoError(b, err)
				defer conn.Close()
				rd := bufio.NewReader(conn)
				_, err = rd.ReadString('\n') // greeting
				require.NoError(b, err)
				_, err = conn.Write([]byte(`{"execute": "qmp_capabilities"}`))
				require.NoError(b, err)
				_, err = rd.ReadString('\n')
				require.NoError(b, err)
				ready.Add(1)
				done.Add(1)
				go func() {
					defer done.Done()
					ready.Done()
					want := <-start
					got := 0
					for got < want {
						if _, err := rd.ReadString('\n'); err != nil {
							break
						}
						got++
					}
					counts <- got
				}()
			}
			ready.Wait()
			data := map[string]any{"status": "active", "total": 1234567}
			b.ReportAllocs()
			b.ResetTimer()
			for range n {
				start <- b.N
			}
			for range b.N {
				srv.Emit("MIGRATION", data)
			}
			done.Wait()
			b.StopTimer()
			for range n {
				require.Equal(b, b.N, <-counts)
			}
		})
	}
}
