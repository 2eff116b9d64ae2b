package migration

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// recorder is an Emitter that keeps what it was given.
type recorder struct {
	mu     sync.Mutex
	events []string // "NAME" or "NAME value"
}

func (r *recorder) Emit(name string, data any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := name
	if d, ok := data.(map[string]any); ok {
		for _, k := range []string{"status", "pass"} {
			if v, ok := d[k]; ok {
				s += " " + fmt.Sprint(v)
			}
		}
	}
	r.events = append(r.events, s)
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// without drops the events named in names (MIGRATION_PASS counts vary with timing).
func without(evs []string, prefix string) []string {
	return slices.DeleteFunc(evs, func(e string) bool { return len(e) >= len(prefix) && e[:len(prefix)] == prefix })
}

// logLines is a Logf that keeps what it was given, and passes it to the test's log.
type logLines struct {
	t  interface{ Logf(string, ...any) }
	mu sync.Mutex
	b  strings.Builder
}

func (l *logLines) logf(format string, args ...any) {
	l.t.Logf(format, args...)
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(&l.b, format+"\n", args...)
}

func (l *logLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// fakeMachine is a machine whose guest is a Go slice. Its vCPUs are goroutines that, while
// the machine runs and a dirty log is open, each dirty rate pages per millisecond of a
// region; a write lands in memory (and in every dirty log) at the next harvest, which is
// when a real harvest would first report it.
type fakeMachine struct {
	mem    []byte
	ncpu   int
	events *recorder
	region int // pages the workload writes, from page 0

	mu      sync.Mutex
	state   string
	queued  []int
	logs    []*fakeLog
	counter uint64
	rate    int // pages per ms per vCPU
	loaded  []byte
	cpu     []byte // what SaveCPU returns; nil: a short state
	resumes int
	starts  int // times state became running through the Machine interface

	lossy atomic.Bool // the dirty log misses every write (a broken tracker)

	hook  atomic.Pointer[func(int)]
	kicks []atomic.Bool
	hooks atomic.Int64 // hook calls
	stop  chan struct{}
	wg    sync.WaitGroup
}

func newFakeMachine(pages, cpus int) *fakeMachine {
	m := &fakeMachine{mem: make([]byte, pages*PageSize), ncpu: cpus, events: &recorder{}, state: RunRunning,
		region: pages, kicks: make([]atomic.Bool, cpus), stop: make(chan struct{})}
	return m
}

// start runs the vCPU goroutines.
func (m *fakeMachine) start(rate, region int) {
	m.mu.Lock()
	m.rate, m.region = rate, region
	m.mu.Unlock()
	for cpu := range m.ncpu {
		m.wg.Add(1)
		go m.vcpu(cpu)
	}
}

func (m *fakeMachine) close() {
	close(m.stop)
	m.wg.Wait()
}

func (m *fakeMachine) vcpu(cpu int) {
	defer m.wg.Done()
	seed := uint64(cpu*7919 + 1)
	for {
		select {
		case <-m.stop:
			return
		case <-time.After(time.Millisecond):
		}
		if m.kicks[cpu].Swap(false) {
			if h := m.hook.Load(); h != nil {
				m.hooks.Add(1)
				(*h)(cpu)
			}
		}
		m.mu.Lock()
		if m.state == RunRunning && len(m.logs) > 0 {
			for range m.rate {
				seed = seed*6364136223846793005 + 1442695040888963407
				m.queued = append(m.queued, int(seed>>33)%m.region)
			}
		}
		m.mu.Unlock()
	}
}

func (m *fakeMachine) setRate(r int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rate = r
}

func (m *fakeMachine) Memory() []byte { return m.mem }

// PopulatedPages: a Go slice has no holes the fake could report.
func (m *fakeMachine) PopulatedPages(dst []uint64) {
	for i := range dst {
		dst[i] = ^uint64(0)
	}
	if tail := len(m.mem) / PageSize % 64; tail != 0 {
		dst[len(dst)-1] = 1<<tail - 1
	}
}

func (m *fakeMachine) DiscardPages(first, count int) error {
	clear(m.mem[first*PageSize : (first+count)*PageSize])
	return nil
}
func (m *fakeMachine) NumCPUs() int { return m.ncpu }
func (m *fakeMachine) RunState() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

func (m *fakeMachine) Pause(to string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == RunRunning {
		m.events.Emit("STOP", nil)
	}
	m.state = to
	return nil
}

func (m *fakeMachine) SetRunState(to string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if to == RunRunning && m.state != RunRunning {
		m.starts++
	}
	m.state = to
}

func (m *fakeMachine) Resume() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state != RunRunning {
		m.starts++
	}
	m.state = RunRunning
	m.resumes++
	m.events.Emit("RESUME", nil)
	return nil
}

func (m *fakeMachine) SaveCPU() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == RunRunning {
		return nil, errors.New("SaveCPU of a running machine")
	}
	if m.cpu != nil {
		return m.cpu, nil
	}
	return []byte("vcpu-state"), nil
}

