package kvm

import "strconv"

// ioctl request numbers (x86-64), from include/uapi/linux/kvm.h. The _IOW/_IOR
// ones embed the size of their argument, which the layout tests check.
const (
	ioctlGetAPIVersion       = 0xAE00
	ioctlCreateVM            = 0xAE01
	ioctlCheckExtension      = 0xAE03
	ioctlGetVCPUMmapSize     = 0xAE04
	ioctlCreateVCPU          = 0xAE41
	ioctlGetDirtyLog         = 0x4010AE42
	ioctlSetUserMemoryRegion = 0x4020AE46
	ioctlRun                 = 0xAE80
	ioctlGetRegs             = 0x8090AE81
	ioctlSetRegs             = 0x4090AE82
	ioctlGetSregs            = 0x8138AE83
	ioctlSetSregs            = 0x4138AE84
	ioctlEnableCap           = 0x4068AEA3
	ioctlGetTSCKHz           = 0xAEA3
	ioctlResetDirtyRings     = 0xAEC7
)

// APIVersion is the only KVM API version there has ever been.
const APIVersion = 12

// Cap is a KVM capability number for CheckExtension.
type Cap uintptr

// Capabilities migvisor asks about.
const (
	CapNrVCPUs            Cap = 9  // the recommended most vCPUs
	CapMaxVCPUs           Cap = 66 // the most vCPUs a VM can have
	CapImmediateExit      Cap = 136
	CapDirtyLogRing       Cap = 192
	CapDirtyLogRingAcqRel Cap = 223
)

// ExitReason is kvm_run.exit_reason.
type ExitReason uint32

// Exit reasons migvisor handles or reports.
const (
	ExitUnknown       ExitReason = 0
	ExitIO            ExitReason = 2
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitInternalError ExitReason = 17
	ExitDirtyRingFull ExitReason = 31
)

var exitNames = map[ExitReason]string{
	ExitUnknown:       "UNKNOWN",
	ExitIO:            "IO",
	ExitHLT:           "HLT",
	ExitMMIO:          "MMIO",
	ExitShutdown:      "SHUTDOWN",
	ExitFailEntry:     "FAIL_ENTRY",
	ExitIntr:          "INTR",
	ExitInternalError: "INTERNAL_ERROR",
	ExitDirtyRingFull: "DIRTY_RING_FULL",
}

func (r ExitReason) String() string {
	if s, ok := exitNames[r]; ok {
		return s
	}
	return "EXIT_" + strconv.FormatUint(uint64(r), 10)
}

// Port I/O directions (kvm_run.io.direction).
const (
	IOIn  = 0
	IOOut = 1
)

const (
	memLogDirtyPages = 1 // KVM_MEM_LOG_DIRTY_PAGES

	dirtyGFNDirty = 1 // KVM_DIRTY_GFN_F_DIRTY
	dirtyGFNReset = 2 // KVM_DIRTY_GFN_F_RESET

	dirtyLogPageOffset = 64 // KVM_DIRTY_LOG_PAGE_OFFSET: ring's page offset in the vCPU fd

	// DirtyGFNSize is sizeof(struct kvm_dirty_gfn): the ring's bytes per entry.
	DirtyGFNSize = 16
)
