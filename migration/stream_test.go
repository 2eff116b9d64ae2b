package migration

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"
)

// sampleStream encodes a small machine: a normal run, a zero run, an EOS, the CPU state and
// the trailer, and returns the stream and the memory it describes.
func sampleStream(t testing.TB) ([]byte, []byte) {
	mem := make([]byte, 8*PageSize)
	for i := range 3 * PageSize {
		mem[PageSize+i] = byte(i*7 + 1)
	}
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	defer e.Close()
	require.NoError(t, e.WriteHeader(Header{Version: StreamVersion, Config: MachineConfig{
		MemSize: uint64(len(mem)), CPUs: 2, PageSize: PageSize, Workloads: []byte("w")}}))
	e.SetGuestMemory(mem)
	require.NoError(t, e.WriteGuestPages(1, 3))
	require.NoError(t, e.WriteZeroPages(4, 4))
	require.NoError(t, e.WriteZeroPages(0, 1))
	require.NoError(t, e.WriteEndOfSection(1))
	require.NoError(t, e.WriteCPU([]byte("cpu-state")))
	require.NoError(t, e.WriteTrailer(MemoryDigest(mem)))
	require.NoError(t, e.Flush())
	require.EqualValues(t, buf.Len(), e.Written())
	return buf.Bytes(), mem
}

// decodeAll reads a whole stream into fresh memory, as a receiver would.
func decodeAll(stream []byte) ([]byte, []Record, error) {
	d := NewDecoder(bytes.NewReader(stream))
	h, err := d.ReadHeader()
	if err != nil {
		return nil, nil, err
	}
	if h.Config.MemSize > 1<<20 {
		return nil, nil, errors.New("too big for a test")
	}
	mem := bytes.Repeat([]byte{0xee}, int(h.Config.MemSize))
	var recs []Record
	for {
		r, err := d.Next(mem)
		if err != nil {
			return mem, recs, err
		}
		switch r.Kind {
		case KindCPU:
			r.CPU = bytes.Clone(r.CPU)
		case KindZeroPages: // the receiver's job: the decoder leaves memory alone
			clear(mem[r.First*PageSize : (r.First+uint64(r.Count))*PageSize])
		}
		recs = append(recs, r)
		if r.Kind == KindTrailer {
			if r.Digest != MemoryDigest(mem) {
				return mem, recs, ErrDigestMismatch
			}
			return mem, recs, nil
		}
	}
}

func TestStreamRoundTrip(t *testing.T) {
	stream, mem := sampleStream(t)
	got, recs, err := decodeAll(stream)
	require.NoError(t, err)
	require.Equal(t, mem, got)
	kinds := []RecordKind{}
	for _, r := range recs {
		kinds = append(kinds, r.Kind)
	}
	require.Equal(t, []RecordKind{KindPages, KindZeroPages, KindZeroPages, KindEndOfSection, KindCPU, KindTrailer}, kinds)
	require.Equal(t, Record{Kind: KindPages, First: 1, Count: 3}, recs[0])
	require.Equal(t, Record{Kind: KindZeroPages, First: 4, Count: 4}, recs[1])
	require.EqualValues(t, 1, recs[3].Pass)
	require.Equal(t, "cpu-state", string(recs[4].CPU))
}

func TestStreamHeaderRefusals(t *testing.T) {
	good := Header{Version: StreamVersion, Config: MachineConfig{MemSize: 4 * PageSize, CPUs: 1, PageSize: PageSize}}
	enc := func(h Header) []byte {
		var b bytes.Buffer
		e := NewEncoder(&b)
		defer e.Close()
		require.NoError(t, e.WriteHeader(h))
		require.NoError(t, e.Flush())
		return b.Bytes()
	}
	v1 := good
	v1.Version = 1 // before the stream digest
	ps := good
	ps.Config.PageSize = 8192
	badCRC := enc(good)
	badCRC[20] ^= 1
	badMagic := enc(good)
	badMagic[0] = 'Q'
	for _, tc := range []struct {
		name, want string
		in         []byte
	}{
		{"version 1", "stream version 1 is not supported (this migvisor reads version 2)", enc(v1)},
		{"page size", "page size 8192 is not supported", enc(ps)},
		{"checksum", "header checksum mismatch", badCRC},
		{"magic", "not a migvisor migration stream", badMagic},
		{"truncated", "truncated after 10 bytes", enc(good)[:10]},
		{"empty", "truncated after 0 bytes", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewDecoder(bytes.NewReader(tc.in)).ReadHeader()
			require.ErrorContains(t, err, tc.want)
			var se *StreamError
			require.ErrorAs(t, err, &se)
		})
	}
}

