package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/migvisor/migvisor/vmm/kvm"
	"golang.org/x/sys/unix"
)

// PageSize is the guest page size: the unit of dirty tracking.
const PageSize = 4096

// Emitter receives the machine's QMP events (STOP, RESUME). *qmp.Server satisfies it.
type Emitter interface{ Emit(name string, data any) }

// Accelerators.
const (
	AccelKVM  = "kvm"
	AccelSoft = "soft"
)

// MachineName is the machine type QEMU's messages name for a migvisor machine.
const MachineName = "migvisor"

// MaxSoftCPUs is the most vCPUs the soft backend runs: what KVM allows on common hosts.
const MaxSoftCPUs = 1024

// MaxCPUs is the most vCPUs a machine on accel can have: KVM_CAP_MAX_VCPUS with KVM,
// MaxSoftCPUs with the soft backend.
func MaxCPUs(accel string) (int, error) {
	switch accel {
	case AccelSoft:
		return MaxSoftCPUs, nil
	case AccelKVM:
		sys, err := kvm.Open()
		if err != nil {
			return 0, err
		}
		defer sys.Close()
		return sys.MaxVCPUs()
	}
	return 0, fmt.Errorf("vmm: accelerator %q", accel)
}

// Config describes a machine.
type Config struct {
	MemSize       uint64     // bytes, a multiple of PageSize
	CPUs          int        // vCPUs, at least 1 and at most MaxCPUs(Accel)
	Accel         string     // AccelKVM or AccelSoft
	DirtyRingSize int        // entries per vCPU (see ValidateRingSize); 0 = no ring, a dirty bitmap
	Workloads     []Workload // one per vCPU (index = cpu; missing or zero value = idle)
	Initial       RunState   // Prelaunch, InMigrate or Running (the zero value means Prelaunch)
	Events        Emitter    // may be nil
	Logf          func(format string, args ...any)
}

// Workload is what one vCPU runs: a loop over its region of guest memory that writes
// BytesPerPage bytes of (or reads) every 4 KiB page, pass after pass.
type Workload struct {
	Mode         string // ModeWrite, ModeRead or ModeIdle ("" = idle)
	Size         uint64 // region bytes; 0 = the machine's default share
	BytesPerPage int    // bytes a write stores per page: a multiple of 4 up to 4096 (0 = 8)
	Rate         uint64 // pages touched per second times 4096; 0 = flat out
}

func (w Workload) mode() string {
	if w.Mode == "" {
		return ModeIdle
	}
	return w.Mode
}

// Machine is a guest: memory, vCPU threads, run state, dirty tracking and workloads.
// Its methods are safe for concurrent use.
type Machine struct {
	cfg   Config
	logf  func(format string, args ...any)
	ram   *guestMemory
	mem   []byte // ram.mem
	pages uint64
	be    backend
	cpus  []*vcpu
	lay   layout
	// maxCPUs is MaxCPUs(cfg.Accel) as New found it.
	maxCPUs int

	mu        sync.Mutex // run state and vCPU parking
	cond      *sync.Cond // signalled on every change under mu but parking, for the vCPUs
	allParked *sync.Cond // signalled when the last vCPU parks (one wake, not one a vCPU per park)
	state     RunState
	autostart bool   // cont during inmigrate: run once the migration completes
	run       bool   // vCPUs may run
	starts    uint64 // times run went true: a dirty log tells by it whether any vCPU ran
	nparked   int    // vCPUs waiting outside KVM_RUN
	closed    bool

	hook atomic.Pointer[func(cpu int)]
	// fullPages is how many pages make a ring-full event (0: the ring's size).
	fullPages atomic.Int64
	rp        *reaper

	stats *sampler

	memMu    sync.RWMutex // Close unmaps the memory under it: readers check unmapped
	unmapped bool
	wg       sync.WaitGroup
	done     chan struct{}
}

