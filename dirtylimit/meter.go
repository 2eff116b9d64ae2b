package dirtylimit

import (
	"hash/maphash"
	"math/rand/v2"
	"sync"
	"time"
)

// Mode is calc-dirty-rate's DirtyRateMeasureMode.
type Mode string

// The measuring modes.
const (
	PageSampling Mode = "page-sampling"
	DirtyRing    Mode = "dirty-ring"
	DirtyBitmap  Mode = "dirty-bitmap"
)

// TimeUnit is QEMU's TimeUnit for calc-time.
type TimeUnit string

// The time units.
const (
	Second      TimeUnit = "second"
	Millisecond TimeUnit = "millisecond"
)

// Status is DirtyRateStatus.
type Status string

// The measurement states.
const (
	Unstarted Status = "unstarted"
	Measuring Status = "measuring"
	Measured  Status = "measured"
)

// DirtyLog is a view of the pages dirtied since it was made (*vmm.DirtyLog satisfies it): Sync
// ORs the pages dirtied since the last Sync into dst, one bit a page, and returns how many.
type DirtyLog interface {
	Sync(dst []uint64) int
	Close()
}

// QEMU's bounds (migration/dirtyrate.h).
const (
	minCalcMS         = 50
	maxCalcMS         = 60000
	minSamplePages    = 128
	maxSamplePages    = 16384
	minSampledRAM     = 128 << 10 // MIN_RAMBLOCK_SIZE << 10: smaller memory is not sampled
	maxCalcTimeSecond = maxCalcMS / millisPerSecond
)

// CalcArgs are calc-dirty-rate's arguments; the zero Unit is second and the zero Mode is
// page-sampling, as when QEMU's optional members are absent.
type CalcArgs struct {
	CalcTime    int64
	Unit        TimeUnit
	SamplePages *int64
	Mode        Mode
}

// VcpuRate is QEMU's DirtyRateVcpu.
type VcpuRate struct {
	ID        int64 `json:"id"`
	DirtyRate int64 `json:"dirty-rate"`
}

// RateInfo is query-dirty-rate's DirtyRateInfo.
type RateInfo struct {
	DirtyRate     *int64     `json:"dirty-rate,omitempty"` // MiB/s, once measured
	Status        Status     `json:"status"`
	StartTime     int64      `json:"start-time"` // epoch seconds
	CalcTime      int64      `json:"calc-time"`  // in CalcTimeUnit, rounded down
	CalcTimeUnit  TimeUnit   `json:"calc-time-unit"`
	SamplePages   uint64     `json:"sample-pages"`
	Mode          Mode       `json:"mode"`
	VcpuDirtyRate []VcpuRate `json:"vcpu-dirty-rate,omitempty"` // dirty-ring mode, once measured
}

// Meter is calc-dirty-rate / query-dirty-rate: one measurement at a time, in its own goroutine.
type Meter struct {
	m      Machine
	clk    Clock
	newLog func() DirtyLog

	mu          sync.Mutex
	status      Status
	mode        Mode
	startTime   int64
	calcMS      int64
	samplePages uint64
	rate        int64
	vcpus       []VcpuRate
	closed      bool
	stop        chan struct{}
	wg          sync.WaitGroup
}

// NewMeter returns m's dirty-rate meter, unstarted.
func NewMeter(m Machine, opt Options) *Meter {
	return &Meter{m: m, clk: opt.clock(), newLog: opt.NewDirtyLog, status: Unstarted, mode: PageSampling,
		stop: make(chan struct{})}
}

// calcMillis converts calc-time to ms; false when it is out of range (checked before converting,
// so that no huge value wraps into the range as it does in QEMU).
func calcMillis(t int64, u TimeUnit) (int64, bool) {
	if u == Millisecond {
		return t, t >= minCalcMS && t <= maxCalcMS
	}
	if t < 0 || t > maxCalcTimeSecond {
		return 0, false
	}
	ms := t * millisPerSecond
	return ms, ms >= minCalcMS
}

// Calc is calc-dirty-rate: it checks the request in QEMU's order and starts the measurement.
func (mt *Meter) Calc(a CalcArgs) error {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	if mt.status == Measuring {
		return generic(descBusy)
	}
	switch a.Unit {
	case "", Second, Millisecond:
	default:
		return errBadEnum("calc-time-unit", string(a.Unit))
	}
	ms, ok := calcMillis(a.CalcTime, a.Unit)
	if !ok {
		return generic(descCalcTime)
	}
	mode := a.Mode
	switch mode {
	case "":
		mode = PageSampling
	case PageSampling, DirtyRing, DirtyBitmap:
	default:
		return errBadEnum("mode", string(mode))
	}
	samples := uint64(defaultSamplePgs)
	if a.SamplePages != nil {
		if mode != PageSampling {
			return generic(descSampleMode)
		}
		if *a.SamplePages < minSamplePages || *a.SamplePages > maxSamplePages {
			return generic(descSampleRange)
		}
		samples = uint64(*a.SamplePages)
	}
	ring := mt.m.RingSize() != 0
	if (mode == DirtyRing && !ring) || (mode == DirtyBitmap && (ring || mt.newLog == nil)) {
		return errModeOff(mode)
	}
	if mt.closed {
		return generic(descClosed)
	}
	// QEMU passes through "unstarted" while its thread starts; migvisor is measuring at once, so a
	// query right after the reply sees it.
	mt.status, mt.mode = Measuring, mode
	mt.startTime, mt.calcMS, mt.samplePages = mt.clk.Now().Unix(), ms, samples
	mt.rate, mt.vcpus = -1, nil
	mt.wg.Add(1)
	go mt.measure(mode, ms, samples)
	return nil
}

