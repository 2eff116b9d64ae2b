package migration

import (
	"errors"
	"fmt"
	"sync"
)

// IncomingArgs is migrate-incoming's argument.
type IncomingArgs struct {
	URI         *string   `json:"uri"`
	Channels    []Channel `json:"channels"`
	ExitOnError *bool     `json:"exit-on-error"`
	FDs         FDSource  `json:"-"` // the client's descriptors, for fd:NAME
}

// ErrDigestMismatch is the destination's refusal of memory that differs from the source's.
var ErrDigestMismatch = errors.New("memory digest mismatch: the guest memory received differs from the source's")

// MigrateIncoming is migrate-incoming: listen (or open, or run) now, receive in the
// background. MIGRATION setup is emitted before the reply.
func (m *Migration) MigrateIncoming(a IncomingArgs) error {
	addr, err := pickAddress(a.URI, a.Channels)
	if err != nil {
		return err
	}
	exit := a.ExitOnError == nil || *a.ExitOnError
	return m.startIncoming(addr, exit, a.FDs)
}

// StartIncoming starts the destination for `-incoming URI` ("defer" waits for
// migrate-incoming). A failed migration then exits (IncomingFailed), as QEMU's does.
func (m *Migration) StartIncoming(uri string) error {
	if uri == "defer" {
		return nil
	}
	addr, err := ParseURI(uri)
	if err != nil {
		return err
	}
	return m.startIncoming(addr, true, nil)
}

func (m *Migration) startIncoming(addr Address, exitOnError bool, fds FDSource) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.incomingStarted {
		return errIncomingStarted
	}
	if !m.cfg.Incoming || m.cfg.Machine.RunState() != RunInmigrate {
		return errNoIncoming
	}
	// TLS is not implemented: refuse, as QEMU does for credentials it has not got, rather
	// than accept a plaintext stream the user asked to be encrypted.
	if m.params.TLSCreds != "" {
		return errNoTLSCreds(m.params.TLSCreds)
	}
	if m.setupStuck {
		return errIncomingState(StatusSetup)
	}
	if err := addr.takeFD(fds, true); err != nil {
		return err
	}
	l, err := listen(addr)
	if err != nil {
		m.setupStuck = true
		m.emitMigration(m.caps["events"], "MIGRATION", map[string]any{"status": StatusSetup})
		return err
	}
	d := &incomingRun{m: m, l: l, addrs: l.addresses(), events: m.caps["events"], exitOnError: exitOnError,
		done: make(chan struct{})}
	m.incomingStarted = true
	m.dst = d
	d.setState(StatusSetup)
	go d.run()
	return nil
}

// IncomingDone returns a channel closed when the current incoming migration has ended, nil
// if none was started.
func (m *Migration) IncomingDone() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dst == nil {
		return nil
	}
	return m.dst.done
}

// Close ends what runs, before the machine closes: an incoming migration stops (without
// IncomingFailed) and an outgoing one is cancelled; it returns once both have ended.
func (m *Migration) Close() error {
	m.mu.Lock()
	m.closing = true
	d, src := m.dst, m.src
	m.mu.Unlock()
	if d != nil {
		d.l.Close()
		d.mu.Lock()
		if d.conn != nil {
			d.conn.Close()
		}
		d.mu.Unlock()
		<-d.done
	}
	if src != nil {
		src.requestCancel()
		<-src.done
	}
	return nil
}

// incomingRun is one incoming migration.
type incomingRun struct {
	m           *Migration
	l           listener
	events      bool
	exitOnError bool
	done        chan struct{}

	mu      sync.Mutex
	state   string
	errDesc string
	addrs   []SocketAddress
	conn    inConn
	dec     *Decoder
	// sourceStopped is the header's FlagSourceStopped: the guest stays paused once loaded.
	sourceStopped bool
}

func (d *incomingRun) setState(s string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state = s
	if s != StatusSetup && s != StatusActive {
		d.addrs = nil
	}
	d.m.emitMigration(d.events, "MIGRATION", map[string]any{"status": s})
}

// fill is fill_destination_migration_info.
func (d *incomingRun) fill(info *MigrationInfo) {
	d.mu.Lock()
	defer d.mu.Unlock()
	info.SocketAddress = d.addrs
	info.Status = d.state
	if d.state == StatusFailed {
		info.ErrorDesc = d.errDesc
	}
}

