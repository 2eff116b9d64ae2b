package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migvisor/migvisor/migration/controller"
	"github.com/migvisor/migvisor/qmp"
)

// migrate is `migctl migrate [flags] SRC DST`: a whole migration through package controller;
// this file only parses flags and renders.
func migrate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: migctl migrate [flags] SRC DST   (QMP addresses: a unix path or tcp:HOST:PORT; DST started with -incoming defer)")
		fs.PrintDefaults()
	}
	uri := fs.String("uri", "", "migration channel (default: a unix socket beside DST's for unix QMP addresses, tcp:DSTHOST:49152 for tcp ones)")
	bandwidth := fs.String("bandwidth", "", "max-bandwidth in bytes/s, with a K, M or G suffix (binary); default: the source's")
	downtime := fs.Int64("downtime", 300, "downtime limit the steps end at, ms")
	policy := fs.String("policy", "auto", "auto, precopy, auto-converge or dirty-limit")
	steps := fs.Int("downtime-steps", 3, "downtime steps up to -downtime (Nova's)")
	stepDelay := fs.Duration("downtime-delay-per-gib", 0, "time between downtime steps per GiB of guest memory (default: the time a GiB takes at -bandwidth)")
	completion := fs.Duration("completion-timeout-per-gib", 150*time.Second, "give up (-on-timeout) after this long per GiB of guest memory; 0: never")
	progress := fs.Duration("progress-timeout", 5*time.Second, "a stall: remaining bytes set no new low for this long; it tightens the dirty limit")
	onTimeout := fs.String("on-timeout", "abort", "abort (migrate_cancel) or pause (stop the guest so that it completes)")
	jsonOut := fs.Bool("json", false, "one JSON object per sample, the summary last")
	report := fs.String("report", "", "write summary.json, samples.csv, charts and index.html into this directory")
	dryRun := fs.Bool("dry-run", false, "print the plan and stop")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return 2
	}
	cfg := controller.Config{URI: *uri, Downtime: time.Duration(*downtime) * time.Millisecond, DowntimeSteps: *steps,
		DowntimeDelayPerGiB: *stepDelay, CompletionTimeoutPerGiB: *completion, ProgressTimeout: *progress, DryRun: *dryRun}
	if *progress == 0 {
		cfg.ProgressTimeout = -1
	}
	var err error
	if cfg.Policy, err = controller.ParsePolicy(*policy); err != nil {
		return usageError(stderr, err)
	}
	if cfg.OnTimeout, err = controller.ParseTimeoutAction(*onTimeout); err != nil {
		return usageError(stderr, err)
	}
	if *bandwidth != "" {
		if cfg.Bandwidth, err = parseSize(*bandwidth); err != nil {
			return usageError(stderr, fmt.Errorf("-bandwidth: %v", err))
		}
	}
	if *downtime <= 0 {
		return usageError(stderr, fmt.Errorf("-downtime must be positive"))
	}
	if cfg.URI == "" {
		cfg.URI = defaultURI(fs.Arg(1))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	src, err := dial(ctx, fs.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "migctl migrate: source %s: %v\n", fs.Arg(0), err)
		return 1
	}
	defer src.Close()
	dst, err := dial(ctx, fs.Arg(1))
	if err != nil {
		fmt.Fprintf(stderr, "migctl migrate: destination %s: %v\n", fs.Arg(1), err)
		return 1
	}
	defer dst.Close()

	r := newRenderer(stdout, *jsonOut)
	cfg.OnSample, cfg.OnAction, cfg.OnPass = r.sample, r.action, r.pass
	sum, err := controller.Run(ctx, src, dst, cfg)
	if u, ok := strings.CutPrefix(cfg.URI, "unix:"); ok && !*dryRun {
		os.Remove(u) // the channel's socket file, if the destination left it
	}
	r.finish(sum)
	if *report != "" && !*dryRun {
		if rerr := writeReport(*report, sum); rerr != nil {
			fmt.Fprintf(stderr, "migctl migrate: -report: %v\n", rerr)
			if err == nil {
				return 1
			}
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "migctl migrate: %s\n", oneLine(err.Error()))
		return 1
	}
	return 0
}

func usageError(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "migctl migrate: %v\n", err)
	return 2
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", "; ") }

func dial(ctx context.Context, addr string) (*qmp.Client, error) {
	network, a := socketAddr(addr)
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return qmp.Dial(dctx, network, a)
}

// defaultURI puts the channel beside the destination: a unix socket in its QMP socket's
// directory, or KubeVirt's migration port on its host.
func defaultURI(dst string) string {
	network, addr := socketAddr(dst)
	if network == "tcp" {
		host := addr
		if i := strings.LastIndex(addr, ":"); i >= 0 {
			host = addr[:i]
		}
		return "tcp:" + host + ":49152"
	}
	return "unix:" + filepath.Join(filepath.Dir(addr), fmt.Sprintf("migctl-%d.sock", os.Getpid()))
}

