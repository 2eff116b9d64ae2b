package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/migvisor/migvisor/vmm/kvm"
	"math/bits"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migvisor/migvisor/vmm/guest"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func bitmapFor(m *Machine) []uint64 { return make([]uint64, (len(m.Memory())/PageSize+63)/64) }

func pagesIn(bm []uint64) []uint64 {
	var out []uint64
	for i, w := range bm {
		for w != 0 {
			b := bits.TrailingZeros64(w)
			w &^= 1 << b
			out = append(out, uint64(i*64+b))
		}
	}
	return out
}

func pageRange(start, size uint64) []uint64 {
	var out []uint64
	for p := start / PageSize; p < (start+size)/PageSize; p++ {
		out = append(out, p)
	}
	return out
}

// The pages a known workload dirties are exactly the pages harvested: its write region and
// the records' page; never the read region or the code.
func TestDirtySetIsExact(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		for _, ring := range []int{0, testRing(accel)} {
			t.Run(fmt.Sprintf("ring=%d", ring), func(t *testing.T) {
				m := newMachine(t, Config{Accel: accel, DirtyRingSize: ring, Initial: Prelaunch,
					Workloads: []Workload{{Mode: ModeWrite, Size: 64 * PageSize}, {Mode: ModeRead, Size: 16 * PageSize}}})
				log := m.NewDirtyLog()
				defer log.Close()
				require.NoError(t, m.Cont())
				waitFor(t, "two passes of each workload", func() bool {
					s := m.WorkloadStats()
					return s[0].Passes >= 2 && s[1].Passes >= 2
				})
				require.NoError(t, m.Stop())
				bm := bitmapFor(m)
				n := log.Sync(bm)

				st := m.WorkloadStats()
				want := append([]uint64{guest.RecordBase / PageSize}, pageRange(st[0].RegionStart, st[0].RegionSize)...)
				sort.Slice(want, func(i, j int) bool { return want[i] < want[j] })
				require.Equal(t, want, pagesIn(bm))
				require.Equal(t, len(want), n)
				require.Zero(t, log.Sync(bm), "a second sync adds nothing")
				if ring == 0 {
					require.Zero(t, m.DirtyPages(0))
					require.Zero(t, m.DirtyPages(1))
				} else {
					// vCPU 1's only dirty page, the records', is vCPU 0's too: either may log it.
					require.GreaterOrEqual(t, m.DirtyPages(0)+m.DirtyPages(1), uint64(64+1))
				}
				require.Zero(t, m.DirtyFailSafes())
			})
		}
	})
}

// Over sustained writing no dirty page is lost: a copy of guest memory kept up to date the way
// migration does it (copy each page Sync reports, after the Sync) ends equal to the memory.
// Every pass stores a new value in every page, so a page missed after its last write would
// differ.
func TestNoDirtyPageLost(t *testing.T) {
	dur := 10 * time.Second
	if testing.Short() {
		dur = 2 * time.Second
	}
	forEachBackend(t, func(t *testing.T, accel string) {
		for _, ring := range []int{testRing(accel), 0} {
			t.Run(fmt.Sprintf("ring=%d", ring), func(t *testing.T) {
				dur := dur
				if ring == 0 { // the bitmap path has no reaper to race with: a short run will do
					dur = min(dur, 2*time.Second)
				}
				m := newMachine(t, Config{Accel: accel, DirtyRingSize: ring, Initial: Running,
					Workloads: []Workload{{Mode: ModeWrite, Size: 4 << 20}, {Mode: ModeWrite, Size: 2 << 20, BytesPerPage: 4}}})
				mem := m.Memory()
				log := m.NewDirtyLog()
				defer log.Close()
				shadow := bytes.Clone(mem) // migration's first pass: everything
				bm := bitmapFor(m)
				copyDirty := func() {
					log.Sync(bm)
					for _, p := range pagesIn(bm) {
						copy(shadow[p*PageSize:(p+1)*PageSize], mem[p*PageSize:(p+1)*PageSize])
					}
					clear(bm)
				}
				start := m.WorkloadStats()
				for end := time.Now().Add(dur); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
					copyDirty()
				}
				require.NoError(t, m.Pause(FinishMigrate))
				copyDirty()

				st := m.WorkloadStats()
				for cpu := range st {
					// A ring that KVM left out of step stalls its vCPU; that must have failed safe.
					if m.DirtyFailSafes() == 0 {
						require.GreaterOrEqual(t, st[cpu].Passes, start[cpu].Passes+2, "vCPU %d made too little progress to test anything", cpu)
					}
				}
				if !bytes.Equal(shadow, mem) {
					var lost []uint64
					for p := uint64(0); p < uint64(len(mem)/PageSize); p++ {
						if !bytes.Equal(shadow[p*PageSize:(p+1)*PageSize], mem[p*PageSize:(p+1)*PageSize]) {
							lost = append(lost, p)
						}
					}
					t.Fatalf("%d dirty pages were never reported after their last write, e.g. %v", len(lost), lost[:min(len(lost), 10)])
				}
				t.Logf("passes %d and %d, harvested %d and %d, fail-safes %d", st[0].Passes, st[1].Passes,
					m.DirtyPages(0), m.DirtyPages(1), m.DirtyFailSafes())
				if accel == AccelSoft {
					require.Zero(t, m.DirtyFailSafes())
				}
			})
		}
	})
}

