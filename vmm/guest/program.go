package guest

import (
	"fmt"
)

// PageSize is the page the workloads step by.
const PageSize = 4096

// Mode is a workload.
type Mode string

// Workloads.
const (
	ModeWrite Mode = "write" // store BytesPerPage bytes in every page of the region, forever
	ModeRead  Mode = "read"  // load one dword from every page of the region, forever
	ModeIdle  Mode = "idle"  // hlt in a loop
)

var modeNumbers = map[Mode]uint32{ModeWrite: 1, ModeRead: 2, ModeIdle: 3}

func modeOf(n uint32) Mode {
	for m, v := range modeNumbers {
		if v == n {
			return m
		}
	}
	return Mode(fmt.Sprintf("mode(%d)", n))
}

// DefaultBytesPerPage is what a write workload stores per page when
// Params.BytesPerPage is 0: one 8-byte value as two 32-bit stores.
const DefaultBytesPerPage = 8

// Suggested guest physical layout for n vCPUs (all below 4 GiB, the limit of
// 32-bit flat mode):
//
//	0x1000 + cpu*0x1000   vCPU cpu's code (one page each, up to 15 vCPUs
//	                      before 0x10000; the programs are a few hundred bytes)
//	0x10000 + cpu*64      vCPU cpu's record (up to 64 vCPUs in the page)
//	1 MiB and up          the workload regions, each page aligned
//
// The programs use no stack, so a vCPU's ESP is irrelevant.
const (
	CodeBase    = 0x1000
	CodeStride  = 0x1000
	RecordBase  = 0x10000
	RegionStart = 0x100000
)

// CodeAddr is the suggested entry point of vCPU cpu's program.
func CodeAddr(cpu int) uint64 { return CodeBase + uint64(cpu)*CodeStride }

// RecordAddr is the suggested address of vCPU cpu's record.
func RecordAddr(cpu int) uint64 { return RecordBase + uint64(cpu)*RecordSize }

// Params describes one vCPU's program.
type Params struct {
	Mode         Mode
	RegionBase   uint64 // page aligned; write and read only
	RegionSize   uint64 // bytes, a positive multiple of PageSize; base+size < 4 GiB
	BytesPerPage int    // write only: a multiple of 4 in [4, PageSize]; 0 = DefaultBytesPerPage
	RecordAddr   uint64 // 64-byte aligned, below 4 GiB
}

func (p Params) validate() error {
	if _, ok := modeNumbers[p.Mode]; !ok {
		return fmt.Errorf("guest: unknown workload mode %q", p.Mode)
	}
	if p.RecordAddr%RecordSize != 0 || p.RecordAddr+RecordSize > 1<<32 {
		return fmt.Errorf("guest: record address %#x not 64-byte aligned below 4 GiB", p.RecordAddr)
	}
	if p.Mode == ModeIdle {
		return nil
	}
	if p.RegionBase%PageSize != 0 || p.RegionSize%PageSize != 0 || p.RegionSize == 0 {
		return fmt.Errorf("guest: region [%#x, +%#x) not a non-empty page-aligned range", p.RegionBase, p.RegionSize)
	}
	if p.RegionBase+p.RegionSize >= 1<<32 {
		return fmt.Errorf("guest: region [%#x, +%#x) reaches 4 GiB", p.RegionBase, p.RegionSize)
	}
	if b := p.BytesPerPage; p.Mode == ModeWrite && b != 0 && (b < 4 || b > PageSize || b%4 != 0) {
		return fmt.Errorf("guest: %d bytes per page is not a multiple of 4 in [4, %d]", b, PageSize)
	}
	return nil
}

// Program returns the 32-bit protected-mode (paging off) machine code of the
// workload p. The code is position independent: load it anywhere and start
// the vCPU at its first byte (kvm.SetupProtectedMode). Its record must be
// initialised (InitRecord) before it starts.
//
// The code is lean on purpose: on hosts that emulate 32-bit guest code (PVM)
// every instruction costs a few hundred nanoseconds and every store is a
// dirty-ring entry, so the page loop runs about ten instructions and makes one
// store to the record per page; pacing keeps its state in registers.
func Program(p Params) ([]byte, error) {
	a, err := program(p)
	if err != nil {
		return nil, err
	}
	return a.assemble()
}