// parseSize reads bytes with an optional binary K/M/G/T suffix.
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K', 'k':
			mult = 1 << 10
		case 'M', 'm':
			mult = 1 << 20
		case 'G', 'g':
			mult = 1 << 30
		case 'T', 't':
			mult = 1 << 40
		}
		if mult > 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("%q is not a positive size", s)
	}
	if v > ^uint64(0)/mult {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return v * mult, nil
}

// renderer prints progress: one redrawn line on a terminal (at most every 200 ms), a line
// per pass elsewhere, or JSON.
type renderer struct {
	w        io.Writer
	json     bool
	tty      bool
	last     time.Time
	lastPass int64
	prev     *controller.Sample
	drawn    bool
}

func newRenderer(w io.Writer, jsonOut bool) *renderer {
	r := &renderer{w: w, json: jsonOut}
	if f, ok := w.(*os.File); ok {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		r.tty = err == nil
	}
	return r
}

func (r *renderer) sample(s controller.Sample) {
	defer func() { r.prev = &s }()
	if r.json {
		b, _ := json.Marshal(map[string]any{"sample": s})
		fmt.Fprintln(r.w, string(b))
		return
	}
	if r.tty {
		if time.Since(r.last) < 200*time.Millisecond && !controller.Terminal(s.Status) {
			return
		}
		r.last = time.Now()
		fmt.Fprintf(r.w, "\r\033[K%s", progressLine(s, r.prev))
		r.drawn = true
		return
	}
	if s.RAM.DirtySyncCount != r.lastPass || controller.Terminal(s.Status) {
		r.lastPass = s.RAM.DirtySyncCount
		fmt.Fprintln(r.w, progressLine(s, r.prev))
	}
}

// progressLine: status, pass, transferred and remaining, rate, dirty rate, limit or
// throttle, expected downtime, ETA.
func progressLine(s controller.Sample, prev *controller.Sample) string {
	rate := s.RAM.Mbps * 1e6 / 8
	dirty := float64(s.RAM.DirtyPagesRate * max(s.RAM.PageSize, 4096))
	var b strings.Builder
	fmt.Fprintf(&b, "%6.1fs %-9s pass %-3d sent %s left %s at %s dirty %s", s.Elapsed.Seconds(), s.Status,
		s.RAM.DirtySyncCount, controller.FormatBytes(float64(s.RAM.Transferred)), controller.FormatBytes(float64(s.RAM.Remaining)),
		controller.FormatRate(rate), controller.FormatRate(dirty))
	switch {
	case s.LimitTotal > 0:
		fmt.Fprintf(&b, " limit %d MB/s", s.LimitTotal)
	case s.CPUThrottlePercentage > 0:
		fmt.Fprintf(&b, " throttle %d%%", s.CPUThrottlePercentage)
	}
	if s.ExpectedDowntime > 0 {
		fmt.Fprintf(&b, " exp. downtime %d ms", s.ExpectedDowntime)
	}
	if rate > dirty && s.Status == "active" {
		fmt.Fprintf(&b, " ETA %.1fs", float64(s.RAM.Remaining)/(rate-dirty))
	}
	return b.String()
}

func (r *renderer) action(a controller.Action) {
	if r.json {
		b, _ := json.Marshal(map[string]any{"action": a})
		fmt.Fprintln(r.w, string(b))
		return
	}
	r.clearLine()
	line := fmt.Sprintf("%s %7.3fs %s %s: %s", a.Time.UTC().Format("15:04:05.000"), a.Elapsed.Seconds(), a.Target, a.Kind, a.Reason)
	if a.Error != "" {
		line += " — error: " + a.Error
	}
	fmt.Fprintln(r.w, line)
}

func (r *renderer) pass(controller.Pass) {}

func (r *renderer) clearLine() {
	if r.tty && r.drawn {
		fmt.Fprint(r.w, "\r\033[K")
		r.drawn = false
	}
}

func (r *renderer) finish(sum *controller.Summary) {
	if r.json {
		b, _ := json.Marshal(map[string]any{"summary": sum})
		fmt.Fprintln(r.w, string(b))
		return
	}
	if r.tty && r.drawn {
		fmt.Fprintln(r.w)
	}
	if sum.Plan != nil && sum.Status == "" && sum.Reason == "" {
		p := sum.Plan
		fmt.Fprintf(r.w, "plan: %s; predicted dirty rate %d MB/s, ", p.Strategy, p.PredictedDirtyRate)
		if p.PredictedPasses > 0 {
			fmt.Fprintf(r.w, "%d passes, %.1fs\n", p.PredictedPasses, p.PredictedTime.Seconds())
		} else {
			fmt.Fprintln(r.w, "not predicted to converge")
		}
		return
	}
	if sum.Status != "" {
		fmt.Fprintf(r.w, "%s: total-time %d ms, downtime %d ms, setup-time %d ms, %s sent in %d passes\n", sum.Status,
			sum.TotalTime, sum.Downtime, sum.SetupTime, controller.FormatBytes(float64(sum.Transferred)), sum.DirtySyncCount)
	}
}
