package kvm

// Go mirrors of the C structures in include/uapi/linux/kvm.h and
// arch/x86/include/uapi/asm/kvm.h (x86-64). layout_test.go pins every size and
// offset to the C values.

// Regs is struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment is struct kvm_segment: a segment register's hidden part.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable (GDTR/IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	InterruptBitmap        [4]uint64
}

// userspaceMemoryRegion is struct kvm_userspace_memory_region.
type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// enableCap is struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

// dirtyGFN is struct kvm_dirty_gfn, one dirty ring entry. Flags is shared
// with the kernel and only accessed atomically.
type dirtyGFN struct {
	Flags  uint32
	Slot   uint32
	Offset uint64
}

// dirtyLog is struct kvm_dirty_log; Bitmap is the user address of the bitmap.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64
}

// runHeader is the start of struct kvm_run, up to and including the
// exit-information union's members that migvisor reads. ImmediateExit and the
// union are shared with the kernel: see vcpu.go for how they are accessed.
type runHeader struct {
	RequestInterruptWindow     uint8
	ImmediateExit              uint8
	_                          [6]uint8
	ExitReason                 uint32
	ReadyForInterruptInjection uint8
	IFFlag                     uint8
	Flags                      uint16
	CR8                        uint64
	APICBase                   uint64
	Exit                       [32]byte // start of the exit union (io, fail_entry, internal)
}

// runIO is kvm_run.io, overlaid on runHeader.Exit.
type runIO struct {
	Direction  uint8
	Size       uint8
	Port       uint16
	Count      uint32
	DataOffset uint64
}

// runFailEntry is kvm_run.fail_entry.
type runFailEntry struct {
	HardwareEntryFailureReason uint64
	CPU                        uint32
}

// runInternal is the head of kvm_run.internal.
type runInternal struct {
	Suberror uint32
	NData    uint32
	Data     [2]uint64
}
