package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/migration"
	"github.com/migvisor/migvisor/qmp"
	"github.com/migvisor/migvisor/schema"
	"github.com/migvisor/migvisor/unixsock"
	"github.com/migvisor/migvisor/vmm"
	"github.com/migvisor/migvisor/vmm/kvm"
)

// version is what query-version and the greeting report: the QEMU release whose QMP migvisor
// speaks (management tools gate features on it), and migvisor's own release in "package".
var version = qmp.Version{Major: 10, Minor: 0, Micro: 0, Package: "migvisor 0.1.0"}

// daemon is one running migvisor: the machine and the pieces around it, served over QMP.
type daemon struct {
	cfg     *config
	srv     *qmp.Server
	machine *vmm.Machine
	limiter *dirtylimit.Limiter
	meter   *dirtylimit.Meter
	mig     *migration.Migration
	log     io.Writer
	failed  error // why the daemon stops with an error (an incoming migration that failed)

	listeners []net.Listener
	unixPaths []string

	quitOnce sync.Once
	quit     chan struct{} // closed when the daemon must stop (quit, a signal)
}

// newDaemon builds the machine and the QMP server from cfg; nothing listens yet.
func newDaemon(cfg *config, log io.Writer) (*daemon, error) {
	d := &daemon{cfg: cfg, log: log, quit: make(chan struct{})}
	accel, err := resolveAccel(cfg.accel, kvm.Available(), func(s string) { fmt.Fprintln(log, "migvisor: "+s) })
	if err != nil {
		return nil, err
	}
	d.srv = qmp.NewServer(schema.Default(), version)
	d.srv.Logf = func(format string, args ...any) { fmt.Fprintf(log, "migvisor: "+format+"\n", args...) }
	// The vCPUs start in run(), once QMP listens: prelaunch is the state before that.
	initial := vmm.RunState("prelaunch")
	if cfg.incoming != "" {
		initial = "inmigrate"
	}
	d.machine, err = vmm.New(vmm.Config{
		MemSize:       cfg.memSize,
		CPUs:          cfg.cpus,
		Accel:         accel,
		DirtyRingSize: cfg.ringSize,
		Workloads:     cfg.workloads,
		Initial:       initial,
		Events:        d.srv,
		Logf:          func(format string, args ...any) { fmt.Fprintf(log, "migvisor: "+format+"\n", args...) },
	})
	if err != nil {
		return nil, err
	}
	d.limiter = dirtylimit.NewLimiter(d.machine, dirtylimit.Options{Algorithm: cfg.dirtyLimitAlgorithm})
	d.meter = dirtylimit.NewMeter(d.machine, dirtylimit.Options{
		NewDirtyLog: func() dirtylimit.DirtyLog { return d.machine.NewDirtyLog() },
	})
	d.mig, err = newMigration(d, d.incomingFailed)
	if err != nil {
		d.closeMachine()
		return nil, err
	}
	registerMachine(d.srv, d.machine, d)
	registerProbe(d.srv, d.machine)
	registerDirtyLimit(d.srv, d.limiter, d.meter)
	registerMigration(d.srv, d.mig)
	if missing := d.srv.Missing(); len(missing) > 0 {
		d.closeMachine()
		return nil, fmt.Errorf("internal error: QMP commands without handler or schema: %v", missing)
	}
	return d, nil
}

// listen opens every -qmp endpoint; the unix ones get mode 0600 and are removed on close.
func (d *daemon) listen() error {
	for _, ep := range d.cfg.qmp {
		l, err := listenEndpoint(ep)
		if err != nil {
			d.closeListeners()
			return err
		}
		d.listeners = append(d.listeners, l)
		if ep.network == "unix" {
			d.unixPaths = append(d.unixPaths, ep.addr)
		}
	}
	return nil
}