// vcpu is one virtual CPU: its thread's view of the run state, its ring and its counters.
type vcpu struct {
	id   int
	r    runner
	ring dirtyRing // nil without a ring
	tid  atomic.Int64

	dirty       atomic.Uint64            // pages harvested from the ring, cumulative
	hookPending atomic.Bool              // run the ring-full hook before the next KVM_RUN
	wake        chan struct{}            // wakes a halted vCPU
	parked      bool                     // under Machine.mu
	inGuest     atomic.Bool              // in (or about to enter) KVM_RUN: the reaper kicks it to collect
	collect     atomic.Bool              // collect the ring before running again
	syncDone    atomic.Pointer[chan int] // a synchronous harvest waiting for that collection
	failure     string                   // under Machine.mu: the error after which the vCPU never runs again
}

// New builds a machine and starts its vCPU threads; they run guest code only in the running
// state (Config.Initial Running starts them at once, without an event).
func New(cfg Config) (*Machine, error) {
	if cfg.CPUs < 1 {
		return nil, fmt.Errorf("vmm: %d vCPUs", cfg.CPUs)
	}
	maxCPUs, err := MaxCPUs(cfg.Accel)
	if err != nil {
		return nil, err
	}
	if cfg.CPUs > maxCPUs {
		return nil, errTooManyCPUs(cfg.CPUs, maxCPUs)
	}
	if cfg.MemSize == 0 || cfg.MemSize%PageSize != 0 {
		return nil, fmt.Errorf("vmm: memory size %d is not a positive multiple of %d", cfg.MemSize, PageSize)
	}
	if err := ValidateRingSize(cfg.DirtyRingSize); err != nil {
		return nil, err
	}
	if len(cfg.Workloads) > cfg.CPUs {
		return nil, fmt.Errorf("vmm: %d workloads for %d vCPUs", len(cfg.Workloads), cfg.CPUs)
	}
	switch cfg.Initial {
	case "":
		cfg.Initial = Prelaunch
	case Prelaunch, InMigrate, Running:
	default:
		return nil, fmt.Errorf("vmm: initial run state %q", cfg.Initial)
	}
	m := &Machine{cfg: cfg, logf: cfg.Logf, state: cfg.Initial, maxCPUs: maxCPUs, done: make(chan struct{})}
	if m.logf == nil {
		m.logf = func(string, ...any) {}
	}
	m.cond = sync.NewCond(&m.mu)
	m.allParked = sync.NewCond(&m.mu)
	lay, err := newLayout(cfg)
	if err != nil {
		return nil, err
	}
	m.lay = lay
	m.ram, err = newGuestMemory(cfg.MemSize)
	if err != nil {
		return nil, err
	}
	m.mem = m.ram.mem
	m.pages = cfg.MemSize / PageSize
	// The first touch of fresh memory is expensive on the project's hosts; populating the
	// workload regions up front keeps that out of the workloads' rates. A destination's
	// memory is about to be overwritten by the source's, holes included: it is left as it is.
	if cfg.Initial != InMigrate {
		for _, r := range lay.regions {
			if r.size > 0 {
				unix.Madvise(m.mem[r.start:r.start+r.size], unix.MADV_POPULATE_WRITE)
			}
		}
	}
	if cfg.Accel == AccelSoft {
		m.be, err = newSoftBackend(m)
	} else {
		m.be, err = newKVMBackend(m)
	}
	if err != nil {
		m.ram.close()
		return nil, err
	}
	m.cpus = make([]*vcpu, cfg.CPUs)
	for i := range m.cpus {
		m.cpus[i] = &vcpu{id: i, r: m.be.runner(i), ring: m.be.ring(i), wake: make(chan struct{}, 1)}
	}
	spareProcs(lay.busy())
	m.rp = newReaper(m)
	m.stats = newSampler(m)
	ready := make(chan struct{}, cfg.CPUs)
	for _, c := range m.cpus {
		m.wg.Add(1)
		go m.vcpuThread(c, ready)
	}
	for range m.cpus {
		<-ready
	}
	m.rp.start()
	m.wg.Add(1)
	go m.stats.loop()
	if cfg.Initial == Running {
		m.mu.Lock()
		m.setRunLocked(true)
		m.mu.Unlock()
	}
	return m, nil
}

