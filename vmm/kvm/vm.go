package kvm

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PageSize is the guest page size the dirty log and ring count in.
const PageSize = 4096

// VM is a KVM virtual machine.
type VM struct {
	sys *System
	fd  int

	mu        sync.Mutex
	ringBytes int // 0: no dirty ring
	vcpus     []*VCPU
	slots     atomic.Pointer[map[uint32]uint64] // slot -> pages, for ring sanity checks
}

// EnableDirtyRing gives every vCPU created afterwards a dirty ring of entries
// entries (a power of two, at most CheckExtension's limit / 16, and more than
// the kernel reserves: 256 is the least accepted here, larger with Intel PML on
// bare metal; the kernel answers EINVAL otherwise). It must be
// called before the first CreateVCPU and at most once. It uses
// KVM_CAP_DIRTY_LOG_RING_ACQ_REL when the host has it, else
// KVM_CAP_DIRTY_LOG_RING.
func (vm *VM) EnableDirtyRing(entries int) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if len(vm.vcpus) > 0 {
		return fmt.Errorf("kvm: EnableDirtyRing after CreateVCPU")
	}
	if vm.ringBytes != 0 {
		return fmt.Errorf("kvm: dirty ring already enabled")
	}
	if entries <= 0 || entries&(entries-1) != 0 {
		return fmt.Errorf("kvm: dirty ring size %d is not a power of two", entries)
	}
	c := CapDirtyLogRingAcqRel
	limit, err := vm.checkExtension(c)
	if err != nil {
		return err
	}
	if limit == 0 {
		c = CapDirtyLogRing
		if limit, err = vm.checkExtension(c); err != nil {
			return err
		}
	}
	if limit == 0 {
		return opError("KVM_ENABLE_CAP(DIRTY_LOG_RING)", unix.ENOTSUP)
	}
	bytes := entries * DirtyGFNSize
	if bytes > limit {
		return fmt.Errorf("kvm: dirty ring of %d entries (%d bytes) exceeds the host's %d bytes: %w",
			entries, bytes, limit, unix.EINVAL)
	}
	ec := enableCap{Cap: uint32(c), Args: [4]uint64{uint64(bytes)}}
	if _, err := ioctlPtr(vm.fd, ioctlEnableCap, unsafe.Pointer(&ec), "KVM_ENABLE_CAP"); err != nil {
		return err
	}
	vm.ringBytes = bytes
	return nil
}

// checkExtension asks the VM (KVM_CAP_CHECK_EXTENSION_VM), whose answers may
// differ from the system's for per-VM capabilities like the ring.
func (vm *VM) checkExtension(c Cap) (int, error) {
	r, err := ioctl(vm.fd, ioctlCheckExtension, uintptr(c), "KVM_CHECK_EXTENSION")
	return int(r), err
}

// CheckExtension is KVM_CHECK_EXTENSION on the VM.
func (vm *VM) CheckExtension(c Cap) (int, error) { return vm.checkExtension(c) }

// RingEntries is the dirty ring size in entries, 0 without a ring.
func (vm *VM) RingEntries() int {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.ringBytes / DirtyGFNSize
}

