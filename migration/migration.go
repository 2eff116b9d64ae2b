package migration

import (
	"sync"
	"time"
)

// Config wires a Migration to its machine.
type Config struct {
	Machine   Machine
	Limiter   DirtyLimiter // nil: no dirty-limit service
	Events    Emitter      // nil: no events
	DirtyRing bool         // KVM with a dirty ring: the dirty-limit capability may be turned on
	// Workloads describes the guest's workloads; it travels in the stream header and must
	// match on the destination when both ends know it (nil: not compared).
	Workloads []byte
	Incoming  bool // started with -incoming (a URI or defer)
	// Autostart tells whether the destination runs the guest once loaded (false with -S, or
	// after a stop during inmigrate). Nil: always.
	Autostart func() bool
	// IncomingFailed is called after an incoming migration failed when exit-on-error is on
	// (QEMU's default): the caller reports and exits. Nil: stay and wait for migrate-incoming.
	IncomingFailed func(error)
	// CheckAllMemory makes the source reread all populated memory at the stop, however long
	// it takes, instead of what a quarter of downtime-limit allows.
	CheckAllMemory bool
	Logf           func(format string, args ...any)
}

// Migration owns capabilities, parameters and the outgoing and incoming migrations of one
// machine. Its methods implement the QMP commands.
type Migration struct {
	cfg Config

	mu              sync.Mutex
	caps            Capabilities
	params          Parameters
	src             *sourceRun
	dst             *incomingRun
	incomingStarted bool
	// setupStuck: a migrate-incoming's transport could not be opened. QEMU 10 then leaves the
	// incoming state in setup: query-migrate shows it, and no other migrate-incoming is taken.
	setupStuck bool
	closing    bool
}

// New returns the migration service of cfg.Machine with QEMU's defaults.
func New(cfg Config) *Migration {
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	return &Migration{cfg: cfg, caps: Capabilities{}, params: DefaultParameters()}
}

// emit sends an event; MIGRATION and MIGRATION_PASS only with the events capability.
func (m *Migration) emitMigration(eventsOn bool, name string, data any) {
	if eventsOn && m.cfg.Events != nil {
		m.cfg.Events.Emit(name, data)
	}
}

// running reports an outgoing migration between setup and its end. Callers hold m.mu.
func (m *Migration) running() bool {
	return m.src != nil && m.src.isRunning()
}

// QueryCapabilities is query-migrate-capabilities.
func (m *Migration) QueryCapabilities() []CapabilityState {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]CapabilityState, len(capabilityNames))
	for i, n := range capabilityNames {
		out[i] = CapabilityState{Capability: n, State: m.caps[n]}
	}
	return out
}

// SetCapabilities is migrate-set-capabilities: all or nothing, checked on the merged set.
func (m *Migration) SetCapabilities(list []CapabilityState) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.running() {
		return errInProgress
	}
	next := m.caps.clone()
	for _, c := range list {
		next[c.Capability] = c.State
	}
	if err := checkCapabilities(next, m.cfg.DirtyRing); err != nil {
		return err
	}
	m.caps = next.clone()
	return nil
}

// QueryParameters is query-migrate-parameters.
func (m *Migration) QueryParameters() Parameters {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.params.clone()
}

// SetParameters is migrate-set-parameters: validated on the merged set, applied whole or not
// at all; during a migration the new values take effect as in QEMU (bandwidth at once, the
// dirty-limit period at the next period, the rest at their next use).
func (m *Migration) SetParameters(s *SetParameters) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	next := m.params.merge(s)
	if err := next.check(); err != nil {
		return err
	}
	m.params = next
	if r := m.src; r != nil && r.isRunning() {
		r.limit.Store(int64(next.MaxBandwidth / 10))
		if r.dirtyLimit {
			m.cfg.Limiter.SetPeriod(time.Duration(next.XVCPUDirtyLimitPeriod) * time.Millisecond)
		}
	}
	return nil
}

func (m *Migration) paramsNow() Parameters {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.params.clone()
}

// Pause is migrate-pause, which QEMU allows only in postcopy; migvisor has none.
func (m *Migration) Pause() error { return errPauseNotPostcpy }

// Query is query-migrate: the incoming side first, then the outgoing side over it, as QEMU.
func (m *Migration) Query() *MigrationInfo {
	m.mu.Lock()
	dst, src := m.dst, m.src
	dl := m.caps["dirty-limit"]
	stuck := m.setupStuck
	m.mu.Unlock()
	info := &MigrationInfo{}
	if dst != nil {
		dst.fill(info)
	} else if stuck {
		info.Status = StatusSetup
	}
	if src != nil {
		src.fill(info, dl && m.cfg.Limiter != nil, m.cfg.Limiter)
	}
	return info
}
