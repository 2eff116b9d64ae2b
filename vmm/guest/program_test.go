package guest

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"
)

// listing disassembles p's program in 32-bit mode (Intel syntax), one
// instruction a line, with its labels on lines of their own and as jump
// targets.
func listing(t *testing.T, p Params) string {
	t.Helper()
	a, err := program(p)
	require.NoError(t, err)
	code, err := a.assemble()
	require.NoError(t, err)
	names := map[uint64]string{}
	for name, off := range a.labels {
		names[uint64(off)] = name
	}
	sym := func(addr uint64) (string, uint64) { return names[addr], addr }
	var b strings.Builder
	for pc := 0; pc < len(code); {
		if name, ok := names[uint64(pc)]; ok {
			b.WriteString(name + ":\n")
		}
		in, err := x86asm.Decode(code[pc:], 32)
		require.NoError(t, err, "at %#x", pc)
		b.WriteString("\t" + x86asm.IntelSyntax(in, uint64(pc), sym) + "\n")
		pc += in.Len
	}
	return b.String()
}

// The intended listings, in pieces, for a region [1 MiB, 3 MiB) and the
// record at 0x10000: pages at 0x10008, passes at 0x10010, ticks per page at
// 0x10018.
const (
	header = `	mov dword ptr [0x10004], MODE
	mov dword ptr [0x10030], 0x100000
	mov dword ptr [0x10034], 0x200000
	mov dword ptr [0x10000], 0x5256474d
	xor esi, esi
	xor ebp, ebp
	mov esp, 0x1000
pass:
	mov edi, 0x100000
`
	stampListing = `	mov eax, dword ptr [0x10010]
	inc eax
`
	// After the page's own access: count it in esp, pace, next page; the
	// record at the end of a pass and every 0x1000 (RecordEvery) pages.
	loop = `	dec esp
	jz publish
counted:
	mov ecx, dword ptr [0x10018]
	or ecx, dword ptr [0x1001c]
	jnz pace
paced:
	add edi, 0x1000
	cmp edi, 0x300000
	jb page
publish:
	mov ebx, 0x1000
	sub ebx, esp
	jz published
	mov esp, 0x1000
	mov ecx, dword ptr [0x10008]
	add ecx, ebx
	jb carry
	mov dword ptr [0x10008], ecx
published:
	cmp edi, 0x300000
	jb counted
	mov eax, dword ptr [0x10010]
	mov edx, dword ptr [0x10014]
	mov ebx, eax
	mov ecx, edx
	add ebx, 0x1
	adc ecx, 0x0
	lock cmpxchg8b qword ptr [0x10010]
	jmp pass
carry:
	mov eax, dword ptr [0x10008]
	mov edx, dword ptr [0x1000c]
	add ebx, eax
	mov ecx, edx
	adc ecx, 0x0
	lock cmpxchg8b qword ptr [0x10008]
STAMP	jmp published
pace:
	mov ecx, dword ptr [0x1001c]
	mov ebx, dword ptr [0x10018]
	cmp ecx, dword ptr [0x1001c]
	jnz pace
	rdtsc
	cmp ebp, edx
	jnbe restart
	jb advance
	cmp esi, eax
	jnbe restart
advance:
	add esi, ebx
	adc ebp, ecx
	cmp ebp, edx
	jb restart
	jnbe spin
	cmp esi, eax
	jb restart
spin:
	pause
	cmp ebx, dword ptr [0x10018]
	jnz restart
	cmp ecx, dword ptr [0x1001c]
	jnz restart
	rdtsc
	cmp edx, ebp
	jb spin
	jnbe waited
	cmp eax, esi
	jb spin
	jmp waited
restart:
	mov esi, eax
	mov ebp, edx
waited:
STAMP	jmp paced
`
)

// want assembles the intended listing of a read or write program whose page
// access is access.
func want(mode string, write bool, access string) string {
	s := ""
	if write {
		s = stampListing
	}
	return strings.ReplaceAll(header, "MODE", mode) + s + "page:\n" + access + strings.ReplaceAll(loop, "STAMP", s)
}

