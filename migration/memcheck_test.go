package migration

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPageSumsEveryPage(t *testing.T) {
	mem := make([]byte, (3*checkChunk+5)*PageSize) // a last chunk shorter than the others
	fill(mem)
	sums := PageSums(mem)
	require.Len(t, sums, len(mem)/PageSize)
	for p, sum := range sums {
		require.Equal(t, PageSum(mem[p*PageSize:(p+1)*PageSize]), sum, "page %d", p)
	}
}

// The check at the stop compares memory with what was sent of every page but those the final
// send carries, and names the first page that differs.
func TestMemCheck(t *testing.T) {
	const pages = 3*checkChunk + 5
	last := pages - 1
	for _, tc := range []struct {
		name    string
		changed []int // pages written after they were sent
		final   []int // pages the final send carries
		want    string
	}{
		{"memory as sent", nil, []int{3, 64, last}, ""},
		{"a page the final send carries", []int{64}, []int{3, 64, last}, ""},
		{"a page never reported", []int{65}, []int{64}, "1 pages changed without being reported dirty (the first is page 65)"},
		{"the first of several, across chunks", []int{last, 2*checkChunk + 1, checkChunk + 7}, []int{checkChunk},
			"3 pages changed without being reported dirty (the first is page 263)"},
		{"the last page", []int{last}, nil, "1 pages changed without being reported dirty (the first is page 772)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := make([]byte, pages*PageSize)
			fill(mem)
			sent := PageSums(mem)
			for _, p := range tc.changed {
				mem[p*PageSize+100] ^= 0xff
			}
			final := make([]uint64, (pages+63)/64)
			for _, p := range tc.final {
				final[p/64] |= 1 << (p % 64)
			}
			err := checkMemory(mem, sent, final).wait()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// A failed migration abandons the check: once abandon returns no worker reads memory, and the
// guest may write it again (the race detector watches).
func TestMemCheckAbandon(t *testing.T) {
	mem := make([]byte, 8*checkChunk*PageSize)
	fill(mem)
	c := checkMemory(mem, PageSums(mem), nil)
	c.abandon()
	clear(mem)
}