// Views are independent: syncing one leaves the others' pages alone.
func TestDirtyLogsAreIndependent(t *testing.T) {
	m := newMachine(t, Config{Accel: AccelSoft, DirtyRingSize: 1024, Initial: Running,
		Workloads: []Workload{{Mode: ModeWrite, Size: 8 * PageSize}}})
	a, b := m.NewDirtyLog(), m.NewDirtyLog()
	// A whole pass after the views opened (the one under way may have begun before).
	p0 := m.WorkloadStats()[0].Passes
	waitFor(t, "a pass", func() bool { return m.WorkloadStats()[0].Passes >= p0+2 })
	require.NoError(t, m.Stop())
	bmA, bmB := bitmapFor(m), bitmapFor(m)
	require.Equal(t, 9, a.Sync(bmA))
	require.Zero(t, a.Sync(bmA))
	require.Equal(t, 9, b.Sync(bmB))
	require.Equal(t, bmA, bmB)

	b.Close()
	require.Zero(t, b.Sync(bitmapFor(m)))
	c := m.NewDirtyLog()
	require.Zero(t, c.Sync(bitmapFor(m)), "a new view starts empty")
	passes := m.WorkloadStats()[0].Passes
	require.NoError(t, m.Cont())
	waitFor(t, "a pass", func() bool { return m.WorkloadStats()[0].Passes > passes })
	require.NoError(t, m.Stop())
	require.Equal(t, 9, c.Sync(bitmapFor(m)))
}

// A view is quiet while no vCPU has run since it opened, whatever run states came and went.
func TestDirtyLogQuiet(t *testing.T) {
	cont := func(m *Machine) error { return m.Cont() }
	stop := func(m *Machine) error { return m.Stop() }
	pause := func(m *Machine) error { return m.Pause(FinishMigrate) }
	for _, tc := range []struct {
		name          string
		initial       RunState
		before, after []func(m *Machine) error // run states changed before and after the view opens
		quiet         bool
	}{
		{"opened in prelaunch, never run", Prelaunch, nil, []func(*Machine) error{pause}, true},
		{"opened after a stop, stop only", Running, []func(*Machine) error{stop}, []func(*Machine) error{stop, pause}, true},
		{"opened after a stop, cont and stop", Running, []func(*Machine) error{stop}, []func(*Machine) error{cont, stop}, false},
		{"opened in prelaunch, running now", Prelaunch, nil, []func(*Machine) error{cont}, false},
		{"opened running, stopped since", Running, nil, []func(*Machine) error{pause}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(t, Config{Accel: AccelSoft, DirtyRingSize: 1024, Initial: tc.initial,
				Workloads: []Workload{{Mode: ModeWrite, Size: 8 * PageSize}}})
			for _, f := range tc.before {
				require.NoError(t, f(m))
			}
			log := m.NewDirtyLog()
			defer log.Close()
			for _, f := range tc.after {
				require.NoError(t, f(m))
			}
			require.Equal(t, tc.quiet, log.Quiet())
		})
	}
}

