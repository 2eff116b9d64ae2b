// Package vmm is migvisor's machine: guest memory, vCPU threads, the run state, dirty-page
// tracking and the workloads the vCPUs run.
//
// A Machine has one shared anonymous mapping of guest memory (Memory), mapped into KVM as a
// slot with dirty logging, and Config.CPUs vCPUs, each on its own locked OS thread
// (ThreadID). With Accel "kvm" the vCPUs are real KVM vCPUs running vmm/guest's programs in
// 32-bit protected mode; with Accel "soft" the same workloads run as Go code on those
// threads, writing the same memory and the same per-vCPU records. Either way a workload
// loops over its own region of guest memory (from 1 MiB up), and WorkloadStats reads its
// progress without stopping it.
//
// The machine owns the run state (QEMU's names and events): Cont and Stop are QMP's cont and
// stop, Pause, Resume and SetRunState are migration's. The vCPUs run in guest mode only in
// the running state; stopping returns once every vCPU is outside KVM_RUN, and SaveCPU and
// LoadCPU then read and write their state.
//
// # Dirty pages
//
// With a dirty ring (Config.DirtyRingSize entries per vCPU) a reaper thread harvests every
// ring while the vCPUs run, every 50 µs to 1 ms so that no ring gets near full (the host
// notes: KVM's own ring-full exit cannot be relied on), and resets the rings. Each page it
// harvests goes, with the vCPU that dirtied it, to that vCPU's cumulative counter
// (DirtyPages) and to every open DirtyLog (migration's bitmap; each view is independent).
// Harvest runs one pass synchronously. When a ring received its size in entries since that
// vCPU's last ring-full event, the vCPU is kicked and its thread calls the ring-full hook
// (SetRingFullHook; the dirty limit sleeps there) outside KVM_RUN; a real
// KVM_EXIT_DIRTY_RING_FULL, and Kick, end up in the same hook. A ring found inconsistent
// makes every page dirty in every DirtyLog (DirtyFailSafes counts it) instead of losing pages.
// Without a ring DirtyLog syncs KVM's dirty bitmap (or the soft one) and DirtyPages stays 0.
//
//	m, err := vmm.New(vmm.Config{MemSize: 512 << 20, CPUs: 2, Accel: "kvm", DirtyRingSize: 4096,
//		Workloads: []vmm.Workload{{Mode: "write"}}, Initial: vmm.Running, Events: srv})
//	log := m.NewDirtyLog()
//	n := log.Sync(bitmap) // pages dirtied since the last Sync, ORed into bitmap
//
// ParseWorkload, ParseSize, ParseMemSize and ValidateRingSize turn command-line values into
// a Config with QEMU's syntax and error texts.
package vmm
