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
// With a dirty ring (Config.DirtyRingSize entries per vCPU) the reaper keeps every ring far
// from full while the vCPUs run: every 100 µs to 1 ms (adapting to how full the rings get) it
// kicks each vCPU in guest mode, and the vCPU's own thread harvests its ring, resets the
// rings and goes back in. Rings are collected on their own threads because on nested PVM a
// ring harvested from another thread while its vCPU is in KVM_RUN loses entries, and KVM does
// not stop a vCPU before its ring overflows (kvm-host-notes.md, vmm/kvm's doc). Each page
// goes, with the vCPU that dirtied it, to that vCPU's cumulative counter (DirtyPages) and to
// every open DirtyLog (migration's bitmap; each view is independent). Harvest, and
// DirtyLog.Sync before it reads its view, bring in everything dirtied so far: running vCPUs
// are asked to collect, the other rings are harvested directly. When a ring received its
// size in entries since that vCPU's last ring-full event, the vCPU's thread calls the
// ring-full hook (SetRingFullHook; the dirty limit sleeps there) outside KVM_RUN; a real
// KVM_EXIT_DIRTY_RING_FULL, and Kick, end up in the same hook. A ring found inconsistent
// (overrun, entries the host left unflagged) makes every page its vCPU's program can write
// (its record and, for a write workload, its region) dirty in every DirtyLog, and trouble
// with the machine's tracking as a whole every page (DirtyFailSafes counts it, a log line
// says so), instead of losing pages; a ring the host
// left stuck beyond repair stops its vCPU. Without a ring DirtyLog syncs KVM's dirty bitmap
// (or the soft one) and DirtyPages stays 0.
//
// The reaper's threads, one per host CPU, are pinned and run at a real-time priority where
// allowed (root); they sleep while no vCPU is in guest mode, so an idle machine costs
// nothing. While a machine exists GOMAXPROCS leaves spare Ps, one for each vCPU with a read
// or write workload (idle vCPUs halt outside KVM_RUN), because a thread in KVM_RUN holds its
// P until the runtime takes it back.
//
// A machine has 1 to MaxCPUs(Accel) vCPUs (KVM_CAP_MAX_VCPUS, 1024 on the soft backend);
// vmm/guest's layout keeps every vCPU's record and code below the workload regions, which
// start at 1 MiB for up to 1024 vCPUs and stay below 4 GiB in larger guests. Guest memory of the workload regions is
// pre-faulted on the host side at New (first touches are expensive on the project's hosts).
//
//	m, err := vmm.New(vmm.Config{MemSize: 512 << 20, CPUs: 2, Accel: "kvm", DirtyRingSize: 4096,
//		Workloads: []vmm.Workload{{Mode: "write"}}, Initial: vmm.Running, Events: srv})
//	log := m.NewDirtyLog()
//	n := log.Sync(bitmap) // pages dirtied since the last Sync, ORed into bitmap
//
// ParseWorkload, ParseSize, ParseMemSize and ValidateRingSize turn command-line values into
// a Config with QEMU's syntax and error texts.
package vmm