// SetMemoryRegion maps mem at guest physical address guestPhys as slot slot.
// mem must stay mapped for the VM's life and should come from unix.Mmap (not
// the Go heap). logDirty enables dirty tracking for the slot
// (KVM_MEM_LOG_DIRTY_PAGES); the dirty ring only reports slots that have it.
// An empty mem deletes the slot.
func (vm *VM) SetMemoryRegion(slot uint32, guestPhys uint64, mem []byte, logDirty bool) error {
	r := userspaceMemoryRegion{Slot: slot, GuestPhysAddr: guestPhys, MemorySize: uint64(len(mem))}
	if len(mem) > 0 {
		r.UserspaceAddr = uint64(uintptr(unsafe.Pointer(&mem[0])))
	}
	if logDirty {
		r.Flags |= memLogDirtyPages
	}
	if _, err := ioctlPtr(vm.fd, ioctlSetUserMemoryRegion, unsafe.Pointer(&r), "KVM_SET_USER_MEMORY_REGION"); err != nil {
		return err
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	slots := map[uint32]uint64{}
	if old := vm.slots.Load(); old != nil {
		for k, v := range *old {
			slots[k] = v
		}
	}
	if len(mem) == 0 {
		delete(slots, slot)
	} else {
		slots[slot] = uint64(len(mem)) / PageSize
	}
	vm.slots.Store(&slots)
	return nil
}

// GetDirtyLog copies slot's dirty bitmap (one bit per page, bit i of word i/64
// for page i) into bitmap and clears it in the kernel (KVM_GET_DIRTY_LOG). The
// slot must have been set with logDirty and the VM must have no dirty ring.
// bitmap must hold at least one bit per page of the slot.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if p := vm.slots.Load(); p != nil {
		if pages, ok := (*p)[slot]; ok && uint64(len(bitmap))*64 < pages {
			return fmt.Errorf("kvm: dirty bitmap of %d bits for slot %d of %d pages: %w",
				len(bitmap)*64, slot, pages, unix.EINVAL)
		}
	}
	if len(bitmap) == 0 {
		return opError("KVM_GET_DIRTY_LOG", unix.EINVAL)
	}
	l := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, err := ioctlPtr(vm.fd, ioctlGetDirtyLog, unsafe.Pointer(&l), "KVM_GET_DIRTY_LOG")
	runtime.KeepAlive(bitmap)
	return err
}

// ResetDirtyRings tells KVM that every ring entry marked by Harvest has been
// collected, so it re-protects those pages and may reuse the entries. It
// returns how many entries were reset. Call it after Harvest and before reading
// the harvested pages' contents.
//
// It holds every ring's lock across the ioctl, so no Harvest marks entries
// the reset might or might not cover.
func (vm *VM) ResetDirtyRings() (int, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for _, c := range vm.vcpus {
		if c.ring != nil {
			c.ring.mu.Lock()
		}
	}
	// One deferred call, not one a vCPU: a defer in a loop is allocated, and resets come
	// thousands of times a second.
	defer func() {
		for _, c := range vm.vcpus {
			if c.ring != nil {
				c.ring.mu.Unlock()
			}
		}
	}()
	n, err := ioctl(vm.fd, ioctlResetDirtyRings, 0, "KVM_RESET_DIRTY_RINGS")
	if err != nil {
		return 0, err
	}
	for _, c := range vm.vcpus {
		if c.ring != nil {
			c.ring.pending.Store(0)
		}
	}
	return int(n), nil
}

// CreateVCPU creates vCPU id and maps its kvm_run page (and dirty ring).
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	fd, err := ioctl(vm.fd, ioctlCreateVCPU, uintptr(id), "KVM_CREATE_VCPU")
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(int(fd))
	c := &VCPU{vm: vm, id: id, fd: int(fd)}
	c.runMem, err = unix.Mmap(c.fd, 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		c.Close()
		return nil, wrapOp("mmap kvm_run", err)
	}
	c.run = (*runHeader)(unsafe.Pointer(&c.runMem[0]))
	if vm.ringBytes > 0 {
		// The ring must be MAP_SHARED: the kernel writes entries, we write flags.
		mem, err := unix.Mmap(c.fd, dirtyLogPageOffset*int64(unix.Getpagesize()), vm.ringBytes,
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			c.Close()
			return nil, wrapOp("mmap dirty ring", err)
		}
		c.ring = newDirtyRing(vm, mem)
	}
	vm.vcpus = append(vm.vcpus, c)
	return c, nil
}

// Close closes the VM. Its vCPUs should be closed first (Close closes any that
// are still open).
func (vm *VM) Close() error {
	vm.mu.Lock()
	vcpus := vm.vcpus
	vm.vcpus = nil
	vm.mu.Unlock()
	for _, c := range vcpus {
		c.Close()
	}
	if vm.fd < 0 {
		return nil
	}
	err := unix.Close(vm.fd)
	vm.fd = -1
	return err
}

func (vm *VM) forget(c *VCPU) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for i, v := range vm.vcpus {
		if v == c {
			vm.vcpus = append(vm.vcpus[:i], vm.vcpus[i+1:]...)
			return
		}
	}
}
