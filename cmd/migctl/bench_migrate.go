package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// benchMigrate is `migctl bench-migrate`: it starts a source and a destination migvisor on this
// machine for each scenario, migrates a busy guest between them and prints one row per scenario.
func benchMigrate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench-migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	mem := fs.String("m", "1G", "guest memory")
	ring := fs.Int("ring", 4096, "dirty ring entries per vCPU")
	smp := fs.Int("smp", 2, "vCPUs of both daemons: 0 writes, 1 reads, the others are idle")
	accel := fs.String("accel", "kvm", "accelerator of both daemons (kvm or soft)")
	bandwidth := fs.Uint64("bandwidth", 128<<20, "max-bandwidth, bytes/s")
	downtime := fs.Uint64("downtime", 300, "downtime-limit, ms")
	limits := fs.String("dirty-limits", "50,100,200", "vcpu-dirty-limit values (MB/s) to try")
	timeout := fs.Duration("timeout", 60*time.Second, "give a migration up (migrate_cancel) after this long")
	transport := fs.String("transport", "unix", "unix or tcp")
	only := fs.String("only", "", "run only the scenarios whose name contains this")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var scenarios []scenario
	scenarios = append(scenarios,
		scenario{name: "no throttle"},
		scenario{name: "auto-converge", caps: []string{"auto-converge"}})
	for _, s := range strings.Split(*limits, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
		if err != nil {
			fmt.Fprintf(stderr, "migctl: -dirty-limits: %v\n", err)
			return 2
		}
		scenarios = append(scenarios, scenario{name: fmt.Sprintf("dirty-limit %d MB/s", n), caps: []string{"dirty-limit"},
			params: map[string]any{"vcpu-dirty-limit": n, "x-vcpu-dirty-limit-period": 1000}})
	}
	scenarios = append(scenarios, scenario{name: "idle guest, unlimited", idle: true})

	dir, err := os.MkdirTemp("", "migctl-bench-")
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if *smp < 2 {
		fmt.Fprintf(stderr, "migctl: -smp %d: the scenarios need a writing and a reading vCPU\n", *smp)
		return 2
	}
	common := benchCommon{mem: *mem, ring: *ring, smp: *smp, accel: *accel, bandwidth: *bandwidth, downtime: *downtime,
		timeout: *timeout, transport: *transport, dir: dir}
	fmt.Fprintf(stdout, "guest %s, %d vCPUs (0 writes flat out, 1 reads, the others idle), %s, ring %d, max-bandwidth %d MiB/s, downtime-limit %d ms, over %s\n\n",
		*mem, *smp, *accel, *ring, *bandwidth>>20, *downtime, *transport)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tresult\ttotal ms\tdowntime ms\tsent MiB\tpasses\tread vCPU speed\tMiB/s\t")
	var notes []string
	for i, s := range scenarios {
		if *only != "" && !strings.Contains(s.name, *only) {
			continue
		}
		r, err := common.run(i, s)
		if err != nil {
			fmt.Fprintf(tw, "%s\terror: %v\t\t\t\t\t\t\t\n", s.name, err)
			continue
		}
		status := r.status
		if r.vcpuErr != "" {
			status += " *"
			notes = append(notes, fmt.Sprintf("* %s: the source's %s: the guest did not run whole, so this row does not count", s.name, r.vcpuErr))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.0f\t%d\t%s\t%.0f\t\n", s.name, status, r.totalMS, r.downtimeMS,
			float64(r.sent)/(1<<20), r.passes, r.readSpeed(), r.rate())
	}
	tw.Flush()
	for _, n := range notes {
		fmt.Fprintln(stdout, n)
	}
	if *only == "" || strings.Contains("raw transport", *only) {
		hot, err := rawThroughput(dir, *transport, 2<<30, false)
		var cold float64
		if err == nil {
			cold, err = rawThroughput(dir, *transport, 1<<30, true)
		}
		if err != nil {
			fmt.Fprintf(stdout, "\nraw %s transport: error: %v\n", *transport, err)
		} else {
			fmt.Fprintf(stdout, "\nraw %s transport, one stream: %.0f MiB/s from a 1 MiB buffer to a small one (2 GiB), "+
				"%.0f MiB/s from 1 GiB of memory into another\n", *transport, hot/(1<<20), cold/(1<<20))
		}
	}
	return 0
}

type scenario struct {
	name   string
	caps   []string
	params map[string]any
	idle   bool // memory filled with non-zero pages, guest paused, no bandwidth limit
}

