package vmm

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"github.com/migvisor/migvisor/vmm/guest"
)

// region is a vCPU's workload region in guest physical memory, in bytes.
type region struct{ start, size uint64 }

// layout places the workloads: each vCPU's record and code where vmm/guest suggests (for both
// backends: below 1 MiB for up to 1024 vCPUs), then the regions one after the other from
// guest.RegionStart up, in vCPU order; workloads without a size share the memory the others
// leave below guest.RegionLimit (what 32-bit code reaches: a larger guest's memory above it is
// never touched).
type layout struct {
	work    []Workload // resolved: mode and bytes per page filled in
	regions []region   // zero for idle vCPUs
	records []uint64
}

func newLayout(cfg Config) (layout, error) {
	n := cfg.CPUs
	l := layout{work: make([]Workload, n), regions: make([]region, n), records: make([]uint64, n)}
	for i := range l.work {
		if i < len(cfg.Workloads) {
			l.work[i] = cfg.Workloads[i]
		}
		w := &l.work[i]
		w.Mode = w.mode()
		switch w.Mode {
		case ModeIdle:
		case ModeWrite, ModeRead:
		default:
			return layout{}, fmt.Errorf("vmm: vCPU %d: workload mode %q", i, w.Mode)
		}
		if w.BytesPerPage == 0 {
			w.BytesPerPage = guest.DefaultBytesPerPage
		}
		if b := w.BytesPerPage; b < 4 || b > PageSize || b%4 != 0 {
			return layout{}, fmt.Errorf("vmm: vCPU %d: %d bytes per page is not a multiple of 4 in [4, %d]", i, b, PageSize)
		}
		l.records[i] = guest.RecordAddr(i)
	}
	if need := guest.CodeAddr(n, n); cfg.MemSize < need {
		return layout{}, fmt.Errorf("vmm: %d bytes of guest memory do not hold the records and programs of %d vCPUs (%d bytes)", cfg.MemSize, n, need)
	}
	first, top := guest.RegionStart(n), min(cfg.MemSize, guest.RegionLimit)
	if top <= first {
		for _, w := range l.work {
			if w.Mode != ModeIdle {
				return layout{}, fmt.Errorf("vmm: workloads need guest memory above %#x", first)
			}
		}
		return l, nil
	}
	// Workloads without a size share what the sized ones leave, in whole pages.
	left, unsized := top-first, uint64(0)
	for _, w := range l.work {
		switch {
		case w.Mode == ModeIdle:
		case w.Size == 0:
			unsized++
		default:
			left -= min(left, w.Size)
		}
	}
	def := left / max(unsized, 1) / PageSize * PageSize
	next := first
	for i, w := range l.work {
		if w.Mode == ModeIdle {
			continue
		}
		size := w.Size
		if size == 0 {
			size = def
		}
		if size == 0 || size%PageSize != 0 {
			return layout{}, fmt.Errorf("vmm: vCPU %d: region size %d is not a positive multiple of %d", i, size, PageSize)
		}
		end := next + size
		if end > top || end < next {
			return layout{}, fmt.Errorf("vmm: the workload regions do not fit: vCPU %d's %d bytes at %#x pass the end of guest memory (%d bytes, at most 4 GiB usable)",
				i, size, next, cfg.MemSize)
		}
		l.regions[i] = region{start: next, size: size}
		next = end
	}
	return l, nil
}

// flatOutWriter reports whether some vCPU writes without a rate limit.
func (l layout) flatOutWriter() bool {
	for _, w := range l.work {
		if w.Mode == ModeWrite && w.Rate == 0 {
			return true
		}
	}
	return false
}

// busy is the number of vCPUs that run in guest mode rather than halt: those with a read or
// write workload.
func (l layout) busy() int {
	n := 0
	for _, r := range l.regions {
		if r.size > 0 {
			n++
		}
	}
	return n
}

// codeAddr is where vCPU cpu's program is loaded and starts.
func (l layout) codeAddr(cpu int) uint64 { return guest.CodeAddr(len(l.work), cpu) }

// writable is what vCPU cpu's program can store to: its record and, for a write workload, its
// region (the programs use no stack; vmm/guest's tests pin the pages each mode dirties).
func (l layout) writable(cpu int) []region {
	rs := []region{{start: l.records[cpu], size: guest.RecordSize}}
	if l.work[cpu].Mode == ModeWrite {
		rs = append(rs, l.regions[cpu])
	}
	return rs
}

// guestParams is vCPU cpu's program description for vmm/guest.
func (l layout) guestParams(cpu int) guest.Params {
	w, r := l.work[cpu], l.regions[cpu]
	return guest.Params{Mode: guest.Mode(w.Mode), RegionBase: r.start, RegionSize: r.size,
		BytesPerPage: w.BytesPerPage, RecordAddr: l.records[cpu]}
}

