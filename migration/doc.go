// Package migration live-migrates a migvisor machine to another migvisor with precopy, as
// QEMU 10 does, and implements QEMU's migration QMP commands.
//
// A Migration (New) owns the capabilities, the parameters and one outgoing and one incoming
// migration of a machine. It knows the machine through the small Machine interface
// (vmm.Machine through an adapter in cmd/migvisor), the dirty-limit service through
// DirtyLimiter, and sends events through Emitter. Its methods are the commands: Migrate,
// MigrateIncoming (and StartIncoming for -incoming), Cancel, Pause, Query,
// SetCapabilities/QueryCapabilities, SetParameters/QueryParameters; errors a client sees
// are *qerr.Error with QEMU's texts (errors.go).
//
// # Precopy
//
// Setup marks every page dirty and counts the first sync (pass 1). Each iteration sends dirty
// pages from a cursor for at most 50 ms or until the rate limit (max-bandwidth per 100 ms
// window) is spent, then an end-of-section record. When the pages left are fewer than the
// switch-over threshold (measured bandwidth × downtime-limit) the dirty log is synced again
// (a new pass); when they still fit, the guest is stopped (finish-migrate, STOP), the state
// goes to device, a last sync runs, and the rest goes out with the vCPU state while all
// memory is checked against what was sent, then the digests (see the stream format).
// Syncing harvests the dirty log before any page it reports is read, so a page written after
// its harvest is seen by the next sync. With pause-before-switchover the stopped source
// enters pre-switchover and waits for migrate-continue (Continue) before device; a cancel
// there resumes the guest, and the downtime counts from the stop either way.
// Status: none → setup → active → [pre-switchover →] device → completed;
// MIGRATION and MIGRATION_PASS events with the events capability. The source ends in
// postmigrate; on failure or cancel it ends failed or cancelled with the guest as it was
// (RESUME if the migration had stopped it).
//
// Convergence: every sync more than a second after the last period start compares what the
// guest dirtied with what was sent; two high periods in a row throttle the guest, either by
// auto-converge (a CPU throttle of cpu-throttle-initial, then +increment up to
// max-cpu-throttle, served as p/(1−p) × 10 ms of sleep per 10 ms slice on each vCPU's thread
// through the machine's hook) or, with the dirty-limit capability, by giving every vCPU the
// vcpu-dirty-limit with period x-vcpu-dirty-limit-period. With auto-converge a sync also
// happens at least every 5 s after the first pass, so that the throttle reacts inside long
// passes. Unlike QEMU, the migration's limit is layered over the user's (each vCPU keeps the
// tighter of the two) and lifted when the migration ends whatever the outcome, which gives the
// user's limits back as they were.
//
// # Transports
//
// unix:PATH, tcp:HOST:PORT, fd:NAME (a connected socket or a pipe passed with getfd, which
// MigrateArgs.FDs / IncomingArgs.FDs hand over; the destination also takes an inherited
// descriptor's number), exec:CMD (through /bin/sh -c; the stream is the command's stdin
// on the source and its stdout on the destination) and file:PATH[,offset=N] (migrate saves,
// -incoming restores), or the same as QEMU's "channels". Sockets carry a return path: the
// destination accepts the header or refuses it with its reason before any page moves, then
// refuses a bad stream, or acknowledges a verified one and waits for the source's go-ahead
// before it runs the guest, so that exactly one side runs it.
//
// Pages are never copied in user space. The sender checksums a run of pages while its
// encoder's writer goroutine writes the previous one from guest memory (writev with the
// records before it); over a unix socket the pages are lent with vmsplice and spliced into
// the socket, so the receiver's read is their only copy. The receiver reads payloads straight
// into guest memory and checksums them while they are in cache. Both ends ask for 4 MiB
// socket buffers so that neither waits for the other. `migctl bench-migrate -only idle`
// measures it against the transport's raw rate (`-only raw`).
//
// # Stream format, version 2
//
// All integers are big-endian.
//
//	header   "MIGVISOR" | u32 version (2) | u32 flags (bit 0: return path; bit 1: the source guest was stopped)
//	         | u64 memory size | u32 vCPUs | u32 page size (4096)
//	         | u32 n | n bytes workloads description | u32 CRC32C of all the above
//	records  any number of:
//	  0x01 RAM   u8 flags (bit 0: zero) | u64 first page | u32 count (1..65536)
//	             | count × page size bytes unless zero
//	  0x02 EOS   u64 pass (the end of one iteration; the sender's dirty-sync count)
//	  0x03 CPU   u32 n | n bytes of vCPU state (opaque to migration, versioned by the machine)
//	  0x04 END   32 bytes memory digest | 32 bytes stream digest (the last record of the stream)
//	go-ahead 0x05, after the destination's acknowledgement (return path only)
//	return path, destination to source, twice: after the header and after the trailer
//	         'A' u32 0 (header accepted / stream verified and vCPU state loaded)
//	       | 'R' u32 n, n bytes reason (refused; the destination then drops the stream)
//
// The stream digest is SHA-256 over every byte of the stream before it but page payloads:
// the header (so the machine configuration and the flags), every record's type and fields
// (page runs, zero flags, sections), the vCPU state and the memory digest. The destination
// checks it as the END record arrives, before it looks at memory or loads the vCPU state, so
// a flipped register or page-run header is refused like a flipped page.
//
// The memory digest is SHA-256 over the memory size (u64) and the CRC32C of every page, of
// guest memory as the source had it when it stopped. It covers the payloads: the last copy of
// each page is what the destination's memory ends up holding, and a copy a later one replaces
// never reaches the guest, so every byte after the header that reaches the guest is verified.
// Each end keeps the checksum of every page as it goes out or comes in. Pages go from guest
// memory to the transport uncopied: one the guest changes between its checksum and its send was
// reported dirty and goes again, and any other difference between what was summed and what
// arrived fails the digest.
//
// What guards against a write the dirty log missed (scrub.go): pages that were never written
// are holes (Machine.PopulatedPages); they go as zero runs in setup, unread, and the destination
// punches holes for zero runs. While precopy waits for its bandwidth window, a scrub rereads the
// pages the log calls clean against the checksum of what was last sent of them; one that differs
// and that the next sync does not report is a write the log missed: it is logged, counted and
// sent again. At the stop, once the last sync is done, memory no longer changes: beside the
// final send, the source rereads populated pages the final send does not carry, from where the
// scrub left off, for at most a quarter of downtime-limit (Config.CheckAllMemory, the daemon's
// -memory-check all: all of them); a page that differs is sent again, and once the log has
// missed any write the check covers all populated memory whatever it costs. A guest none of
// whose vCPUs ran since the migration's dirty log opened cannot have changed a page and is not
// reread. The digest hashes chunks of 4096 page checksums (refreshed between passes; a chunk of
// zero pages is a constant), so that digesting at the stop costs what the final send touched.
// downtime. The receiver refuses another version (a version 1 stream, whose END had the memory
// digest alone, is refused at the header with the reason on the return path, as a version 1
// destination refuses version 2: both ends must run the same version), a bad header checksum, a
// different memory size, vCPU count, page size or (when it knows its own) workloads
// description, records out of bounds, a truncated stream, a stream digest that differs from its
// records' and a memory digest that differs from its memory's; it never runs a guest from such
// a stream, and the source, refused, resumes its own.
package migration
