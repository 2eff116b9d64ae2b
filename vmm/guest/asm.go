package guest

import (
	"encoding/binary"
	"fmt"
)

// A tiny x86 assembler for the handful of 32-bit instructions the workloads
// use. Memory operands are [base+disp] with a general register base other
// than esp (which would need a SIB byte the programs never use).

type reg uint8

const (
	eax reg = iota
	ecx
	edx
	ebx
	esp
	ebp
	esi
	edi
)

// mem is a [base+disp] operand, or [disp] (an absolute address) when abs.
type mem struct {
	base reg
	disp int32
	abs  bool
}

// at is the absolute memory operand [addr].
func at(addr uint32) mem { return mem{disp: int32(addr), abs: true} }

// aluOp is the /digit of the classic ALU group (add, or, adc, sbb, and, sub,
// xor, cmp); opcode op*8+1 is "op r/m32, r32", op*8+3 "op r32, r/m32".
type aluOp uint8

const (
	opAdd aluOp = iota
	opOr
	opAdc
	opSbb
	opAnd
	opSub
	opXor
	opCmp
)

// cond is a condition code for jcc (0F 80+cc).
type cond uint8

const (
	condB  cond = 0x2 // unsigned below
	condZ  cond = 0x4
	condNZ cond = 0x5
	condA  cond = 0x7 // unsigned above
)

type asm struct {
	buf    []byte
	labels map[string]int
	fixups []fixup
}

// fixup is a rel32 at buf[at:at+4] to resolve against label, relative to at+4.
type fixup struct {
	at    int
	label string
}

func newAsm() *asm { return &asm{labels: map[string]int{}} }

func (a *asm) emit(b ...byte) { a.buf = append(a.buf, b...) }

func (a *asm) imm32(v uint32) { a.buf = binary.LittleEndian.AppendUint32(a.buf, v) }

// modrmMem emits a ModRM (and displacement) for a memory operand with the
// given reg field.
func (a *asm) modrmMem(regField byte, m mem) {
	if m.abs {
		a.emit(regField<<3 | 0x5) // mod 00, r/m 101: [disp32]
		a.imm32(uint32(m.disp))
		return
	}
	if m.base == esp {
		panic("guest asm: esp as a base needs a SIB byte")
	}
	switch {
	case m.disp == 0 && m.base != ebp: // [ebp] with mod 00 means disp32
		a.emit(regField<<3 | byte(m.base))
	case m.disp >= -128 && m.disp <= 127:
		a.emit(0x40|regField<<3|byte(m.base), byte(int8(m.disp)))
	default:
		a.emit(0x80 | regField<<3 | byte(m.base))
		a.imm32(uint32(m.disp))
	}
}

func (a *asm) modrmReg(regField byte, rm reg) { a.emit(0xc0 | regField<<3 | byte(rm)) }

func (a *asm) label(name string) {
	if _, dup := a.labels[name]; dup {
		panic("guest asm: duplicate label " + name)
	}
	a.labels[name] = len(a.buf)
}

func (a *asm) rel32(label string) {
	a.fixups = append(a.fixups, fixup{at: len(a.buf), label: label})
	a.imm32(0)
}

// movRI: mov r32, imm32.
func (a *asm) movRI(r reg, v uint32) { a.emit(0xb8 + byte(r)); a.imm32(v) }

// movMI: mov dword [m], imm32.
func (a *asm) movMI(m mem, v uint32) { a.emit(0xc7); a.modrmMem(0, m); a.imm32(v) }

// movRM: mov r32, [m].
func (a *asm) movRM(r reg, m mem) { a.emit(0x8b); a.modrmMem(byte(r), m) }

// movMR: mov [m], r32.
func (a *asm) movMR(m mem, r reg) { a.emit(0x89); a.modrmMem(byte(r), m) }

// movRR: mov dst, src.
func (a *asm) movRR(dst, src reg) { a.emit(0x89); a.modrmReg(byte(src), dst) }

// aluRR: op dst, src.
func (a *asm) aluRR(op aluOp, dst, src reg) { a.emit(byte(op)*8 + 1); a.modrmReg(byte(src), dst) }

// aluRM: op r, [m].
func (a *asm) aluRM(op aluOp, r reg, m mem) { a.emit(byte(op)*8 + 3); a.modrmMem(byte(r), m) }

// aluRI: op r, imm (the sign-extended imm8 form when it fits).
func (a *asm) aluRI(op aluOp, r reg, v int32) {
	if v >= -128 && v <= 127 {
		a.emit(0x83)
		a.modrmReg(byte(op), r)
		a.emit(byte(int8(v)))
		return
	}
	a.emit(0x81)
	a.modrmReg(byte(op), r)
	a.imm32(uint32(v))
}

// incR: inc r32 (the one-byte 40+r form, valid in 32-bit mode).
func (a *asm) incR(r reg) { a.emit(0x40 + byte(r)) }

// decR: dec r32 (48+r).
func (a *asm) decR(r reg) { a.emit(0x48 + byte(r)) }

// lockCmpxchg8b: lock cmpxchg8b qword [m], an atomic 64-bit compare-exchange.
func (a *asm) lockCmpxchg8b(m mem) { a.emit(0xf0, 0x0f, 0xc7); a.modrmMem(1, m) }

func (a *asm) rdtsc() { a.emit(0x0f, 0x31) }
func (a *asm) pause() { a.emit(0xf3, 0x90) }
func (a *asm) hlt()   { a.emit(0xf4) }

// jcc: conditional jump, always rel32 so no relaxation pass is needed.
func (a *asm) jcc(c cond, label string) { a.emit(0x0f, 0x80+byte(c)); a.rel32(label) }

// jmp: unconditional jump (rel32).
func (a *asm) jmp(label string) { a.emit(0xe9); a.rel32(label) }

// assemble resolves the jumps and returns the code.
func (a *asm) assemble() ([]byte, error) {
	for _, f := range a.fixups {
		to, ok := a.labels[f.label]
		if !ok {
			return nil, fmt.Errorf("guest asm: undefined label %q", f.label)
		}
		binary.LittleEndian.PutUint32(a.buf[f.at:], uint32(int32(to-(f.at+4))))
	}
	return a.buf, nil
}
