package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// benchSweep is `migctl bench-sweep`: migrations of idle guests of several sizes and vCPU
// counts, with and without a dirty ring, run by migvisor and, where qemu-system-x86_64 is
// installed, by QEMU on the same machine in the same run (the ratio is what means something
// on a noisy host); and the busy 208 MiB guest many times, for the tail of its downtime.
func benchSweep(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench-sweep", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sizes := fs.String("sizes", "1G,4G,16G", "idle guest sizes")
	cpus := fs.String("cpus", "1,8,64,256", "vCPU counts (1 GiB idle guest)")
	rings := fs.String("rings", "0,4096", "dirty ring sizes of the idle sweeps (0: KVM's dirty bitmap)")
	runs := fs.Int("runs", 3, "migrations per idle scenario and program")
	busyRuns := fs.Int("busy-runs", 20, "migrations of the busy 208 MiB guest")
	busyRing := fs.Int("busy-ring", 65536, "dirty ring of the busy guest")
	bandwidth := fs.Uint64("bandwidth", 10<<30, "max-bandwidth of the idle scenarios, bytes/s")
	downtime := fs.Uint64("downtime", 300, "downtime-limit, ms")
	qemuBin := fs.String("qemu", "qemu-system-x86_64", "QEMU to compare with (\"\" for none)")
	only := fs.String("only", "", "size, cpus or busy: run only that part")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	dir, err := os.MkdirTemp("", "migctl-sweep-")
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	sw := &sweep{dir: dir, downtime: *downtime, out: stdout}
	mv, err := migvisorPath()
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 1
	}
	sw.progs = []program{{name: "migvisor", bin: mv}}
	if *qemuBin != "" {
		if p, err := exec.LookPath(*qemuBin); err == nil {
			sw.progs = append(sw.progs, program{name: "QEMU", bin: p, qemu: true})
		} else {
			fmt.Fprintf(stdout, "(%s not found: migvisor alone)\n", *qemuBin)
		}
	}
	ringList, err := intList(*rings)
	if err != nil {
		fmt.Fprintf(stderr, "migctl: -rings: %v\n", err)
		return 2
	}
	if *only == "" || *only == "size" {
		var scen []idleScenario
		for _, s := range strings.Split(*sizes, ",") {
			for _, r := range ringList {
				scen = append(scen, idleScenario{mem: strings.TrimSpace(s), cpus: 1, ring: r})
			}
		}
		sw.idleTable(fmt.Sprintf("Idle running guest, 1 vCPU, max-bandwidth %d MiB/s, downtime-limit %d ms, unix socket, %d runs each",
			*bandwidth>>20, *downtime, *runs), scen, *bandwidth, *runs)
	}
	if *only == "" || *only == "cpus" {
		counts, err := intList(*cpus)
		if err != nil {
			fmt.Fprintf(stderr, "migctl: -cpus: %v\n", err)
			return 2
		}
		var scen []idleScenario
		for _, n := range counts {
			for _, r := range ringList {
				scen = append(scen, idleScenario{mem: "1G", cpus: n, ring: r})
			}
		}
		sw.idleTable(fmt.Sprintf("Idle running 1 GiB guest by vCPU count, max-bandwidth %d MiB/s, downtime-limit %d ms, %d runs each",
			*bandwidth>>20, *downtime, *runs), scen, *bandwidth, *runs)
		sw.writerTable(counts, *busyRing)
	}
	if *only == "" || *only == "busy" {
		sw.busyTable(*busyRuns, *busyRing)
	}
	return 0
}

type program struct {
	name, bin string
	qemu      bool
}

// machineArgs are the options of a guest: migvisor and QEMU take the same ones. QEMU's guest
// has no kernel (its firmware finds nothing to boot); migvisor's runs idle vCPUs.
func (p program) machineArgs(mem string, cpus, ring int) []string {
	accel := "kvm"
	if ring > 0 {
		accel += ",dirty-ring-size=" + strconv.Itoa(ring)
	}
	a := []string{"-accel", accel, "-m", mem, "-smp", strconv.Itoa(cpus)}
	if p.qemu {
		a = append(a, "-nodefaults", "-nographic", "-display", "none")
	}
	return a
}

type sweep struct {
	dir      string
	downtime uint64
	out      io.Writer
	progs    []program
	n        int // migrations so far: names sockets
}

