package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/qmp"
	"github.com/stretchr/testify/require"
)

// A 256-vCPU machine, one vCPU writing among idle ones, through QMP: query-cpus-fast lists
// every vCPU on a thread of its own, calc-dirty-rate measures them all, the dirty limit
// throttles the writer, and a dirty-limit migration to another 256-vCPU daemon completes
// within the downtime limit.
func TestManyVCPUsThroughQMP(t *testing.T) {
	for _, accel := range []string{"kvm", "soft"} {
		t.Run(accel, func(t *testing.T) {
			manyVCPUs(t, []string{"-accel", accel + ",dirty-ring-size=4096", "-smp", "256", "-m", "128",
				"-workload", "cpus=0,mode=write,size=32M"})
		})
	}
}

func manyVCPUs(t *testing.T, machine []string) {
	const cpus = 256
	dst := startInProcess(t, append(slices.Clone(machine), "-incoming", "defer")...)
	src := startInProcess(t, machine...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sc, dc := qmpClient(ctx, t, src), qmpClient(ctx, t, dst)
	exec := func(c *qmp.Client, cmd string, args, res any) {
		t.Helper()
		require.NoError(t, c.Execute(ctx, cmd, args, res), cmd)
	}

	var info []struct {
		CPUIndex int `json:"cpu-index"`
		ThreadID int `json:"thread-id"`
	}
	exec(sc, "query-cpus-fast", nil, &info)
	require.Len(t, info, cpus)
	tids := map[int]bool{}
	for i, c := range info {
		require.Equal(t, i, c.CPUIndex)
		tids[c.ThreadID] = true
	}
	require.Len(t, tids, cpus)

	exec(sc, "calc-dirty-rate", map[string]any{"calc-time": 1, "mode": "dirty-ring"}, nil)
	var rate struct {
		Status    string `json:"status"`
		DirtyRate int64  `json:"dirty-rate"`
		VCPURates []struct {
			ID   int   `json:"id"`
			Rate int64 `json:"dirty-rate"`
		} `json:"vcpu-dirty-rate"`
	}
	for rate.Status != "measured" {
		time.Sleep(100 * time.Millisecond)
		exec(sc, "query-dirty-rate", nil, &rate)
	}
	require.Len(t, rate.VCPURates, cpus)
	require.Positive(t, rate.VCPURates[0].Rate, "the writer")
	for _, r := range rate.VCPURates[1:] {
		require.Zero(t, r.Rate, "idle vCPU %d", r.ID)
	}

	// The writer alone is limited, to well below its flat-out rate.
	free := rate.VCPURates[0].Rate
	limit := max(1, free/8)
	exec(sc, "set-vcpu-dirty-limit", map[string]any{"cpu-index": 0, "dirty-rate": limit}, nil)
	var lims []struct {
		CPUIndex int   `json:"cpu-index"`
		Limit    int64 `json:"limit-rate"`
		Current  int64 `json:"current-rate"`
	}
	time.Sleep(2 * time.Second)
	exec(sc, "query-vcpu-dirty-limit", nil, &lims)
	require.Len(t, lims, 1)
	t.Logf("writer: %d MB/s free, limited to %d: %d MB/s", free, limit, lims[0].Current)
	require.Less(t, lims[0].Current, free/2, "the dirty limit does not throttle the writer")
	exec(sc, "cancel-vcpu-dirty-limit", map[string]any{"cpu-index": 0}, nil)

	dir, err := os.MkdirTemp("", "mv-scale-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	exec(dc, "migrate-incoming", map[string]any{"uri": uri}, nil)
	exec(sc, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
		{"capability": "dirty-limit", "state": true}}}, nil)
	exec(sc, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 30, "vcpu-dirty-limit": limit,
		"downtime-limit": 300}, nil)
	exec(sc, "migrate", map[string]any{"uri": uri}, nil)
	var mig struct {
		Status    string `json:"status"`
		TotalTime int64  `json:"total-time"`
		Downtime  int64  `json:"downtime"`
	}
	for {
		exec(sc, "query-migrate", nil, &mig)
		if mig.Status == "completed" || mig.Status == "failed" || mig.Status == "cancelled" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// How long it took is for the benchmarks (bench-migrate -vcpus) to say.
	t.Logf("migration of %d vCPUs: %s, %d ms, downtime %d ms", cpus, mig.Status, mig.TotalTime, mig.Downtime)
	require.Equal(t, "completed", mig.Status)
	var st struct {
		Status string `json:"status"`
	}
	for st.Status != "running" {
		exec(dc, "query-status", nil, &st)
		time.Sleep(20 * time.Millisecond)
	}
	exec(dc, "query-cpus-fast", nil, &info)
	require.Len(t, info, cpus)
}

// -smp past the accelerator's limit is refused with QEMU's text.
func TestTooManyVCPUsRefused(t *testing.T) {
	cfg, err := parseArgs(machineArgs(t, []string{"-accel", "kvm", "-smp", "100000"}))
	require.NoError(t, err)
	_, err = newDaemon(cfg, testLog{t})
	require.Error(t, err)
	var qe *qerr.Error
	require.ErrorAs(t, err, &qe)
	require.Regexp(t, `^Invalid SMP CPUs 100000\. The max CPUs supported by machine 'migvisor' is \d+$`, qe.Desc)
}

func qmpClient(ctx context.Context, t *testing.T, p *inProcess) *qmp.Client {
	t.Helper()
	c, err := qmp.Dial(ctx, "unix", p.sock)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}