func TestProgramListings(t *testing.T) {
	region := Params{RegionBase: 0x100000, RegionSize: 0x200000, RecordAddr: 0x10000}
	with := func(m Mode, bpp int) Params { p := region; p.Mode, p.BytesPerPage = m, bpp; return p }
	const store8 = "\tmov dword ptr [edi], eax\n\tmov dword ptr [edi+0x4], eax\n"
	fill := func(dwords string) string {
		return "\tmov ebx, edi\n\tmov ecx, " + dwords + "\nfill:\n\tmov dword ptr [ebx], eax\n\tadd ebx, 0x4\n\tdec ecx\n\tjnz fill\n"
	}
	tests := []struct {
		name string
		p    Params
		want string
	}{
		{"idle", Params{Mode: ModeIdle, RecordAddr: 0x10040}, `	mov dword ptr [0x10044], 0x3
	mov dword ptr [0x10070], 0x0
	mov dword ptr [0x10074], 0x0
	mov dword ptr [0x10040], 0x5256474d
idle:
	hlt
	jmp idle
`},
		{"write default", with(ModeWrite, 0), want("0x1", true, store8)},
		{"write 8", with(ModeWrite, 8), want("0x1", true, store8)},
		{"write 4", with(ModeWrite, 4), want("0x1", true, "\tmov dword ptr [edi], eax\n")},
		{"write 64", with(ModeWrite, 64), want("0x1", true, fill("0x10"))},
		{"write 4096", with(ModeWrite, 4096), want("0x1", true, fill("0x400"))},
		{"read", with(ModeRead, 0), want("0x2", false, "\tmov eax, dword ptr [edi]\n")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assert.Equal(t, tt.want, listing(t, tt.p)) })
	}
}

// Program's code is what the listings were made of.
func TestProgramIsAssembled(t *testing.T) {
	p := Params{Mode: ModeWrite, RegionBase: 0x100000, RegionSize: 0x200000, RecordAddr: 0x10000}
	code, err := Program(p)
	require.NoError(t, err)
	a, err := program(p)
	require.NoError(t, err)
	again, err := a.assemble()
	require.NoError(t, err)
	assert.Equal(t, again, code)
}

func TestProgramRejects(t *testing.T) {
	ok := Params{Mode: ModeWrite, RegionBase: 0x100000, RegionSize: 0x1000, RecordAddr: 0x10000}
	tests := []struct {
		name string
		edit func(p *Params)
	}{
		{"unknown mode", func(p *Params) { p.Mode = "scribble" }},
		{"unaligned record", func(p *Params) { p.RecordAddr = 0x10008 }},
		{"record above 4 GiB", func(p *Params) { p.RecordAddr = 1 << 32 }},
		{"unaligned region", func(p *Params) { p.RegionBase = 0x100800 }},
		{"empty region", func(p *Params) { p.RegionSize = 0 }},
		{"partial page", func(p *Params) { p.RegionSize = 0x1800 }},
		{"region reaching 4 GiB", func(p *Params) { p.RegionBase, p.RegionSize = 0xfff00000, 0x100000 }},
		{"region past RegionLimit", func(p *Params) { p.RegionBase, p.RegionSize = RegionLimit, PageSize }},
		{"bytes per page not a multiple of 4", func(p *Params) { p.BytesPerPage = 6 }},
		{"bytes per page past the page", func(p *Params) { p.BytesPerPage = 8192 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := ok
			tt.edit(&p)
			_, err := Program(p)
			assert.Error(t, err)
		})
	}
	_, err := Program(ok)
	assert.NoError(t, err)
	top := ok
	top.RegionBase = RegionLimit - PageSize
	_, err = Program(top)
	assert.NoError(t, err, "a region ending at RegionLimit")
}

func TestTicksPerPage(t *testing.T) {
	tests := []struct {
		rate, hz, want uint64
	}{
		{0, 2_600_000_000, 0},
		{4096, 2_600_000_000, 2_600_000_000},
		{4 << 20, 2_600_000_000, 2_539_062},
		{1 << 62, 1_000_000, 1},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, TicksPerPage(tt.rate, tt.hz), "rate %d, hz %d", tt.rate, tt.hz)
	}
}

// The suggested layout keeps records, code and regions apart for any vCPU count a KVM host
// allows, with the regions at 1 MiB for up to 1024 vCPUs.
func TestLayoutScales(t *testing.T) {
	for _, n := range []int{1, 15, 16, 64, 256, 1024, 4096} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			recEnd := RecordAddr(n-1) + RecordSize
			assert.Equal(t, uint64(RecordBase), RecordAddr(0))
			assert.LessOrEqual(t, recEnd, CodeAddr(n, 0), "records run into the code")
			assert.Zero(t, CodeAddr(n, 0)%PageSize, "code does not start on a page")
			codeEnd := CodeAddr(n, n-1) + CodeStride
			start := RegionStart(n)
			assert.LessOrEqual(t, codeEnd, start, "code runs into the regions")
			assert.Zero(t, start%PageSize)
			assert.GreaterOrEqual(t, start, uint64(MinRegionStart))
			assert.Less(t, start, uint64(RegionLimit))
			if n <= 1024 {
				assert.Equal(t, uint64(MinRegionStart), start)
			}
			// Every program fits its slot at the last vCPU too.
			for _, p := range []Params{
				{Mode: ModeWrite, BytesPerPage: PageSize},
				{Mode: ModeRead},
				{Mode: ModeIdle},
			} {
				p.RegionBase, p.RegionSize, p.RecordAddr = start, PageSize, RecordAddr(n-1)
				code, err := Program(p)
				require.NoError(t, err)
				assert.LessOrEqual(t, len(code), CodeStride)
			}
		})
	}
}