// A ring that cannot be right makes every page dirty in every view and is counted and logged.
func TestInconsistentRingFailsSafe(t *testing.T) {
	var mu sync.Mutex
	var lines []string
	m := newMachine(t, Config{Accel: AccelSoft, DirtyRingSize: 1024, Initial: Prelaunch,
		Workloads: []Workload{{Mode: ModeRead, Size: 1 << 20}, {Mode: ModeWrite, Size: 2 << 20}},
		Logf:      func(f string, a ...any) { mu.Lock(); lines = append(lines, fmt.Sprintf(f, a...)); mu.Unlock() }})
	log := m.NewDirtyLog()
	defer log.Close()
	// The overrun is planted, harvested once and taken back under the reaper's lock: the
	// reaper's own threads harvest whenever they like while the machine is not running, and
	// one that saw the planted counters would fail safe a second time.
	overrun := func(cpu int) {
		r := m.be.(*softBackend).cpus[cpu].ring
		m.rp.mu.Lock()
		defer m.rp.mu.Unlock()
		r.dirty.Store(r.resetAt.Load() + 1025) // more entries than the ring has
		m.rp.harvestLocked(m.cpus[cpu], true)
		r.dirty.Store(r.resetAt.Load())
	}
	record := func(cpu int) uint64 { return m.lay.records[cpu] / PageSize }
	// A vCPU's ring holds what that vCPU wrote: its record and, writing, its region.
	overrun(1)
	require.Equal(t, uint64(1), m.DirtyFailSafes())
	bm := bitmapFor(m)
	log.Sync(bm)
	want := append([]uint64{record(1)}, pageRange(m.lay.regions[1].start, m.lay.regions[1].size)...)
	require.Equal(t, want, pagesIn(bm))
	// A reading vCPU writes its record alone.
	overrun(0)
	bm = bitmapFor(m)
	log.Sync(bm)
	require.Equal(t, []uint64{record(0)}, pagesIn(bm))
	// What the machine as a whole may have lost is all of memory.
	m.rp.failSafe(-1, errors.New("reset failed"))
	require.Equal(t, len(m.Memory())/PageSize, log.Sync(bitmapFor(m)))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, lines, 2, "the third of a series is not logged")
	require.Contains(t, lines[0], "dirty tracking of vCPU 1 inconsistent")
	require.Contains(t, lines[0], "marking the memory vCPU 1 writes dirty")
	require.Equal(t, uint64(3), m.DirtyFailSafes())
}

// The ring-full hook runs on the vCPU's own thread each time its ring has received its size
// in entries.
func TestRingFullHookOnVCPUThread(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		ring := testRing(accel)
		m := newMachine(t, Config{Accel: accel, DirtyRingSize: ring, Initial: Prelaunch,
			Workloads: []Workload{{Mode: ModeIdle}, {Mode: ModeWrite, Size: 4 << 20}}})
		var mu sync.Mutex
		calls := map[int]int{}
		var wrong []string
		m.SetRingFullHook(func(cpu int) {
			mu.Lock()
			defer mu.Unlock()
			calls[cpu]++
			if tid := unix.Gettid(); tid != m.ThreadID(cpu) {
				wrong = append(wrong, fmt.Sprintf("vCPU %d's hook on thread %d, not %d", cpu, tid, m.ThreadID(cpu)))
			}
		})
		require.NoError(t, m.Cont())
		waitFor(t, "three ring-full events", func() bool { mu.Lock(); defer mu.Unlock(); return calls[1] >= 3 })
		require.NoError(t, m.Stop())
		mu.Lock()
		defer mu.Unlock()
		require.Empty(t, wrong)
		require.Zero(t, calls[0], "the idle vCPU's ring never filled")
		require.GreaterOrEqual(t, m.DirtyPages(1), uint64(3*ring))
	})
}

// SetRingFullPages makes ring-full events come every n pages: the first comes long before a
// whole ring, and each stands for at least n pages.
func TestRingFullEveryNPages(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		ring := testRing(accel)
		every := ring / 8
		m := newMachine(t, Config{Accel: accel, DirtyRingSize: ring, Initial: Prelaunch,
			Workloads: []Workload{{Mode: ModeIdle}, {Mode: ModeWrite, Size: 4 << 20}}})
		m.SetRingFullPages(every)
		var mu sync.Mutex
		calls, firstAt := 0, uint64(0)
		m.SetRingFullHook(func(cpu int) {
			mu.Lock()
			defer mu.Unlock()
			if cpu != 1 {
				return
			}
			if calls++; calls == 1 {
				firstAt = m.DirtyPages(1)
			}
		})
		require.NoError(t, m.Cont())
		waitFor(t, "sixteen events", func() bool { mu.Lock(); defer mu.Unlock(); return calls >= 16 })
		require.NoError(t, m.Stop())
		mu.Lock()
		defer mu.Unlock()
		require.Less(t, firstAt, uint64(ring), "the first event must not wait for a whole ring")
		require.GreaterOrEqual(t, m.DirtyPages(1), uint64(calls*every))
	})
}