// The soft backend keeps the same record as the guest programs (vmm/guest's record.go):
// magic, mode, pages, passes, region base and size at these offsets; a test pins them to
// guest.ReadRecord.
const (
	recMagic  = 0
	recMode   = 4
	recPages  = 8
	recPasses = 16
	recBase   = 48
	recSize   = 52
)

var recModes = map[string]uint32{ModeWrite: 1, ModeRead: 2, ModeIdle: 3}

// writeRecordHeader is what a guest program does first.
func (c *softCPU) writeRecordHeader() {
	mem, a := c.b.m.mem, c.rec
	binary.LittleEndian.PutUint32(mem[a+recMode:], recModes[c.w.Mode])
	binary.LittleEndian.PutUint32(mem[a+recBase:], uint32(c.reg.start))
	binary.LittleEndian.PutUint32(mem[a+recSize:], uint32(c.reg.size))
	binary.LittleEndian.PutUint32(mem[a+recMagic:], guest.Magic)
}

// writeRecord publishes the soft vCPU's progress (aligned 8-byte stores, as the guest's).
func (c *softCPU) writeRecord(pages, passes uint64) {
	mem, a := c.b.m.mem, c.rec
	binary.LittleEndian.PutUint64(mem[a+recPages:], pages)
	binary.LittleEndian.PutUint64(mem[a+recPasses:], passes)
}

// WorkloadStat is one vCPU's workload as x-query-workload reports it.
type WorkloadStat struct {
	CPU            int    `json:"cpu-index"`
	Mode           string `json:"mode"`
	RegionStart    uint64 `json:"region-start"`
	RegionSize     uint64 `json:"region-size"`
	Pages          uint64 `json:"pages"`  // pages touched (written or read), cumulative
	Passes         uint64 `json:"passes"` // complete passes over the region
	PagesPerSecond uint64 `json:"pages-per-second"`
	Error          string `json:"error,omitempty"` // why the vCPU stopped for good, if it did
}

// WorkloadStats reads every vCPU's record while the vCPUs run.
func (m *Machine) WorkloadStats() []WorkloadStat {
	m.memMu.RLock()
	defer m.memMu.RUnlock()
	if m.unmapped {
		return nil
	}
	now := time.Now()
	out := make([]WorkloadStat, len(m.cpus))
	for i := range out {
		rec := guest.ReadRecord(m.mem, m.lay.records[i])
		out[i] = WorkloadStat{CPU: i, Mode: m.lay.work[i].Mode, RegionStart: m.lay.regions[i].start,
			RegionSize: m.lay.regions[i].size, Pages: rec.Pages, Passes: rec.Passes,
			PagesPerSecond: m.stats.rate(i, rec.Pages, now)}
	}
	m.mu.Lock()
	for i, c := range m.cpus {
		out[i].Error = c.failure
	}
	m.mu.Unlock()
	return out
}

// Sampling of the page counters for pages-per-second: every sampleEvery, keeping a bit more
// than a second of samples.
const (
	sampleEvery = 100 * time.Millisecond
	sampleKeep  = 12
)

type sample struct {
	at    time.Time
	pages []uint64
}

type sampler struct {
	m       *Machine
	mu      sync.Mutex
	samples []sample // oldest first
}

func newSampler(m *Machine) *sampler { return &sampler{m: m} }

func (s *sampler) loop() {
	defer s.m.wg.Done()
	t := time.NewTicker(sampleEvery)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			s.take(now)
		case <-s.m.done:
			return
		}
	}
}

func (s *sampler) take(now time.Time) {
	pages := make([]uint64, len(s.m.cpus))
	for i := range pages {
		pages[i] = guest.ReadRecord(s.m.mem, s.m.lay.records[i]).Pages
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == sampleKeep {
		s.samples = append(s.samples[:0], s.samples[1:]...)
	}
	s.samples = append(s.samples, sample{at: now, pages: pages})
}

// rate is cpu's pages per second from the newest sample at least a second old (or the oldest
// there is) to now.
func (s *sampler) rate(cpu int, pages uint64, now time.Time) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var base *sample
	for i := len(s.samples) - 1; i >= 0; i-- {
		base = &s.samples[i]
		if now.Sub(base.at) >= time.Second {
			break
		}
	}
	if base == nil || pages < base.pages[cpu] {
		return 0
	}
	dt := now.Sub(base.at).Seconds()
	if dt <= 0 {
		return 0
	}
	return uint64(float64(pages-base.pages[cpu]) / dt)
}
