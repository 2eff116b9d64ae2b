package kvm

import (
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"
)

// DirtyRing is one vCPU's dirty ring: kvm_dirty_gfn entries the kernel fills
// as the guest writes pages, which user space collects in order.
type DirtyRing struct {
	mu      sync.Mutex // serialises Harvest, Recover and VM.ResetDirtyRings
	vm      *VM
	mem     []byte
	entries []dirtyGFN // overlays mem: shared with the kernel
	mask    uint32
	fetch   uint32        // next entry to harvest (free-running)
	atFull  uint32        // fetch after the last HandleFull
	pending atomic.Uint32 // entries harvested since the last ResetDirtyRings
}

func newDirtyRing(vm *VM, mem []byte) *DirtyRing {
	n := len(mem) / DirtyGFNSize
	return &DirtyRing{
		vm:      vm,
		mem:     mem,
		entries: unsafe.Slice((*dirtyGFN)(unsafe.Pointer(&mem[0])), n),
		mask:    uint32(n - 1),
		atFull:  ^uint32(0), // no HandleFull yet
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
// Harvest may run on any goroutine while the vCPU runs; calls on one ring
// serialise with each other, with Recover and with VM.ResetDirtyRings, which
// the caller issues before reading the pages' contents. fn must not call back
// into the ring or its VM.
func (r *DirtyRing) Harvest(fn func(slot uint32, offset uint64)) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.harvest(fn)
}

func (r *DirtyRing) harvest(fn func(slot uint32, offset uint64)) (int, error) {
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

// Recover unsticks a ring that the kernel keeps reporting full
// (ExitDirtyRingFull) while Harvest finds nothing at the fetch index. Some
// hosts (nested PVM) under sustained load leave an entry without its DIRTY
// flag, its slot and offset written, and go on filling the entries after it;
// the in-order walk stops at that entry for good and the vCPU makes no more
// progress. Recover walks one lap from the fetch index up to the last DIRTY
// entry and collects everything on the way: it passes fn the DIRTY entries
// and the unflagged ones whose slot and offset are plausible (likely real
// dirty pages), and marks all of them collected so that VM.ResetDirtyRings
// moves the kernel past them. It returns the number of entries passed to fn,
// and an error wrapping ErrRingInconsistent when it skipped any unflagged
// entry: dirty pages may have been lost, so the caller must treat all of guest
// memory as dirty.
//
// Call it only while the vCPU is outside KVM_RUN, when nothing is writing the
// ring, and only when the ring is known stuck: HandleFull decides that.
func (r *DirtyRing) Recover(fn func(slot uint32, offset uint64)) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.recover(fn)
}

// HandleFull is what the vCPU's thread does after an ExitDirtyRingFull,
// before VM.ResetDirtyRings and the next Run: it harvests, and when nothing at
// all was collected since the previous ring-full exit (by it or by a reaper),
// the kernel reported the ring full without publishing anything new, so the
// ring is stuck and it Recovers. Its results are Harvest's or Recover's.
func (r *DirtyRing) HandleFull(fn func(slot uint32, offset uint64)) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n, err := r.harvest(fn)
	if n == 0 && err == nil && r.fetch == r.atFull {
		n, err = r.recover(fn)
	}
	r.atFull = r.fetch
	return n, err
}

func (r *DirtyRing) recover(fn func(slot uint32, offset uint64)) (int, error) {
	slots := r.vm.slots.Load()
	size := uint32(len(r.entries))
	last := -1
	for i := uint32(0); i < size; i++ {
		if atomic.LoadUint32(&r.entries[(r.fetch+i)&r.mask].Flags) == dirtyGFNDirty {
			last = int(i)
		}
	}
	if last < 0 {
		return 0, fmt.Errorf("%w: %w", ErrRingInconsistent, ErrRingStuck)
	}
	n, skipped := 0, 0
	for i := 0; i <= last; i++ {
		e := &r.entries[r.fetch&r.mask]
		if atomic.LoadUint32(&e.Flags) != dirtyGFNDirty {
			skipped++
		}
		if slots != nil {
			if pages, ok := (*slots)[e.Slot]; ok && e.Offset < pages {
				fn(e.Slot, e.Offset)
				n++
			}
		}
		atomic.StoreUint32(&e.Flags, dirtyGFNReset)
		r.fetch++
		r.pending.Add(1)
	}
	if skipped > 0 {
		return n, fmt.Errorf("%w: %d entries without their dirty flag before %d dirty ones",
			ErrRingInconsistent, skipped, last+1-skipped)
	}
	return n, nil
}
