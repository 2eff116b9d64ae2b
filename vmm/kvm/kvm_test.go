package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// requireKVM skips when this machine has no /dev/kvm at all; any other failure
// to use it is a test failure.
func requireKVM(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat(DevicePath); errors.Is(err, os.ErrNotExist) {
		tb.Skipf("%s is absent: KVM tests need it", DevicePath)
	}
	require.NoError(tb, Available())
}

const (
	testMemSize = 32 << 20
	testCode    = 0x1000
	testData    = 0x100000 // 1 MiB
)

// newTestVM makes a VM with testMemSize bytes of dirty-logged guest memory at
// 0 in slot 0 and, if ring > 0, a dirty ring of that many entries.
func newTestVM(tb testing.TB, ring int) (*VM, []byte) {
	tb.Helper()
	requireKVM(tb)
	sys, err := Open()
	require.NoError(tb, err)
	tb.Cleanup(func() { sys.Close() })
	vm, err := sys.CreateVM()
	require.NoError(tb, err)
	tb.Cleanup(func() { vm.Close() })
	mem, err := unix.Mmap(-1, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(tb, err)
	tb.Cleanup(func() { unix.Munmap(mem) })
	if ring > 0 {
		require.NoError(tb, vm.EnableDirtyRing(ring))
	}
	require.NoError(tb, vm.SetMemoryRegion(0, 0, mem, true))
	return vm, mem
}

// newTestVCPU loads code at testCode and points a protected-mode vCPU at it.
func newTestVCPU(tb testing.TB, vm *VM, mem []byte, code []byte) *VCPU {
	tb.Helper()
	copy(mem[testCode:], code)
	c, err := vm.CreateVCPU(0)
	require.NoError(tb, err)
	require.NoError(tb, SetupProtectedMode(c, testCode, testCode))
	return c
}

// Hand-assembled 32-bit test programs.
func progHLT() []byte { return []byte{0xb8, 0x42, 0, 0, 0, 0xf4} } // mov eax, 0x42; hlt

func progOut() []byte { return []byte{0xb0, 0x5a, 0xe6, 0x10, 0xf4} } // mov al, 0x5a; out 0x10, al; hlt

// progWritePages writes n pages, stride bytes apart, from base, then halts:
//
//	mov edi, base; mov ecx, n
//	l: mov [edi], ecx; add edi, stride; dec ecx; jnz l
//	hlt
func progWritePages(base, n, stride uint32) []byte {
	p := []byte{0xbf}
	p = binary.LittleEndian.AppendUint32(p, base)
	p = append(p, 0xb9)
	p = binary.LittleEndian.AppendUint32(p, n)
	p = append(p, 0x89, 0x0f, 0x81, 0xc7)
	p = binary.LittleEndian.AppendUint32(p, stride)
	return append(p, 0x49, 0x75, 0xf5, 0xf4)
}

// progSpin increments the dword at addr forever: l: inc dword [addr]; jmp l.
func progSpin(addr uint32) []byte {
	p := binary.LittleEndian.AppendUint32([]byte{0xff, 0x05}, addr)
	return append(p, 0xeb, 0xf8)
}

// onVCPUThread runs fn on a goroutine locked to its OS thread, with the
// thread's id, and returns a channel closed when fn returns.
func onVCPUThread(fn func(tid int)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		fn(unix.Gettid())
	}()
	return done
}

func TestAvailable(t *testing.T) {
	requireKVM(t)
	sys, err := Open()
	require.NoError(t, err)
	defer sys.Close()
	assert.Positive(t, sys.VCPUMmapSize())
	n, err := sys.CheckExtension(CapImmediateExit)
	require.NoError(t, err)
	assert.Positive(t, n, "KVM_CAP_IMMEDIATE_EXIT")
}

// MaxVCPUs is at least the recommended count, and a VM takes a vCPU with the highest id a
// machine of that many vCPUs uses.
func TestMaxVCPUs(t *testing.T) {
	requireKVM(t)
	sys, err := Open()
	require.NoError(t, err)
	defer sys.Close()
	max, err := sys.MaxVCPUs()
	require.NoError(t, err)
	rec, err := sys.CheckExtension(CapNrVCPUs)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, max, rec)
	vm, err := sys.CreateVM()
	require.NoError(t, err)
	defer vm.Close()
	c, err := vm.CreateVCPU(max - 1)
	require.NoError(t, err)
	require.NoError(t, c.Close())
}