// Close stops the vCPUs and the reaper and releases the guest memory. Memory() must not be used
// after Close; the other methods are harmless then (WorkloadStats returns nil, Sync adds
// nothing).
func (m *Machine) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.run = false
	m.cond.Broadcast()
	m.allParked.Broadcast()
	m.mu.Unlock()
	close(m.done)
	for _, c := range m.cpus {
		m.kickThread(c)
	}
	m.rp.wakeUp()
	m.wg.Wait()
	m.rp.close()
	releaseProcs()
	m.memMu.Lock()
	defer m.memMu.Unlock()
	m.unmapped = true
	err := m.be.close()
	return errors.Join(err, m.ram.close())
}

// MaxCPUs is the most vCPUs a machine on this one's accelerator can have (query-machines'
// cpu-max).
func (m *Machine) MaxCPUs() int { return m.maxCPUs }

// NumCPUs is the number of vCPUs.
func (m *Machine) NumCPUs() int { return len(m.cpus) }

// ThreadID is the OS thread id of cpu's thread (what query-cpus-fast reports).
func (m *Machine) ThreadID(cpu int) int { return int(m.cpus[cpu].tid.Load()) }

// KVM reports whether the vCPUs are real KVM vCPUs.
func (m *Machine) KVM() bool { return m.cfg.Accel == AccelKVM }

// RingSize is the dirty ring's entries per vCPU, 0 without a ring.
func (m *Machine) RingSize() int { return m.cfg.DirtyRingSize }

// Memory is the guest RAM, guest physical address 0 up. The vCPUs write it concurrently.
func (m *Machine) Memory() []byte { return m.mem }

// PopulatedPages sets in dst (one bit per page) every page of guest memory that may hold
// data. The others have never been written since the machine started or since they were
// discarded: they are zero, and reading them would only cost host memory.
func (m *Machine) PopulatedPages(dst []uint64) { m.ram.populated(dst) }

// DiscardPages makes pages [first, first+count) of guest memory zero and releases their host
// memory, without touching them. It is for a machine whose vCPUs do not run (an incoming
// migration's destination).
func (m *Machine) DiscardPages(first, count int) error {
	if first < 0 || count < 0 || uint64(first)+uint64(count) > m.pages {
		return fmt.Errorf("vmm: discarding pages %d+%d of %d", first, count, m.pages)
	}
	return m.ram.discard(uint64(first), uint64(count))
}

// SetRingFullHook sets the function every vCPU thread calls, outside KVM_RUN, at each of its
// ring-full events and after each Kick. nil removes it.
func (m *Machine) SetRingFullHook(h func(cpu int)) {
	if h == nil {
		m.hook.Store(nil)
		return
	}
	m.hook.Store(&h)
}

// SetRingFullPages makes a ring-full event come every n pages a vCPU's ring received instead
// of every ring's worth, so that a hook that paces the vCPU (the dirty limit) can do it in
// finer steps than a whole ring. n <= 0, or more than the ring holds, means the ring's size.
func (m *Machine) SetRingFullPages(n int) {
	if n <= 0 || n > m.cfg.DirtyRingSize {
		n = 0
	}
	m.fullPages.Store(int64(n))
}

// ringFullPages is the number of pages that make a ring-full event now.
func (m *Machine) ringFullPages() int {
	if n := m.fullPages.Load(); n > 0 {
		return int(n)
	}
	return m.cfg.DirtyRingSize
}

// Kick makes cpu leave guest mode soon and run the ring-full hook before it goes back.
func (m *Machine) Kick(cpu int) {
	c := m.cpus[cpu]
	c.hookPending.Store(true)
	m.kickThread(c)
}

