// Package kvm is migvisor's thin, safe-to-call wrapper over the Linux KVM API
// on x86-64. It is the only package in migvisor that issues KVM ioctls or
// touches memory shared with the kernel (the vCPU's kvm_run page and its dirty
// ring), so every unsafe pointer and every C layout lives here.
//
// vCPU ioctls (Regs, Sregs, TSCKHz...) wait while the vCPU is in Run: issue
// them on the vCPU's thread or while it is stopped.
//
// Typical use:
//
//	sys, err := kvm.Open()                  // or kvm.Available() to decide on a fallback
//	vm, err := sys.CreateVM()
//	err = vm.EnableDirtyRing(4096)          // optional, before any vCPU
//	err = vm.SetMemoryRegion(0, 0, mem, true) // mem from unix.Mmap, not the Go heap
//	vcpu, err := vm.CreateVCPU(0)
//	err = kvm.SetupProtectedMode(vcpu, entry, stack)
//	for { err = vcpu.Run(); switch vcpu.ExitReason() { ... } }
//
// # Threads and kicks
//
// A vCPU runs on the OS thread that calls Run, so its goroutine must hold
// runtime.LockOSThread and publish unix.Gettid(). Kick(tid) makes that thread
// leave KVM_RUN: it sets kvm_run.immediate_exit (covers a thread that is just
// about to enter KVM_RUN) and sends KickSignal (SIGURG) with tgkill (covers a
// thread already inside). Run then returns an error that matches unix.EINTR.
// SIGURG is the signal the Go runtime itself uses for goroutine preemption:
// its handler is always installed and a stray one is harmless, so no signal
// needs reserving. The vCPU loop must call SetImmediateExit(false) after an
// EINTR, before it looks at why it was kicked; the kicker publishes its reason
// before calling Kick. Run may also return EINTR for signals nobody asked for
// (the runtime sends SIGURG on its own), so a loop treats EINTR as "check your
// requests and run again".
//
// # Dirty ring
//
// With EnableDirtyRing, every vCPU gets a ring of kvm_dirty_gfn entries
// (VCPU.Ring). Collecting it is DirtyRing.Harvest, then VM.ResetDirtyRings,
// and only then reading the contents of the harvested pages. Harvest, Recover,
// HandleFull and ResetDirtyRings serialise on each ring's lock, so several
// goroutines may collect.
//
// Where to collect: on nested PVM, harvesting and resetting from another
// goroutine while the vCPU is inside KVM_RUN (QEMU's reaper thread design)
// makes the host lose ring writes within seconds of sustained dirtying: entries
// left without their DIRTY flag, ring-full exits, rings that stay full. Doing
// both on the vCPU's own thread between runs, kicked every 500 µs, has been
// clean there (no ring-full exit, about 2 million entries/s for one vCPU):
// TestRingUnderLoadNeverFailsSilently measures both. ResetDirtyRings is
// VM-wide, so with several vCPUs one thread's reset still meets the others in
// KVM_RUN; expect some recoveries then.
//
// The ring's soft-full exit (ExitDirtyRingFull) is not reliable on every host
// (see the host notes): collect often enough that the ring never fills. On a
// ring-full exit the vCPU thread calls DirtyRing.HandleFull, then
// VM.ResetDirtyRings, and runs again. HandleFull notices a stuck ring (an entry
// left unflagged stops the in-order walk for good) and moves it on, reporting
// ErrRingInconsistent: treat all of guest memory as dirty then. ErrRingStuck
// means it could not: the vCPU cannot go on with this ring.
//
// On hosts that emulate the guest's 32-bit code (nested PVM), every emulated
// store is a ring entry, even to a page already dirty since the last reset:
// count entries as writes, not as distinct pages.
//
// Without a ring, SetMemoryRegion(..., logDirty=true) and VM.GetDirtyLog give
// the classic bitmap interface instead.
//
// Errors wrap the errno and name the ioctl: "KVM_CREATE_VCPU: invalid
// argument", and errors.Is(err, unix.EINVAL) holds.
package kvm