func TestRunHLT(t *testing.T) {
	vm, mem := newTestVM(t, 0)
	c := newTestVCPU(t, vm, mem, progHLT())
	require.NoError(t, runToExit(c))
	require.Equal(t, ExitHLT, c.ExitReason(), c.ExitDetail())
	r, err := c.Regs()
	require.NoError(t, err)
	assert.Equal(t, uint64(0x42), r.RAX&0xffffffff)
	assert.Equal(t, uint64(testCode+len(progHLT())), r.RIP)
	s, err := c.Sregs()
	require.NoError(t, err)
	assert.Equal(t, uint64(cr0PE|cr0ET), s.CR0&(cr0PE|cr0ET|1<<31), "protected mode, paging off")
}

func TestRunIO(t *testing.T) {
	vm, mem := newTestVM(t, 0)
	c := newTestVCPU(t, vm, mem, progOut())
	require.NoError(t, runToExit(c))
	require.Equal(t, ExitIO, c.ExitReason(), c.ExitDetail())
	io, err := c.IO()
	require.NoError(t, err)
	assert.Equal(t, IO{Direction: IOOut, Size: 1, Port: 0x10, Count: 1, Data: []byte{0x5a}}, io)
	require.NoError(t, runToExit(c))
	assert.Equal(t, ExitHLT, c.ExitReason())
	_, err = c.IO()
	assert.Error(t, err, "IO after a HLT exit")
}

func TestErrors(t *testing.T) {
	vm, mem := newTestVM(t, 0)
	newTestVCPU(t, vm, mem, progHLT())
	tests := []struct {
		name  string
		do    func() error
		errno unix.Errno
		text  string
	}{
		{"duplicate vCPU id", func() error { _, err := vm.CreateVCPU(0); return err },
			unix.EEXIST, "KVM_CREATE_VCPU: file exists"},
		{"dirty log of a missing slot", func() error { return vm.GetDirtyLog(9, make([]uint64, 1)) },
			unix.ENOENT, "KVM_GET_DIRTY_LOG: no such file or directory"},
		{"reset rings without rings", func() error { _, err := vm.ResetDirtyRings(); return err },
			unix.EINVAL, "KVM_RESET_DIRTY_RINGS: invalid argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do()
			require.Error(t, err)
			assert.ErrorIs(t, err, tt.errno)
			assert.EqualError(t, err, tt.text)
			var kerr *Error
			assert.ErrorAs(t, err, &kerr)
		})
	}
	assert.Error(t, vm.EnableDirtyRing(1024), "a ring after the first vCPU")
}

func TestEnableDirtyRingArguments(t *testing.T) {
	tests := []struct {
		name    string
		entries int
	}{
		{"zero", 0},
		{"not a power of two", 1000},
		{"beyond the host limit", 1 << 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vm, _ := newTestVM(t, 0)
			assert.Error(t, vm.EnableDirtyRing(tt.entries))
			assert.Equal(t, 0, vm.RingEntries())
		})
	}
	vm, _ := newTestVM(t, 1024)
	assert.Equal(t, 1024, vm.RingEntries())
	assert.Error(t, vm.EnableDirtyRing(1024), "enabling twice")
}

// wantPages lists the guest page numbers progWritePages(base, n, stride) writes.
func wantPages(base, n, stride uint32) []uint64 {
	var w []uint64
	for i := uint32(0); i < n; i++ {
		w = append(w, uint64(base+i*stride)/PageSize)
	}
	return w
}

// assertPages checks that got is exactly want, reporting a short summary of
// the difference rather than thousands of page numbers.
func assertPages(t *testing.T, want []uint64, got map[uint64]bool) {
	t.Helper()
	var missing, extra []uint64
	w := map[uint64]bool{}
	for _, p := range want {
		w[p] = true
		if !got[p] {
			missing = append(missing, p)
		}
	}
	for p := range got {
		if !w[p] {
			extra = append(extra, p)
		}
	}
	sort.Slice(extra, func(i, j int) bool { return extra[i] < extra[j] })
	assert.Empty(t, head(missing), "%d pages written but not reported", len(missing))
	assert.Empty(t, head(extra), "%d pages reported but not written", len(extra))
}

