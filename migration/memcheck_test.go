package migration

import (
	"testing"
	"time"

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

// The check at the stop compares memory with what was sent of every page but those skip
// marks, and lists the pages that differ.
func TestMemCheck(t *testing.T) {
	const pages = 3*checkChunk + 5
	last := pages - 1
	for _, tc := range []struct {
		name    string
		changed []int // pages written after they were sent
		skip    []int // pages the final send carries, or holes
		from    int
		want    []int
	}{
		{"memory as sent", nil, []int{3, 64, last}, 0, nil},
		{"a page the final send carries", []int{64}, []int{3, 64, last}, 0, nil},
		{"a page never reported", []int{65}, []int{64}, 0, []int{65}},
		{"several, across chunks", []int{last, 2*checkChunk + 1, checkChunk + 7}, []int{checkChunk}, 0,
			[]int{checkChunk + 7, 2*checkChunk + 1, last}},
		{"the last page", []int{last}, nil, 0, []int{last}},
		{"starting in the middle, wrapping", []int{1, last}, nil, 2*checkChunk + 3, []int{1, last}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := make([]byte, pages*PageSize)
			fill(mem)
			sent := PageSums(mem)
			for _, p := range tc.changed {
				mem[p*PageSize+100] ^= 0xff
			}
			skip := make([]uint64, (pages+63)/64)
			for _, p := range tc.skip {
				skip[p/64] |= 1 << (p % 64)
			}
			res := checkMemory(mem, sent, skip, tc.from, time.Time{}).wait()
			require.Equal(t, tc.want, res.missed)
			require.True(t, res.whole)
			require.Equal(t, pages-len(tc.skip), res.checked)
		})
	}
}

// A deadline ends the check early: a past one reads nothing and says the check is not whole.
func TestMemCheckDeadline(t *testing.T) {
	mem := make([]byte, 4*checkChunk*PageSize)
	fill(mem)
	sent := PageSums(mem)
	mem[100] ^= 1
	res := checkMemory(mem, sent, nil, 0, time.Now().Add(-time.Second)).wait()
	require.False(t, res.whole)
	require.Zero(t, res.checked)
	require.Empty(t, res.missed)
	res = checkMemory(mem, sent, nil, 0, time.Now().Add(time.Minute)).wait()
	require.True(t, res.whole)
	require.Equal(t, []int{0}, res.missed)
}

// A failed migration abandons the check: once abandon returns no worker reads memory, and the
// guest may write it again (the race detector watches).
func TestMemCheckAbandon(t *testing.T) {
	mem := make([]byte, 8*checkChunk*PageSize)
	fill(mem)
	c := checkMemory(mem, PageSums(mem), nil, 0, time.Time{})
	c.abandon()
	clear(mem)
}