// Kick makes a vCPU run the hook soon, whether it is in guest mode or halted.
func TestKickRunsHook(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m := newMachine(t, Config{Accel: accel, Initial: Running,
			Workloads: []Workload{{Mode: ModeWrite, Size: 1 << 20}, {Mode: ModeIdle}}})
		ran := make(chan [2]int, 1)
		m.SetRingFullHook(func(cpu int) { ran <- [2]int{cpu, unix.Gettid()} })
		for i := range 50 {
			cpu := i % 2
			m.Kick(cpu)
			require.Equal(t, [2]int{cpu, m.ThreadID(cpu)}, <-ran)
		}
		m.SetRingFullHook(nil)
	})
}

// Stop returns with every vCPU outside guest mode, even one sleeping in the hook or halted.
func TestStopWaitsForVCPUs(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m := newMachine(t, Config{Accel: accel, Initial: Running,
			Workloads: []Workload{{Mode: ModeWrite, Size: 1 << 20}, {Mode: ModeIdle}}})
		inHook := make(chan struct{})
		release := make(chan struct{})
		m.SetRingFullHook(func(cpu int) {
			inHook <- struct{}{}
			<-release
		})
		m.Kick(0)
		<-inHook
		stopped := make(chan struct{})
		go func() { m.Stop(); close(stopped) }()
		select {
		case <-stopped:
			t.Fatal("Stop returned while vCPU 0 was still in its hook")
		case <-time.After(50 * time.Millisecond):
		}
		close(release)
		<-stopped
		require.Equal(t, Paused, m.RunState())
		m.SetRingFullHook(nil)
	})
}

// scriptedRing hands out a fixed sequence of entries once, as a host that logs every store does.
type scriptedRing struct{ pages []uint64 }

func (s *scriptedRing) harvest(visit func(page uint64)) (int, error) {
	for _, p := range s.pages {
		visit(p)
	}
	n := len(s.pages)
	s.pages = nil
	return n, nil
}

func (s *scriptedRing) handleFull(visit func(page uint64)) (int, error) { return s.harvest(visit) }

// Where KVM emulates the guest, each store is an entry: a page stored to twice in a row is still
// one dirty page, for the per-vCPU count (the dirty limit's rate) and for the views.
func TestRepeatedEntriesCountOnce(t *testing.T) {
	m := newMachine(t, Config{Accel: AccelSoft, DirtyRingSize: 1024, Initial: Prelaunch})
	log := m.NewDirtyLog()
	m.cpus[0].ring = &scriptedRing{pages: []uint64{300, 300, 301, 301, 302, 302, 300}}
	m.Harvest()
	require.Equal(t, uint64(4), m.DirtyPages(0), "300 300 | 301 301 | 302 302 | 300: four pages dirtied in turn")
	bm := bitmapFor(m)
	require.Equal(t, 3, log.Sync(bm))
	require.Equal(t, []uint64{300, 301, 302}, pagesIn(bm))
}

// On nested PVM a machine whose vCPU writes flat out into a small ring says how to avoid
// overruns; a paced writer, or a ring large enough, gets no such line.
func TestPVMRingAdvice(t *testing.T) {
	if err := kvm.Available(); err != nil {
		t.Skipf("KVM is not usable here: %v", err)
	}
	dir := t.TempDir()
	require.True(t, nestedPVM(dir))
	require.False(t, nestedPVM(filepath.Join(dir, "absent")))
	for _, tc := range []struct {
		name   string
		ring   int
		rate   uint64
		advice bool
	}{
		{"flat out, ring 4096", 4096, 0, true},
		{"paced, ring 4096", 4096, 64 << 20, false},
		{"flat out, ring 65536", 65536, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var lines []string
			newMachine(t, Config{Accel: AccelKVM, DirtyRingSize: tc.ring, Initial: Prelaunch,
				Workloads: []Workload{{Mode: ModeWrite, Size: 8 * PageSize, Rate: tc.rate}},
				Logf:      func(f string, a ...any) { mu.Lock(); lines = append(lines, fmt.Sprintf(f, a...)); mu.Unlock() }})
			mu.Lock()
			defer mu.Unlock()
			got := strings.Contains(strings.Join(lines, "\n"), "dirty-ring-size=65536 avoids it")
			require.Equal(t, tc.advice && nestedPVM(pvmModule), got, "%q", lines)
		})
	}
}
