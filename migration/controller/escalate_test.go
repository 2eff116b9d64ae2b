package controller

import (
	"bufio"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// recorded reads query-migrate answers, one a line, as samples timed by their total-time.
func recorded(t *testing.T, file string) []Sample {
	t.Helper()
	f, err := os.Open(file)
	require.NoError(t, err)
	defer f.Close()
	var out []Sample
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var s Sample
		require.NoError(t, json.Unmarshal(sc.Bytes(), &s.MigrationInfo))
		s.Elapsed = time.Duration(s.TotalTime) * time.Millisecond
		out = append(out, s)
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out)
	return out
}

func TestDowntimeSteps(t *testing.T) {
	// Nova's schedule for 300 ms in 3 steps, 8 s per GiB, a 512 MiB guest: every 4 s.
	got := DowntimeSteps(300*time.Millisecond, 3, 8*time.Second, 512<<20)
	require.Equal(t, []DowntimeStep{{0, 100 * time.Millisecond}, {4 * time.Second, 166666666}, {8 * time.Second, 233333332},
		{12 * time.Second, 300 * time.Millisecond}}, got)
	require.Equal(t, []DowntimeStep{{0, time.Second}}, DowntimeSteps(time.Second, 0, time.Second, 1<<30))
}

// kinds runs the samples through an Escalator and lists each decision as "kind@ms".
func kinds(cfg EscalatorConfig, samples []Sample) ([]string, *Escalator) {
	e := NewEscalator(cfg)
	var out []string
	for _, s := range samples {
		for _, d := range e.Observe(s) {
			out = append(out, d.Kind+"@"+time.Duration(s.Elapsed).String())
		}
	}
	return out, e
}

func TestEscalatorOnRecordedQEMU(t *testing.T) {
	// QEMU 10.0.2 migrating a 256 MiB guest that rewrites 208 MiB: pass 1 takes remaining down
	// to 44 MB at 6.0 s; pass 2 starts at 211 MB and comes under that only at 11.5 s.
	samples := recorded(t, "testdata/qemu-10.0.2-dirty-limit-auto-src.jsonl")
	limits := []VCPURate{{0, 40}}
	for _, tc := range []struct {
		name   string
		cfg    EscalatorConfig
		want   []string
		limits []VCPURate
	}{
		{name: "progress within the timeout: nothing", cfg: EscalatorConfig{ProgressTimeout: 6 * time.Second, Limits: limits},
			limits: limits},
		{name: "a 5 s stall in pass 2 halves the limit", cfg: EscalatorConfig{ProgressTimeout: 5 * time.Second, Limits: limits},
			want: []string{"tighten-limit@11.039s"}, limits: []VCPURate{{0, 20}}},
		{name: "a stall without limits puts the fallback on", cfg: EscalatorConfig{ProgressTimeout: 5 * time.Second, Fallback: limits},
			want: []string{"tighten-limit@11.039s"}, limits: limits},
		{name: "a stall with nothing to tighten is said once", cfg: EscalatorConfig{ProgressTimeout: 2 * time.Second},
			want: []string{"stall@8.031s"}},
		{name: "limits at 1 MB/s cannot tighten", cfg: EscalatorConfig{ProgressTimeout: 2 * time.Second, Limits: []VCPURate{{0, 1}}},
			want: []string{"stall@8.031s"}, limits: []VCPURate{{0, 1}}},
		{name: "completion timeout aborts once", cfg: EscalatorConfig{CompletionTimeout: 10 * time.Second},
			want: []string{"abort@10.037s"}},
		{name: "completion timeout pauses", cfg: EscalatorConfig{CompletionTimeout: 10 * time.Second, OnTimeout: TimeoutPause},
			want: []string{"pause@10.037s"}},
		{name: "downtime steps as time passes", cfg: EscalatorConfig{Steps: DowntimeSteps(300*time.Millisecond, 3, 8*time.Second, 512<<20)},
			want: []string{"set-downtime@506ms", "set-downtime@4.017s", "set-downtime@8.031s", "set-downtime@12.041s"}},
		{name: "a late first sample takes only the latest step due",
			cfg:  EscalatorConfig{Steps: []DowntimeStep{{0, 10 * time.Millisecond}, {100 * time.Millisecond, 20 * time.Millisecond}, {time.Hour, time.Second}}},
			want: []string{"set-downtime@506ms"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, e := kinds(tc.cfg, samples)
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.limits, e.Limits())
		})
	}
}