func head(s []uint64) []uint64 {
	if len(s) > 10 {
		return s[:10]
	}
	return s
}

// A guest writes a known set of pages, about three rings' worth, while its ring is collected
// the way vmm collects it: a pacing goroutine kicks the vCPU, whose thread harvests and resets
// between runs (harvesting from another thread inside KVM_RUN loses entries on nested PVM; see
// TestRingUnderLoadNeverFailsSilently). The union of what was harvested is exactly that set. If
// the host loses ring writes beyond repair it must say so (ErrRingStuck), and then nothing more
// can be asserted.
func TestDirtyRingHarvestWhileRunning(t *testing.T) {
	const entries = 1024
	vm, mem := newTestVM(t, entries)
	const n, stride = 3000, 2 * PageSize
	c := newTestVCPU(t, vm, mem, progWritePages(testData, n, stride))
	ring := c.Ring()
	require.NotNil(t, ring)
	assert.Equal(t, entries, ring.Size())

	got := map[uint64]bool{}
	record := func(slot uint32, off uint64) {
		assert.Equal(t, uint32(0), slot)
		got[off] = true
	}
	tids := make(chan int, 1)
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		tid := <-tids
		for !stop.Load() {
			time.Sleep(200 * time.Microsecond)
			c.Kick(tid)
		}
	})
	fullExits := 0
	var stuck error
	<-onVCPUThread(func(tid int) {
		tids <- tid
		for {
			err := c.Run()
			harvest := ring.Harvest
			switch {
			case errors.Is(err, unix.EINTR):
				c.SetImmediateExit(false)
			case err != nil:
				t.Error(err)
				return
			case c.ExitReason() == ExitDirtyRingFull:
				fullExits++
				harvest = ring.HandleFull
			default:
				assert.Equal(t, ExitHLT, c.ExitReason(), c.ExitDetail())
				return
			}
			n, err := harvest(record)
			if errors.Is(err, ErrRingStuck) {
				stuck = err
				return
			}
			if n >= entries && stuck == nil {
				// A full ring where KVM should have stopped the vCPU first: the host may have
				// written over entries (vmm fails safe here, marking all memory dirty).
				stuck = fmt.Errorf("a collection found all %d entries dirty", n)
			}
			_, err = vm.ResetDirtyRings()
			require.NoError(t, err)
		}
	})
	stop.Store(true)
	wg.Wait()
	t.Logf("%d ring-full exits", fullExits)
	if stuck != nil {
		t.Logf("the host lost ring writes, and it was detectable: %v", stuck)
		return
	}
	_, err := ring.Harvest(record) // what came after the last collection
	require.NoError(t, err)
	assertPages(t, wantPages(testData, n, stride), got)
}

// Without a ring, the bitmap shows exactly the written pages, once.
func TestDirtyLogBitmap(t *testing.T) {
	vm, mem := newTestVM(t, 0)
	const n, stride = 100, 3 * PageSize
	c := newTestVCPU(t, vm, mem, progWritePages(testData, n, stride))
	bitmap := make([]uint64, testMemSize/PageSize/64)
	require.NoError(t, vm.GetDirtyLog(0, bitmap)) // start from a clean log
	require.NoError(t, runToExit(c))
	require.Equal(t, ExitHLT, c.ExitReason(), c.ExitDetail())
	require.NoError(t, vm.GetDirtyLog(0, bitmap))
	got := map[uint64]bool{}
	for w, bits := range bitmap {
		for b := 0; b < 64; b++ {
			if bits&(1<<b) != 0 {
				got[uint64(w*64+b)] = true
			}
		}
	}
	assertPages(t, wantPages(testData, n, stride), got)
	require.NoError(t, vm.GetDirtyLog(0, bitmap))
	assert.Equal(t, make([]uint64, len(bitmap)), bitmap, "cleared by the previous read")
	assert.Error(t, vm.GetDirtyLog(0, bitmap[:1]), "bitmap too small for the slot")
}