type benchCommon struct {
	mem, accel, transport, dir string
	ring, smp                  int
	bandwidth, downtime        uint64
	timeout                    time.Duration
}

type benchResult struct {
	status                    string
	totalMS, downtimeMS       int64
	sent                      uint64
	passes                    int64
	readBefore, readDuring    float64 // read vCPU pages/s
	readMeasured, transferred bool
	vcpuErr                   string // a source vCPU that stopped for good during the run
}

func (r benchResult) readSpeed() string {
	if !r.readMeasured || r.readBefore == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*r.readDuring/r.readBefore)
}

func (r benchResult) rate() float64 {
	if r.totalMS == 0 {
		return 0
	}
	return float64(r.sent) / (1 << 20) / (float64(r.totalMS) / 1000)
}

type migrationInfo struct {
	Status    string `json:"status"`
	TotalTime int64  `json:"total-time"`
	Downtime  int64  `json:"downtime"`
	ErrorDesc string `json:"error-desc"`
	RAM       struct {
		Transferred    uint64 `json:"transferred"`
		DirtySyncCount int64  `json:"dirty-sync-count"`
	} `json:"ram"`
}

type workloadStat struct {
	CPUIndex int    `json:"cpu-index"`
	Mode     string `json:"mode"`
	Pages    uint64 `json:"pages"`
	Passes   uint64 `json:"passes"`
	Error    string `json:"error"`
}

func (b benchCommon) run(i int, s scenario) (benchResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout+90*time.Second)
	defer cancel()
	var res benchResult
	accel := fmt.Sprintf("%s,dirty-ring-size=%d", b.accel, b.ring)
	machine := []string{"-accel", accel, "-smp", strconv.Itoa(b.smp), "-m", b.mem}
	if s.idle {
		// One store a page is enough to make every page non-zero (sent whole); filling whole
		// pages would take minutes where KVM emulates the guest's stores.
		machine = append(machine, "-workload", "cpus=0-1,mode=write")
	} else {
		machine = append(machine, "-workload", "cpus=0,mode=write", "-workload", "cpus=1,mode=read")
	}
	src, err := startDaemon(ctx, b.dir, fmt.Sprintf("src%d", i), machine...)
	if err != nil {
		return res, err
	}
	defer src.stop(ctx)
	dst, err := startDaemon(ctx, b.dir, fmt.Sprintf("dst%d", i), append(machine, "-incoming", "defer")...)
	if err != nil {
		return res, err
	}
	defer dst.stop(ctx)

	uri := "unix:" + filepath.Join(b.dir, fmt.Sprintf("mig%d.sock", i))
	if b.transport == "tcp" {
		port, err := freePort()
		if err != nil {
			return res, err
		}
		uri = fmt.Sprintf("tcp:127.0.0.1:%d", port)
	}
	bandwidth := b.bandwidth
	if s.idle {
		bandwidth = 1 << 40         // effectively unlimited
		time.Sleep(3 * time.Second) // let the writers touch every page of their regions
		if err := src.exec(ctx, "stop", nil, nil); err != nil {
			return res, err
		}
	} else {
		res.readBefore, err = readRate(ctx, src, 2*time.Second)
		if err != nil {
			return res, err
		}
	}
	caps := []map[string]any{{"capability": "events", "state": true}}
	for _, c := range s.caps {
		caps = append(caps, map[string]any{"capability": c, "state": true})
	}
	if err := src.exec(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return res, err
	}
	params := map[string]any{"max-bandwidth": bandwidth, "downtime-limit": b.downtime}
	for k, v := range s.params {
		params[k] = v
	}
	if err := src.exec(ctx, "migrate-set-parameters", params, nil); err != nil {
		return res, err
	}
	if err := dst.exec(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		return res, err
	}
	var startPages uint64
	if !s.idle {
		if startPages, err = readPages(ctx, src); err != nil {
			return res, err
		}
	}
	start := time.Now()
	if err := src.exec(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return res, err
	}
	var info migrationInfo
	lastPages, lastAt := startPages, start
	for {
		time.Sleep(100 * time.Millisecond)
		if err := src.exec(ctx, "query-migrate", nil, &info); err != nil {
			return res, err
		}
		if info.Status == "active" && !s.idle {
			if p, err := readPages(ctx, src); err == nil {
				lastPages, lastAt = p, time.Now()
			}
		}
		if info.Status == "completed" || info.Status == "failed" || info.Status == "cancelled" {
			break
		}
		if time.Since(start) > b.timeout {
			_ = src.exec(ctx, "migrate_cancel", nil, nil)
			for info.Status != "cancelled" && info.Status != "failed" && ctx.Err() == nil {
				time.Sleep(50 * time.Millisecond)
				_ = src.exec(ctx, "query-migrate", nil, &info)
			}
			res.status = fmt.Sprintf("no convergence in %s", b.timeout)
			res.vcpuErr = vcpuFailure(ctx, src)
			res.totalMS = time.Since(start).Milliseconds()
			res.passes = info.RAM.DirtySyncCount
			res.sent = info.RAM.Transferred
			return res, nil
		}
	}
	res.vcpuErr = vcpuFailure(ctx, src)
	if !s.idle && lastAt.After(start) {
		res.readDuring = float64(lastPages-startPages) / lastAt.Sub(start).Seconds()
		res.readMeasured = true
	}
	res.status, res.totalMS, res.downtimeMS = info.Status, info.TotalTime, info.Downtime
	res.sent, res.passes = info.RAM.Transferred, info.RAM.DirtySyncCount
	if info.Status != "completed" {
		if info.ErrorDesc != "" {
			res.status += ": " + info.ErrorDesc
		}
		return res, nil
	}
	// The destination must be running the guest (paused for the idle case, as the source was).
	var st struct {
		Status string `json:"status"`
	}
	want := "running"
	if s.idle {
		want = "paused"
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if err := dst.exec(ctx, "query-status", nil, &st); err != nil {
			return res, err
		}
		if st.Status == want {
			break
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("destination is %s, not %s", st.Status, want)
		}
	}
	return res, nil
}

