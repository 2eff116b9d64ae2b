package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KickSignal is the signal Kick sends to a vCPU thread. It is SIGURG, which the
// Go runtime already handles (it uses it for preemption) and tolerates at any
// time, so migvisor reserves no signal. Any signal delivered to the thread makes
// KVM_RUN return EINTR, even with the runtime's SA_RESTART handlers.
const KickSignal = unix.SIGURG

// VCPU is one virtual CPU. Run, and everything that reads or sets registers,
// belongs to the vCPU's own (locked) OS thread; Kick, SetImmediateExit and
// Ring may be used from any goroutine.
type VCPU struct {
	vm     *VM
	id     int
	fd     int
	runMem []byte
	run    *runHeader // overlays runMem: shared with the kernel
	ring   *DirtyRing
}

// ID is the vCPU id given to CreateVCPU.
func (c *VCPU) ID() int { return c.id }

// Run enters the guest (KVM_RUN) until the next exit to user space. A kick or
// any other signal makes it return an error matching unix.EINTR (ExitReason is
// then ExitIntr or stale and means nothing).
func (c *VCPU) Run() error {
	_, err := ioctl(c.fd, ioctlRun, 0, "KVM_RUN")
	return err
}

// ExitReason is why the last Run returned.
func (c *VCPU) ExitReason() ExitReason {
	return ExitReason(atomic.LoadUint32(&c.run.ExitReason))
}

// immediateExitWord is the aligned 32-bit word holding request_interrupt_window
// (byte 0) and immediate_exit (byte 1). Only user space writes these bytes, so
// updating immediate_exit with 32-bit atomic and/or is exact and never tears
// the byte the kernel reads.
func (c *VCPU) immediateExitWord() *uint32 {
	return (*uint32)(unsafe.Pointer(&c.run.RequestInterruptWindow))
}

// SetImmediateExit sets kvm_run.immediate_exit: while set, KVM_RUN returns
// EINTR at once without entering the guest.
func (c *VCPU) SetImmediateExit(on bool) {
	if on {
		atomic.OrUint32(c.immediateExitWord(), 1<<8)
	} else {
		atomic.AndUint32(c.immediateExitWord(), ^uint32(0xff00))
	}
}

// Kick makes the vCPU running on OS thread tid leave KVM_RUN soon: it sets
// immediate_exit (so a thread about to enter does not) and sends KickSignal to
// the thread (so one already inside leaves). The vCPU thread clears
// immediate_exit with SetImmediateExit(false) before it handles the reason it
// was kicked. A tid of 0 only sets immediate_exit.
func (c *VCPU) Kick(tid int) error {
	c.SetImmediateExit(true)
	if tid == 0 {
		return nil
	}
	if err := unix.Tgkill(unix.Getpid(), tid, KickSignal); err != nil {
		return wrapOp("tgkill", err)
	}
	return nil
}

// IO describes a port I/O exit (ExitIO). Data is the bytes the guest wrote
// (Out) or the buffer to fill (In): Size*Count bytes inside the kvm_run page,
// valid until the next Run.
type IO struct {
	Direction uint8 // IOIn or IOOut
	Size      uint8 // 1, 2 or 4
	Port      uint16
	Count     uint32
	Data      []byte
}

// IO returns the details of the last exit, which must be ExitIO.
func (c *VCPU) IO() (IO, error) {
	if r := c.ExitReason(); r != ExitIO {
		return IO{}, fmt.Errorf("kvm: IO() after a %v exit", r)
	}
	io := (*runIO)(unsafe.Pointer(&c.run.Exit[0]))
	n := uint64(io.Size) * uint64(io.Count)
	if io.DataOffset+n > uint64(len(c.runMem)) {
		return IO{}, fmt.Errorf("kvm: IO data at %d+%d outside kvm_run (%d bytes)", io.DataOffset, n, len(c.runMem))
	}
	return IO{
		Direction: io.Direction, Size: io.Size, Port: io.Port, Count: io.Count,
		Data: c.runMem[io.DataOffset : io.DataOffset+n],
	}, nil
}

// ExitDetail describes the last exit for logs and errors: the reason and, for
// FAIL_ENTRY and INTERNAL_ERROR, the codes KVM gave.
func (c *VCPU) ExitDetail() string {
	r := c.ExitReason()
	switch r {
	case ExitFailEntry:
		f := (*runFailEntry)(unsafe.Pointer(&c.run.Exit[0]))
		return fmt.Sprintf("%v: hardware entry failure reason %#x on cpu %d", r, f.HardwareEntryFailureReason, f.CPU)
	case ExitInternalError:
		in := (*runInternal)(unsafe.Pointer(&c.run.Exit[0]))
		return fmt.Sprintf("%v: suberror %d", r, in.Suberror)
	}
	return r.String()
}

// Regs reads the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	_, err := ioctlPtr(c.fd, ioctlGetRegs, unsafe.Pointer(&r), "KVM_GET_REGS")
	return r, err
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	_, err := ioctlPtr(c.fd, ioctlSetRegs, unsafe.Pointer(&r), "KVM_SET_REGS")
	return err
}

// Sregs reads the special registers (segments, control registers).
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	_, err := ioctlPtr(c.fd, ioctlGetSregs, unsafe.Pointer(&s), "KVM_GET_SREGS")
	return s, err
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error {
	_, err := ioctlPtr(c.fd, ioctlSetSregs, unsafe.Pointer(&s), "KVM_SET_SREGS")
	return err
}

// TSCKHz is the guest's TSC frequency in kHz (KVM_GET_TSC_KHZ): what the
// guest's rdtsc counts in.
func (c *VCPU) TSCKHz() (uint64, error) {
	r, err := ioctl(c.fd, ioctlGetTSCKHz, 0, "KVM_GET_TSC_KHZ")
	return uint64(r), err
}

// Ring is the vCPU's dirty ring, nil when the VM has none.
func (c *VCPU) Ring() *DirtyRing { return c.ring }

// Close unmaps the vCPU's shared pages and closes it. The vCPU must not be in
// Run, and its Ring must not be in use.
func (c *VCPU) Close() error {
	c.vm.forget(c)
	if c.ring != nil {
		unix.Munmap(c.ring.mem)
		c.ring = nil
	}
	if c.runMem != nil {
		unix.Munmap(c.runMem)
		c.runMem, c.run = nil, nil
	}
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}
