package migration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
)

// Stream constants; doc.go describes the layout.
const (
	StreamVersion = 2
	PageSize      = 4096

	headerFixedLen = 8 + 4 + 4 + 8 + 4 + 4 + 4 // magic .. workloads length
	ramHeaderLen   = 1 + 1 + 8 + 4             // a RAM record before its payload
	maxWorkloads   = 1 << 20
	maxCPUState    = 64 << 20
	maxRunPages    = 1 << 16
	// readChunk is the most a length field makes the decoder allocate before the bytes it
	// announces arrive; past it, the buffer grows with what was received.
	readChunk = 64 << 10

	recRAM   = 0x01
	recEOS   = 0x02
	recCPU   = 0x03
	recTrail = 0x04
	recGo    = 0x05

	ramZero = 0x01 // the run is all zero pages: no payload

	// FlagReturnPath in the header asks the destination to answer on the same connection
	// (acknowledge the verified state, then wait for the go-ahead before it runs the guest).
	FlagReturnPath = 0x1
	// FlagSourceStopped says the source's guest was not running when the migration started
	// (stop, -S): the destination then leaves it paused, as QEMU carries the run state over.
	FlagSourceStopped = 0x2

	rpAck    = 'A'
	rpRefuse = 'R'
)

var (
	streamMagic = [8]byte{'M', 'I', 'G', 'V', 'I', 'S', 'O', 'R'}
	castagnoli  = crc32.MakeTable(crc32.Castagnoli)
	zeroPage    [PageSize]byte
)

// MachineConfig is what both ends must agree on before any page moves.
type MachineConfig struct {
	MemSize   uint64
	CPUs      uint32
	PageSize  uint32
	Workloads []byte // opaque, compared byte for byte when the receiver knows its own
}

// Header opens every stream.
type Header struct {
	Version uint32
	Flags   uint32
	Config  MachineConfig
}

// Digest is a SHA-256: of all guest memory (MemoryDigest), or of the stream's records.
type Digest [32]byte

// RecordKind tells what Decoder.Next returned.
type RecordKind int

// Record kinds.
const (
	KindPages RecordKind = iota + 1 // pages written into the memory given to Next
	KindZeroPages
	KindEndOfSection
	KindCPU
	KindTrailer
)

// Record is one decoded record. CPU aliases the decoder's buffer until the next call.
type Record struct {
	Kind   RecordKind
	First  uint64 // first page index (pages, zero pages)
	Count  uint32 // number of pages
	Pass   uint64 // end of section: the sender's dirty-sync count
	CPU    []byte
	Digest Digest // trailer: the memory digest (the stream digest is checked by Next)
}

// Encoder writes a stream. It counts every byte it accepts, for statistics and rate limiting,
// and digests every byte but page payloads for the trailer's stream digest.
// Small records gather in a buffer. A page payload is not copied: the encoder queues a
// reference to it, with the records buffered before it, for its writer goroutine, which sends
// both in one writev when the transport is a socket while the caller prepares the next run.
// A payload must therefore stay as it is until the next Flush, or change only where the
// caller will send it again (guest memory, whose changed pages are dirty again). The writer's
// first error is returned by the calls after it.
type Encoder struct {
	w    io.Writer
	conn net.Conn // w's socket, when it has one
	buf  []byte
	n    int64
	hdr  [32]byte
	sum  hash.Hash // the stream digest so far

	queue  chan encChunk
	spare  chan []byte // buffers the writer is done with
	failed atomic.Pointer[error]
	closed bool

	guest  []byte   // SetGuestMemory's
	splice *splicer // the writer's, for guest pages to a unix socket
}

// encChunk is one write for the writer goroutine.
type encChunk struct {
	small   []byte     // buffered records, handed back through spare once written
	payload []byte     // a payload, written after small
	guest   bool       // payload is guest memory: it may be lent rather than copied
	flushed chan error // answered once everything queued before is written
}

const (
	encBufSize = 64 << 10
	// Payloads at least this long are queued by reference rather than copied.
	directMin = 16 << 10
	// encQueue chunks may wait for the writer: enough to keep it busy while the caller
	// checksums the next run, few enough to keep the byte count near what was sent.
	encQueue = 4
)

// NewEncoder starts a writer for w; Close stops it. A w with a NetConn method (as
// crypto/tls.Conn has) gets records and payload in one system call.
func NewEncoder(w io.Writer) *Encoder {
	e := &Encoder{w: w, buf: make([]byte, 0, encBufSize), queue: make(chan encChunk, encQueue),
		spare: make(chan []byte, encQueue+1), sum: sha256.New()}
	if nc, ok := w.(interface{ NetConn() net.Conn }); ok {
		e.conn = nc.NetConn()
	}
	for range encQueue + 1 {
		e.spare <- make([]byte, 0, encBufSize)
	}
	go e.writer()
	return e
}

