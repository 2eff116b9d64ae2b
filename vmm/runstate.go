package vmm

import "github.com/migvisor/migvisor/qerr"

// RunState is the machine's run state, with QEMU's names.
type RunState string

// The run states migvisor uses.
const (
	Prelaunch     RunState = "prelaunch"
	Running       RunState = "running"
	Paused        RunState = "paused"
	InMigrate     RunState = "inmigrate"
	FinishMigrate RunState = "finish-migrate"
	PostMigrate   RunState = "postmigrate"
	Shutdown      RunState = "shutdown"
)

// RunState is the current run state.
func (m *Machine) RunState() RunState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Autostart reports whether the machine is to run once an incoming migration completes: true
// after a cont during inmigrate, false after a stop then. The migration destination reads it.
func (m *Machine) Autostart() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.autostart
}

// SetAutostart sets what Autostart reports (cmd: true for -incoming without -S).
func (m *Machine) SetAutostart(on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.autostart = on
}

// Cont is QMP cont: from prelaunch, paused, finish-migrate or postmigrate the vCPUs start and
// RESUME is emitted; while running nothing happens; during inmigrate it only sets autostart.
func (m *Machine) Cont() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.state {
	case Running:
		return nil
	case Shutdown:
		return qerr.Generic(errNeedsReset)
	case InMigrate:
		m.autostart = true
		return nil
	}
	m.toLocked(Running, "RESUME")
	return nil
}

// Stop is QMP stop: running -> paused with STOP; during inmigrate it clears autostart; in any
// other state nothing changes and no event is sent.
func (m *Machine) Stop() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.state {
	case Running:
		m.toLocked(Paused, "STOP")
	case InMigrate:
		m.autostart = false
	}
	return nil
}

// Pause stops the vCPUs for migration and enters state to (finish-migrate): with STOP if the
// machine was running, silently otherwise. It returns once no vCPU is in guest mode.
func (m *Machine) Pause(to RunState) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ev := ""
	if m.state == Running {
		ev = "STOP"
	}
	m.toLocked(to, ev)
	return nil
}

// Resume is migration's way back to running (a cancelled or failed source, an autostarting
// destination): the vCPUs start and RESUME is emitted, unless already running.
func (m *Machine) Resume() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == Running {
		return nil
	}
	if m.state == Shutdown {
		return qerr.Generic(errNeedsReset)
	}
	m.toLocked(Running, "RESUME")
	return nil
}

// SetRunState changes the state without an event (postmigrate, inmigrate, paused ...); the
// vCPUs run exactly when the state is running.
func (m *Machine) SetRunState(to RunState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.toLocked(to, "")
}

// toLocked enters state to, starting or stopping the vCPUs, then emits ev (if any). The event
// is sent with m.mu held so that events come out in the order of the transitions.
func (m *Machine) toLocked(to RunState, ev string) {
	m.state = to
	m.setRunLocked(to == Running)
	if ev != "" && m.cfg.Events != nil {
		m.cfg.Events.Emit(ev, nil)
	}
}