func TestCheckConfig(t *testing.T) {
	base := MachineConfig{MemSize: 1 << 20, CPUs: 2, PageSize: PageSize, Workloads: []byte("a")}
	for _, tc := range []struct {
		name string
		edit func(*MachineConfig)
		want string
	}{
		{"same", func(*MachineConfig) {}, ""},
		{"memory", func(c *MachineConfig) { c.MemSize = 2 << 20 }, "the source has 1048576 bytes of memory, this machine has 2097152"},
		{"cpus", func(c *MachineConfig) { c.CPUs = 4 }, "the source has 2 vCPUs, this machine has 4"},
		{"workloads", func(c *MachineConfig) { c.Workloads = []byte("b") }, "workloads"},
		{"workloads unknown here", func(c *MachineConfig) { c.Workloads = nil }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := base
			tc.edit(&want)
			err := CheckConfig(base, want)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// part is where one part of a stream lies: its header or (part of) a record.
type part struct {
	name       string
	start, end int
}

// Names of the parts of a stream: a page record is its header and its payload.
const (
	partHeader     = "header"
	partRAMHeader  = "RAM header"
	partRAMPayload = "RAM payload"
	partZeroRun    = "zero run"
	partEOS        = "EOS"
	partCPU        = "CPU"
	partEND        = "END"
)

// streamParts decodes a good stream and says where each of its parts lies.
func streamParts(t testing.TB, stream []byte) []part {
	d := NewDecoder(bytes.NewReader(stream))
	h, err := d.ReadHeader()
	require.NoError(t, err)
	parts := []part{{partHeader, 0, int(d.n)}}
	mem := make([]byte, h.Config.MemSize)
	for {
		start := int(d.n)
		r, err := d.Next(mem)
		require.NoError(t, err)
		end := int(d.n)
		switch r.Kind {
		case KindPages:
			parts = append(parts, part{partRAMHeader, start, start + ramHeaderLen}, part{partRAMPayload, start + ramHeaderLen, end})
		case KindZeroPages:
			parts = append(parts, part{partZeroRun, start, end})
		case KindEndOfSection:
			parts = append(parts, part{partEOS, start, end})
		case KindCPU:
			parts = append(parts, part{partCPU, start, end})
		case KindTrailer:
			return append(parts, part{partEND, start, end})
		}
	}
}

// firstPart is the first part of a stream named name.
func firstPart(t testing.TB, parts []part, name string) part {
	for _, p := range parts {
		if p.name == name {
			return p
		}
	}
	t.Fatalf("no %s in the stream", name)
	return part{}
}

// Each record's fields are checked where they can be, and whatever a corruption leaves
// parseable is refused by a digest.
func TestStreamCorruptRecords(t *testing.T) {
	stream, _ := sampleStream(t)
	parts := streamParts(t, stream)
	ram, payload := firstPart(t, parts, partRAMHeader), firstPart(t, parts, partRAMPayload)
	cpu, eos, end := firstPart(t, parts, partCPU), firstPart(t, parts, partEOS), firstPart(t, parts, partEND)
	// Byte offsets in a RAM record: tag, flags, first page (u64), count (u32).
	const ramFlags, ramFirstLow, ramCount = 1, 9, 10
	for _, tc := range []struct {
		name string
		edit func([]byte) []byte
		want error // nil: a *StreamError containing msg
		msg  string
	}{
		{"unknown record", func(b []byte) []byte { b[ram.start] = 0x7f; return b }, nil, "unknown record type 0x7f"},
		{"unknown page flag", func(b []byte) []byte { b[ram.start+ramFlags] = 0x80; return b }, nil, "unknown page flags"},
		{"run past memory", func(b []byte) []byte { b[ram.start+ramFirstLow] = 0xff; return b }, nil, "outside memory"},
		{"empty run", func(b []byte) []byte { copy(b[ram.start+ramCount:], []byte{0, 0, 0, 0}); return b }, nil, "outside memory"},
		{"run moved", func(b []byte) []byte { b[ram.start+ramFirstLow] ^= 1; return b }, ErrStreamDigestMismatch, ""},
		{"page payload", func(b []byte) []byte { b[payload.start+100] ^= 0xff; return b }, ErrDigestMismatch, ""},
		{"section", func(b []byte) []byte { b[eos.end-1] ^= 1; return b }, ErrStreamDigestMismatch, ""},
		{"vCPU state", func(b []byte) []byte { b[cpu.end-1] ^= 1; return b }, ErrStreamDigestMismatch, ""},
		{"memory digest", func(b []byte) []byte { b[end.start+1] ^= 1; return b }, ErrStreamDigestMismatch, ""},
		{"stream digest", func(b []byte) []byte { b[end.end-1] ^= 1; return b }, ErrStreamDigestMismatch, ""},
		{"truncated in a page", func(b []byte) []byte { return b[:payload.start+5000] }, nil, "truncated"},
		{"truncated before the trailer", func(b []byte) []byte { return b[:end.start] }, nil, "truncated"},
		{"truncated digest", func(b []byte) []byte { return b[:len(b)-1] }, nil, "truncated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := decodeAll(tc.edit(bytes.Clone(stream)))
			if tc.want != nil {
				require.ErrorIs(t, err, tc.want)
				return
			}
			var se *StreamError
			require.ErrorAs(t, err, &se)
			require.ErrorContains(t, err, tc.msg)
		})
	}
}

// No bit of the stream can be flipped unnoticed: every flip in every part is refused, by the
// header's checksum, a record's bounds, the stream digest or the memory digest.
func TestStreamEveryFlipRefused(t *testing.T) {
	stream, _ := sampleStream(t)
	parts := streamParts(t, stream)
	for _, name := range []string{partHeader, partRAMHeader, partRAMPayload, partZeroRun, partEOS, partCPU, partEND} {
		t.Run(name, func(t *testing.T) {
			n := 0
			for _, p := range parts {
				if p.name != name {
					continue
				}
				for off := p.start; off < p.end; off++ {
					for bit := range 8 {
						if name == partRAMPayload && bit != off%8 {
							continue // one bit a byte: the payload is most of the stream
						}
						b := bytes.Clone(stream)
						b[off] ^= 1 << bit
						_, _, err := decodeAll(b)
						var se *StreamError
						if !errors.As(err, &se) && !errors.Is(err, ErrStreamDigestMismatch) && !errors.Is(err, ErrDigestMismatch) {
							t.Fatalf("bit %d of byte %d (%s at %d..%d) flipped: %v", bit, off, name, p.start, p.end, err)
						}
						n++
					}
				}
			}
			require.NotZero(t, n, "the sample has a %s", name)
		})
	}
}

// A length field costs memory only as the bytes it announces arrive: a peer that announces
// the largest vCPU state and sends ten bytes of it does not make the decoder allocate it.
func TestDecoderAllocatesWhatArrives(t *testing.T) {
	var b bytes.Buffer
	e := NewEncoder(&b)
	defer e.Close()
	require.NoError(t, e.WriteHeader(Header{Version: StreamVersion, Config: MachineConfig{MemSize: PageSize, CPUs: 1, PageSize: PageSize}}))
	require.NoError(t, e.Flush())
	stream := append(b.Bytes(), recCPU, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(stream[len(stream)-4:], maxCPUState)
	stream = append(stream, make([]byte, 10)...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	d := NewDecoder(bytes.NewReader(stream))
	_, err := d.ReadHeader()
	require.NoError(t, err)
	_, err = d.Next(make([]byte, PageSize))
	runtime.ReadMemStats(&after)
	require.ErrorContains(t, err, "truncated")
	require.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(maxCPUState/8))
}

func TestReturnPath(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, writeReply(&b, nil))
	require.NoError(t, writeReply(&b, errors.New("no room")))
	require.NoError(t, readReply(&b))
	err := readReply(&b)
	var ref *RefusedError
	require.ErrorAs(t, err, &ref)
	require.Equal(t, "no room", ref.Msg)
	require.ErrorIs(t, readReply(&b), io.EOF)
	require.ErrorContains(t, readReply(bytes.NewReader([]byte{'X', 0, 0, 0, 0})), "bad reply")
}

func TestMemoryDigest(t *testing.T) {
	mem := make([]byte, 300*PageSize+PageSize)
	d0 := MemoryDigest(mem)
	require.Equal(t, d0, MemoryDigest(bytes.Clone(mem)))
	sums := make([]uint32, len(mem)/PageSize)
	for i := range sums {
		sums[i] = zeroPageSum
	}
	require.Equal(t, d0, DigestOf(uint64(len(mem)), sums), "the destination's incremental form")
	for _, off := range []int{0, PageSize - 1, 200*PageSize + 17, len(mem) - 1} {
		mem[off] ^= 1
		require.NotEqual(t, d0, MemoryDigest(mem), "flip at %d", off)
		mem[off] ^= 1
	}
	require.NotEqual(t, d0, MemoryDigest(mem[:len(mem)-PageSize]), "size is part of the digest")
}

// readerIn is an incoming stream without a return path (a file).
type readerIn struct{ io.Reader }

func (readerIn) replyTo() io.Writer { return nil }
func (readerIn) Close() error       { return nil }

// FuzzStreamDecoder feeds the destination's loader (decoder, digests, vCPU state) streams
// from the network: it must refuse or load without panicking, and a stream it accepts must
// leave the machine with the source's memory and vCPU state. The seeds are the sample
// stream truncated in and flipped at the start, middle and end of each of its parts.
func FuzzStreamDecoder(f *testing.F) {
	stream, mem := sampleStream(f)
	f.Add(stream)
	for _, p := range streamParts(f, stream) {
		for _, off := range []int{p.start, (p.start + p.end) / 2, p.end - 1} {
			f.Add(bytes.Clone(stream[:off]))
			b := bytes.Clone(stream)
			b[off] ^= 1 << (off % 8)
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fm := newFakeMachine(len(mem)/PageSize, 2)
		fm.state = RunInmigrate
		d := &incomingRun{m: New(Config{Machine: fm, Incoming: true, Workloads: []byte("w")})}
		var returnPath bool
		if err := d.load(readerIn{bytes.NewReader(b)}, false, &returnPath); err != nil {
			return
		}
		require.Equal(t, mem, fm.mem)
		require.Equal(t, "cpu-state", string(fm.loaded))
	})
}

// BenchmarkMemoryDigest digests 512 MiB of touched memory (untouched memory would all read
// the kernel's one zero page, from cache).
func BenchmarkMemoryDigest(b *testing.B) {
	mem := bytes.Repeat([]byte{1}, 512<<20)
	b.SetBytes(int64(len(mem)))
	for b.Loop() {
		MemoryDigest(mem)
	}
}

func BenchmarkEncodePages(b *testing.B) {
	mem := bytes.Repeat([]byte{1}, runPages*PageSize)
	e := NewEncoder(io.Discard)
	defer e.Close()
	e.SetGuestMemory(mem)
	b.SetBytes(int64(len(mem)))
	for b.Loop() {
		if err := e.WriteGuestPages(0, runPages); err != nil {
			b.Fatal(err)
		}
	}
}

// sockWriter is a transport whose socket the encoder writes with writev.
type sockWriter struct{ net.Conn }

func (s sockWriter) NetConn() net.Conn { return s.Conn }

// failAfter accepts n bytes, then fails every write.
type failAfter struct{ n int }

var errTransport = errors.New("transport broke")

func (f *failAfter) Write(b []byte) (int, error) {
	if len(b) > f.n {
		return 0, errTransport
	}
	f.n -= len(b)
	return len(b), nil
}

// Page runs large enough to be queued by reference arrive whole and in order: over tcp
// (writev), guest pages over a unix socket (lent with vmsplice) and over a plain writer; a
// transport's failure reaches the calls after it.
func TestEncoderQueuesPayloads(t *testing.T) {
	const pages = 256
	mem := make([]byte, pages*PageSize)
	for i := range mem {
		mem[i] = byte(i/PageSize*31 + i%251 + 1)
	}
	// A vCPU state larger than a buffer goes by reference too, but never lent.
	cpu := bytes.Repeat([]byte("vcpu"), 16<<10)
	encode := func(e *Encoder) error {
		if err := e.WriteHeader(Header{Version: StreamVersion, Config: MachineConfig{
			MemSize: uint64(len(mem)), CPUs: 1, PageSize: PageSize}}); err != nil {
			return err
		}
		e.SetGuestMemory(mem)
		for p := 0; p < pages; p += runPages {
			if err := e.WriteGuestPages(uint64(p), runPages); err != nil {
				return err
			}
			if err := e.WriteEndOfSection(uint64(p)); err != nil {
				return err
			}
		}
		if err := e.WriteCPU(cpu); err != nil {
			return err
		}
		if err := e.WriteTrailer(MemoryDigest(mem)); err != nil {
			return err
		}
		return e.Flush()
	}
	for _, tc := range []struct {
		name, network string
		spliced       bool
	}{
		{"tcp (writev)", "tcp", false},
		{"unix (pages lent)", "unix", true},
		{"plain writer", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e *Encoder
			got := make(chan []byte, 1)
			var buf bytes.Buffer
			if tc.network == "" {
				e = NewEncoder(&buf)
				close(got)
			} else {
				a, b, err := socketPair(tc.network, t.TempDir())
				require.NoError(t, err)
				defer a.Close()
				defer b.Close()
				go func() { s, _ := io.ReadAll(b); got <- s }()
				e = NewEncoder(sockWriter{a})
			}
			defer e.Close()
			require.NoError(t, encode(e))
			require.Equal(t, tc.spliced, e.splice != nil, "pages lent to the socket")
			stream := buf.Bytes()
			if tc.network != "" {
				e.conn.Close()
				stream = <-got
			}
			require.EqualValues(t, len(stream), e.Written())
			dec, recs, err := decodeAll(stream)
			require.NoError(t, err)
			require.Equal(t, mem, dec)
			require.Equal(t, KindCPU, recs[len(recs)-2].Kind)
			require.Equal(t, cpu, recs[len(recs)-2].CPU)
		})
	}
	t.Run("failing transport", func(t *testing.T) {
		e := NewEncoder(&failAfter{n: 3 * runPages * PageSize})
		defer e.Close()
		require.ErrorIs(t, encode(e), errTransport)
		require.ErrorIs(t, e.WriteEndOfSection(1), errTransport)
		require.ErrorIs(t, e.Flush(), errTransport)
	})
}

// socketPair is both ends of a connection over network (tcp or unix, in dir).
func socketPair(network, dir string) (net.Conn, net.Conn, error) {
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(dir, "s")
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := l.Accept(); acc <- c }()
	a, err := net.Dial(network, l.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	b := <-acc
	if b == nil {
		a.Close()
		return nil, nil, errors.New("accept failed")
	}
	return a, b, nil
}

// The digest kept as pages come (whole zero chunks as a constant, the rest rehashed where
// they changed) is the digest of the checksums computed afresh.
func TestPageSumsDigestIsIncremental(t *testing.T) {
	const pages = 3*digestChunk + 17 // a short last chunk
	ps := newPageSums(pages)
	ps.setRange(0, pages, zeroPageSum)
	sums := make([]uint32, pages)
	for i := range sums {
		sums[i] = zeroPageSum
	}
	require.Equal(t, DigestOf(pages*PageSize, sums), ps.digest(pages*PageSize))
	for _, p := range []int{5, digestChunk + 1, pages - 1} {
		ps.set(p, uint32(p))
		sums[p] = uint32(p)
		require.Equal(t, DigestOf(pages*PageSize, sums), ps.digest(pages*PageSize), "after page %d", p)
	}
	ps.setRange(digestChunk-3, 2*digestChunk+3, zeroPageSum) // a whole chunk and two parts
	for p := digestChunk - 3; p < 2*digestChunk+3; p++ {
		sums[p] = zeroPageSum
	}
	require.Equal(t, DigestOf(pages*PageSize, sums), ps.digest(pages*PageSize))
	require.NotEqual(t, DigestOf(pages*PageSize, sums), DigestOf((pages-1)*PageSize, sums[:pages-1]))
}