// fakeEntry publishes a ring entry as the kernel would.
func fakeEntry(r *DirtyRing, i uint32, slot uint32, off uint64) {
	e := &r.entries[i&r.mask]
	e.Slot, e.Offset = slot, off
	atomic.StoreUint32(&e.Flags, dirtyGFNDirty)
}

func TestHarvestInconsistent(t *testing.T) {
	tests := []struct {
		name  string
		fill  func(r *DirtyRing) // entries the "kernel" publishes
		wantN int
	}{
		{"unknown slot", func(r *DirtyRing) {
			fakeEntry(r, 0, 0, 5)
			fakeEntry(r, 1, 3, 5)
			fakeEntry(r, 2, 0, 6)
		}, 2},
		{"offset past the slot", func(r *DirtyRing) {
			fakeEntry(r, 0, 0, testMemSize/PageSize)
		}, 0},
		{"more dirty entries than the ring between resets", func(r *DirtyRing) {
			for i := uint32(0); i < uint32(r.Size()); i++ {
				fakeEntry(r, i, 0, uint64(i))
			}
			n, err := r.Harvest(func(uint32, uint64) {})
			require.NoError(t, err)
			require.Equal(t, r.Size(), n)
			fakeEntry(r, uint32(r.Size()), 0, 1)
		}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vm, mem := newTestVM(t, 1024)
			c := newTestVCPU(t, vm, mem, progHLT())
			r := c.Ring()
			tt.fill(r)
			n, err := r.Harvest(func(uint32, uint64) {})
			assert.ErrorIs(t, err, ErrRingInconsistent)
			assert.Equal(t, tt.wantN, n)
			n, err = r.Harvest(func(uint32, uint64) {})
			assert.NoError(t, err, "the bad entry was collected")
			assert.Zero(t, n)
		})
	}
}