// measure runs one measurement and publishes it; on Close it gives up.
func (mt *Meter) measure(mode Mode, ms int64, samples uint64) {
	defer mt.wg.Done()
	var (
		elapsed int64
		rate    int64 = -1
		vcpus   []VcpuRate
	)
	switch mode {
	case DirtyRing:
		n := mt.m.NumCPUs()
		start := make([]uint64, n)
		mt.m.Harvest() // count from here: what the rings still hold was dirtied before
		t0 := mt.clk.Now()
		for i := range start {
			start[i] = mt.m.DirtyPages(i)
		}
		if !mt.wait(t0, ms) {
			return
		}
		mt.m.Harvest()
		elapsed = mt.elapsed(t0, ms) // to the end of the harvest, which counts what came during it
		rate = 0
		vcpus = make([]VcpuRate, n)
		for i := range vcpus {
			r := int64(rateMiBps(mt.m.DirtyPages(i)-start[i], elapsed))
			vcpus[i] = VcpuRate{ID: int64(i), DirtyRate: r}
			rate += r
		}
	case DirtyBitmap:
		log := mt.newLog()
		pages := len(mt.m.Memory()) / pageSize
		bits := make([]uint64, (pages+63)/64)
		log.Sync(bits) // like QEMU's throw-away first sync: count from here
		clear(bits)
		t0 := mt.clk.Now()
		ok := mt.wait(t0, ms)
		n := uint64(log.Sync(bits))
		log.Close()
		if !ok {
			return
		}
		elapsed = mt.elapsed(t0, ms)
		rate = int64(((n * millisPerSecond) >> pageShiftToMiB) / uint64(elapsed))
	default:
		t0 := mt.clk.Now()
		s := newSample(mt.m.Memory(), samples)
		if !mt.wait(t0, ms) {
			return
		}
		elapsed = mt.elapsed(t0, ms)
		rate = s.rate(elapsed)
	}
	mt.mu.Lock()
	defer mt.mu.Unlock()
	mt.status, mt.calcMS, mt.rate, mt.vcpus = Measured, elapsed, rate, vcpus
}

// wait sleeps until ms after t0; false on Close.
func (mt *Meter) wait(t0 time.Time, ms int64) bool {
	t := mt.clk.NewTimer(time.Duration(ms)*time.Millisecond - mt.clk.Now().Sub(t0))
	select {
	case <-mt.stop:
		t.Stop()
		return false
	case <-t.C():
		return true
	}
}

// elapsed is the ms since t0, at least ms: what the measurement covered once its last
// collection is done (on a busy host a harvest can take milliseconds, and counts the pages
// dirtied meanwhile).
func (mt *Meter) elapsed(t0 time.Time, ms int64) int64 {
	return max(ms, mt.clk.Now().Sub(t0).Milliseconds())
}

// Query is query-dirty-rate; unit "" is second.
func (mt *Meter) Query(unit TimeUnit) RateInfo {
	if unit == "" {
		unit = Second
	}
	mt.mu.Lock()
	defer mt.mu.Unlock()
	info := RateInfo{Status: mt.status, StartTime: mt.startTime, CalcTime: mt.calcMS, CalcTimeUnit: unit,
		SamplePages: mt.samplePages, Mode: mt.mode}
	if unit != Millisecond {
		info.CalcTime /= millisPerSecond
	}
	if mt.status == Measured {
		r := mt.rate
		info.DirtyRate = &r
		if mt.mode != PageSampling {
			info.SamplePages = 0
		}
		info.VcpuDirtyRate = append([]VcpuRate(nil), mt.vcpus...)
	}
	return info
}

// Close stops a measurement under way and waits for it.
func (mt *Meter) Close() error {
	mt.mu.Lock()
	if !mt.closed {
		mt.closed = true
		close(mt.stop)
	}
	mt.mu.Unlock()
	mt.wg.Wait()
	return nil
}

// sample is page-sampling's first pass: random pages of guest memory and their hashes.
type sample struct {
	mem    []byte
	seed   maphash.Seed
	pages  []uint64
	hashes []uint64
	memMiB uint64
}

// newSample picks samplesPerGiB pages per GiB of mem (none if mem is under 128 KiB, as QEMU skips
// such blocks) and hashes them.
func newSample(mem []byte, samplesPerGiB uint64) *sample {
	s := &sample{mem: mem, seed: maphash.MakeSeed()}
	npages := uint64(len(mem)) / pageSize
	if uint64(len(mem)) < minSampledRAM || npages == 0 {
		return s
	}
	count := uint64(len(mem)) * samplesPerGiB >> 30
	s.memMiB = npages * pageSize >> 20
	s.pages, s.hashes = make([]uint64, count), make([]uint64, count)
	for i := range s.pages {
		s.pages[i] = rand.Uint64N(npages)
		s.hashes[i] = s.hash(s.pages[i])
	}
	return s
}

func (s *sample) hash(page uint64) uint64 {
	return maphash.Bytes(s.seed, s.mem[page*pageSize:(page+1)*pageSize])
}

// rate hashes the pages again: dirty × MiB × 1000 / (samples × ms), or -1 when nothing was sampled
// (QEMU leaves its initial -1 then).
func (s *sample) rate(ms int64) int64 {
	if len(s.pages) == 0 {
		return -1
	}
	var dirty uint64
	for i, p := range s.pages {
		if s.hash(p) != s.hashes[i] {
			dirty++
		}
	}
	return int64(dirty * s.memMiB * millisPerSecond / (uint64(len(s.pages)) * uint64(ms)))
}
