package vmm

import (
	"errors"
	"testing"
	"time"

	"github.com/migvisor/migvisor/vmm/guest"
	"github.com/stretchr/testify/require"
)

func TestLayout(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name    string
		mem     uint64
		cpus    int
		w       []Workload
		regions []region
		err     string
	}{
		{"default shares", 33 * mib, 3, []Workload{{Mode: ModeWrite}, {}, {Mode: ModeRead}},
			[]region{{mib, 16 * mib}, {}, {17 * mib, 16 * mib}}, ""},
		{"explicit and default", 16 * mib, 2, []Workload{{Mode: ModeWrite, Size: 4 * mib}, {Mode: ModeWrite}},
			[]region{{mib, 4 * mib}, {5 * mib, 11 * mib}}, ""},
		{"default rounds down to pages", mib + 5*PageSize + 100, 2, []Workload{{Mode: ModeWrite}, {Mode: ModeRead}},
			[]region{{mib, 2 * PageSize}, {mib + 2*PageSize, 2 * PageSize}}, ""},
		{"all idle", 2 * mib, 2, nil, []region{{}, {}}, ""},
		{"too big", 16 * mib, 2, []Workload{{Mode: ModeWrite, Size: 8 * mib}, {Mode: ModeWrite, Size: 8 * mib}}, nil,
			"vmm: the workload regions do not fit: vCPU 1's 8388608 bytes at 0x900000 pass the end of guest memory (16777216 bytes, at most 4 GiB usable)"},
		{"no room above 1 MiB", mib, 1, []Workload{{Mode: ModeWrite}}, nil, "vmm: workloads need guest memory above 0x100000"},
		{"no room for the programs", 64 << 10, 2, nil, nil,
			"vmm: 65536 bytes of guest memory do not hold the records and programs of 2 vCPUs (70656 bytes)"},
		{"programs of 1024 vCPUs below 1 MiB", mib, 1024, nil, make([]region, 1024), ""},
		{"256 vCPUs, one writer", 64 * mib, 256, []Workload{{Mode: ModeWrite}},
			append([]region{{mib, 63 * mib}}, make([]region, 255)...), ""},
		{"2048 vCPUs: regions past the programs", 64 * mib, 2048, []Workload{{Mode: ModeWrite}},
			append([]region{{0x130000, 64*mib - 0x130000}}, make([]region, 2047)...), ""},
		{"16 GiB: regions below 4 GiB", 16 << 30, 2, []Workload{{Mode: ModeWrite}, {Mode: ModeRead}},
			[]region{{mib, 0x7ff7f000}, {mib + 0x7ff7f000, 0x7ff7f000}}, ""},
		{"16 GiB: a sized region past 4 GiB", 16 << 30, 1, []Workload{{Mode: ModeWrite, Size: 4 << 30}}, nil,
			"vmm: the workload regions do not fit: vCPU 0's 4294967296 bytes at 0x100000 pass the end of guest memory (17179869184 bytes, at most 4 GiB usable)"},
		{"unaligned size", 16 * mib, 1, []Workload{{Mode: ModeWrite, Size: 1000}}, nil,
			"vmm: vCPU 0: region size 1000 is not a positive multiple of 4096"},
		{"bytes per page", 16 * mib, 1, []Workload{{Mode: ModeWrite, BytesPerPage: 6}}, nil,
			"vmm: vCPU 0: 6 bytes per page is not a multiple of 4 in [4, 4096]"},
		{"mode", 16 * mib, 1, []Workload{{Mode: "run"}}, nil, `vmm: vCPU 0: workload mode "run"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := newLayout(Config{MemSize: tc.mem, CPUs: tc.cpus, Workloads: tc.w})
			if tc.err != "" {
				require.EqualError(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.regions, l.regions)
		})
	}
}

// The soft backend keeps the guest programs' record: vmm/guest reads it back.
func TestSoftRecordIsTheGuestRecord(t *testing.T) {
	m := newMachine(t, Config{Accel: AccelSoft, Initial: Running,
		Workloads: []Workload{{Mode: ModeWrite, Size: 8 * PageSize}, {Mode: ModeIdle}}})
	waitFor(t, "a pass and the idle vCPU's start", func() bool {
		return m.WorkloadStats()[0].Passes > 0 && guest.ReadRecord(m.Memory(), guest.RecordAddr(1)).Started
	})
	require.NoError(t, m.Stop())
	r := guest.ReadRecord(m.Memory(), guest.RecordAddr(0))
	require.True(t, r.Started)
	require.Equal(t, guest.ModeWrite, r.Mode)
	require.Equal(t, uint32(guest.MinRegionStart), r.RegionBase)
	require.Equal(t, uint32(8*PageSize), r.RegionSize)
	require.Equal(t, r.Pages/8, r.Passes)
	require.Equal(t, guest.ModeIdle, guest.ReadRecord(m.Memory(), guest.RecordAddr(1)).Mode)
}

func TestWorkloadStats(t *testing.T) {
	forEachBackend(t, func(t *testing.T, accel string) {
		m := newMachine(t, Config{Accel: accel, Initial: Running, MemSize: 16 << 20,
			Workloads: []Workload{{Mode: ModeWrite, Size: 64 * PageSize, Rate: 2000 * PageSize}, {Mode: ModeIdle}}})
		waitFor(t, "a rate", func() bool { return m.WorkloadStats()[0].PagesPerSecond > 0 })
		st := m.WorkloadStats()
		require.Equal(t, WorkloadStat{CPU: 1, Mode: ModeIdle}, st[1])
		require.Equal(t, ModeWrite, st[0].Mode)
		require.Equal(t, uint64(guest.MinRegionStart), st[0].RegionStart)
		require.Equal(t, uint64(64*PageSize), st[0].RegionSize)
		require.NotZero(t, st[0].Pages)
		require.Equal(t, st[0].Pages/64, st[0].Passes, "passes count whole regions")
		require.Empty(t, st[0].Error)

		// A vCPU that stopped for good says why, and counts no more pages.
		m.vcpuFailed(m.cpus[0], errors.New("its dirty ring broke"))
		m.Kick(0) // out of its run, to park
		require.Equal(t, "its dirty ring broke", m.WorkloadStats()[0].Error)
		require.Empty(t, m.WorkloadStats()[1].Error)
		waitFor(t, "the vCPU parked", func() bool {
			m.mu.Lock()
			defer m.mu.Unlock()
			return m.cpus[0].parked
		})
		pages := m.WorkloadStats()[0].Pages
		time.Sleep(20 * time.Millisecond)
		require.Equal(t, pages, m.WorkloadStats()[0].Pages)
	})
}