func (e *Encoder) writer() {
	var err error
	for c := range e.queue {
		if err == nil {
			err = e.send(c)
			if err != nil {
				e.failed.Store(&err)
			}
		}
		if c.small != nil {
			e.spare <- c.small[:0]
		}
		if c.flushed != nil {
			c.flushed <- err
		}
	}
	if e.splice != nil {
		e.splice.close()
	}
}

func (e *Encoder) send(c encChunk) error {
	if c.guest && e.splice != nil {
		if len(c.small) > 0 {
			if _, err := e.conn.Write(c.small); err != nil {
				return err
			}
			c.small = nil
		}
		err := e.splice.send(c.payload)
		if !errors.Is(err, errNoSplice) {
			return err
		}
		e.splice.close() // the host will not: write from now on
		e.splice = nil
	}
	if e.conn != nil {
		vec := net.Buffers{c.small, c.payload}
		_, err := vec.WriteTo(e.conn)
		return err
	}
	for _, b := range [][]byte{c.small, c.payload} {
		if len(b) > 0 {
			if _, err := e.w.Write(b); err != nil {
				return err
			}
		}
	}
	return nil
}

// Written is the number of bytes accepted so far (written or queued).
func (e *Encoder) Written() int64 { return e.n }

func (e *Encoder) err() error {
	if p := e.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// SetGuestMemory names the memory WriteGuestPages sends from, before the first write. It
// must stay mapped and change only where the caller will send it again while the stream
// is open: over a unix socket its pages are lent to the receiver rather than copied.
func (e *Encoder) SetGuestMemory(mem []byte) {
	e.guest = mem
	if e.conn != nil {
		e.splice = newSplicer(e.conn)
	}
}

// enqueue hands the buffer and payload to the writer and takes a fresh buffer.
func (e *Encoder) enqueue(payload []byte, guest bool) error {
	if err := e.err(); err != nil {
		return err
	}
	e.queue <- encChunk{small: e.buf, payload: payload, guest: guest}
	e.buf = <-e.spare
	return nil
}

// Push hands what is buffered to the writer without waiting for it.
func (e *Encoder) Push() error {
	if len(e.buf) == 0 {
		return e.err()
	}
	return e.enqueue(nil, false)
}

// Flush pushes, then waits until every accepted byte is written.
func (e *Encoder) Flush() error {
	if err := e.Push(); err != nil {
		return err
	}
	done := make(chan error, 1)
	e.queue <- encChunk{flushed: done}
	return <-done
}

// Close stops the writer once it has written what is queued, without waiting for it: a
// writer blocked on a transport that is not read returns when the transport is closed.
func (e *Encoder) Close() {
	if !e.closed {
		e.closed = true
		close(e.queue)
	}
}

func (e *Encoder) write(b []byte) error { return e.writeFrom(b, false) }

// writeFrom accepts b; guest marks a page payload, which the memory digest covers instead
// of the stream digest.
func (e *Encoder) writeFrom(b []byte, guest bool) error {
	if err := e.err(); err != nil {
		return err
	}
	if !guest {
		e.sum.Write(b)
	}
	if len(b) >= directMin {
		if err := e.enqueue(b, guest); err != nil {
			return err
		}
		e.n += int64(len(b))
		return nil
	}
	if len(e.buf)+len(b) > cap(e.buf) {
		if err := e.Push(); err != nil {
			return err
		}
	}
	e.buf = append(e.buf, b...)
	e.n += int64(len(b))
	return nil
}

// WriteHeader writes magic, version, flags and the machine configuration, sealed by a CRC32C.
func (e *Encoder) WriteHeader(h Header) error {
	if len(h.Config.Workloads) > maxWorkloads {
		return fmt.Errorf("workloads description too large (%d bytes)", len(h.Config.Workloads))
	}
	b := make([]byte, 0, headerFixedLen+len(h.Config.Workloads)+4)
	b = append(b, streamMagic[:]...)
	b = binary.BigEndian.AppendUint32(b, h.Version)
	b = binary.BigEndian.AppendUint32(b, h.Flags)
	b = binary.BigEndian.AppendUint64(b, h.Config.MemSize)
	b = binary.BigEndian.AppendUint32(b, h.Config.CPUs)
	b = binary.BigEndian.AppendUint32(b, h.Config.PageSize)
	b = binary.BigEndian.AppendUint32(b, uint32(len(h.Config.Workloads)))
	b = append(b, h.Config.Workloads...)
	b = binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	return e.write(b)
}

func (e *Encoder) ramHeader(flags byte, first uint64, count int) error {
	if count <= 0 || count > maxRunPages {
		return fmt.Errorf("bad run length %d", count)
	}
	h := e.hdr[:ramHeaderLen]
	h[0] = recRAM
	h[1] = flags
	binary.BigEndian.PutUint64(h[2:], first)
	binary.BigEndian.PutUint32(h[10:], uint32(count))
	return e.write(h)
}

// WriteGuestPages writes count pages of SetGuestMemory's memory from page first.
func (e *Encoder) WriteGuestPages(first uint64, count int) error {
	if first+uint64(count) > uint64(len(e.guest)/PageSize) {
		return fmt.Errorf("page run %d+%d outside guest memory of %d pages", first, count, len(e.guest)/PageSize)
	}
	if err := e.ramHeader(0, first, count); err != nil {
		return err
	}
	return e.writeFrom(e.guest[first*PageSize:(first+uint64(count))*PageSize], true)
}

// WriteZeroPages writes a run of zero pages: the flag alone, no payload.
func (e *Encoder) WriteZeroPages(first uint64, count int) error {
	return e.ramHeader(ramZero, first, count)
}

// WriteEndOfSection closes one iteration.
func (e *Encoder) WriteEndOfSection(pass uint64) error {
	h := e.hdr[:9]
	h[0] = recEOS
	binary.BigEndian.PutUint64(h[1:], pass)
	return e.write(h)
}

// WriteCPU writes the opaque vCPU state.
func (e *Encoder) WriteCPU(state []byte) error {
	if len(state) > maxCPUState {
		return fmt.Errorf("vCPU state too large (%d bytes)", len(state))
	}
	h := e.hdr[:5]
	h[0] = recCPU
	binary.BigEndian.PutUint32(h[1:], uint32(len(state)))
	if err := e.write(h); err != nil {
		return err
	}
	return e.write(state)
}

// WriteTrailer ends the stream with the digest of guest memory as the source stopped it,
// then the stream digest of everything before it but page payloads.
func (e *Encoder) WriteTrailer(d Digest) error {
	e.hdr[0] = recTrail
	if err := e.write(e.hdr[:1]); err != nil {
		return err
	}
	if err := e.write(d[:]); err != nil {
		return err
	}
	return e.write(e.sum.Sum(nil))
}

// WriteGo is the source's go-ahead after the destination acknowledged (return path only).
func (e *Encoder) WriteGo() error {
	if err := e.write([]byte{recGo}); err != nil {
		return err
	}
	return e.Flush()
}

// StreamError is a malformed, truncated or refused stream.
type StreamError struct{ Msg string }

func (e *StreamError) Error() string { return "migration stream: " + e.Msg }

func streamErr(format string, args ...any) error {
	return &StreamError{Msg: fmt.Sprintf(format, args...)}
}

// ErrStreamDigestMismatch is the refusal of a stream whose records (header, page records
// but their payloads, sections, vCPU state, memory digest) differ from what the source sent.
var ErrStreamDigestMismatch = errors.New("stream digest mismatch: the machine configuration, page records or vCPU state received differ from the source's")

// Decoder reads a stream.
type Decoder struct {
	r      *bufio.Reader
	hdr    Header
	gotHdr bool
	buf    [16]byte
	cpu    []byte
	n      int64
	sum    hash.Hash // the stream digest of what was read so far
}

// NewDecoder buffers reads from r. The buffer is small: bufio reads a request at least its
// size straight into the caller's slice, so page payloads land in guest memory uncopied.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: bufio.NewReaderSize(r, decBufSize), sum: sha256.New()}
}

