package vmm

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync/atomic"
	"time"

	"github.com/migvisor/migvisor/vmm/guest"
	"golang.org/x/sys/unix"
)

// softBackend runs the workloads as Go code on the vCPU threads. Its dirty tracking follows
// the kernel's: a page is logged once, into the ring of the vCPU that dirtied it, and is not
// logged again until a reset that follows its harvest re-arms it.
type softBackend struct {
	m      *Machine
	logged []atomic.Uint64 // one bit per page: logged since the last reset (the bitmap without a ring)
	cpus   []*softCPU
}

func newSoftBackend(m *Machine) (*softBackend, error) {
	b := &softBackend{m: m, logged: make([]atomic.Uint64, (m.pages+63)/64)}
	for i := 0; i < m.cfg.CPUs; i++ {
		// The guest program and its record go in as for KVM, so that memory images are alike
		// and either accelerator can continue from the other's.
		code, err := guest.Program(m.lay.guestParams(i))
		if err != nil {
			return nil, err
		}
		copy(m.mem[m.lay.codeAddr(i):m.lay.codeAddr(i)+guest.CodeStride], code)
		guest.InitRecord(m.mem, m.lay.records[i], 0)
		c := &softCPU{b: b, id: i, w: m.lay.work[i], reg: m.lay.regions[i], rec: m.lay.records[i]}
		if n := m.cfg.DirtyRingSize; n > 0 {
			c.ring = &softRing{b: b, entries: make([]uint64, n), mask: uint64(n - 1)}
		}
		b.cpus = append(b.cpus, c)
	}
	return b, nil
}

func (b *softBackend) runner(cpu int) runner { return b.cpus[cpu] }

func (b *softBackend) ring(cpu int) dirtyRing {
	if r := b.cpus[cpu].ring; r != nil {
		return r
	}
	return nil
}

func (b *softBackend) resetRings() error {
	for _, c := range b.cpus {
		c.ring.reset()
	}
	return nil
}

func (b *softBackend) syncBitmap(visit func(page uint64)) error {
	for i := range b.logged {
		w := b.logged[i].Swap(0)
		for w != 0 {
			bit := uint64(bits.TrailingZeros64(w))
			w &^= 1 << bit
			visit(uint64(i)*64 + bit)
		}
	}
	return nil
}

func (b *softBackend) close() error { return nil }

// markDirty logs page for c after c has written it (c's ring has room: run checks before each
// page, and a page costs at most two entries). The write comes first and the test-and-set
// is a locked instruction, so a harvester that re-arms the page after this point reads the
// new contents, and one that re-armed it before sees it logged again.
func (b *softBackend) markDirty(c *softCPU, page uint64) {
	bit := uint64(1) << (page % 64)
	if b.logged[page/64].Or(bit)&bit != 0 || c.ring == nil {
		return
	}
	c.ring.push(page)
}

// softRing is the kernel ring's software twin: the vCPU pushes at dirty, the reaper harvests
// up to dirty and the reset re-arms up to the harvest point.
type softRing struct {
	b       *softBackend
	entries []uint64
	mask    uint64
	dirty   atomic.Uint64 // next entry to fill (the vCPU's)
	fetch   uint64        // next entry to harvest (the reaper's)
	resetAt atomic.Uint64 // first entry not yet re-armed
}

// softRingReserve is what the kernel keeps free at the end of a ring (KVM_DIRTY_RING_RSVD_ENTRIES):
// the vCPU stops once the ring holds size minus this many entries.
const softRingReserve = 64

func (r *softRing) full() bool {
	return r.dirty.Load()-r.resetAt.Load() >= uint64(len(r.entries)-softRingReserve)
}

func (r *softRing) push(page uint64) {
	d := r.dirty.Load()
	r.entries[d&r.mask] = page
	r.dirty.Store(d + 1)
}

func (r *softRing) harvest(visit func(page uint64)) (int, error) {
	d := r.dirty.Load()
	if d-r.resetAt.Load() > uint64(len(r.entries)) {
		return 0, fmt.Errorf("soft dirty ring: %d entries since the last reset in a ring of %d", d-r.resetAt.Load(), len(r.entries))
	}
	n := int(d - r.fetch)
	for ; r.fetch < d; r.fetch++ {
		visit(r.entries[r.fetch&r.mask])
	}
	return n, nil
}

// handleFull is harvest: the soft ring never gets stuck.
func (r *softRing) handleFull(visit func(page uint64)) (int, error) { return r.harvest(visit) }

