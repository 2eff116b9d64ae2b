package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"

	"github.com/migvisor/migvisor/vmm/guest"
	"github.com/migvisor/migvisor/vmm/kvm"
	"golang.org/x/sys/unix"
)

// kvmBackend runs the vCPUs with KVM: guest memory in slot 0 with dirty logging, one dirty
// ring per vCPU when the machine has one, the vmm/guest programs in 32-bit protected mode.
type kvmBackend struct {
	m    *Machine
	sys  *kvm.System
	vm   *kvm.VM
	cpus []*kvmCPU
	bmap []uint64 // KVM_GET_DIRTY_LOG's buffer (no ring)
}

const memSlot = 0

func newKVMBackend(m *Machine) (_ *kvmBackend, err error) {
	b := &kvmBackend{m: m}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if b.sys, err = kvm.Open(); err != nil {
		return nil, err
	}
	if b.vm, err = b.sys.CreateVM(); err != nil {
		return nil, err
	}
	if n := m.cfg.DirtyRingSize; n > 0 {
		if err = b.vm.EnableDirtyRing(n); err != nil {
			var ke *kvm.Error
			if errors.As(err, &ke) {
				return nil, errRingEnable(ke.Errno.Error())
			}
			return nil, errRingEnable(err.Error())
		}
		if n < pvmRingAdvice && m.lay.flatOutWriter() && nestedPVM(pvmModule) {
			m.logf("KVM here is nested PVM, where a kicked vCPU can stay in guest mode for ~10 ms: one writing flat out can overrun a ring of %d entries (dirty-ring-size=%d avoids it)", n, pvmRingAdvice)
		}
	} else {
		b.bmap = make([]uint64, (m.pages+63)/64)
	}
	if err = b.vm.SetMemoryRegion(memSlot, 0, m.mem, true); err != nil {
		return nil, err
	}
	for i := 0; i < m.cfg.CPUs; i++ {
		v, err := b.vm.CreateVCPU(i)
		if err != nil {
			return nil, err
		}
		c := &kvmCPU{b: b, id: i, v: v}
		b.cpus = append(b.cpus, c)
		if err := c.start(); err != nil {
			return nil, fmt.Errorf("vmm: vCPU %d: %w", i, err)
		}
	}
	return b, nil
}

func (b *kvmBackend) runner(cpu int) runner { return b.cpus[cpu] }

func (b *kvmBackend) ring(cpu int) dirtyRing {
	if r := b.cpus[cpu].v.Ring(); r != nil {
		return kvmRing{r}
	}
	return nil
}

func (b *kvmBackend) resetRings() error {
	_, err := b.vm.ResetDirtyRings()
	return err
}

func (b *kvmBackend) syncBitmap(visit func(page uint64)) error {
	if err := b.vm.GetDirtyLog(memSlot, b.bmap); err != nil {
		return err
	}
	for i, w := range b.bmap {
		for w != 0 {
			bit := bits.TrailingZeros64(w)
			w &^= 1 << bit
			visit(uint64(i)*64 + uint64(bit))
		}
	}
	return nil
}

func (b *kvmBackend) close() error {
	var errs []error
	for _, c := range b.cpus {
		errs = append(errs, c.v.Close())
	}
	if b.vm != nil {
		errs = append(errs, b.vm.Close())
	}
	if b.sys != nil {
		errs = append(errs, b.sys.Close())
	}
	return errors.Join(errs...)
}

// On nested PVM (kvm-host-notes.md) a flat-out writer fills some 450 entries per ms and a
// kicked vCPU may leave guest mode only 6-10 ms later (measured), while KVM's ring-full exit
// comes late: a ring smaller than pvmRingAdvice can overrun.
const (
	pvmModule     = "/sys/module/kvm_pvm"
	pvmRingAdvice = 65536
)

// nestedPVM reports whether KVM is served by the PVM module (its sysfs directory exists).
func nestedPVM(module string) bool {
	_, err := os.Stat(module)
	return err == nil
}