const decBufSize = 8 << 10

// full reads len(b) bytes into the stream digest.
func (d *Decoder) full(b []byte) error {
	if err := d.payload(b); err != nil {
		return err
	}
	d.sum.Write(b)
	return nil
}

// payload reads len(b) bytes of page payload, which the memory digest covers.
func (d *Decoder) payload(b []byte) error {
	n, err := io.ReadFull(d.r, b)
	d.n += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return streamErr("truncated after %d bytes", d.n)
		}
		return err
	}
	return nil
}

// sized reads n bytes into buf's array (or a new one), growing it only as the bytes arrive,
// so that a length the peer announces but does not send costs no memory.
func (d *Decoder) sized(buf []byte, n int) ([]byte, error) {
	buf = buf[:0]
	for len(buf) < n {
		k := min(n-len(buf), max(len(buf), readChunk))
		buf = slices.Grow(buf, k)
		if err := d.full(buf[len(buf) : len(buf)+k]); err != nil {
			return nil, err
		}
		buf = buf[:len(buf)+k]
	}
	return buf, nil
}

// ReadHeader reads and checks the header: magic, CRC and version. The configuration is
// compared by CheckConfig.
func (d *Decoder) ReadHeader() (Header, error) {
	b := make([]byte, headerFixedLen)
	if err := d.full(b[:8]); err != nil {
		return Header{}, err
	}
	if !bytes.Equal(b[:8], streamMagic[:]) {
		if bytes.HasPrefix(b, []byte("QEVM")) {
			return Header{}, streamErr("not a migvisor migration stream (this is QEMU's)")
		}
		return Header{}, streamErr("not a migvisor migration stream (bad magic %q)", b[:8])
	}
	if err := d.full(b[8:]); err != nil {
		return Header{}, err
	}
	h := Header{
		Version: binary.BigEndian.Uint32(b[8:]),
		Flags:   binary.BigEndian.Uint32(b[12:]),
	}
	if h.Version != StreamVersion {
		return Header{}, streamErr("stream version %d is not supported (this migvisor reads version %d)", h.Version, StreamVersion)
	}
	h.Config.MemSize = binary.BigEndian.Uint64(b[16:])
	h.Config.CPUs = binary.BigEndian.Uint32(b[24:])
	h.Config.PageSize = binary.BigEndian.Uint32(b[28:])
	wl := binary.BigEndian.Uint32(b[32:])
	if wl > maxWorkloads {
		return Header{}, streamErr("workloads description too large (%d bytes)", wl)
	}
	workloads, err := d.sized(nil, int(wl))
	if err != nil {
		return Header{}, err
	}
	crc := d.buf[:4]
	if err := d.full(crc); err != nil {
		return Header{}, err
	}
	if crc32.Update(crc32.Checksum(b, castagnoli), castagnoli, workloads) != binary.BigEndian.Uint32(crc) {
		return Header{}, streamErr("header checksum mismatch")
	}
	h.Config.Workloads = workloads[:wl:wl]
	if h.Config.PageSize != PageSize {
		return Header{}, streamErr("page size %d is not supported (expected %d)", h.Config.PageSize, PageSize)
	}
	if h.Config.MemSize%PageSize != 0 {
		return Header{}, streamErr("memory size %d is not a whole number of pages", h.Config.MemSize)
	}
	d.hdr, d.gotHdr = h, true
	return h, nil
}

