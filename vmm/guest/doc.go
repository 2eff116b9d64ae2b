// Package guest generates the machine code each migvisor vCPU runs: small
// workloads (write, read, idle) in 32-bit protected mode with paging off,
// where every page the guest writes reaches KVM's dirty ring (guest paging
// breaks dirty tracking on some hosts). The code is hand-encoded by a tiny
// assembler (asm.go) and checked against its intended listing with a
// disassembler in the tests.
//
// Each program keeps a 64-byte record in guest memory (layout in record.go):
// pages touched and passes completed, which the VMM reads while the guest runs
// (ReadRecord), and ticks-per-page, which the VMM sets (SetTicksPerPage) to
// pace the guest on its own TSC without any exit to the VMM. The guest counts
// pages in a register and adds them to the record every RecordEvery pages
// (16 MiB) and at the end of each pass: pages is exact as of the last update,
// and exact at pass boundaries, but may lag the guest by up to RecordEvery-1
// pages, so a rate read from it is coarse over a large region touched
// slowly.
//
// Use:
//
//	code, err := guest.Program(guest.Params{Mode: guest.ModeWrite,
//		RegionBase: base, RegionSize: size, RecordAddr: guest.RecordAddr(cpu)})
//	copy(mem[guest.CodeAddr(n, cpu):], code) // n: the machine's vCPUs
//	guest.InitRecord(mem, guest.RecordAddr(cpu), guest.TicksPerPage(rate, tscHz))
//	kvm.SetupProtectedMode(vcpu, uint32(guest.CodeAddr(n, cpu)), 0)
//	... run the vCPU; guest.ReadRecord(mem, guest.RecordAddr(cpu)) at any time
//
// tscHz is the guest TSC frequency: kvm's VCPU.TSCKHz()*1000.
//
// The write workload dirties exactly its region's pages and its record's
// page; the read workload only its record's page, a few stores a pass, so
// a dirty limit leaves it alone; idle writes its record once and then exits
// to the VMM with HLT each time it is run.
//
// On nested PVM the guest's 32-bit code is emulated (a few hundred ns an
// instruction) and every store is a dirty-ring entry, so a write page costs
// BytesPerPage/4 entries, and the record about one per RecordEvery pages plus
// two a pass. The page loop is eight instructions besides the page's own
// access (ten for the default write, nine for a read): flat out on a quiet
// host, about 420,000 written and 500,000 read pages/s with the ring
// collected as it goes (BenchmarkWorkload; half that when the host is busy).
package guest
