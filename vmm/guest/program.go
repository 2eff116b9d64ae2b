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
// 32-bit flat mode), for any n a KVM host allows:
//
//	RecordBase + cpu*64        vCPU cpu's record (64 a page: 1024 vCPUs take
//	                           64 KiB)
//	CodeAddr(n, cpu)           vCPU cpu's code, CodeStride bytes each from the
//	                           first page after the n records (the programs are
//	                           a few hundred bytes; Program refuses a longer one)
//	RegionStart(n) and up      the workload regions, each page aligned: 1 MiB,
//	                           or the first page after the code where n is
//	                           larger than about 1600
//	up to RegionLimit          what the programs can address; guest memory
//	                           above it is never touched
//
// The programs use no stack (they count pages in ESP, which they set), so a
// vCPU's initial ESP is irrelevant.
const (
	RecordBase     = 0x10000
	CodeStride     = 512
	MinRegionStart = 0x100000
	RegionLimit    = 1<<32 - PageSize
)

// RecordAddr is the suggested address of vCPU cpu's record.
func RecordAddr(cpu int) uint64 { return RecordBase + uint64(cpu)*RecordSize }

// CodeAddr is the suggested entry point of vCPU cpu's program on a machine of
// cpus vCPUs.
func CodeAddr(cpus, cpu int) uint64 { return codeBase(cpus) + uint64(cpu)*CodeStride }

func codeBase(cpus int) uint64 { return pageUp(RecordAddr(cpus)) }

// RegionStart is where the workload regions of a machine of cpus vCPUs start:
// page aligned, past every vCPU's code.
func RegionStart(cpus int) uint64 { return max(MinRegionStart, pageUp(CodeAddr(cpus, cpus))) }

func pageUp(a uint64) uint64 { return (a + PageSize - 1) &^ (PageSize - 1) }

// Params describes one vCPU's program.
type Params struct {
	Mode         Mode
	RegionBase   uint64 // page aligned; write and read only
	RegionSize   uint64 // bytes, a positive multiple of PageSize; base+size <= RegionLimit
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
	if p.RegionBase+p.RegionSize > RegionLimit {
		return fmt.Errorf("guest: region [%#x, +%#x) passes %#x", p.RegionBase, p.RegionSize, uint64(RegionLimit))
	}
	if b := p.BytesPerPage; p.Mode == ModeWrite && b != 0 && (b < 4 || b > PageSize || b%4 != 0) {
		return fmt.Errorf("guest: %d bytes per page is not a multiple of 4 in [4, %d]", b, PageSize)
	}
	return nil
}

// RecordEvery is how often, in pages, a read or write workload adds the pages
// it has touched to its record (4096 pages, 16 MiB of guest memory); it also
// does at the end of each pass, so pages and passes are exact at pass
// boundaries and a region smaller than RecordEvery pages shows every pass.
// In between, the count is kept in a register. A record store is a dirty
// page, and on hosts that emulate the guest (PVM) a dirty-ring entry of its
// own: updating the record once a page would make a reading vCPU dirty a page
// per page it reads, and fill its ring.
const RecordEvery = 4096

// Program returns the 32-bit protected-mode (paging off) machine code of the
// workload p. The code is position independent: load it anywhere and start
// the vCPU at its first byte (kvm.SetupProtectedMode). Its record must be
// initialised (InitRecord) before it starts; the program adds to the counters
// it finds there. It is at most CodeStride bytes.
//
// The code is lean on purpose: on hosts that emulate 32-bit guest code (PVM)
// every instruction costs a few hundred nanoseconds and every store is a
// dirty-ring entry, so the page loop runs eight instructions besides the
// page's own access, counts pages in a register and stores to the record
// only every RecordEvery pages and at the end of a pass; pacing keeps its
// state in registers.
func Program(p Params) ([]byte, error) {
	a, err := program(p)
	if err != nil {
		return nil, err
	}
	code, err := a.assemble()
	if err == nil && len(code) > CodeStride {
		// The layout gives each program CodeStride bytes.
		return nil, fmt.Errorf("guest: a program of %d bytes does not fit in %d", len(code), CodeStride)
	}
	return code, err
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
	// esp = pages left before the next record update (no stack is used),
	// eax = the value a write stores (passes+1, so each pass changes the
	// contents); ebx, ecx, edx are scratch.
	end := int32(uint32(p.RegionBase + p.RegionSize))
	a.aluRR(opXor, esi, esi)
	a.aluRR(opXor, ebp, ebp)
	a.movRI(esp, RecordEvery)
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
	a.decR(esp)
	a.jcc(condZ, "publish")
	a.label("counted")
	// Pace only when ticks-per-page is not 0. A torn read here only
	// decides whether to look closer.
	a.movRM(ecx, rec(offTicks))
	a.aluRM(opOr, ecx, rec(offTicks+4))
	a.jcc(condNZ, "pace")
	a.label("paced")
	a.aluRI(opAdd, edi, PageSize)
	a.aluRI(opCmp, edi, end)
	a.jcc(condB, "page")

	// The end of a pass, or RecordEvery pages counted (from the loop, the
	// cursor still on the page just counted): add the pages not yet in the
	// record to its pages counter, the low dword alone (one 32-bit store)
	// unless it carries; then the whole quadword at once (out of line).
	a.label("publish")
	a.movRI(ebx, RecordEvery)
	a.aluRR(opSub, ebx, esp)
	a.jcc(condZ, "published") // none: the pass ended right after an update
	a.movRI(esp, RecordEvery)
	a.movRM(ecx, rec(offPages))
	a.aluRR(opAdd, ecx, ebx)
	a.jcc(condB, "carry")
	a.movMR(rec(offPages), ecx)
	a.label("published")
	a.aluRI(opCmp, edi, end)
	a.jcc(condB, "counted")
	inc64(a, rec(offPasses))
	a.jmp("pass")

	// Out of line: ebx pages make the pages counter carry into its upper
	// dword.
	a.label("carry")
	add64(a, rec(offPages))
	if p.Mode == ModeWrite {
		stamp(a, rec)
	}
	a.jmp("published")

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

// add64 adds ebx to the 64-bit counter m with one atomic 64-bit store (lock
// cmpxchg8b), so a reader never sees half of a carry. The guest is the
// counter's only writer, so the compare always succeeds. It clobbers eax,
// ebx, ecx, edx.
func add64(a *asm, m mem) {
	hi := m
	hi.disp += 4
	a.movRM(eax, m)
	a.movRM(edx, hi)
	a.aluRR(opAdd, ebx, eax)
	a.movRR(ecx, edx)
	a.aluRI(opAdc, ecx, 0)
	a.lockCmpxchg8b(m)
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
