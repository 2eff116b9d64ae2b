package migration

import "time"

// Run states this package asks the machine for (QEMU's names).
const (
	RunRunning       = "running"
	RunPaused        = "paused"
	RunInmigrate     = "inmigrate"
	RunFinishMigrate = "finish-migrate"
	RunPostmigrate   = "postmigrate"
)

// Machine is what migration needs from the VMM (vmm.Machine through a thin adapter).
type Machine interface {
	Memory() []byte // guest RAM, PageSize pages
	// PopulatedPages sets in dst (a bit per page) every page that may hold data; a page it
	// leaves clear is zero, and the sender neither reads nor checks it.
	PopulatedPages(dst []uint64)
	// DiscardPages makes a run of pages zero without writing them (the receiver's zero
	// pages), giving their host memory back.
	DiscardPages(first, count int) error
	NumCPUs() int
	RunState() string
	Pause(to string) error // stop the vCPUs (STOP if they ran) and enter run state `to`
	SetRunState(to string)
	Resume() error // run the vCPUs again, RESUME
	NewDirtyLog() DirtyLog
	SaveCPU() ([]byte, error) // all vCPU state; the machine is paused
	LoadCPU([]byte) error
	// Kick makes vCPU cpu leave guest mode soon and run the ring-full hook on its own thread;
	// auto-converge serves its sleep there.
	Kick(cpu int)
	SetRingFullHook(h func(cpu int)) // nil removes it
}

// DirtyLog is one migration's view of dirtied pages.
type DirtyLog interface {
	// Sync harvests first, then ORs the pages dirtied since the last Sync into dst (one bit
	// per page) and returns how many it added.
	Sync(dst []uint64) int
	// Quiet reports that no vCPU has run since the log opened: no page can have changed.
	Quiet() bool
	Close()
}

// DirtyLimiter is the dirty-limit service (*dirtylimit.Limiter satisfies it).
type DirtyLimiter interface {
	// SetMigrationActive makes the user's set/cancel-vcpu-dirty-limit refuse while a
	// dirty-limit migration runs.
	SetMigrationActive(bool)
	SetAll(rateMBps uint64) error // every vCPU, bypassing the refusal
	CancelAll()
	Wake() // cut short every penalty being slept, before the machine is paused
	SetPeriod(time.Duration)
	InService() bool
	ThrottleTimePerRound() uint64 // µs, max over vCPUs
	RingFullTime() uint64         // µs
}

// Emitter sends QMP events.
type Emitter interface {
	Emit(name string, data any)
}
