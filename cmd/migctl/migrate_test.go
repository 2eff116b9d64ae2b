package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// withMigvisor builds the daemon once and puts it on PATH, where startDaemon finds it.
func withMigvisor(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm: the busy guest needs real vCPUs")
	}
	dir := t.TempDir()
	out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "migvisor"), "../migvisor").CombinedOutput()
	require.NoError(t, err, "%s", out)
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// endState is what the controller must leave as it found it.
type endState struct {
	Caps   json.RawMessage
	Params json.RawMessage
	Limits []struct {
		CPU   int    `json:"cpu-index"`
		Limit uint64 `json:"limit-rate"`
	}
}

func stateOf(t *testing.T, ctx context.Context, d *daemon) endState {
	t.Helper()
	var s endState
	require.NoError(t, d.exec(ctx, "query-migrate-capabilities", nil, &s.Caps))
	require.NoError(t, d.exec(ctx, "query-migrate-parameters", nil, &s.Params))
	require.NoError(t, d.exec(ctx, "query-vcpu-dirty-limit", nil, &s.Limits))
	return s
}

// TestMigrateBusyGuest: a writer and a reader vCPU; policy auto must limit the writer alone,
// complete, and leave both ends as they were, the user's own limit on the reader included.
func TestMigrateBusyGuest(t *testing.T) {
	withMigvisor(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	machine := []string{"-accel", "kvm,dirty-ring-size=65536", "-smp", "2", "-m", "128M",
		"-workload", "cpus=0,mode=write,size=64M", "-workload", "cpus=1,mode=read"}
	src, err := startDaemon(ctx, dir, "src", machine...)
	require.NoError(t, err)
	defer src.stop(ctx)
	dst, err := startDaemon(ctx, dir, "dst", append(machine, "-incoming", "defer")...)
	require.NoError(t, err)
	defer dst.stop(ctx)

	// The user's own limit on the reader, which the controller must leave alone.
	require.NoError(t, src.exec(ctx, "set-vcpu-dirty-limit", map[string]any{"cpu-index": 1, "dirty-rate": 500}, nil))
	// First touches of guest memory are slow on nested hosts: let the writer reach its pace.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		var rates []struct {
			PagesPerSecond uint64 `json:"pages-per-second"`
		}
		require.NoError(t, src.exec(ctx, "x-query-workload", nil, &rates))
		if rates[0].PagesPerSecond >= 5000 {
			break
		}
		if time.Now().After(deadline) {
			t.Skipf("the writer runs at %d pages/s only: this host is too slow for the busy scenario", rates[0].PagesPerSecond)
		}
	}
	srcBefore, dstBefore := stateOf(t, ctx, src), stateOf(t, ctx, dst)

	report := filepath.Join(dir, "report")
	var out, errb bytes.Buffer
	rc := run([]string{"migrate", "-json", "-bandwidth", "32M", "-downtime", "100", "-report", report, src.sock, dst.sock}, &out, &errb)
	require.Equal(t, 0, rc, "stderr: %s\nstdout: %s", errb.String(), out.String())

	// -json: samples and actions, the summary last.
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	var last struct {
		Summary struct {
			Status string `json:"status"`
			Plan   struct {
				Strategy string `json:"strategy"`
				Limits   []struct {
					ID   int    `json:"id"`
					Rate uint64 `json:"dirty-rate"`
				} `json:"limits"`
			} `json:"plan"`
			Downtime int64 `json:"downtime"`
			Actions  []struct {
				Kind string `json:"action"`
			} `json:"actions"`
		} `json:"summary"`
	}
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &last))
	sum := last.Summary
	require.Equal(t, "completed", sum.Status)
	require.Equal(t, "dirty-limit", sum.Plan.Strategy)
	require.Len(t, sum.Plan.Limits, 1, "only the writer is limited")
	require.Equal(t, 0, sum.Plan.Limits[0].ID)
	samples := 0
	sc := bufio.NewScanner(strings.NewReader(out.String()))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), `{"sample":`) {
			samples++
		}
	}
	require.NotZero(t, samples)

	var st struct {
		Status string `json:"status"`
	}
	require.NoError(t, dst.exec(ctx, "query-status", nil, &st))
	require.Equal(t, "running", st.Status)
	require.Equal(t, srcBefore, stateOf(t, ctx, src), "the source as it was, the user's limit on vCPU 1 included")
	dstAfter := stateOf(t, ctx, dst)
	require.JSONEq(t, string(dstBefore.Caps), string(dstAfter.Caps))
	require.JSONEq(t, string(dstBefore.Params), string(dstAfter.Params))

	for _, f := range []string{"summary.json", "samples.csv", "index.html"} {
		fi, err := os.Stat(filepath.Join(report, f))
		require.NoError(t, err)
		require.NotZero(t, fi.Size(), f)
	}
}
