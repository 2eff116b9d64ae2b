package guest

import (
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/migvisor/migvisor/vmm/kvm"
)

const (
	testMemSize    = 32 << 20
	testRegionSize = 1 << 20 // 256 pages, fewer than RecordEvery
	// bigRegionSize makes a pass update the record once mid-pass, after
	// RecordEvery pages, and once at its end.
	bigRegionSize = (RecordEvery + RecordEvery/2) * PageSize
)

// machine is a one-vCPU KVM guest running one workload. With a dirty ring,
// the vCPU's own thread collects it between runs, kicked every 500 µs (the
// way kvm's doc finds reliable on nested PVM).
type machine struct {
	t    testing.TB
	vm   *kvm.VM
	mem  []byte
	vcpu *kvm.VCPU
	rec  uint64
	tid  int
	hz   uint64 // guest TSC frequency

	stop atomic.Bool
	ran  chan error // the vCPU loop's end
	exit kvm.ExitReason
	// Collection: the vCPU thread, then halt once it has ended.
	dirty      map[uint64]bool // guest pages harvested
	entries    int             // ring entries harvested
	recoveries int             // stuck rings recovered
	herr       error
	kicker     sync.WaitGroup
	kstop      atomic.Bool
}

func requireKVM(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(kvm.DevicePath); errors.Is(err, os.ErrNotExist) {
		t.Skipf("%s is absent: the workload tests run on KVM", kvm.DevicePath)
	}
	require.NoError(t, kvm.Available())
}

// start loads p's program for vCPU 0 at the suggested addresses and runs it;
// ring > 0 gives the VM a dirty ring of that many entries, harvested while
// the guest runs. Without a ring, memory is not dirty-tracked.
func start(t testing.TB, p Params, ring int, ticksPerPage uint64) *machine {
	return startAt(t, p, ring, ticksPerPage, 0)
}

// startAt is start with the record's pages counter preset to pages.
func startAt(t testing.TB, p Params, ring int, ticksPerPage, pages uint64) *machine {
	requireKVM(t)
	sys, err := kvm.Open()
	require.NoError(t, err)
	t.Cleanup(func() { sys.Close() })
	vm, err := sys.CreateVM()
	require.NoError(t, err)
	t.Cleanup(func() { vm.Close() })
	mem, err := unix.Mmap(-1, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Munmap(mem) })
	if ring > 0 {
		require.NoError(t, vm.EnableDirtyRing(ring))
	}
	require.NoError(t, vm.SetMemoryRegion(0, 0, mem, ring > 0))

	code, err := Program(p)
	require.NoError(t, err)
	copy(mem[CodeAddr(1, 0):], code)
	InitRecord(mem, p.RecordAddr, ticksPerPage)
	atomic.StoreUint64(word64(mem, p.RecordAddr+offPages), pages)
	vcpu, err := vm.CreateVCPU(0)
	require.NoError(t, err)
	require.NoError(t, kvm.SetupProtectedMode(vcpu, uint32(CodeAddr(1, 0)), 0))
	// vCPU ioctls wait while the vCPU runs: ask before it does.
	khz, err := vcpu.TSCKHz()
	require.NoError(t, err)

	m := &machine{t: t, vm: vm, mem: mem, vcpu: vcpu, rec: p.RecordAddr, hz: khz * 1000,
		ran: make(chan error, 1), dirty: map[uint64]bool{}}
	tids := make(chan int)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		m.ran <- m.loop()
	}()
	m.tid = <-tids
	if ring > 0 {
		m.kicker.Go(func() {
			tick := time.NewTicker(500 * time.Microsecond)
			defer tick.Stop()
			for !m.kstop.Load() {
				<-tick.C
				m.vcpu.Kick(m.tid)
			}
		})
	}
	t.Cleanup(func() { m.halt() })
	return m
}

// loop is the vCPU thread: run until stopped or halted, collecting the ring
// (if any) after kicks and ring-full exits.
func (m *machine) loop() error {
	for {
		err := m.vcpu.Run()
		switch {
		case errors.Is(err, unix.EINTR):
			m.vcpu.SetImmediateExit(false)
			if m.vcpu.Ring() != nil {
				m.harvestOnce(false)
			}
			if m.stop.Load() {
				return nil
			}
			continue
		case err != nil:
			return err
		}
		switch m.exit = m.vcpu.ExitReason(); m.exit {
		case kvm.ExitDirtyRingFull:
			if err := m.harvestOnce(true); errors.Is(err, kvm.ErrRingStuck) {
				return err // the host lost ring writes: the vCPU cannot go on
			}
		case kvm.ExitHLT:
			return nil
		default:
			return errors.New("unexpected exit " + m.vcpu.ExitDetail())
		}
	}
}

