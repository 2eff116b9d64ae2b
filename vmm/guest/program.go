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
func Program(p Params) ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	a := newAsm()
	rec := func(off int32) mem { return mem{base: esi, disp: off} }

	// Register use: esi = record, edi = page cursor, ebp = region end;
	// eax, ebx, ecx, edx are scratch.
	a.movRI(esi, uint32(p.RecordAddr))
	a.movMI(rec(offMode), modeNumbers[p.Mode])
	a.movMI(rec(offBase), uint32(p.RegionBase))
	a.movMI(rec(offSize), uint32(p.RegionSize))
	a.movMI(rec(offMagic), Magic)

	if p.Mode == ModeIdle {
		a.label("idle")
		a.hlt()
		a.jmp("idle")
		return a.assemble()
	}

	a.movRI(ebp, uint32(p.RegionBase+p.RegionSize))
	a.label("pass")
	a.movRI(edi, uint32(p.RegionBase))
	a.label("page")
	if p.Mode == ModeWrite {
		bpp := p.BytesPerPage
		if bpp == 0 {
			bpp = DefaultBytesPerPage
		}
		// The value stored is passes+1, so every pass changes the contents.
		a.movRM(eax, rec(offPasses))
		a.incR(eax)
		switch bpp {
		case 4:
			a.movMR(mem{base: edi}, eax)
		case 8:
			a.movMR(mem{base: edi}, eax)
			a.movMR(mem{base: edi, disp: 4}, eax)
		default:
			a.movRR(ebx, edi)
			a.movRI(ecx, uint32(bpp/4))
			a.repStosd() // DF is clear (EFLAGS 0x2)
			a.movRR(edi, ebx)
		}
	} else {
		a.movRM(eax, mem{base: edi})
	}
	inc64(a, rec(offPages))
	pace(a, rec)
	a.aluRI(opAdd, edi, PageSize)
	a.aluRR(opCmp, edi, ebp)
	a.jcc(condB, "page")
	inc64(a, rec(offPasses))
	a.jmp("pass")
	return a.assemble()
}

// inc64 adds one to the 64-bit counter m with a single atomic 64-bit store.
// The guest is the counter's only writer, so the compare always succeeds.
func inc64(a *asm, m mem) {
	a.movRM(eax, m)
	a.movRM(edx, mem{base: m.base, disp: m.disp + 4})
	a.movRR(ebx, eax)
	a.movRR(ecx, edx)
	a.aluRI(opAdd, ebx, 1)
	a.aluRI(opAdc, ecx, 0)
	a.lockCmpxchg8b(m)
}

// pace keeps one page per ticks-per-page TSC ticks when ticks-per-page is not
// 0. The deadline advances by ticks-per-page at each page and the guest spins
// (pause) until the TSC reaches it. When behind it does not catch up
// (deadline = now), and when more than one page ahead (the TSC moved back,
// e.g. after migration, or the rate was raised) it restarts from now, so a
// stale deadline can never stall it.
func pace(a *asm, rec func(int32) mem) {
	// edx:eax = ticks per page, read atomically: cmpxchg8b with edx:eax =
	// ecx:ebx = 0 either finds 0 and writes 0 back, or loads the value.
	a.aluRR(opXor, eax, eax)
	a.aluRR(opXor, edx, edx)
	a.aluRR(opXor, ebx, ebx)
	a.aluRR(opXor, ecx, ecx)
	a.lockCmpxchg8b(rec(offTicks))
	a.movRR(ecx, eax)
	a.aluRR(opOr, ecx, edx)
	a.jcc(condZ, "paced")
	a.movMR(rec(offScratch), eax)
	a.movMR(rec(offScratch+4), edx)
	a.aluMR(opAdd, rec(offDeadline), eax)
	a.aluMR(opAdc, rec(offDeadline+4), edx) // deadline += ticks
	a.rdtsc()                               // edx:eax = now
	a.movRM(ebx, rec(offDeadline))
	a.movRM(ecx, rec(offDeadline+4))
	a.aluRR(opSub, ebx, eax)
	a.aluRR(opSbb, ecx, edx) // ecx:ebx = deadline - now
	a.jcc(condL, "restart")  // behind
	a.aluMR(opSub, rec(offScratch), ebx)
	a.aluMR(opSbb, rec(offScratch+4), ecx) // ticks - (deadline - now)
	a.jcc(condL, "restart")                // more than a page ahead
	a.label("spin")
	a.pause()
	a.rdtsc()
	a.aluRM(opSub, eax, rec(offDeadline))
	a.aluRM(opSbb, edx, rec(offDeadline+4)) // now - deadline
	a.jcc(condL, "spin")
	a.jmp("paced")
	a.label("restart")
	a.movMR(rec(offDeadline), eax)
	a.movMR(rec(offDeadline+4), edx) // deadline = now
	a.label("paced")
}
