package vmm

import (
	"math/bits"
	"testing"

	"github.com/stretchr/testify/require"
)

func populatedPages(m *Machine) []uint64 {
	bm := make([]uint64, (m.pages+63)/64)
	m.PopulatedPages(bm)
	return bm
}

func isSet(bm []uint64, p uint64) bool { return bm[p/64]&(1<<(p%64)) != 0 }

func count(bm []uint64) int {
	n := 0
	for _, w := range bm {
		n += bits.OnesCount64(w)
	}
	return n
}

// Memory the guest never wrote is a hole: PopulatedPages leaves it out, so that a migration
// neither reads nor keeps it; a written page is in, and DiscardPages makes pages zero holes
// again.
func TestPopulatedAndDiscardedPages(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m := newMachine(t, Config{MemSize: 256 << 20, Accel: accel}) // idle vCPUs: code and records only
		bm := populatedPages(m)
		require.Less(t, count(bm), 64, "an idle guest has its programs and records, little else")
		const p = 40000 // 156 MiB: no program's
		require.False(t, isSet(bm, p))
		mem := m.Memory()
		mem[p*PageSize+7] = 1
		bm = populatedPages(m)
		require.True(t, isSet(bm, p))
		require.NoError(t, m.DiscardPages(p, 1))
		require.False(t, isSet(populatedPages(m), p))
		require.Zero(t, mem[p*PageSize+7]) // (reading a hole fills it: last)
		require.Error(t, m.DiscardPages(int(m.pages)-1, 2), "past the end of memory")
	})
}

// A destination's workload regions are not faulted in: the source's memory replaces them.
func TestIncomingMachineLeavesRegionsUnpopulated(t *testing.T) {
	w := []Workload{{Mode: ModeWrite, Size: 64 << 20}}
	src := newMachine(t, Config{MemSize: 128 << 20, CPUs: 1, Accel: AccelSoft, Workloads: w})
	dst := newMachine(t, Config{MemSize: 128 << 20, CPUs: 1, Accel: AccelSoft, Workloads: w, Initial: InMigrate})
	require.GreaterOrEqual(t, count(populatedPages(src)), (64<<20)/PageSize)
	require.Less(t, count(populatedPages(dst)), 64)
}
