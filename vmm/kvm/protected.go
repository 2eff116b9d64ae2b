package kvm

// Control register and flag bits for SetupProtectedMode.
const (
	cr0PE = 1 << 0 // protection enable
	cr0ET = 1 << 4 // extension type (always 1 on modern CPUs)

	rflagsReserved = 1 << 1 // bit 1 of EFLAGS always reads 1
)

// Flat 32-bit segments: base 0, limit 4 GiB (4 KiB granularity), selectors
// as if from a GDT with code at 0x08 and data at 0x10. The hidden parts are
// set directly, so no GDT needs to exist in guest memory as long as the
// guest never reloads a segment register.
var (
	flatCode = Segment{Base: 0, Limit: 0xffffffff, Selector: 0x08, Type: 0xb, // execute/read, accessed
		Present: 1, DB: 1, S: 1, G: 1}
	flatData = Segment{Base: 0, Limit: 0xffffffff, Selector: 0x10, Type: 0x3, // read/write, accessed
		Present: 1, DB: 1, S: 1, G: 1}
)

// SetupProtectedMode puts a fresh vCPU in 32-bit protected mode with paging
// off (CR0 = PE|ET, EFER 0), flat code and data segments, EFLAGS 0x2 (IF and
// DF clear), EIP = entry and ESP = stack. Guest code must be 32-bit code that
// does not reload segment registers. Paging stays off because, on some hosts,
// guest paging stops data writes from reaching the dirty ring.
func SetupProtectedMode(c *VCPU, entry, stack uint32) error {
	s, err := c.Sregs()
	if err != nil {
		return err
	}
	s.CS = flatCode
	s.DS, s.ES, s.FS, s.GS, s.SS = flatData, flatData, flatData, flatData, flatData
	s.CR0 = cr0PE | cr0ET
	s.CR3, s.CR4, s.EFER = 0, 0, 0
	if err := c.SetSregs(s); err != nil {
		return err
	}
	return c.SetRegs(Regs{RIP: uint64(entry), RSP: uint64(stack), RFLAGS: rflagsReserved})
}
