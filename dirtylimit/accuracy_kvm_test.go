package dirtylimit_test

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/vmm"
	"github.com/migvisor/migvisor/vmm/kvm"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// The accuracy report runs only when asked, on a real machine:
//
//	MIGVISOR_ACCURACY=1 go test ./dirtylimit/ -run TestAccuracyReport -v -timeout 30m
//
// MIGVISOR_ACCURACY_ACCEL=soft runs it on the software backend instead of KVM;
// MIGVISOR_ACCURACY_QUOTAS=50,200 measures only those quotas; MIGVISOR_ACCURACY_LIMIT=all limits
// the read vCPU too, as a migration does (by default only the write vCPU is limited: the read
// vCPU's column then shows what throttling its neighbour does to it).
const (
	accRing      = 4096
	accSettleMax = 5  // periods allowed to settle before the steady window regardless
	accSteady    = 10 // periods of the steady window
	accMem       = 512 << 20
)

var accQuotas = []uint64{10, 50, 100, 200, 500}

// accRun is one quota under one algorithm.
type accRun struct {
	alg        dirtylimit.Algorithm
	quota      uint64
	rates      []uint64 // the write vCPU, MiB/s, each 1 s period from the limit on
	settle     int      // periods until every later one is within the bound; -1 never
	inBound    int      // periods within the bound, of all
	meanErr    float64  // % of the quota, steady window
	worstErr   float64  // % of the quota, steady window
	peak       float64  // % over the quota of the worst period, settling included
	readRatio  float64  // read vCPU's pages/s in the steady window over its unthrottled pages/s, %
	freeWrite  uint64   // write vCPU unthrottled, MiB/s
	freeReadPS float64  // read vCPU unthrottled, pages/s
	readDirty  float64  // read vCPU's dirty-ring entries per page read, unthrottled
}

func TestAccuracyReport(t *testing.T) {
	if os.Getenv("MIGVISOR_ACCURACY") == "" {
		t.Skip("set MIGVISOR_ACCURACY=1 to measure the dirty limit on a real machine")
	}
	accel := vmm.AccelKVM
	if os.Getenv("MIGVISOR_ACCURACY_ACCEL") == "soft" {
		accel = vmm.AccelSoft
	} else if err := kvm.Available(); err != nil {
		t.Skipf("no KVM: %v", err)
	}
	quotas := accQuotas
	if s := os.Getenv("MIGVISOR_ACCURACY_QUOTAS"); s != "" {
		quotas = nil
		for _, f := range strings.Split(s, ",") {
			q, err := strconv.ParseUint(f, 10, 64)
			require.NoError(t, err)
			quotas = append(quotas, q)
		}
	}
	all := os.Getenv("MIGVISOR_ACCURACY_LIMIT") == "all"
	var runs []accRun
	for _, q := range quotas {
		for _, alg := range []dirtylimit.Algorithm{dirtylimit.QEMU, dirtylimit.Migvisor} {
			r := measureAccuracy(t, accel, alg, q, all)
			t.Logf("%s quota %d: %v", alg, q, r.rates)
			runs = append(runs, r)
		}
	}
	t.Log("\n" + accuracyTable(accel, all, runs))
}