// runToExit runs c until an exit other than a signal's EINTR (the Go runtime
// interrupts threads on its own, e.g. for preemption).
func runToExit(c *VCPU) error {
	for {
		err := c.Run()
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// spinner is a vCPU running progSpin on its own thread.
type spinner struct {
	c       *VCPU
	tid     int
	counter *uint32        // the guest's counter
	kicking atomic.Bool    // a kick was requested: an EINTR now is ours
	quit    atomic.Bool    // the test is over
	results chan runResult // one per kick
}

// runResult is what Run returned for a kick, and when.
type runResult struct {
	err error
	at  time.Time
}

// startSpinner runs progSpin on a vCPU thread, which re-enters the guest after
// EINTRs nobody asked for and reports each requested one, kicks times over.
func startSpinner(tb testing.TB, kicks int) *spinner {
	vm, mem := newTestVM(tb, 0)
	s := &spinner{
		c:       newTestVCPU(tb, vm, mem, progSpin(testData)),
		counter: (*uint32)(unsafe.Pointer(&mem[testData])),
		results: make(chan runResult, kicks),
	}
	tids := make(chan int)
	ended := onVCPUThread(func(tid int) {
		tids <- tid
		for i := 0; i < kicks && !s.quit.Load(); {
			err := s.c.Run()
			at := time.Now()
			if errors.Is(err, unix.EINTR) && !s.kicking.Load() {
				continue // the runtime's own signal
			}
			s.c.SetImmediateExit(false)
			s.kicking.Store(false)
			s.results <- runResult{err, at}
			i++
		}
	})
	s.tid = <-tids
	tb.Cleanup(func() { // out of KVM_RUN before the VM's cleanup unmaps it
		s.quit.Store(true)
		s.kicking.Store(true)
		for {
			s.c.Kick(s.tid)
			select {
			case <-ended:
				return
			case <-time.After(time.Millisecond):
			}
		}
	})
	return s
}

// inGuest waits until the guest is seen running (its counter moves).
func (s *spinner) inGuest() {
	start := atomic.LoadUint32(s.counter)
	for atomic.LoadUint32(s.counter) == start {
		runtime.Gosched()
	}
}

func TestKick(t *testing.T) {
	tests := []struct {
		name string
		kick func(c *VCPU, tid int) error
	}{
		{"Kick", func(c *VCPU, tid int) error { return c.Kick(tid) }},
		{"signal alone", func(_ *VCPU, tid int) error { return unix.Tgkill(unix.Getpid(), tid, KickSignal) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startSpinner(t, 1)
			s.inGuest()
			s.kicking.Store(true)
			require.NoError(t, tt.kick(s.c, s.tid))
			err := (<-s.results).err
			assert.ErrorIs(t, err, unix.EINTR)
			assert.EqualError(t, err, "KVM_RUN: interrupted system call")
		})
	}
}

// A kick that lands while the vCPU thread is outside KVM_RUN still stops the
// next entry.
func TestKickBeforeRun(t *testing.T) {
	vm, mem := newTestVM(t, 0)
	c := newTestVCPU(t, vm, mem, progSpin(testData))
	require.NoError(t, c.Kick(0))
	err := c.Run()
	assert.ErrorIs(t, err, unix.EINTR)
	c.SetImmediateExit(false)
	assert.Zero(t, mem[testData], "the guest never ran")
}

// A ring left with unflagged entries before dirty ones (as nested PVM does
// under load) is stuck for Harvest; Recover collects past them and says so.
func TestRecoverStuckRing(t *testing.T) {
	vm, mem := newTestVM(t, 1024)
	c := newTestVCPU(t, vm, mem, progHLT())
	r := c.Ring()
	for i := uint32(0); i < 10; i++ {
		fakeEntry(r, i, 0, uint64(100+i))
	}
	for i := uint32(0); i < 3; i++ { // written but never flagged
		atomic.StoreUint32(&r.entries[i].Flags, 0)
	}
	r.entries[1].Slot = 7 // and one of them implausible

	n, err := r.Harvest(func(uint32, uint64) { t.Error("Harvest collected past the stuck entry") })
	require.NoError(t, err)
	require.Zero(t, n)

	got := map[uint64]bool{}
	n, err = r.Recover(func(slot uint32, off uint64) { got[off] = true })
	assert.ErrorIs(t, err, ErrRingInconsistent)
	assert.Equal(t, 9, n)
	want := map[uint64]bool{}
	for _, off := range []uint64{100, 102, 103, 104, 105, 106, 107, 108, 109} {
		want[off] = true
	}
	assert.Equal(t, want, got)

	n, err = r.Harvest(func(uint32, uint64) { t.Error("collected twice") })
	assert.NoError(t, err)
	assert.Zero(t, n)
}

// A full ring with nothing dirty in it cannot be helped, and says so.
func TestRecoverNothingToCollect(t *testing.T) {
	vm, mem := newTestVM(t, 1024)
	c := newTestVCPU(t, vm, mem, progHLT())
	n, err := c.Ring().Recover(func(uint32, uint64) { t.Error("nothing to collect") })
	assert.ErrorIs(t, err, ErrRingStuck)
	assert.ErrorIs(t, err, ErrRingInconsistent)
	assert.Zero(t, n)
}

// A ring that is merely behind recovers without an error.
func TestRecoverConsistentRing(t *testing.T) {
	vm, mem := newTestVM(t, 1024)
	c := newTestVCPU(t, vm, mem, progHLT())
	r := c.Ring()
	for i := uint32(0); i < 5; i++ {
		fakeEntry(r, i, 0, uint64(i))
	}
	n, err := r.Recover(func(uint32, uint64) {})
	assert.NoError(t, err)
	assert.Equal(t, 5, n)
}

// progWriteForever writes n pages, stride bytes apart, from base, and the
// dword at counter after each, forever (as a workload updating its record):
//
//	s: mov edi, base; mov ecx, n
//	l: mov [edi], ecx; mov [counter], ecx; add edi, stride; dec ecx; jnz l
//	jmp s
func progWriteForever(base, n, stride, counter uint32) []byte {
	p := []byte{0xbf}
	p = binary.LittleEndian.AppendUint32(p, base)
	p = append(p, 0xb9)
	p = binary.LittleEndian.AppendUint32(p, n)
	p = append(p, 0x89, 0x0f, 0x89, 0x0d)
	p = binary.LittleEndian.AppendUint32(p, counter)
	p = append(p, 0x81, 0xc7)
	p = binary.LittleEndian.AppendUint32(p, stride)
	return append(p, 0x49, 0x75, 0xef, 0xeb, 0xe3)
}

// Under sustained writes the guest keeps making progress and only its pages
// are reported, or, if the host loses ring writes beyond repair (nested PVM),
// HandleFull says so (ErrRingStuck): no dirty page goes missing silently. Two
// ways to collect: a reaper goroutine harvesting and resetting while the vCPU
// runs, and the vCPU's own thread doing it between runs, kicked every 500 µs.
// On nested PVM the second has been clean (no recovery, no ring-full exit)
// while the first gets stuck within seconds; see the logged figures.
func TestRingUnderLoadNeverFailsSilently(t *testing.T) {
	for _, reaper := range []bool{true, false} {
		name := map[bool]string{true: "reaper", false: "vCPU thread"}[reaper]
		t.Run(name, func(t *testing.T) { ringUnderLoad(t, reaper) })
	}
}

func ringUnderLoad(t *testing.T, reaper bool) {
	vm, mem := newTestVM(t, 4096)
	const n, stride, counter = 256, PageSize, testData - PageSize
	c := newTestVCPU(t, vm, mem, progWriteForever(testData, n, stride, counter))
	ring := c.Ring()
	var entries, recovered, fulls atomic.Int64
	var mu sync.Mutex
	got := map[uint64]bool{}
	record := func(_ uint32, off uint64) {
		mu.Lock()
		got[off] = true
		mu.Unlock()
		entries.Add(1)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	if reaper {
		wg.Go(func() {
			for !stop.Load() {
				_, err := ring.Harvest(record)
				assert.NoError(t, err)
				_, err = vm.ResetDirtyRings()
				assert.NoError(t, err)
				time.Sleep(100 * time.Microsecond)
			}
		})
	}
	tids := make(chan int)
	ended := make(chan error, 1) // the vCPU thread's end: nil when stopped, else why
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		ended <- func() error {
			for !stop.Load() {
				err := c.Run()
				harvest := ring.Harvest
				switch {
				case errors.Is(err, unix.EINTR):
					c.SetImmediateExit(false)
					if reaper {
						continue
					}
				case err != nil:
					return err
				case c.ExitReason() == ExitDirtyRingFull:
					fulls.Add(1)
					harvest = ring.HandleFull
				default:
					return errors.New(c.ExitDetail())
				}
				if _, err := harvest(record); errors.Is(err, ErrRingStuck) {
					return err
				} else if err != nil {
					require.ErrorIs(t, err, ErrRingInconsistent)
					recovered.Add(1)
				}
				if _, err := vm.ResetDirtyRings(); err != nil {
					return err
				}
			}
			return nil
		}()
	}()
	tid := <-tids
	var end error
	finished := false
	finish := func() { // stop both sides before the VM's cleanup unmaps anything
		if finished {
			return
		}
		finished = true
		stop.Store(true)
		if end == nil {
			c.Kick(tid)
			end = <-ended
		}
		wg.Wait()
	}
	t.Cleanup(finish)
	tick := time.NewTicker(500 * time.Microsecond)
	defer tick.Stop()
	before := entries.Load()
	for i := 1; i <= 2000 && end == nil; i++ { // about a second
		select {
		case end = <-ended:
		case <-tick.C:
			if !reaper {
				require.NoError(t, c.Kick(tid))
			}
		}
		if i%1000 == 0 && end == nil {
			require.Greater(t, entries.Load(), before, "no dirty pages for 1000 ticks and no error: stuck silently")
			before = entries.Load()
		}
	}
	finish()
	t.Logf("%d entries, %d ring-full exits, %d recoveries, end: %v", entries.Load(), fulls.Load(), recovered.Load(), end)
	if end != nil {
		require.ErrorIs(t, end, ErrRingStuck, "the only way the vCPU may stop")
		return
	}
	assertPages(t, append(wantPages(testData, n, stride), counter/PageSize), got)
}