func listenEndpoint(ep endpoint) (net.Listener, error) {
	if ep.network == "unix" {
		if err := unixsock.CheckPath(ep.addr); err != nil {
			return nil, fmt.Errorf("-qmp unix:%s: %w", ep.addr, err)
		}
		if err := removeStaleSocket(ep.addr); err != nil {
			return nil, err
		}
		// Created with its final mode: under any umask only the owner can ever connect.
		l, err := unixsock.Listen(ep.addr, 0o600)
		if err != nil {
			return nil, fmt.Errorf("-qmp unix:%s: %w", ep.addr, err)
		}
		return l, nil
	}
	l, err := net.Listen("tcp", ep.addr)
	if err != nil {
		return nil, fmt.Errorf("-qmp tcp:%s: %w", ep.addr, err)
	}
	return l, nil
}

// removeStaleSocket clears the way for a unix listener: a socket nobody answers on is removed; a
// live socket or any other kind of file is an error and is left alone.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("-qmp unix:%s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("-qmp unix:%s: %s exists and is %s, not a socket; not removing it", path, path, fileKind(fi.Mode()))
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("-qmp unix:%s: address already in use", path)
	}
	return os.Remove(path)
}

// fileKind names what a file is, for refusing to replace it.
func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m.IsRegular():
		return "a regular file"
	case m&os.ModeSymlink != 0:
		return "a symbolic link"
	case m&os.ModeNamedPipe != 0:
		return "a named pipe"
	case m&os.ModeDevice != 0:
		return "a device"
	}
	return "not a regular file"
}

// serve starts serving every listener; with wait=on it returns only once each such listener has
// its first client, as QEMU holds the machine for it.
func (d *daemon) serve() {
	var waits []chan struct{}
	for i, l := range d.listeners {
		if d.cfg.qmp[i].wait {
			w := &firstAccept{Listener: l, got: make(chan struct{})}
			waits = append(waits, w.got)
			l = w
		}
		go d.srv.Serve(l)
	}
	for _, w := range waits {
		select {
		case <-w:
		case <-d.quit:
			return
		}
	}
}

// firstAccept reports, once, that its listener accepted a connection.
type firstAccept struct {
	net.Listener
	once sync.Once
	got  chan struct{}
}

func (f *firstAccept) Accept() (net.Conn, error) {
	c, err := f.Listener.Accept()
	if err == nil {
		f.once.Do(func() { close(f.got) })
	}
	return c, err
}

// incomingFailed ends the daemon after an incoming migration failed with exit-on-error on, as
// QEMU exits: the guest was never run. The migration has logged why.
func (d *daemon) incomingFailed(err error) {
	d.failed = err
	d.shutdown()
}

// shutdown asks the daemon to stop; the SHUTDOWN event has been emitted by the caller.
func (d *daemon) shutdown() { d.quitOnce.Do(func() { close(d.quit) }) }

// run starts the machine (unless it waits for -S or an incoming migration) and blocks until quit.
func (d *daemon) run(ctx context.Context) {
	d.serve()
	if d.cfg.incoming != "" {
		if err := d.mig.StartIncoming(d.cfg.incoming); err != nil {
			fmt.Fprintf(d.log, "migvisor: -incoming %s: %v\n", d.cfg.incoming, err)
			d.incomingFailed(err)
		}
	}
	if !d.cfg.startPaused && d.cfg.incoming == "" {
		if err := d.machine.Cont(); err != nil {
			fmt.Fprintf(d.log, "migvisor: cannot start the vCPUs: %v\n", err)
			d.shutdown()
		}
	}
	select {
	case <-d.quit:
	case <-ctx.Done():
		d.srv.Emit("SHUTDOWN", map[string]any{"guest": false, "reason": "host-signal"})
	}
}

// close stops everything: QMP output is flushed first, so a quit reply reaches its client.
func (d *daemon) close() {
	d.srv.Close()
	d.closeListeners()
	d.closeMachine()
}

// closeMachine stops what runs on the machine before the machine itself.
func (d *daemon) closeMachine() {
	if d.mig != nil {
		d.mig.Close()
	}
	d.meter.Close()
	d.limiter.Close()
	d.machine.Close()
}

func (d *daemon) closeListeners() {
	for _, l := range d.listeners {
		l.Close()
	}
}
