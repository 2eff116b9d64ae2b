package kvm

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
)

// The wanted values are those of the C structures in the x86-64 uapi headers.
func TestLayout(t *testing.T) {
	var (
		run   runHeader
		io    runIO
		fail  runFailEntry
		in    runInternal
		regs  Regs
		sregs Sregs
		seg   Segment
		dt    DTable
		umr   userspaceMemoryRegion
		ec    enableCap
		gfn   dirtyGFN
		dl    dirtyLog
	)
	const exit = 32 // offset of kvm_run's exit union
	tests := []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_run.immediate_exit", unsafe.Offsetof(run.ImmediateExit), 1},
		{"kvm_run.exit_reason", unsafe.Offsetof(run.ExitReason), 8},
		{"kvm_run.if_flag", unsafe.Offsetof(run.IFFlag), 13},
		{"kvm_run.flags", unsafe.Offsetof(run.Flags), 14},
		{"kvm_run.cr8", unsafe.Offsetof(run.CR8), 16},
		{"kvm_run.apic_base", unsafe.Offsetof(run.APICBase), 24},
		{"kvm_run.io", unsafe.Offsetof(run.Exit), exit},
		{"kvm_run.io.size", exit + unsafe.Offsetof(io.Size), 33},
		{"kvm_run.io.port", exit + unsafe.Offsetof(io.Port), 34},
		{"kvm_run.io.count", exit + unsafe.Offsetof(io.Count), 36},
		{"kvm_run.io.data_offset", exit + unsafe.Offsetof(io.DataOffset), 40},
		{"kvm_run.fail_entry.cpu", exit + unsafe.Offsetof(fail.CPU), 40},
		{"kvm_run.internal.ndata", exit + unsafe.Offsetof(in.NData), 36},
		{"kvm_run.internal.data", exit + unsafe.Offsetof(in.Data), 40},
		{"sizeof(runHeader) within the union", unsafe.Sizeof(run), exit + 32},
		{"sizeof(kvm_regs)", unsafe.Sizeof(regs), 144},
		{"kvm_regs.rsp", unsafe.Offsetof(regs.RSP), 48},
		{"kvm_regs.r8", unsafe.Offsetof(regs.R8), 64},
		{"kvm_regs.rip", unsafe.Offsetof(regs.RIP), 128},
		{"kvm_regs.rflags", unsafe.Offsetof(regs.RFLAGS), 136},
		{"sizeof(kvm_segment)", unsafe.Sizeof(seg), 24},
		{"kvm_segment.limit", unsafe.Offsetof(seg.Limit), 8},
		{"kvm_segment.selector", unsafe.Offsetof(seg.Selector), 12},
		{"kvm_segment.type", unsafe.Offsetof(seg.Type), 14},
		{"kvm_segment.present", unsafe.Offsetof(seg.Present), 15},
		{"kvm_segment.db", unsafe.Offsetof(seg.DB), 17},
		{"kvm_segment.g", unsafe.Offsetof(seg.G), 20},
		{"kvm_segment.unusable", unsafe.Offsetof(seg.Unusable), 22},
		{"sizeof(kvm_dtable)", unsafe.Sizeof(dt), 16},
		{"kvm_dtable.limit", unsafe.Offsetof(dt.Limit), 8},
		{"sizeof(kvm_sregs)", unsafe.Sizeof(sregs), 312},
		{"kvm_sregs.tr", unsafe.Offsetof(sregs.TR), 144},
		{"kvm_sregs.gdt", unsafe.Offsetof(sregs.GDT), 192},
		{"kvm_sregs.idt", unsafe.Offsetof(sregs.IDT), 208},
		{"kvm_sregs.cr0", unsafe.Offsetof(sregs.CR0), 224},
		{"kvm_sregs.cr4", unsafe.Offsetof(sregs.CR4), 248},
		{"kvm_sregs.efer", unsafe.Offsetof(sregs.EFER), 264},
		{"kvm_sregs.apic_base", unsafe.Offsetof(sregs.APICBase), 272},
		{"kvm_sregs.interrupt_bitmap", unsafe.Offsetof(sregs.InterruptBitmap), 280},
		{"sizeof(kvm_userspace_memory_region)", unsafe.Sizeof(umr), 32},
		{"kvm_userspace_memory_region.flags", unsafe.Offsetof(umr.Flags), 4},
		{"kvm_userspace_memory_region.guest_phys_addr", unsafe.Offsetof(umr.GuestPhysAddr), 8},
		{"kvm_userspace_memory_region.memory_size", unsafe.Offsetof(umr.MemorySize), 16},
		{"kvm_userspace_memory_region.userspace_addr", unsafe.Offsetof(umr.UserspaceAddr), 24},
		{"sizeof(kvm_enable_cap)", unsafe.Sizeof(ec), 104},
		{"kvm_enable_cap.args", unsafe.Offsetof(ec.Args), 8},
		{"sizeof(kvm_dirty_gfn)", unsafe.Sizeof(gfn), DirtyGFNSize},
		{"kvm_dirty_gfn.slot", unsafe.Offsetof(gfn.Slot), 4},
		{"kvm_dirty_gfn.offset", unsafe.Offsetof(gfn.Offset), 8},
		{"sizeof(kvm_dirty_log)", unsafe.Sizeof(dl), 16},
		{"kvm_dirty_log.dirty_bitmap", unsafe.Offsetof(dl.Bitmap), 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assert.Equal(t, tt.want, tt.got) })
	}
}

// The size field (bits 16-29) of the _IOR/_IOW request numbers must match
// the Go structs they carry.
func TestIoctlSizes(t *testing.T) {
	tests := []struct {
		name string
		req  uintptr
		size uintptr
	}{
		{"KVM_GET_DIRTY_LOG", ioctlGetDirtyLog, unsafe.Sizeof(dirtyLog{})},
		{"KVM_SET_USER_MEMORY_REGION", ioctlSetUserMemoryRegion, unsafe.Sizeof(userspaceMemoryRegion{})},
		{"KVM_GET_REGS", ioctlGetRegs, unsafe.Sizeof(Regs{})},
		{"KVM_SET_REGS", ioctlSetRegs, unsafe.Sizeof(Regs{})},
		{"KVM_GET_SREGS", ioctlGetSregs, unsafe.Sizeof(Sregs{})},
		{"KVM_SET_SREGS", ioctlSetSregs, unsafe.Sizeof(Sregs{})},
		{"KVM_ENABLE_CAP", ioctlEnableCap, unsafe.Sizeof(enableCap{})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assert.Equal(t, tt.size, tt.req>>16&0x3fff) })
	}
}