func (d *incomingRun) run() {
	defer close(d.done)
	err := d.receive()
	if err == nil {
		d.setState(StatusCompleted)
		return
	}
	m := d.m
	m.cfg.Logf("incoming migration failed: %v", err)
	d.mu.Lock()
	d.errDesc = err.Error()
	d.mu.Unlock()
	d.setState(StatusFailed)
	m.mu.Lock()
	closing := m.closing
	m.mu.Unlock()
	if closing {
		return
	}
	if d.exitOnError && m.cfg.IncomingFailed != nil {
		m.cfg.IncomingFailed(err)
		return
	}
	// Stay in inmigrate, never running the half-received guest, ready for another try.
	m.mu.Lock()
	m.incomingStarted = false
	m.mu.Unlock()
}

// receive loads one stream into the machine and runs the guest only once the stream is
// whole, the digest matches, the vCPU state is loaded and (with a return path) the source
// has committed.
func (d *incomingRun) receive() error {
	c, err := d.l.accept()
	if err != nil {
		return fmt.Errorf("waiting for the source: %w", err)
	}
	d.mu.Lock()
	d.conn = c
	d.mu.Unlock()
	d.setState(StatusActive)
	reply := c.replyTo()
	returnPath := false
	err = d.load(c, reply != nil, &returnPath)
	if err != nil {
		if returnPath {
			writeReply(reply, err)
			drain(c, c)
		} else {
			c.Close()
		}
		return err
	}
	if returnPath {
		if err := writeReply(reply, nil); err != nil {
			c.Close()
			return fmt.Errorf("acknowledging to the source: %w", err)
		}
		dec := d.dec
		if err := dec.ReadGo(); err != nil {
			c.Close()
			return fmt.Errorf("the source did not commit the migration: %w", err)
		}
	}
	c.Close()
	mach := d.m.cfg.Machine
	if auto := d.m.cfg.Autostart; !d.sourceStopped && (auto == nil || auto()) {
		if err := mach.Resume(); err != nil {
			return err
		}
	} else {
		mach.SetRunState(RunPaused)
	}
	return nil
}

func (d *incomingRun) load(c inConn, canReply bool, returnPath *bool) error {
	mach := d.m.cfg.Machine
	d.dec = NewDecoder(c)
	h, err := d.dec.ReadHeader()
	if err != nil {
		*returnPath = canReply // a source of another version may read why
		return err
	}
	*returnPath = canReply && h.Flags&FlagReturnPath != 0
	d.sourceStopped = h.Flags&FlagSourceStopped != 0
	if h.Flags&^(FlagReturnPath|FlagSourceStopped) != 0 {
		return streamErr("unknown header flags %#x", h.Flags)
	}
	mem := mach.Memory()
	want := MachineConfig{MemSize: uint64(len(mem)), CPUs: uint32(mach.NumCPUs()), PageSize: PageSize,
		Workloads: d.m.cfg.Workloads}
	if err := CheckConfig(h.Config, want); err != nil {
		return err
	}
	if *returnPath {
		if err := writeReply(c.replyTo(), nil); err != nil {
			return fmt.Errorf("accepting the stream: %w", err)
		}
	}
	// The page checksums of the digest are kept as pages arrive, while they are in cache, so
	// that checking the digest does not reread memory during the downtime.
	npages := len(mem) / PageSize
	sums := newPageSums(npages)
	seen := make([]bool, npages)
	var cpu []byte
	for {
		rec, err := d.dec.Next(mem)
		if err != nil {
			return err
		}
		switch rec.Kind {
		case KindPages, KindZeroPages:
			if rec.Kind == KindZeroPages {
				if err := mach.DiscardPages(int(rec.First), int(rec.Count)); err != nil {
					return err
				}
			}
			lo, hi := int(rec.First), int(rec.First)+int(rec.Count)
			if rec.Kind == KindZeroPages {
				sums.setRange(lo, hi, zeroPageSum)
			} else {
				for p := lo; p < hi; p++ {
					sums.set(p, PageSum(mem[p*PageSize:(p+1)*PageSize]))
				}
			}
			for p := lo; p < hi; p++ {
				seen[p] = true
			}
		case KindEndOfSection:
			sums.refresh() // between passes, so that the digest at the end has little to hash
		case KindCPU:
			cpu = append(cpu[:0], rec.CPU...)
		case KindTrailer:
			if cpu == nil {
				return streamErr("the stream ended without the vCPU state")
			}
			for p, ok := range seen {
				if !ok { // never sent: what this machine has must match too
					sums.set(p, PageSum(mem[p*PageSize:(p+1)*PageSize]))
				}
			}
			if sums.digest(uint64(len(mem))) != rec.Digest {
				return ErrDigestMismatch
			}
			if err := mach.LoadCPU(cpu); err != nil {
				return fmt.Errorf("loading the vCPU state: %w", err)
			}
			return nil
		}
	}
}