func (r *softRing) reset() {
	if r == nil {
		return
	}
	for i := r.resetAt.Load(); i < r.fetch; i++ {
		p := r.entries[i&r.mask]
		r.b.logged[p/64].And(^(uint64(1) << (p % 64)))
	}
	r.resetAt.Store(r.fetch)
}

// softCPU runs one vCPU's workload in Go.
type softCPU struct {
	b      *softBackend
	id     int
	w      Workload
	reg    region
	rec    uint64 // guest address of the vCPU's workload record
	ring   *softRing
	kicked atomic.Bool

	// The workload's position, owned by the vCPU thread (and by save/load while parked).
	started          bool // the record's header is written
	pos, pass, pages uint64
	next             time.Time // pacing: when the next page is due
	sum              byte      // what read mode reads, kept so the reads are not optimised away
}

func (c *softCPU) init() error { return nil }

func (c *softCPU) kick() { c.kicked.Store(true) }

// Pacing slack: a vCPU that falls behind its rate (paused, throttled) catches up by at most
// this much, and it sleeps at most softMaxSleep at a time so kicks are seen promptly.
const (
	softMaxBurst = 10 * time.Millisecond
	softMaxSleep = time.Millisecond
)

func (c *softCPU) run() (exit, error) {
	recPage := c.rec / PageSize
	if !c.started {
		// As a guest program does first: the record's header (which dirties its page).
		if c.ring != nil && c.ring.full() {
			return exitRingFull, nil
		}
		c.started = true
		c.writeRecordHeader()
		c.b.markDirty(c, recPage)
	}
	if c.w.mode() == ModeIdle || c.reg.size == 0 {
		return exitHalt, nil
	}
	mem := c.b.m.mem
	npages := c.reg.size / PageSize
	first := c.reg.start / PageSize
	var perPage time.Duration
	if c.w.Rate > 0 {
		perPage = time.Duration(float64(time.Second) * PageSize / float64(c.w.Rate))
	}
	write := c.w.mode() == ModeWrite
	nbytes := uint64(max(c.w.BytesPerPage, 1))
	for {
		if c.kicked.Load() {
			c.kicked.Store(false)
			return exitKicked, nil
		}
		if c.ring != nil && c.ring.full() {
			return exitRingFull, nil
		}
		if perPage > 0 {
			now := time.Now()
			if c.next.Before(now.Add(-softMaxBurst)) {
				c.next = now.Add(-softMaxBurst)
			}
			if wait := c.next.Sub(now); wait > 0 {
				ts := unix.NsecToTimespec(int64(min(wait, softMaxSleep)))
				unix.Nanosleep(&ts, nil)
				continue
			}
			c.next = c.next.Add(perPage)
		}
		page := first + c.pos
		p := mem[page*PageSize : page*PageSize+nbytes]
		if write {
			// What the guest programs store: passes+1 in every dword.
			v := uint32(c.pass + 1)
			for i := 0; i < len(p); i += 4 {
				binary.LittleEndian.PutUint32(p[i:], v)
			}
			c.b.markDirty(c, page)
		} else {
			for _, v := range p {
				c.sum += v
			}
		}
		c.pos++
		c.pages++
		if c.pos == npages {
			c.pos = 0
			c.pass++
		}
		c.writeRecord(c.pages, c.pass)
		c.b.markDirty(c, recPage)
	}
}

// save and load carry the workload's position, which the soft backend keeps in Go.
func (c *softCPU) save() ([]byte, error) {
	b := binary.LittleEndian.AppendUint64(nil, c.pos)
	b = binary.LittleEndian.AppendUint64(b, c.pass)
	return binary.LittleEndian.AppendUint64(b, c.pages), nil
}

func (c *softCPU) load(b []byte) error {
	npages := c.reg.size / PageSize
	switch {
	case b == nil: // saved by KVM: go on from the progress in the record
		rec := guest.ReadRecord(c.b.m.mem, c.rec)
		c.pages, c.pass, c.pos = rec.Pages, rec.Passes, 0
		if npages > 0 && rec.Pages >= rec.Passes*npages {
			c.pos = min(rec.Pages-rec.Passes*npages, npages-1)
		}
	case len(b) == 24:
		c.pos, c.pass, c.pages = binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:])
		if npages > 0 && c.pos >= npages {
			return errCPUState("soft vCPU %d: position %d past its region of %d pages", c.id, c.pos, npages)
		}
	default:
		return errCPUState("soft vCPU %d: %d bytes", c.id, len(b))
	}
	c.writeRecord(c.pages, c.pass)
	c.started = false // write the header again, as a KVM vCPU restarting its program would
	return nil
}