// CheckConfig refuses a stream whose machine differs from the receiver's.
func CheckConfig(got, want MachineConfig) error {
	switch {
	case got.MemSize != want.MemSize:
		return streamErr("the source has %d bytes of memory, this machine has %d", got.MemSize, want.MemSize)
	case got.CPUs != want.CPUs:
		return streamErr("the source has %d vCPUs, this machine has %d", got.CPUs, want.CPUs)
	case got.PageSize != want.PageSize:
		return streamErr("the source uses %d-byte pages, this machine %d", got.PageSize, want.PageSize)
	case want.Workloads != nil && !bytes.Equal(got.Workloads, want.Workloads):
		return streamErr("the source's workloads (%q) differ from this machine's (%q)", got.Workloads, want.Workloads)
	}
	return nil
}

// Next reads one record. Page payloads are read straight into mem, which must be the
// header's memory size; a record that does not fit is an error and writes nothing.
func (d *Decoder) Next(mem []byte) (Record, error) {
	if !d.gotHdr {
		return Record{}, errors.New("migration stream: Next before ReadHeader")
	}
	if uint64(len(mem)) != d.hdr.Config.MemSize {
		return Record{}, fmt.Errorf("migration stream: memory of %d bytes for a %d-byte stream", len(mem), d.hdr.Config.MemSize)
	}
	tag := d.buf[:1]
	if err := d.full(tag); err != nil {
		return Record{}, err
	}
	switch tag[0] {
	case recRAM:
		h := d.buf[:ramHeaderLen-1]
		if err := d.full(h); err != nil {
			return Record{}, err
		}
		flags := h[0]
		first := binary.BigEndian.Uint64(h[1:])
		count := binary.BigEndian.Uint32(h[9:])
		pages := uint64(len(mem)) / PageSize
		if flags&^ramZero != 0 {
			return Record{}, streamErr("unknown page flags %#x", flags)
		}
		if count == 0 || count > maxRunPages || first >= pages || uint64(count) > pages-first {
			return Record{}, streamErr("page run %d+%d outside memory of %d pages", first, count, pages)
		}
		if flags&ramZero != 0 {
			// The caller makes them zero: reading or writing pages to find out or to clear them
			// would fault in memory that the machine can drop instead.
			return Record{Kind: KindZeroPages, First: first, Count: count}, nil
		}
		span := mem[first*PageSize : (first+uint64(count))*PageSize]
		if err := d.payload(span); err != nil {
			return Record{}, err
		}
		return Record{Kind: KindPages, First: first, Count: count}, nil
	case recEOS:
		b := d.buf[:8]
		if err := d.full(b); err != nil {
			return Record{}, err
		}
		return Record{Kind: KindEndOfSection, Pass: binary.BigEndian.Uint64(b)}, nil
	case recCPU:
		b := d.buf[:4]
		if err := d.full(b); err != nil {
			return Record{}, err
		}
		n := binary.BigEndian.Uint32(b)
		if n > maxCPUState {
			return Record{}, streamErr("vCPU state too large (%d bytes)", n)
		}
		cpu, err := d.sized(d.cpu, int(n))
		if err != nil {
			return Record{}, err
		}
		d.cpu = cpu
		return Record{Kind: KindCPU, CPU: cpu}, nil
	case recTrail:
		r := Record{Kind: KindTrailer}
		if err := d.full(r.Digest[:]); err != nil {
			return Record{}, err
		}
		var want, got Digest
		d.sum.Sum(want[:0])
		if err := d.full(got[:]); err != nil {
			return Record{}, err
		}
		if got != want {
			return Record{}, ErrStreamDigestMismatch
		}
		return r, nil
	default:
		return Record{}, streamErr("unknown record type %#x at byte %d", tag[0], d.n-1)
	}
}