// harvestOnce harvests and resets the ring; after a ring-full exit (full) it
// does what kvm documents for that (HandleFull).
func (m *machine) harvestOnce(full bool) error {
	record := func(slot uint32, off uint64) { m.dirty[off] = true }
	harvest := m.vcpu.Ring().Harvest
	if full {
		harvest = m.vcpu.Ring().HandleFull
	}
	n, err := harvest(record)
	if errors.Is(err, kvm.ErrRingInconsistent) && !errors.Is(err, kvm.ErrRingStuck) {
		m.recoveries++ // the host's fault, repaired: not the test's
		err = nil
	}
	m.entries += n
	if err != nil && m.herr == nil {
		m.herr = err
	}
	if _, rerr := m.vm.ResetDirtyRings(); rerr != nil && m.herr == nil {
		m.herr = rerr
	}
	return err
}

// halt stops the kicker and the vCPU (if it still runs), harvesting what is
// left; it returns the vCPU loop's error.
func (m *machine) halt() error {
	if m.ran == nil {
		return nil
	}
	m.kstop.Store(true)
	m.kicker.Wait()
	m.stop.Store(true)
	require.NoError(m.t, m.vcpu.Kick(m.tid))
	err := <-m.ran
	m.ran = nil
	if m.vcpu.Ring() != nil {
		m.harvestOnce(false)
	}
	return err
}

func (m *machine) record() Record { return ReadRecord(m.mem, m.rec) }

// waitPasses waits until the guest has completed n passes over its region.
func (m *machine) waitPasses(n uint64) {
	require.Eventually(m.t, func() bool {
		select {
		case err := <-m.ran:
			m.ran <- err
			require.FailNow(m.t, "the vCPU stopped", "%v, record %+v", err, m.record())
		default:
		}
		return m.record().Passes >= n
	}, 20*time.Second, time.Millisecond, "guest stuck at %+v", m.record())
}

// requireCounts checks the record r of a guest that started with its pages
// counter at from, over a region of n pages, against what the guest does: it
// adds to pages every RecordEvery pages and at the end of each pass, then
// counts the pass, so pages is passes*n plus a multiple of RecordEvery below
// n, or plus n when the guest stopped between its last two record stores.
func requireCounts(t *testing.T, r Record, from, n uint64) {
	t.Helper()
	var can []uint64
	for k := uint64(0); k < n; k += RecordEvery {
		can = append(can, k)
	}
	can = append(can, n)
	require.GreaterOrEqual(t, r.Pages, from+r.Passes*n, "record %+v", r)
	require.Contains(t, can, r.Pages-from-r.Passes*n, "record %+v", r)
}

// requireStamps checks that every page of a write region holds the stamp of
// the pass that last wrote it.
func requireStamps(t *testing.T, m *machine, p Params) {
	t.Helper()
	last := m.record().Passes
	for a := p.RegionBase; a < p.RegionBase+p.RegionSize; a += PageSize {
		v := uint64(binary.LittleEndian.Uint32(m.mem[a:]))
		require.Contains(t, []uint64{last, last + 1}, v, "page %#x", a)
	}
}

func pagesOf(base, size uint64) map[uint64]bool {
	s := map[uint64]bool{}
	for a := base; a < base+size; a += PageSize {
		s[a/PageSize] = true
	}
	return s
}

func TestWorkloadsDirtyWhatTheyTouch(t *testing.T) {
	rec := RecordAddr(0)
	recPage := pagesOf(rec&^(PageSize-1), PageSize)
	// Whole-page writes use a smaller region: hosts that emulate the guest
	// (PVM) log every store, so each page is 1024 ring entries there.
	const small = 16 * PageSize
	tests := []struct {
		name string
		p    Params
		want map[uint64]bool
	}{
		{"write", Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: testRegionSize, RecordAddr: rec},
			union(pagesOf(MinRegionStart, testRegionSize), recPage)},
		{"write 4 bytes", Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: testRegionSize,
			BytesPerPage: 4, RecordAddr: rec},
			union(pagesOf(MinRegionStart, testRegionSize), recPage)},
		{"write whole pages", Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: small,
			BytesPerPage: PageSize, RecordAddr: rec},
			union(pagesOf(MinRegionStart, small), recPage)},
		{"write past RecordEvery", Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: bigRegionSize,
			RecordAddr: rec},
			union(pagesOf(MinRegionStart, bigRegionSize), recPage)},
		{"read", Params{Mode: ModeRead, RegionBase: MinRegionStart, RegionSize: testRegionSize, RecordAddr: rec},
			recPage},
		{"read past RecordEvery", Params{Mode: ModeRead, RegionBase: MinRegionStart, RegionSize: bigRegionSize,
			RecordAddr: rec},
			recPage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A ring that never fills: these tests are about what the
			// guest dirties, not about ring-full handling.
			m := start(t, tt.p, 65536, 0)
			m.waitPasses(3)
			require.NoError(t, m.halt())
			require.NoError(t, m.herr)
			assert.Equal(t, tt.want, m.dirty)

			r := m.record()
			assert.True(t, r.Started)
			assert.Equal(t, tt.p.Mode, r.Mode)
			assert.Equal(t, uint32(MinRegionStart), r.RegionBase)
			assert.Equal(t, uint32(tt.p.RegionSize), r.RegionSize)
			requireCounts(t, r, 0, tt.p.RegionSize/PageSize)
			if tt.p.Mode == ModeWrite {
				requireStamps(t, m, tt.p)
			}
		})
	}
}