type idleScenario struct {
	mem        string
	cpus, ring int
}

// sweepRun is one migration's outcome.
type sweepRun struct {
	status                       string
	totalMS, downtimeMS          int64
	expectedMS                   int64 // expected-downtime in the last active sample (-1: none)
	startMS                      float64
	qmpUS                        float64 // median query-status round trip
	srcRSS, dstRSS               uint64  // KiB, after the migration
	sentMiB                      float64
	passes                       int64
	writerBefore, writerDuring   float64 // pages/s (busy and writer scenarios)
	writerLimited                float64 // pages/s under set-vcpu-dirty-limit (writer scenario)
	readerBefore, readerDuringPS float64
}

func (sw *sweep) idleTable(title string, scen []idleScenario, bandwidth uint64, runs int) {
	fmt.Fprintf(sw.out, "\n%s\n\n", title)
	tw := tabwriter.NewWriter(sw.out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "guest\tring\tprogram\ttotal ms (min/med/max)\tdowntime ms (min/med/max)\texpected ms\tstart ms\tsrc RSS MiB\tdst RSS MiB\ttotal vs QEMU\tdowntime vs QEMU\t")
	for _, sc := range scen {
		var medians [][2]float64
		for _, p := range sw.progs {
			var rs []sweepRun
			var failure string
			for range runs {
				r, err := sw.migrate(p, sc.mem, sc.cpus, sc.ring, bandwidth, nil, nil, false)
				if err != nil {
					failure = err.Error()
					break
				}
				if r.status != "completed" {
					failure = r.status
					break
				}
				rs = append(rs, r)
			}
			name := fmt.Sprintf("%s, %d vCPU", sc.mem, sc.cpus)
			if failure != "" {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t\t\t\t\t\t\t\t\n", name, sc.ring, p.name, failure)
				medians = append(medians, [2]float64{-1, -1})
				continue
			}
			tot := stats(rs, func(r sweepRun) float64 { return float64(r.totalMS) })
			down := stats(rs, func(r sweepRun) float64 { return float64(r.downtimeMS) })
			exp := stats(rs, func(r sweepRun) float64 { return float64(r.expectedMS) })
			start := stats(rs, func(r sweepRun) float64 { return r.startMS })
			srss := stats(rs, func(r sweepRun) float64 { return float64(r.srcRSS) / 1024 })
			drss := stats(rs, func(r sweepRun) float64 { return float64(r.dstRSS) / 1024 })
			medians = append(medians, [2]float64{tot.med, down.med})
			ratioT, ratioD := "", ""
			if len(medians) > 1 && medians[0][0] >= 0 {
				ratioT = ratio(medians[0][0], tot.med)
				ratioD = ratio(medians[0][1], down.med)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%s\t%s\t\n", name, sc.ring, p.name,
				tot, down, exp.med, start.med, srss.max, drss.max, ratioT, ratioD)
		}
	}
	tw.Flush()
	fmt.Fprintln(sw.out, "(vs QEMU: migvisor's median over QEMU's; start: process start to the first QMP answer; RSS: the larger of the runs, after the migration)")
}

// writerTable: a guest with one vCPU writing flat out beside idle ones: start time, QMP
// latency, the dirty limit's hold on the writer, and a dirty-limit migration.
func (sw *sweep) writerTable(counts []int, ring int) {
	fmt.Fprintf(sw.out, "\nOne writing vCPU (64 MiB flat out) among idle ones, 1 GiB, ring %d, migvisor: set-vcpu-dirty-limit 50 on the writer, then a dirty-limit migration (vcpu-dirty-limit 50, 128 MiB/s)\n\n", ring)
	tw := tabwriter.NewWriter(sw.out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "vCPUs\tstart ms\tquery-status µs\twriter MB/s\tlimited MB/s\tresult\ttotal ms\tdowntime ms\texpected ms\t")
	for _, n := range counts {
		work := []string{"-workload", "cpus=0,mode=write,size=64M"}
		params := map[string]any{"vcpu-dirty-limit": 50}
		r, err := sw.migrate(sw.progs[0], "1G", n, ring, 128<<20, work, params, true)
		if err != nil {
			fmt.Fprintf(tw, "%d\terror: %v\t\t\t\t\t\t\t\t\n", n, err)
			continue
		}
		fmt.Fprintf(tw, "%d\t%.0f\t%.0f\t%.0f\t%.0f\t%s\t%d\t%d\t%d\t\n", n, r.startMS, r.qmpUS,
			r.writerBefore*4096/1e6, r.writerLimited*4096/1e6, r.status, r.totalMS, r.downtimeMS, r.expectedMS)
	}
	tw.Flush()
}