func (m *fakeMachine) LoadCPU(b []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.loaded = slices.Clone(b)
	return nil
}

func (m *fakeMachine) Kick(cpu int) { m.kicks[cpu].Store(true) }

func (m *fakeMachine) SetRingFullHook(h func(cpu int)) {
	if h == nil {
		m.hook.Store(nil)
		return
	}
	m.hook.Store(&h)
}

func (m *fakeMachine) NewDirtyLog() DirtyLog {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := &fakeLog{m: m, bits: make([]uint64, (len(m.mem)/PageSize+63)/64), starts: m.starts}
	if m.state == RunRunning {
		l.starts = -1
	}
	m.logs = append(m.logs, l)
	return l
}

// harvest applies the queued writes. Callers hold m.mu.
func (m *fakeMachine) harvest() {
	for _, p := range m.queued {
		m.counter++
		binary.LittleEndian.PutUint64(m.mem[p*PageSize+int(m.counter%500)*8:], m.counter)
		if m.lossy.Load() {
			continue
		}
		for _, l := range m.logs {
			l.bits[p/64] |= 1 << (p % 64)
		}
	}
	m.queued = m.queued[:0]
}

type fakeLog struct {
	m      *fakeMachine
	bits   []uint64
	starts int // m.starts when opened, -1 if the machine ran then
}

func (l *fakeLog) Quiet() bool {
	l.m.mu.Lock()
	defer l.m.mu.Unlock()
	return l.m.state != RunRunning && l.m.starts == l.starts
}

func (l *fakeLog) Sync(dst []uint64) int {
	l.m.mu.Lock()
	defer l.m.mu.Unlock()
	l.m.harvest()
	n := 0
	for i, w := range l.bits {
		n += popcount(w &^ dst[i])
		dst[i] |= w
		l.bits[i] = 0
	}
	return n
}

func (l *fakeLog) Close() {
	l.m.mu.Lock()
	defer l.m.mu.Unlock()
	l.m.logs = slices.DeleteFunc(l.m.logs, func(x *fakeLog) bool { return x == l })
}

func popcount(w uint64) int {
	n := 0
	for ; w != 0; w &= w - 1 {
		n++
	}
	return n
}

// fakeLimiter records what migration asks of the dirty-limit service; SetAll slows the
// fake guest down to limitRate pages per ms.
type fakeLimiter struct {
	m         *fakeMachine
	limitRate int

	mu        sync.Mutex
	calls     []string
	inService bool
	active    bool
	period    time.Duration
}

func (l *fakeLimiter) log(s string) {
	l.calls = append(l.calls, s)
}

func (l *fakeLimiter) SetMigrationActive(a bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.active = a
	l.log(map[bool]string{true: "active", false: "inactive"}[a])
}

func (l *fakeLimiter) SetAll(rate uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inService = true
	l.log("set " + fmt.Sprint(rate))
	if l.m != nil {
		l.m.setRate(l.limitRate)
	}
	return nil
}

func (l *fakeLimiter) CancelAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inService = false
	l.log("cancel")
}

func (l *fakeLimiter) Wake() {}

func (l *fakeLimiter) SetPeriod(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.period = d
	l.log("period " + d.String())
}

func (l *fakeLimiter) InService() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inService
}

func (l *fakeLimiter) ThrottleTimePerRound() uint64 { return 7 }
func (l *fakeLimiter) RingFullTime() uint64         { return 11 }

func (l *fakeLimiter) list() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}
