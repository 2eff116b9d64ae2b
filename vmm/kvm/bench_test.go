package kvm

import (
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// BenchmarkKick measures how long a vCPU spinning in the guest takes to leave
// KVM_RUN after Kick (signal + immediate_exit): ns/kick.
func BenchmarkKick(b *testing.B) {
	s := startSpinner(b, b.N)
	var total time.Duration
	for i := 0; i < b.N; i++ {
		s.inGuest()
		s.kicking.Store(true)
		start := time.Now()
		require.NoError(b, s.c.Kick(s.tid))
		r := <-s.results
		require.ErrorIs(b, r.err, unix.EINTR)
		total += r.at.Sub(start)
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/kick")
}

// BenchmarkHarvest measures collecting a ring of 1024 dirty entries
// (ns/entry) and the KVM_RESET_DIRTY_RINGS that follows (ns/reset).
func BenchmarkHarvest(b *testing.B) {
	const pages = 1024
	vm, mem := newTestVM(b, 4096)
	c := newTestVCPU(b, vm, mem, progWritePages(testData, pages, PageSize))
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var harvest, reset time.Duration
	entries := 0
	for i := 0; i < b.N; i++ {
		require.NoError(b, SetupProtectedMode(c, testCode, testCode))
		require.NoError(b, runToExit(c))
		require.Equal(b, ExitHLT, c.ExitReason())
		t0 := time.Now()
		n, err := c.Ring().Harvest(func(uint32, uint64) {})
		t1 := time.Now()
		require.NoError(b, err)
		_, err = vm.ResetDirtyRings()
		t2 := time.Now()
		require.NoError(b, err)
		entries += n
		harvest += t1.Sub(t0)
		reset += t2.Sub(t1)
	}
	require.Equal(b, b.N*pages, entries)
	b.ReportMetric(float64(harvest.Nanoseconds())/float64(entries), "ns/entry")
	b.ReportMetric(float64(reset.Nanoseconds())/float64(b.N), "ns/reset")
}
