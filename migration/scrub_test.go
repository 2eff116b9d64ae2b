package migration

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The scrub rereads pages the log calls clean; one that changed is only a suspect until the
// next sync: if the log reports it, it was an ordinary write; if not, the log missed it, and
// it goes again.
func TestScrubFindsWhatTheLogMissed(t *testing.T) {
	const pages = 3 * checkChunk
	m := newFakeMachine(pages, 1)
	fill(m.mem)
	log := m.NewDirtyLog().(*fakeLog)
	s := &sender{mach: m, mem: m.mem, npages: pages, sums: newPageSums(pages), log: log}
	copy(s.sums.sums, PageSums(m.mem))
	words := (pages + 63) / 64
	s.bm, s.scratch, s.suspect, s.populated = make([]uint64, words), make([]uint64, words), make([]uint64, words), make([]uint64, words)
	m.PopulatedPages(s.populated)
	s.bm[5] |= 1 << 3 // page 323: dirty, going again anyway

	m.mem[10*PageSize] ^= 1 // written, and the log has it
	log.bits[0] |= 1 << 10
	m.mem[700*PageSize] ^= 1 // written, and the log missed it
	m.mem[323*PageSize] ^= 1 // written while dirty
	s.scrub(time.Now().Add(50 * time.Millisecond))
	require.Equal(t, 2, s.suspects, "pages 10 and 700")
	require.Zero(t, s.bm[0]&(1<<10), "a suspect is not sent before the log is asked")

	s.syncLog()
	require.Equal(t, 1, s.missed)
	require.Equal(t, 700, s.firstMiss)
	for _, p := range []int{10, 323, 700} {
		require.NotZero(t, s.bm[p/64]&(1<<(p%64)), "page %d goes again", p)
	}
	require.Zero(t, s.suspects)
}
