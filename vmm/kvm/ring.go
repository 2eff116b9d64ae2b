package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// DirtyRing is one vCPU's dirty ring: kvm_dirty_gfn entries the kernel fills
// as the guest writes pages, which user space collects in order.
type DirtyRing struct {
	vm      *VM
	mem     []byte
	entries []dirtyGFN // overlays mem: shared with the kernel
	mask    uint32
	fetch   uint32        // next entry to harvest (free-running)
	pending atomic.Uint32 // entries harvested since the last ResetDirtyRings
}

func newDirtyRing(vm *VM, mem []byte) *DirtyRing {
	n := len(mem) / DirtyGFNSize
	return &DirtyRing{
		vm:      vm,
		mem:     mem,
		entries: unsafe.Slice((*dirtyGFN)(unsafe.Pointer(&mem[0])), n),
		mask:    uint32(n - 1),
	}
}

// Size is the ring's number of entries.
func (r *DirtyRing) Size() int { return len(r.entries) }

// Harvest collects the dirty entries from the fetch index on: for each one it
// calls fn with the slot and the page offset within the slot, marks the entry
// collected and moves on, stopping at the first entry the kernel has not
// published (or after one lap of the ring). It returns how many entries it
// passed to fn.
//
// It returns an error wrapping ErrRingInconsistent when an entry names an
// unknown slot or a page past its slot (such an entry is skipped), or when more
// entries are dirty than the ring can hold between two resets. Dirty pages may
// then have been lost, and the caller must treat all of guest memory as dirty.
// Every entry is collected either way, so the ring keeps flowing.
//
// One goroutine at a time per ring; serialise with VM.ResetDirtyRings, which
// the caller issues before reading the pages' contents.
func (r *DirtyRing) Harvest(fn func(slot uint32, offset uint64)) (int, error) {
	slots := r.vm.slots.Load()
	size := uint32(len(r.entries))
	n := 0
	var bad error
	for walked := uint32(0); walked < size; walked++ {
		e := &r.entries[r.fetch&r.mask]
		// Acquire: the slot and offset are valid once DIRTY is seen.
		if atomic.LoadUint32(&e.Flags) != dirtyGFNDirty {
			break
		}
		slot, off := e.Slot, e.Offset
		var pages uint64
		ok := false
		if slots != nil {
			pages, ok = (*slots)[slot]
		}
		switch {
		case !ok || off >= pages:
			if bad == nil {
				bad = fmt.Errorf("%w: entry %d names slot %d page %d, outside the slots set",
					ErrRingInconsistent, r.fetch, slot, off)
			}
		default:
			if r.pending.Load() >= size && bad == nil {
				bad = fmt.Errorf("%w: more than %d dirty entries since the last reset", ErrRingInconsistent, size)
			}
			fn(slot, off)
			n++
		}
		// Release: the kernel may recycle the entry once it sees RESET.
		atomic.StoreUint32(&e.Flags, dirtyGFNReset)
		r.fetch++
		r.pending.Add(1)
	}
	return n, bad
}