// kickThread makes c's thread look at its requests: leave KVM_RUN or wake from a halt.
func (m *Machine) kickThread(c *vcpu) {
	c.r.kick()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// exit is why a runner returned.
type exit int

const (
	exitKicked   exit = iota // a kick (or a stray signal): look at the requests
	exitRingFull             // the vCPU's dirty ring is full: harvest, then the ring-full hook
	exitHalt                 // the guest has nothing to do until it is kicked
)

// runner executes one vCPU. run and init are called only on the vCPU's locked thread; kick
// from any goroutine, and it must make a concurrent or the next run return soon.
type runner interface {
	init() error
	run() (exit, error)
	kick()
	save() ([]byte, error) // only while parked
	load([]byte) error     // only while parked
}

// vcpuThread is the body of a vCPU's OS thread.
func (m *Machine) vcpuThread(c *vcpu, ready chan<- struct{}) {
	defer m.wg.Done()
	runtime.LockOSThread()
	// The thread dies with the goroutine (no UnlockOSThread): a thread that had signals
	// aimed at it by tid must not be reused for other goroutines.
	c.tid.Store(int64(unix.Gettid()))
	err := c.r.init()
	ready <- struct{}{}
	if err != nil {
		m.vcpuFailed(c, err)
	}
	for m.waitRunnable(c) {
		m.runHook(c)
		c.inGuest.Store(true)
		m.rp.enteringGuest()
		ex, err := c.r.run()
		c.inGuest.Store(false)
		if c.collect.Swap(false) {
			m.rp.collect(c)
			if done := c.syncDone.Swap(nil); done != nil {
				*done <- c.id
			}
		}
		if err != nil {
			m.vcpuFailed(c, err)
			continue
		}
		switch ex {
		case exitRingFull:
			m.ringFullExit(c)
		case exitHalt:
			if !c.hookPending.Load() {
				select {
				case <-c.wake:
				case <-m.done:
				}
			}
		}
	}
}

// ringFullExit serves a KVM_EXIT_DIRTY_RING_FULL (or the soft ring's): harvest, then the
// hook. A ring the host left stuck for good stops its vCPU (after failing safe).
func (m *Machine) ringFullExit(c *vcpu) {
	if err := m.rp.ringFull(c); err != nil {
		m.vcpuFailed(c, err)
		return
	}
	c.hookPending.Store(true)
}

func (m *Machine) runHook(c *vcpu) {
	if !c.hookPending.Swap(false) {
		return
	}
	if h := m.hook.Load(); h != nil {
		(*h)(c.id)
	}
}

func (m *Machine) vcpuFailed(c *vcpu, err error) {
	m.logf("vCPU %d stopped: %v", c.id, err)
	m.mu.Lock()
	c.failure = err.Error()
	m.mu.Unlock()
}

// waitRunnable parks c while the vCPUs must not run and reports whether the thread goes on.
func (m *Machine) waitRunnable(c *vcpu) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for (!m.run || c.failure != "") && !m.closed {
		if !c.parked {
			c.parked = true
			// Only Stop waits for parking: a broadcast to the parked vCPUs at each park would
			// cost a number of thread wakes quadratic in the vCPUs.
			if m.nparked++; m.nparked == len(m.cpus) {
				m.allParked.Broadcast()
			}
		}
		m.cond.Wait()
	}
	if c.parked {
		c.parked = false
		m.nparked--
	}
	return !m.closed
}

// setRunLocked lets the vCPUs run or stops them, returning once every vCPU is parked.
func (m *Machine) setRunLocked(run bool) {
	if m.run == run || m.closed {
		return
	}
	m.run = run
	m.cond.Broadcast()
	if run {
		m.starts++
		m.rp.wakeUp()
		return
	}
	for _, c := range m.cpus {
		m.kickThread(c)
	}
	for m.nparked < len(m.cpus) && !m.closed {
		m.allParked.Wait()
	}
}

// running reports whether the vCPUs may run (the reaper's question).
func (m *Machine) running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.run && !m.closed
}

// A thread inside KVM_RUN keeps its P until sysmon takes it back, which can take up to 10 ms:
// with only as many Ps as cores, busy vCPUs would keep the reaper (and everything else)
// waiting that long. While machines exist GOMAXPROCS has spare Ps, so that woken threads run
// at once; the last Close restores it.
var procs struct {
	sync.Mutex
	users, saved int
}

func spareProcs(busy int) {
	procs.Lock()
	defer procs.Unlock()
	if procs.users == 0 {
		procs.saved = runtime.GOMAXPROCS(0)
	}
	procs.users++
	if want := 2*runtime.NumCPU() + busy + 2; runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
}

func releaseProcs() {
	procs.Lock()
	defer procs.Unlock()
	if procs.users--; procs.users == 0 {
		runtime.GOMAXPROCS(procs.saved)
	}
}
