package vmm

import (
	"fmt"
	"testing"
	"time"

	"github.com/migvisor/migvisor/vmm/kvm"
)

func benchMachine(b *testing.B, accel string, cfg Config) *Machine {
	b.Helper()
	if accel == AccelKVM {
		if err := kvm.Available(); err != nil {
			b.Skipf("KVM is not usable here: %v", err)
		}
	}
	cfg.Accel = accel
	cfg.Logf = b.Logf
	m, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	return m
}

// warm waits for every writing vCPU to finish a pass: first touches of guest memory are
// expensive on the project's hosts (New pre-faults the regions on the host side; this covers
// KVM's side).
func warm(m *Machine) {
	for {
		done := true
		for _, s := range m.WorkloadStats() {
			if s.Mode != ModeIdle && s.Passes < 1 {
				done = false
			}
		}
		if done {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkDirtyRate: dirty pages harvested per second with writing vCPUs flat out; one op is
// one harvested page (a ring entry; on the project's hosts every logged store is one, and the
// guest programs store to the page and twice to their record per page). guest-pages/s is
// the pages the guests wrote.
func BenchmarkDirtyRate(b *testing.B) {
	for _, tc := range []struct {
		accel string
		cpus  int
		ring  int
	}{
		{AccelKVM, 1, 4096}, {AccelKVM, 2, 4096}, {AccelKVM, 1, 1024}, {AccelKVM, 1, 65536},
		{AccelSoft, 1, 4096}, {AccelSoft, 2, 4096},
	} {
		b.Run(fmt.Sprintf("%s/vcpus=%d/ring=%d", tc.accel, tc.cpus, tc.ring), func(b *testing.B) {
			w := make([]Workload, tc.cpus)
			for i := range w {
				w[i] = Workload{Mode: ModeWrite, Size: 64 << 20}
			}
			m := benchMachine(b, tc.accel, Config{MemSize: 1<<20 + uint64(tc.cpus)*64<<20, CPUs: tc.cpus,
				DirtyRingSize: tc.ring, Workloads: w, Initial: Running})
			warm(m)
			sum := func() (harvested, written uint64) {
				m.Harvest()
				for i, s := range m.WorkloadStats() {
					harvested += m.DirtyPages(i)
					written += s.Pages
				}
				return
			}
			h0, w0 := sum()
			t0 := time.Now()
			b.ResetTimer()
			last, lastAt := h0, time.Now()
			for h, _ := sum(); h < h0+uint64(b.N); h, _ = sum() {
				if h != last {
					last, lastAt = h, time.Now()
				} else if time.Since(lastAt) > 2*time.Second {
					b.Fatalf("no page harvested for 2 s (%d fail-safes): a ring KVM left out of step stalls its vCPU", m.DirtyFailSafes())
				}
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			h1, w1 := sum()
			s := time.Since(t0).Seconds()
			b.ReportMetric(float64(h1-h0)/s, "pages/s")
			b.ReportMetric(float64(w1-w0)/s, "guest-pages/s")
			b.ReportMetric(float64(m.DirtyFailSafes()), "fail-safes")
		})
	}
}

// BenchmarkReaperPass: the cost of one synchronous pass over the rings (and a reset), with
// two vCPUs writing or idle.
func BenchmarkReaperPass(b *testing.B) {
	for _, mode := range []string{ModeWrite, ModeIdle} {
		for _, accel := range []string{AccelKVM, AccelSoft} {
			b.Run(accel+"/"+mode, func(b *testing.B) {
				m := benchMachine(b, accel, Config{MemSize: 33 << 20, CPUs: 2, DirtyRingSize: 4096,
					Workloads: []Workload{{Mode: mode}, {Mode: mode}}, Initial: Running})
				warm(m)
				b.ResetTimer()
				for range b.N {
					m.Harvest()
				}
			})
		}
	}
}

// BenchmarkKick: from Kick to the vCPU's thread running the hook, for a vCPU in guest mode
// (writing) and a halted one (idle).
func BenchmarkKick(b *testing.B) {
	for _, accel := range []string{AccelKVM, AccelSoft} {
		for _, mode := range []string{ModeWrite, ModeIdle} {
			b.Run(accel+"/"+mode, func(b *testing.B) {
				m := benchMachine(b, accel, Config{MemSize: 9 << 20, CPUs: 1,
					Workloads: []Workload{{Mode: mode}}, Initial: Running})
				warm(m)
				ran := make(chan struct{})
				m.SetRingFullHook(func(int) { ran <- struct{}{} })
				b.ResetTimer()
				for range b.N {
					m.Kick(0)
					<-ran
				}
				b.StopTimer()
				m.SetRingFullHook(nil)
			})
		}
	}
}

// BenchmarkStop: stop with two writing vCPUs, until both are out of guest mode (cont and
// the wait for the workloads to run again are not timed).
func BenchmarkStop(b *testing.B) {
	for _, accel := range []string{AccelKVM, AccelSoft} {
		b.Run(accel, func(b *testing.B) {
			m := benchMachine(b, accel, Config{MemSize: 9 << 20, CPUs: 2,
				Workloads: []Workload{{Mode: ModeWrite}, {Mode: ModeWrite}}, Initial: Running})
			warm(m)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				m.Cont()
				before := m.WorkloadStats()
				for now := m.WorkloadStats(); now[0].Pages == before[0].Pages || now[1].Pages == before[1].Pages; now = m.WorkloadStats() {
					time.Sleep(50 * time.Microsecond)
				}
				b.StartTimer()
				m.Stop()
			}
		})
	}
}
