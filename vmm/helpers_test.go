package vmm

import (
	"sync"
	"testing"
	"time"

	"github.com/migvisor/migvisor/vmm/kvm"
	"github.com/stretchr/testify/require"
)

// forEachBackend runs f against the soft backend and, where /dev/kvm works, against KVM.
func forEachBackend(t *testing.T, f func(t *testing.T, accel string)) {
	for _, accel := range []string{AccelSoft, AccelKVM} {
		t.Run(accel, func(t *testing.T) {
			if accel == AccelKVM {
				if err := kvm.Available(); err != nil {
					t.Skipf("KVM is not usable here, so only the soft backend is tested: %v", err)
				}
			}
			f(t, accel)
		})
	}
}

// testRing is the ring size the tests use: on the project's hosts KVM overruns a ring that
// fills between two reaper passes, and a 1024-entry ring can fill during a host stall.
func testRing(accel string) int {
	if accel == AccelKVM {
		return 4096
	}
	return 1024
}

func newMachine(t *testing.T, cfg Config) *Machine {
	t.Helper()
	if cfg.MemSize == 0 {
		cfg.MemSize = 32 << 20
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 2
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	m, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// waitFor waits (without a deadline of its own: the test's timeout bounds it) until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); !cond(); time.Sleep(time.Millisecond) {
		if time.Since(start) > time.Minute {
			t.Fatalf("still waiting for %s after a minute", what)
		}
	}
}

// events is a fake Emitter.
type events struct {
	mu    sync.Mutex
	names []string
}

func (e *events) Emit(name string, data any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.names = append(e.names, name)
}

func (e *events) take() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.names
	e.names = nil
	return n
}