// measureAccuracy starts a machine with a flat-out write vCPU and a read vCPU, measures them
// free for 2 s, limits the writer (or all) to quota and measures each 1 s period.
func measureAccuracy(t *testing.T, accel string, alg dirtylimit.Algorithm, quota uint64, all bool) accRun {
	m, err := vmm.New(vmm.Config{MemSize: accMem, CPUs: 2, Accel: accel, DirtyRingSize: accRing,
		Workloads: []vmm.Workload{{Mode: vmm.ModeWrite}, {Mode: vmm.ModeRead}},
		Logf:      func(format string, args ...any) { t.Logf("vmm: "+format, args...) }})
	require.NoError(t, err)
	defer m.Close()
	// First touches of fresh guest memory are slow on these hosts (kvm-host-notes.md): pre-fault
	// it all before the vCPUs start, so that the free speeds are the steady ones.
	require.NoError(t, unix.Madvise(m.Memory(), unix.MADV_POPULATE_WRITE))
	lim := dirtylimit.NewLimiter(m, dirtylimit.Options{Algorithm: alg})
	defer lim.Close()
	require.NoError(t, m.Cont())
	time.Sleep(time.Second) // a pass or so: the guest's own first writes
	r := accRun{alg: alg, quota: quota}
	w0, r0, t0 := sampleAcc(m)
	d0 := m.DirtyPages(1)
	time.Sleep(2 * time.Second)
	w1, r1, t1 := sampleAcc(m)
	ms := t1.Sub(t0).Milliseconds()
	r.freeWrite = ((w1 - w0) * 1000 >> 8) / uint64(ms)
	r.freeReadPS = float64(r1-r0) * 1000 / float64(ms)
	r.readDirty = float64(m.DirtyPages(1)-d0) / float64(r1-r0)

	var which *int64
	if !all {
		which = new(int64) // vCPU 0, the writer
	}
	require.NoError(t, lim.Set(which, quota))
	prevW, prevR, prevT := sampleAcc(m)
	var steadyRead uint64
	var steadyMS int64
	periods := accSettleMax + accSteady
	for p := 0; p < periods; p++ {
		time.Sleep(time.Until(prevT.Add(time.Second)))
		w, rd, now := sampleAcc(m)
		ms := now.Sub(prevT).Milliseconds()
		r.rates = append(r.rates, ((w-prevW)*1000>>8)/uint64(ms))
		if p >= periods-accSteady {
			steadyRead += rd - prevR
			steadyMS += ms
		}
		prevW, prevR, prevT = w, rd, now
	}
	require.NoError(t, lim.Cancel(nil))
	if n := m.DirtyFailSafes(); n > 0 {
		t.Logf("%s quota %d: dirty tracking went inconsistent %d times", alg, quota, n)
	}
	r.readRatio = float64(steadyRead) * 1000 / float64(steadyMS) / r.freeReadPS * 100
	r.settle, r.meanErr, r.worstErr, r.peak = settleStats(quota, r.rates)
	for _, v := range r.rates {
		if math.Abs(float64(v)-float64(quota)) <= accBound(quota) {
			r.inBound++
		}
	}
	return r
}

// sampleAcc harvests and reads the write vCPU's dirty pages and the read vCPU's pages read.
func sampleAcc(m *vmm.Machine) (written, read uint64, at time.Time) {
	m.Harvest()
	at = time.Now()
	return m.DirtyPages(0), m.WorkloadStats()[1].Pages, at
}

// accBound is how far a period may be from the quota and count as settled: 10%, or one ring's
// MiB, whichever is larger (a 1 s period holds a whole number of ring bursts, give or take one).
func accBound(quota uint64) float64 {
	return max(float64(quota)/10, float64(accRing*vmm.PageSize>>20))
}

// settleStats: the period after which every period is within accBound (-1: not by the end of the
// settling allowance), and over the steady window (the last accSteady periods) the mean and worst
// error, plus the worst excess over the quota of any period, all in % of the quota.
func settleStats(quota uint64, rates []uint64) (settle int, meanErr, worstErr, peak float64) {
	settle = -1
	for k := 0; k <= accSettleMax; k++ {
		ok := true
		for _, r := range rates[k:] {
			ok = ok && math.Abs(float64(r)-float64(quota)) <= accBound(quota)
		}
		if ok {
			settle = k
			break
		}
	}
	q := float64(quota)
	var sum float64
	for _, r := range rates[len(rates)-accSteady:] {
		sum += float64(r)
		worstErr = max(worstErr, math.Abs(float64(r)-q)/q*100)
	}
	meanErr = math.Abs(sum/accSteady-q) / q * 100
	for _, r := range rates {
		peak = max(peak, (float64(r)-q)/q*100)
	}
	return settle, meanErr, worstErr, peak
}

func accuracyTable(accel string, all bool, runs []accRun) string {
	var b strings.Builder
	limited := "the write vCPU limited"
	if all {
		limited = "both vCPUs limited"
	}
	fmt.Fprintf(&b, "dirty limit accuracy, %s, ring %d entries, 1 write vCPU flat out + 1 read vCPU, %s, 1 s periods\n", accel, accRing, limited)
	fmt.Fprintf(&b, "settle: periods until every later one is within the bound, max(10%%, %d MiB/s) of the quota; errors over the last %d periods\n",
		accRing*vmm.PageSize>>20, accSteady)
	fmt.Fprintf(&b, "%-6s %-9s %6s %8s %9s %9s %8s %10s %10s %11s %12s\n", "quota", "algorithm", "settle", "in bound", "mean err",
		"worst err", "peak", "free write", "read kept", "read free", "read entries")
	for _, r := range runs {
		settle := "never"
		if r.settle >= 0 {
			settle = fmt.Sprint(r.settle)
		}
		fmt.Fprintf(&b, "%-6d %-9s %6s %5d/%-2d %8.1f%% %8.1f%% %7.0f%% %6d MiB %9.1f%% %7.0f p/s %7.2f/page\n", r.quota, r.alg,
			settle, r.inBound, len(r.rates), r.meanErr, r.worstErr, r.peak, r.freeWrite, r.readRatio, r.freeReadPS, r.readDirty)
	}
	return b.String()
}
