package guest

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// The per-vCPU record, RecordSize bytes at a 64-byte aligned guest address.
// All fields are little-endian. "guest" fields are written only by the guest,
// "VMM" fields only by the VMM.
//
//	off size writer field
//	0   4    guest  magic: Magic once the program has started
//	4   4    guest  mode: 1 write, 2 read, 3 idle
//	8   8    guest  pages touched (written or read), cumulative, as of
//	                the guest's last update (every RecordEvery pages and
//	                at the end of each pass)
//	16  8    guest  passes completed over the whole region, cumulative
//	24  8    VMM    ticks per page: TSC ticks between two pages, 0 = flat out
//	32  16   -      reserved, zero
//	48  4    guest  region base
//	52  4    guest  region size
//	56  8    -      reserved, zero
//
// Torn reads: the guest runs in 32-bit mode, where two 32-bit stores would let
// a reader see half an update when a counter carries into its upper dword. So
// the guest adds to only the low dword of pages (one 32-bit store) while it
// cannot carry, and writes the whole quadword with one `lock cmpxchg8b` (an
// atomic 64-bit store) when it does, and for passes. The VMM reads with 64-bit
// atomic loads (ReadRecord), so it never sees a torn counter. The guest reads
// ticks-per-page, which the VMM stores whole (SetTicksPerPage), as high, low,
// high dwords until the high one holds still.
const (
	RecordSize = 64
	Magic      = 0x5256474d // "MGVR"

	offMagic  = 0
	offMode   = 4
	offPages  = 8
	offPasses = 16
	offTicks  = 24
	offBase   = 48
	offSize   = 52
)

// Record is a snapshot of a vCPU's record.
type Record struct {
	Started      bool // the guest wrote Magic
	Mode         Mode // "" before the guest started
	Pages        uint64
	Passes       uint64
	TicksPerPage uint64
	RegionBase   uint32
	RegionSize   uint32
}

func word64(mem []byte, addr uint64) *uint64 {
	if addr%8 != 0 || addr+8 > uint64(len(mem)) {
		panic(fmt.Sprintf("guest: record field at %#x not an aligned 8-byte field inside %d bytes", addr, len(mem)))
	}
	return (*uint64)(unsafe.Pointer(&mem[addr]))
}

func word32(mem []byte, addr uint64) *uint32 {
	if addr%4 != 0 || addr+4 > uint64(len(mem)) {
		panic(fmt.Sprintf("guest: record field at %#x not an aligned 4-byte field inside %d bytes", addr, len(mem)))
	}
	return (*uint32)(unsafe.Pointer(&mem[addr]))
}

// ReadRecord reads the record at guest address addr in guest memory mem (which
// must start at guest physical 0 and be 8-byte aligned, as mmapped memory is)
// while the guest runs.
func ReadRecord(mem []byte, addr uint64) Record {
	var r Record
	r.Started = atomic.LoadUint32(word32(mem, addr+offMagic)) == Magic
	if r.Started {
		r.Mode = modeOf(atomic.LoadUint32(word32(mem, addr+offMode)))
	}
	r.Pages = atomic.LoadUint64(word64(mem, addr+offPages))
	r.Passes = atomic.LoadUint64(word64(mem, addr+offPasses))
	r.TicksPerPage = atomic.LoadUint64(word64(mem, addr+offTicks))
	r.RegionBase = atomic.LoadUint32(word32(mem, addr+offBase))
	r.RegionSize = atomic.LoadUint32(word32(mem, addr+offSize))
	return r
}

// InitRecord clears the record at addr and sets its ticks per page; call it
// before the vCPU first runs the program.
func InitRecord(mem []byte, addr uint64, ticksPerPage uint64) {
	for off := uint64(0); off < RecordSize; off += 8 {
		atomic.StoreUint64(word64(mem, addr+off), 0)
	}
	SetTicksPerPage(mem, addr, ticksPerPage)
}

// SetTicksPerPage changes the pacing of a running guest: ticks TSC ticks per
// page (see TicksPerPage), 0 for flat out. The guest picks it up at its next
// page.
func SetTicksPerPage(mem []byte, addr uint64, ticks uint64) {
	atomic.StoreUint64(word64(mem, addr+offTicks), ticks)
}

// TicksPerPage converts a target dirty rate in bytes/s (each page touched
// counts PageSize bytes) into TSC ticks per page for a TSC of tscHz. A rate of
// 0 means flat out (0 ticks per page).
func TicksPerPage(rate, tscHz uint64) uint64 {
	if rate == 0 {
		return 0
	}
	t := tscHz * PageSize / rate
	if t == 0 {
		t = 1 // faster than one page per tick: as fast as the guest goes anyway
	}
	return t
}