// busyTable migrates the busy guest (vCPU 0 rewriting 208 MiB flat out, vCPU 1 reading, 512
// MiB, 128 MiB/s, dirty-limit 50) runs times and reports the tail of its downtime.
func (sw *sweep) busyTable(runs, ring int) {
	fmt.Fprintf(sw.out, "\nBusy guest: vCPU 0 rewrites 208 MiB flat out, vCPU 1 reads, 512 MiB, ring %d, dirty-limit 50 MB/s, 128 MiB/s, downtime-limit %d ms, %d runs\n\n",
		ring, sw.downtime, runs)
	work := []string{"-workload", "cpus=0,mode=write,size=208M", "-workload", "cpus=1,mode=read"}
	var rs []sweepRun
	tw := tabwriter.NewWriter(sw.out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tresult\ttotal ms\tdowntime ms\texpected ms\tsent MiB\tpasses\t")
	for i := range runs {
		r, err := sw.migrate(sw.progs[0], "512M", 2, ring, 128<<20, work, map[string]any{"vcpu-dirty-limit": 50}, true)
		if err != nil {
			fmt.Fprintf(tw, "%d\terror: %v\t\t\t\t\t\t\n", i+1, err)
			continue
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%.0f\t%d\t\n", i+1, r.status, r.totalMS, r.downtimeMS, r.expectedMS, r.sentMiB, r.passes)
		if r.status == "completed" {
			rs = append(rs, r)
		}
	}
	tw.Flush()
	if len(rs) == 0 {
		return
	}
	d := stats(rs, func(r sweepRun) float64 { return float64(r.downtimeMS) })
	tot := stats(rs, func(r sweepRun) float64 { return float64(r.totalMS) })
	over := 0
	for _, r := range rs {
		if uint64(r.downtimeMS) > sw.downtime {
			over++
		}
	}
	fmt.Fprintf(sw.out, "completed %d of %d; downtime ms min %.0f, median %.0f, p95 %.0f, max %.0f; over the limit: %d; total ms median %.0f, max %.0f\n",
		len(rs), runs, d.min, d.med, d.p95, d.max, over, tot.med, tot.max)
}

// migrate runs one migration between two fresh processes of p. With dirtyLimit the source
// has the dirty-limit capability and the guest runs its workloads (work); params are added
// to max-bandwidth and downtime-limit.
func (sw *sweep) migrate(p program, mem string, cpus, ring int, bandwidth uint64, work []string,
	params map[string]any, dirtyLimit bool) (sweepRun, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sw.n++
	var res sweepRun
	machine := append(p.machineArgs(mem, cpus, ring), work...)
	t0 := time.Now()
	src, err := startProcess(ctx, sw.dir, fmt.Sprintf("src%d", sw.n), p.bin, machine...)
	if err != nil {
		return res, err
	}
	defer src.stop(ctx)
	res.startMS = float64(time.Since(t0).Microseconds()) / 1000
	dst, err := startProcess(ctx, sw.dir, fmt.Sprintf("dst%d", sw.n), p.bin, append(slices.Clone(machine), "-incoming", "defer")...)
	if err != nil {
		return res, err
	}
	defer dst.stop(ctx)
	if res.qmpUS, err = qmpLatency(ctx, src, 200); err != nil {
		return res, err
	}
	if dirtyLimit && !p.qemu {
		if res.writerBefore, err = cpuRate(ctx, src, 0, time.Second); err != nil {
			return res, err
		}
		if len(work) > 0 && !strings.Contains(strings.Join(work, " "), "mode=read") {
			// The writer alone: the dirty limit's hold on it, outside migration.
			if err := src.exec(ctx, "set-vcpu-dirty-limit", map[string]any{"cpu-index": 0, "dirty-rate": 50}, nil); err != nil {
				return res, err
			}
			time.Sleep(time.Second) // one period to settle
			if res.writerLimited, err = cpuRate(ctx, src, 0, 2*time.Second); err != nil {
				return res, err
			}
			if err := src.exec(ctx, "cancel-vcpu-dirty-limit", nil, nil); err != nil {
				return res, err
			}
		}
	}
	caps := []map[string]any{{"capability": "events", "state": true}}
	if dirtyLimit {
		caps = append(caps, map[string]any{"capability": "dirty-limit", "state": true})
	}
	if err := src.exec(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return res, err
	}
	ps := map[string]any{"max-bandwidth": bandwidth, "downtime-limit": sw.downtime}
	for k, v := range params {
		ps[k] = v
	}
	if err := src.exec(ctx, "migrate-set-parameters", ps, nil); err != nil {
		return res, err
	}
	uri := "unix:" + filepath.Join(sw.dir, fmt.Sprintf("mig%d.sock", sw.n))
	if err := dst.exec(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		return res, err
	}
	if err := src.exec(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return res, err
	}
	res.expectedMS = -1
	var info struct {
		migrationInfo
		Expected *int64 `json:"expected-downtime"`
	}
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		if err := src.exec(ctx, "query-migrate", nil, &info); err != nil {
			return res, err
		}
		if info.Status == "active" && info.Expected != nil {
			res.expectedMS = *info.Expected
		}
		if info.Status == "completed" || info.Status == "failed" || info.Status == "cancelled" {
			break
		}
		if time.Since(start) > 3*time.Minute {
			_ = src.exec(ctx, "migrate_cancel", nil, nil)
			res.status = "no convergence in 3 min"
			return res, nil
		}
	}
	res.status, res.totalMS, res.downtimeMS = info.Status, info.TotalTime, info.Downtime
	res.sentMiB, res.passes = float64(info.RAM.Transferred)/(1<<20), info.RAM.DirtySyncCount
	if info.Status != "completed" {
		if info.ErrorDesc != "" {
			res.status += ": " + info.ErrorDesc
		}
		return res, nil
	}
	var st struct {
		Status string `json:"status"`
	}
	for deadline := time.Now().Add(10 * time.Second); st.Status != "running"; time.Sleep(20 * time.Millisecond) {
		if err := dst.exec(ctx, "query-status", nil, &st); err != nil {
			return res, err
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("destination is %s, not running", st.Status)
		}
	}
	res.srcRSS, res.dstRSS = rssKiB(src.cmd.Process.Pid), rssKiB(dst.cmd.Process.Pid)
	return res, nil
}

// qmpLatency is the median round trip of n query-status commands, in µs.
func qmpLatency(ctx context.Context, d *daemon, n int) (float64, error) {
	ts := make([]float64, n)
	for i := range ts {
		t := time.Now()
		if err := d.exec(ctx, "query-status", nil, nil); err != nil {
			return 0, err
		}
		ts[i] = float64(time.Since(t).Nanoseconds()) / 1000
	}
	slices.Sort(ts)
	return ts[n/2], nil
}

// cpuRate is vCPU cpu's pages per second over dur (x-query-workload).
func cpuRate(ctx context.Context, d *daemon, cpu int, dur time.Duration) (float64, error) {
	pages := func() (uint64, error) {
		var stats []workloadStat
		if err := d.exec(ctx, "x-query-workload", nil, &stats); err != nil {
			return 0, err
		}
		for _, s := range stats {
			if s.CPUIndex == cpu {
				return s.Pages, nil
			}
		}
		return 0, errors.New("no such vCPU")
	}
	p0, err := pages()
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	time.Sleep(dur)
	p1, err := pages()
	if err != nil {
		return 0, err
	}
	return float64(p1-p0) / time.Since(t0).Seconds(), nil
}

// rssKiB is a process's resident set (VmRSS), 0 if unknown.
func rssKiB(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

type summary struct{ min, med, p95, max float64 }

func (s summary) String() string { return fmt.Sprintf("%.0f/%.0f/%.0f", s.min, s.med, s.max) }

func stats(rs []sweepRun, f func(sweepRun) float64) summary {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	slices.Sort(v)
	if len(v) == 0 {
		return summary{}
	}
	// p95 by the nearest rank.
	rank := (95*len(v) + 99) / 100
	return summary{min: v[0], med: v[len(v)/2], p95: v[rank-1], max: v[len(v)-1]}
}

func ratio(a, b float64) string {
	if b <= 0 {
		if a <= 0 {
			return "1.00"
		}
		return "-"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}