// ReadGo waits for the source's go-ahead (return path only).
func (d *Decoder) ReadGo() error {
	b := d.buf[:1]
	if err := d.full(b); err != nil {
		return err
	}
	if b[0] != recGo {
		return streamErr("expected the go-ahead, got record type %#x", b[0])
	}
	return nil
}

// writeReply sends the destination's verdict on the return path: nil = acknowledged.
func writeReply(w io.Writer, refusal error) error {
	if refusal == nil {
		_, err := w.Write([]byte{rpAck, 0, 0, 0, 0})
		return err
	}
	msg := refusal.Error()
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := []byte{rpRefuse}
	b = binary.BigEndian.AppendUint32(b, uint32(len(msg)))
	_, err := w.Write(append(b, msg...))
	return err
}

// RefusedError is the destination's refusal, as it worded it.
type RefusedError struct{ Msg string }

func (e *RefusedError) Error() string { return "the destination refused the migration: " + e.Msg }

// readReply reads the destination's verdict: nil for an acknowledgement.
func readReply(r io.Reader) error {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(h[1:])
	switch {
	case h[0] == rpAck && n == 0:
		return nil
	case h[0] == rpRefuse && n <= 4096:
		msg := make([]byte, n)
		if _, err := io.ReadFull(r, msg); err != nil {
			return err
		}
		return &RefusedError{Msg: string(msg)}
	}
	return streamErr("bad reply from the destination (%#x)", h[0])
}

// MemoryDigest summarises guest memory: SHA-256 over the memory size (u64) and the CRC32C of
// every page in order. Both ends keep the page checksums as pages go out and come in
// (PageSum, DigestOf), so that neither rereads its memory in the downtime.
func MemoryDigest(mem []byte) Digest {
	return DigestOf(uint64(len(mem)), PageSums(mem))
}

// PageSums checksums every page of mem, in parallel.
func PageSums(mem []byte) []uint32 {
	sums := make([]uint32, len(mem)/PageSize)
	ps := &pageSummer{mem: mem}
	var wg sync.WaitGroup
	for range sumWorkers(len(sums)) {
		wg.Go(func() { ps.work(func(p int, sum uint32) { sums[p] = sum }) })
	}
	wg.Wait()
	return sums
}

// PageSum is one page's checksum in the digest.
func PageSum(page []byte) uint32 { return crc32.Checksum(page, castagnoli) }

// isZero tells whether a page is all zero bytes.
func isZero(page []byte) bool { return string(page) == string(zeroPage[:]) }

// zeroPageSum is PageSum of a zero page.
var zeroPageSum = PageSum(zeroPage[:])
