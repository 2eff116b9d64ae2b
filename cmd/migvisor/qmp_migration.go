package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/migration"
	"github.com/migvisor/migvisor/qmp"
	"github.com/migvisor/migvisor/vmm"
)

// newMigration builds the migration service of d's machine (after d.machine and d.limiter).
// The daemon then calls registerMigration(d.srv, mig), starts `-incoming URI` with
// mig.StartIncoming(d.cfg.incoming) once QMP listens, and mig.Close() before the machine
// closes. fatal is called when an incoming migration fails and exit-on-error is on (QEMU then
// exits with an error).
func newMigration(d *daemon, fatal func(error)) (*migration.Migration, error) {
	// The stream compares every vCPU's workload, idle ones too.
	all := make([]vmm.Workload, d.machine.NumCPUs())
	copy(all, d.cfg.workloads)
	workloads, err := json.Marshal(all)
	if err != nil {
		return nil, err
	}
	m := d.machine
	if d.cfg.incoming != "" {
		m.SetAutostart(!d.cfg.startPaused) // cont and stop during inmigrate change it later
	}
	return migration.New(migration.Config{
		Machine:        migrationMachine{m: m, lim: d.limiter},
		Limiter:        d.limiter,
		Events:         d.srv,
		DirtyRing:      m.RingSize() > 0,
		Workloads:      workloads,
		Incoming:       d.cfg.incoming != "",
		Autostart:      m.Autostart,
		IncomingFailed: fatal,
		CheckAllMemory: d.cfg.checkAllMemory,
		Logf:           func(format string, args ...any) { fmt.Fprintf(d.log, "migvisor: "+format+"\n", args...) },
	}), nil
}

// registerMigration serves QEMU's migration commands.
func registerMigration(srv *qmp.Server, mig *migration.Migration) {
	srv.Handle("migrate", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a migration.MigrateArgs
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		a.FDs = qmp.SessionFDs(ctx).Take
		return nil, mig.Migrate(a)
	})
	srv.Handle("migrate-incoming", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a migration.IncomingArgs
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		a.FDs = qmp.SessionFDs(ctx).Take
		return nil, mig.MigrateIncoming(a)
	})
	srv.Handle("migrate-continue", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			State string `json:"state"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, mig.Continue(a.State)
	})
	srv.Handle("migrate_cancel", handle(func() (any, error) { return nil, mig.Cancel() }))
	srv.Handle("migrate-pause", handle(func() (any, error) { return nil, mig.Pause() }))
	srv.Handle("query-migrate", handle(func() (any, error) { return mig.Query(), nil }))
	srv.Handle("migrate-set-capabilities", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			Capabilities []migration.CapabilityState `json:"capabilities"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, mig.SetCapabilities(a.Capabilities)
	})
	srv.Handle("query-migrate-capabilities", handle(func() (any, error) { return mig.QueryCapabilities(), nil }))
	srv.Handle("migrate-set-parameters", func(_ context.Context, args json.RawMessage) (any, error) {
		var a migration.SetParameters
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, mig.SetParameters(&a)
	})
	srv.Handle("query-migrate-parameters", handle(func() (any, error) { return mig.QueryParameters(), nil }))
}

// migrationMachine adapts *vmm.Machine to migration.Machine. The machine has one ring-full
// hook, the dirty limit's; auto-converge's hook runs after it while migration sets one.
type migrationMachine struct {
	m   *vmm.Machine
	lim *dirtylimit.Limiter
}

func (a migrationMachine) Memory() []byte                  { return a.m.Memory() }
func (a migrationMachine) PopulatedPages(dst []uint64)     { a.m.PopulatedPages(dst) }
func (a migrationMachine) DiscardPages(first, n int) error { return a.m.DiscardPages(first, n) }
func (a migrationMachine) NumCPUs() int                    { return a.m.NumCPUs() }
func (a migrationMachine) RunState() string                { return string(a.m.RunState()) }
func (a migrationMachine) Pause(to string) error           { return a.m.Pause(vmm.RunState(to)) }
func (a migrationMachine) SetRunState(to string)           { a.m.SetRunState(vmm.RunState(to)) }
func (a migrationMachine) Resume() error                   { return a.m.Resume() }
func (a migrationMachine) SaveCPU() ([]byte, error)        { return a.m.SaveCPU() }
func (a migrationMachine) LoadCPU(b []byte) error          { return a.m.LoadCPU(b) }
func (a migrationMachine) Kick(cpu int)                    { a.m.Kick(cpu) }
func (a migrationMachine) NewDirtyLog() migration.DirtyLog { return a.m.NewDirtyLog() }

func (a migrationMachine) SetRingFullHook(h func(cpu int)) {
	if h == nil {
		a.m.SetRingFullHook(a.lim.RingFull)
		return
	}
	a.m.SetRingFullHook(func(cpu int) {
		a.lim.RingFull(cpu)
		h(cpu)
	})
}
