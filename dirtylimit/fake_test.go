package dirtylimit

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers map[*fakeTimer]struct{}
}

type fakeTimer struct {
	c  *fakeClock
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Unix(1795678691, 0), timers: map[*fakeTimer]struct{}{}}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.ch <- c.now
		return t
	}
	c.timers[t] = struct{}{}
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	_, pending := t.c.timers[t]
	delete(t.c.timers, t)
	return pending
}

// Advance moves the clock on by d and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
			delete(c.timers, t)
		}
	}
}

func (c *fakeClock) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// waitTimers waits until n timers are pending: the goroutines under test have reached their
// waits. The real-time bound only turns a hang into a failure.
func (c *fakeClock) waitTimers(t testing.TB, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); c.pending() != n; time.Sleep(50 * time.Microsecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %d pending timers (have %d)", n, c.pending())
		}
	}
}

// fakeMachine is a Machine whose dirty counters the test sets.
type fakeMachine struct {
	ring     int
	pages    []atomic.Uint64
	harvests atomic.Int64
	mem      []byte
	hook     atomic.Pointer[func(int)]
}

func newFakeMachine(cpus, ring int) *fakeMachine {
	return &fakeMachine{ring: ring, pages: make([]atomic.Uint64, cpus)}
}

func (m *fakeMachine) NumCPUs() int                { return len(m.pages) }
func (m *fakeMachine) RingSize() int               { return m.ring }
func (m *fakeMachine) DirtyPages(cpu int) uint64   { return m.pages[cpu].Load() }
func (m *fakeMachine) Harvest()                    { m.harvests.Add(1) }
func (m *fakeMachine) KVM() bool                   { return true }
func (m *fakeMachine) Memory() []byte              { return m.mem }
func (m *fakeMachine) SetRingFullHook(h func(int)) { m.hook.Store(&h) }

// dirty adds pages to cpu's counter.
func (m *fakeMachine) dirty(cpu int, pages uint64) { m.pages[cpu].Add(pages) }

// fakeLog is a DirtyLog the test fills.
type fakeLog struct {
	mu     sync.Mutex
	dirty  []int
	closed bool
}

func (f *fakeLog) Sync(dst []uint64) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.dirty {
		if dst[p/64]&(1<<(p%64)) == 0 {
			dst[p/64] |= 1 << (p % 64)
			n++
		}
	}
	f.dirty = nil
	return n
}

func (f *fakeLog) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
}

func (f *fakeLog) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

func (f *fakeLog) mark(pages ...int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dirty = append(f.dirty, pages...)
}