func union(a, b map[uint64]bool) map[uint64]bool {
	for k := range b {
		a[k] = true
	}
	return a
}

func TestIdleHalts(t *testing.T) {
	m := start(t, Params{Mode: ModeIdle, RecordAddr: RecordAddr(3)}, 4096, 0)
	select { // it halts at once; the kicker may have had it collect first
	case err := <-m.ran:
		m.ran <- err
	case <-time.After(20 * time.Second):
		require.FailNow(t, "the idle guest never halted")
	}
	require.NoError(t, m.halt())
	assert.Equal(t, kvm.ExitHLT, m.exit)
	require.NoError(t, m.herr)
	assert.Equal(t, pagesOf(RecordBase, PageSize), m.dirty)
	r := m.record()
	assert.True(t, r.Started)
	assert.Equal(t, ModeIdle, r.Mode)
}

// A reading vCPU stores to its record a few times a pass, not once a page:
// on hosts that log every store (PVM) its ring gets a handful of entries
// where it used to get one per page read.
func TestReadHardlyDirties(t *testing.T) {
	p := Params{Mode: ModeRead, RegionBase: MinRegionStart, RegionSize: bigRegionSize, RecordAddr: RecordAddr(0)}
	m := start(t, p, 4096, 0)
	m.waitPasses(20)
	require.NoError(t, m.halt())
	require.NoError(t, m.herr)
	assert.Equal(t, pagesOf(RecordBase, PageSize), m.dirty)
	r := m.record()
	requireCounts(t, r, 0, bigRegionSize/PageSize)
	// The stores: the record's header (4), one per RecordEvery pages, and at
	// the end of each pass one for pages and one for passes (the last pass's
	// pages store may be in without its passes store).
	most := 4 + r.Pages/RecordEvery + 2*r.Passes + 1
	t.Logf("%d ring entries for %d pages read in %d passes (at most %d)", m.entries, r.Pages, r.Passes, most)
	assert.LessOrEqual(t, uint64(m.entries), most)
}

// The pages counter carries from its low to its high dword, both at the end
// of a pass and at an update every RecordEvery pages, and the write stamp
// survives the carry.
func TestCountersCarry(t *testing.T) {
	tests := []struct {
		name string
		size uint64
		from uint64 // the pages counter when the guest starts
	}{
		{"at the end of a pass", testRegionSize, 1<<32 - 5},
		{"every RecordEvery pages", bigRegionSize, 1<<32 - 5},
		{"at the end of a pass past RecordEvery", bigRegionSize, 1<<32 - RecordEvery - 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: tt.size, RecordAddr: RecordAddr(0)}
			m := startAt(t, p, 0, 0, tt.from)
			// Stop early in the second pass, before it rewrites the
			// pages the first wrote after its carry.
			m.waitPasses(1)
			require.NoError(t, m.halt())
			r := m.record()
			assert.Greater(t, r.Pages, uint64(1<<32))
			requireCounts(t, r, tt.from, tt.size/PageSize)
			requireStamps(t, m, p)
		})
	}
}

// rateOver measures the guest's pages/s over d.
func (m *machine) rateOver(d time.Duration) float64 {
	p0, t0 := m.record().Pages, time.Now()
	time.Sleep(d)
	p1, t1 := m.record().Pages, time.Now()
	return float64(p1-p0) / t1.Sub(t0).Seconds()
}

// Pacing: the guest keeps at most near the rate it is given, well below flat
// out, and follows changes made while it runs. The bounds are loose, and only
// upper bounds where the host's load could make the guest slower.
func TestPacing(t *testing.T) {
	p := Params{Mode: ModeWrite, RegionBase: MinRegionStart, RegionSize: testRegionSize, RecordAddr: RecordAddr(0)}
	m := start(t, p, 0, 0)
	hz := m.hz

	flat := m.rateOver(300 * time.Millisecond)
	const rate = 4 << 20 // bytes/s: 1024 pages/s
	SetTicksPerPage(m.mem, m.rec, TicksPerPage(rate, hz))
	paced := m.rateOver(time.Second)
	SetTicksPerPage(m.mem, m.rec, TicksPerPage(4*rate, hz))
	faster := m.rateOver(500 * time.Millisecond)
	SetTicksPerPage(m.mem, m.rec, 0)
	flatAgain := m.rateOver(300 * time.Millisecond)
	require.NoError(t, m.halt())
	t.Logf("pages/s: flat %.0f, paced at %d %.0f, at %d %.0f, flat again %.0f",
		flat, rate/PageSize, paced, 4*rate/PageSize, faster, flatAgain)

	// Upper bounds only: pacing limits the rate, and a loaded host may slow
	// the guest below any target.
	target := float64(rate / PageSize)
	assert.Less(t, paced, 1.5*target, "paced at most near its target")
	assert.Less(t, paced, flat/4, "paced well below flat out")
	assert.Less(t, faster, 1.5*4*target, "a new rate is taken up while running")
	assert.Greater(t, flatAgain, 1.5*4*target, "rate 0 lifts the limit")
}