// kvmRing adapts kvm.DirtyRing to the reaper: slot 0 maps guest physical 0 up, so a page's
// offset in the slot is its page number.
type kvmRing struct{ r *kvm.DirtyRing }

func (k kvmRing) harvest(visit func(page uint64)) (int, error) {
	return k.r.Harvest(func(_ uint32, off uint64) { visit(off) })
}

func (k kvmRing) handleFull(visit func(page uint64)) (int, error) {
	n, err := k.r.HandleFull(func(_ uint32, off uint64) { visit(off) })
	if errors.Is(err, kvm.ErrRingStuck) {
		err = fmt.Errorf("%w: %w", errRingStuck, err)
	}
	return n, err
}

// kvmCPU is one KVM vCPU.
type kvmCPU struct {
	b     *kvmBackend
	id    int
	v     *kvm.VCPU
	tid   int    // set by init, before any kick can name it
	ticks uint64 // the workload's pacing in this host's TSC ticks per page
}

// start loads the vCPU's program and record and points the vCPU at its entry.
func (c *kvmCPU) start() error {
	m, lay := c.b.m, c.b.m.lay
	code, err := guest.Program(lay.guestParams(c.id))
	if err != nil {
		return err
	}
	copy(m.mem[lay.codeAddr(c.id):lay.codeAddr(c.id)+guest.CodeStride], code)
	if rate := lay.work[c.id].Rate; rate > 0 {
		khz, err := c.v.TSCKHz()
		if err != nil {
			return err
		}
		c.ticks = guest.TicksPerPage(rate, khz*1000)
	}
	guest.InitRecord(m.mem, lay.records[c.id], c.ticks)
	return kvm.SetupProtectedMode(c.v, uint32(lay.codeAddr(c.id)), 0)
}

func (c *kvmCPU) init() error {
	c.tid = unix.Gettid()
	return nil
}

func (c *kvmCPU) kick() {
	// tid is written before the thread reports ready, and New returns after that.
	c.v.Kick(c.tid)
}

func (c *kvmCPU) run() (exit, error) {
	err := c.v.Run()
	if errors.Is(err, unix.EINTR) {
		c.v.SetImmediateExit(false)
		return exitKicked, nil
	}
	if err != nil {
		return 0, err
	}
	switch r := c.v.ExitReason(); r {
	case kvm.ExitHLT:
		return exitHalt, nil
	case kvm.ExitDirtyRingFull:
		return exitRingFull, nil
	case kvm.ExitIntr:
		return exitKicked, nil
	default:
		return 0, fmt.Errorf("unexpected exit %s", c.v.ExitDetail())
	}
}

// kvmState is what SaveCPU keeps of a KVM vCPU.
type kvmState struct {
	Regs  kvm.Regs
	Sregs kvm.Sregs
}

func (c *kvmCPU) save() ([]byte, error) {
	var s kvmState
	var err error
	if s.Regs, err = c.v.Regs(); err != nil {
		return nil, err
	}
	if s.Sregs, err = c.v.Sregs(); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, &s); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (c *kvmCPU) load(b []byte) error {
	// The record came with the memory, paced for the source's TSC.
	guest.SetTicksPerPage(c.b.m.mem, c.b.m.lay.records[c.id], c.ticks)
	if b == nil { // state from another accelerator: restart the program where it is loaded
		return kvm.SetupProtectedMode(c.v, uint32(c.b.m.lay.codeAddr(c.id)), 0)
	}
	var s kvmState
	if len(b) != binary.Size(&s) {
		return errCPUState("KVM vCPU %d: %d bytes, want %d", c.id, len(b), binary.Size(&s))
	}
	if err := binary.Read(bytes.NewReader(b), binary.LittleEndian, &s); err != nil {
		return err
	}
	if err := c.v.SetSregs(s.Sregs); err != nil {
		return err
	}
	return c.v.SetRegs(s.Regs)
}