// program assembles p's code, labels and all (the tests list it with them).
func program(p Params) (*asm, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	a := newAsm()
	rec := func(off uint32) mem { return at(uint32(p.RecordAddr) + off) }

	a.movMI(rec(offMode), modeNumbers[p.Mode])
	a.movMI(rec(offBase), uint32(p.RegionBase))
	a.movMI(rec(offSize), uint32(p.RegionSize))
	a.movMI(rec(offMagic), Magic)

	if p.Mode == ModeIdle {
		a.label("idle")
		a.hlt()
		a.jmp("idle")
		return a, nil
	}

	// Registers: edi = page cursor, ebp:esi = pacing deadline (a TSC value),
	// eax = the value a write stores (passes+1, so each pass changes the
	// contents); ebx, ecx, edx are scratch. No stack is used.
	a.aluRR(opXor, esi, esi)
	a.aluRR(opXor, ebp, ebp)
	a.label("pass")
	a.movRI(edi, uint32(p.RegionBase))
	if p.Mode == ModeWrite {
		stamp(a, rec)
	}
	a.label("page")
	if p.Mode == ModeWrite {
		bpp := p.BytesPerPage
		if bpp == 0 {
			bpp = DefaultBytesPerPage
		}
		switch bpp {
		case 4:
			a.movMR(mem{base: edi}, eax)
		case 8:
			a.movMR(mem{base: edi}, eax)
			a.movMR(mem{base: edi, disp: 4}, eax)
		default:
			// A loop rather than rep stosd: some hosts (PVM) emulate
			// string instructions one iteration at a time.
			a.movRR(ebx, edi)
			a.movRI(ecx, uint32(bpp/4))
			a.label("fill")
			a.movMR(mem{base: ebx}, eax)
			a.aluRI(opAdd, ebx, 4)
			a.decR(ecx)
			a.jcc(condNZ, "fill")
		}
	} else {
		a.movRM(eax, mem{base: edi})
	}
	// pages++: the low dword alone, atomically, unless it is about to
	// carry; then the whole quadword at once (out of line).
	a.aluMI(opCmp, rec(offPages), -1)
	a.jcc(condZ, "carry")
	a.incM(rec(offPages))
	a.label("counted")
	// Pace only when ticks-per-page is not 0. A torn read here only
	// decides whether to look closer.
	a.movRM(ecx, rec(offTicks))
	a.aluRM(opOr, ecx, rec(offTicks+4))
	a.jcc(condNZ, "pace")
	a.label("paced")
	a.aluRI(opAdd, edi, PageSize)
	a.aluRI(opCmp, edi, int32(uint32(p.RegionBase+p.RegionSize)))
	a.jcc(condB, "page")
	inc64(a, rec(offPasses))
	a.jmp("pass")

	// Out of line: the pages counter's carry into its upper dword.
	a.label("carry")
	inc64(a, rec(offPages))
	if p.Mode == ModeWrite {
		stamp(a, rec)
	}
	a.jmp("counted")

	pace(a, rec)
	if p.Mode == ModeWrite {
		stamp(a, rec)
	}
	a.jmp("paced")
	return a, nil
}

// stamp loads the value a write pass stores: passes+1 (its low dword).
func stamp(a *asm, rec func(uint32) mem) {
	a.movRM(eax, rec(offPasses))
	a.incR(eax)
}

// inc64 adds one to the 64-bit counter m with one atomic 64-bit store
// (lock cmpxchg8b), so a reader never sees half of a carry. The guest is the
// counter's only writer, so the compare always succeeds. It clobbers eax,
// ebx, ecx, edx.
func inc64(a *asm, m mem) {
	hi := m
	hi.disp += 4
	a.movRM(eax, m)
	a.movRM(edx, hi)
	a.movRR(ebx, eax)
	a.movRR(ecx, edx)
	a.aluRI(opAdd, ebx, 1)
	a.aluRI(opAdc, ecx, 0)
	a.lockCmpxchg8b(m)
}

// pace waits until the TSC reaches the deadline for this page, one
// ticks-per-page after the last; all its state is in registers (the deadline
// in ebp:esi), so pacing writes nothing. When behind it does not catch up
// (deadline = now). When the last deadline is still ahead of the TSC (the
// TSC moved back, as after a migration) or ticks-per-page changes while it
// waits, it starts over from now, so a stale deadline never stalls it.
func pace(a *asm, rec func(uint32) mem) {
	lo, hi := rec(offTicks), rec(offTicks+4)
	a.label("pace")
	// ecx:ebx = ticks per page, read hi, lo, hi until hi holds still (the
	// VMM stores all 64 bits at once).
	a.movRM(ecx, hi)
	a.movRM(ebx, lo)
	a.aluRM(opCmp, ecx, hi)
	a.jcc(condNZ, "pace")
	a.rdtsc() // edx:eax = now
	// Last deadline > now: the TSC went back.
	a.aluRR(opCmp, ebp, edx)
	a.jcc(condA, "restart")
	a.jcc(condB, "advance")
	a.aluRR(opCmp, esi, eax)
	a.jcc(condA, "restart")
	a.label("advance")
	a.aluRR(opAdd, esi, ebx)
	a.aluRR(opAdc, ebp, ecx) // deadline += ticks
	// New deadline < now: behind.
	a.aluRR(opCmp, ebp, edx)
	a.jcc(condB, "restart")
	a.jcc(condA, "spin")
	a.aluRR(opCmp, esi, eax)
	a.jcc(condB, "restart")
	a.label("spin")
	a.pause()
	a.aluRM(opCmp, ebx, lo)
	a.jcc(condNZ, "restart")
	a.aluRM(opCmp, ecx, hi)
	a.jcc(condNZ, "restart") // the rate changed
	a.rdtsc()
	// Until now >= deadline.
	a.aluRR(opCmp, edx, ebp)
	a.jcc(condB, "spin")
	a.jcc(condA, "waited")
	a.aluRR(opCmp, eax, esi)
	a.jcc(condB, "spin")
	a.jmp("waited")
	a.label("restart")
	a.movRR(esi, eax)
	a.movRR(ebp, edx) // deadline = now
	a.label("waited")
}