// readRate measures the read vCPU's pages per second over d.
func readRate(ctx context.Context, d *daemon, dur time.Duration) (float64, error) {
	p0, err := readPages(ctx, d)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	time.Sleep(dur)
	p1, err := readPages(ctx, d)
	if err != nil {
		return 0, err
	}
	return float64(p1-p0) / time.Since(t0).Seconds(), nil
}

// vcpuFailure names a vCPU of d that stopped for good, and why ("" if none).
func vcpuFailure(ctx context.Context, d *daemon) string {
	var stats []workloadStat
	if err := d.exec(ctx, "x-query-workload", nil, &stats); err != nil {
		return ""
	}
	for _, s := range stats {
		if s.Error != "" {
			return fmt.Sprintf("vCPU %d stopped (%s)", s.CPUIndex, s.Error)
		}
	}
	return ""
}

func readPages(ctx context.Context, d *daemon) (uint64, error) {
	var stats []workloadStat
	if err := d.exec(ctx, "x-query-workload", nil, &stats); err != nil {
		return 0, err
	}
	for _, s := range stats {
		if s.Mode == "read" {
			return s.Pages, nil
		}
	}
	return 0, errors.New("no read vCPU")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// rawThroughput is what one stream of the transport carries on this machine, the ceiling a
// migration's transfer rate is compared with. Hot: a 1 MiB buffer written over and over and
// read into a small one, all in cache. Cold: size bytes of memory written once and read into
// another size bytes, both touched beforehand, in runs of a migration's size: the copy any
// migration makes, without its checks.
func rawThroughput(dir, transport string, size int64, cold bool) (float64, error) {
	network, addr := "unix", filepath.Join(dir, "raw.sock")
	if transport == "tcp" {
		network, addr = "tcp", "127.0.0.1:0"
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return 0, err
	}
	defer l.Close()
	const run = 256 << 10
	var src, dst []byte
	if cold {
		src, dst = touched(size), touched(size)
	}
	errc := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		if !cold {
			_, err = io.Copy(io.Discard, c)
			errc <- err
			return
		}
		for off := int64(0); off < size && err == nil; off += run {
			_, err = io.ReadFull(c, dst[off:min(off+run, size)])
		}
		errc <- err
	}()
	c, err := net.Dial(network, l.Addr().String())
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	start := time.Now()
	for sent := int64(0); sent < size; {
		b := buf
		if cold {
			b = src[sent:min(sent+run, size)]
		}
		if _, err := c.Write(b); err != nil {
			c.Close()
			return 0, err
		}
		sent += int64(len(b))
	}
	c.Close()
	if err := <-errc; err != nil {
		return 0, err
	}
	return float64(size) / time.Since(start).Seconds(), nil
}

// touched is n bytes of memory, every page of it written.
func touched(n int64) []byte {
	b := make([]byte, n)
	for i := int64(0); i < n; i += 4096 {
		b[i] = byte(i>>12) | 1
	}
	return b
}
