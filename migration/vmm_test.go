package migration

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/vmm"
	"github.com/migvisor/migvisor/vmm/kvm"
	"github.com/stretchr/testify/require"
)

// vmmMachine is the test's copy of cmd/migvisor's adapter: auto-converge's hook runs after
// the dirty limit's when there is one.
type vmmMachine struct {
	m   *vmm.Machine
	lim *dirtylimit.Limiter
}

func (a vmmMachine) Memory() []byte                  { return a.m.Memory() }
func (a vmmMachine) PopulatedPages(dst []uint64)     { a.m.PopulatedPages(dst) }
func (a vmmMachine) DiscardPages(first, n int) error { return a.m.DiscardPages(first, n) }
func (a vmmMachine) NumCPUs() int                    { return a.m.NumCPUs() }
func (a vmmMachine) RunState() string                { return string(a.m.RunState()) }
func (a vmmMachine) Pause(to string) error           { return a.m.Pause(vmm.RunState(to)) }
func (a vmmMachine) SetRunState(to string)           { a.m.SetRunState(vmm.RunState(to)) }
func (a vmmMachine) Resume() error                   { return a.m.Resume() }
func (a vmmMachine) SaveCPU() ([]byte, error)        { return a.m.SaveCPU() }
func (a vmmMachine) LoadCPU(b []byte) error          { return a.m.LoadCPU(b) }
func (a vmmMachine) Kick(cpu int)                    { a.m.Kick(cpu) }
func (a vmmMachine) NewDirtyLog() DirtyLog           { return a.m.NewDirtyLog() }
func (a vmmMachine) SetRingFullHook(h func(cpu int)) {
	switch {
	case a.lim == nil:
		a.m.SetRingFullHook(h)
	case h == nil:
		a.m.SetRingFullHook(a.lim.RingFull)
	default:
		a.m.SetRingFullHook(func(cpu int) { a.lim.RingFull(cpu); h(cpu) })
	}
}

// newVMM makes a 2-vCPU machine whose workloads write; ring 0 is KVM's dirty bitmap (or the
// soft one), QEMU's default.
func newVMM(t *testing.T, accel string, ring int, initial vmm.RunState) *vmm.Machine {
	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 2, Accel: accel, DirtyRingSize: ring,
		Workloads: []vmm.Workload{{Mode: vmm.ModeWrite, Size: 16 << 20, Rate: 64 << 20}, {Mode: vmm.ModeWrite, Size: 8 << 20, Rate: 32 << 20}},
		Initial:   initial, Logf: t.Logf})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// A real machine whose workloads keep writing migrates whole: the destination's memory
// equals the source's as it stopped, and the guest carries on there. With KVM the pages come
// from real dirty rings or, without a ring, from KVM's dirty bitmap; the dirty limit needs a
// ring, auto-converge does not.
func TestMigrateMachine(t *testing.T) {
	if testing.Short() {
		t.Skip("runs machines")
	}
	accels := []string{vmm.AccelSoft}
	if kvm.Available() == nil {
		accels = append(accels, vmm.AccelKVM)
	}
	for _, accel := range accels {
		for _, ring := range []int{1024, 0} {
			for _, cfg := range []struct {
				name      string
				caps      []CapabilityState
				params    string
				userLimit uint64 // MB/s set with set-vcpu-dirty-limit before migrating
			}{
				{"fast link", nil, `{"max-bandwidth": 268435456, "downtime-limit": 100}`, 0},
				// The guest dirties far more than the link carries: only the throttle, served on
				// the vCPU threads through the machine's hook, lets it converge.
				{"auto-converge", caps("auto-converge", true),
					`{"max-bandwidth": 16777216, "downtime-limit": 100, "throttle-trigger-threshold": 1, "cpu-throttle-initial": 99}`, 0},
				// The same with the dirty limit: every vCPU held to 1 MB/s.
				{"dirty-limit", caps("dirty-limit", true),
					`{"max-bandwidth": 16777216, "downtime-limit": 100, "throttle-trigger-threshold": 1, "vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 250}`, 0},
				// A looser limit of the user's does not stop the migration's, and is back afterwards.
				{"dirty-limit over the user's", caps("dirty-limit", true),
					`{"max-bandwidth": 16777216, "downtime-limit": 100, "throttle-trigger-threshold": 1, "vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 250}`, 400},
			} {
				dirtyLimit := cfg.caps != nil && cfg.caps[0].Capability == "dirty-limit"
				if ring == 0 && dirtyLimit {
					continue
				}
				t.Run(fmt.Sprintf("%s/ring=%d/%s", accel, ring, cfg.name), func(t *testing.T) {
					sm, dm := newVMM(t, accel, ring, vmm.Running), newVMM(t, accel, ring, vmm.InMigrate)
					lim := dirtylimit.NewLimiter(sm, dirtylimit.Options{})
					t.Cleanup(func() { lim.Close() })
					// The source's check of memory at the stop puts the machine's dirty log under test too.
					src := New(Config{Machine: vmmMachine{sm, lim}, Limiter: lim, DirtyRing: ring != 0, Logf: t.Logf})
					dst := New(Config{Machine: vmmMachine{dm, nil}, Incoming: true, Autostart: func() bool { return false }, Logf: t.Logf})
					if cfg.userLimit != 0 {
						require.NoError(t, lim.Set(nil, cfg.userLimit))
					}
					require.NoError(t, src.SetCapabilities(cfg.caps))
					require.NoError(t, src.SetParameters(setParams(t, cfg.params)))
					// Both writers at full speed over all of their regions (first touches are slow on KVM):
					// otherwise a guest that has barely started converges before any throttle is needed.
					for st := sm.WorkloadStats(); st[0].Passes < 1 || st[1].Passes < 1; st = sm.WorkloadStats() {
						time.Sleep(time.Millisecond)
					}
					uri := "unix:" + sockPath(t)
					require.NoError(t, dst.MigrateIncoming(IncomingArgs{URI: &uri}))
					require.NoError(t, src.Migrate(MigrateArgs{URI: &uri}))
					var throttled int64 // the highest cpu-throttle-percentage query-migrate showed
					for watching := true; watching; {
						select {
						case <-src.Done():
							watching = false
						case <-time.After(5 * time.Millisecond):
							if p := src.Query().CPUThrottlePercentage; p != nil {
								throttled = max(throttled, *p)
							}
						}
					}
					wait(t, dst.IncomingDone())
					q := src.Query()
					require.Equal(t, StatusCompleted, q.Status, q.ErrorDesc)
					t.Logf("%s: total %d ms, downtime %d ms, %d syncs, %d normal pages, %.0f Mbit/s",
						cfg.name, *q.TotalTime, *q.Downtime, q.RAM.DirtySyncCount, q.RAM.Normal, q.RAM.Mbps)
					want := []dirtylimit.Info{}
					if cfg.userLimit != 0 {
						for i := range sm.NumCPUs() {
							want = append(want, dirtylimit.Info{CPUIndex: int64(i), LimitRate: cfg.userLimit})
						}
					}
					got := lim.Query()
					for i := range got {
						got[i].CurrentRate = 0
					}
					require.Equal(t, want, got, "the limits the migration set are lifted, the user's kept")
					if cfg.name == "auto-converge" {
						require.EqualValues(t, 99, throttled, "the guest converged because it was throttled")
					}
					require.Equal(t, vmm.PostMigrate, sm.RunState())
					require.Equal(t, vmm.Paused, dm.RunState())
					require.True(t, string(sm.Memory()) == string(dm.Memory()), "memories differ")
					before := dm.WorkloadStats()[0].Pages
					require.NoError(t, dm.Cont())
					for dm.WorkloadStats()[0].Pages == before {
						time.Sleep(time.Millisecond)
					}
				})
			}
		}
	}
}

// BenchmarkMigrateMachineIdle migrates an idle real machine whose memory holds data (two
// thirds of its pages non-zero) over a unix socket without a bandwidth limit, and reports the
// downtime. With downtime-limit 20 ms nearly all memory goes out before the stop, so the
// downtime is mostly the check of all memory against what was sent.
func BenchmarkMigrateMachineIdle(b *testing.B) {
	accels := []string{vmm.AccelSoft}
	if kvm.Available() == nil {
		accels = append(accels, vmm.AccelKVM)
	}
	for _, accel := range accels {
		for _, size := range []uint64{512 << 20, 1 << 30} {
			for _, dl := range []uint64{300, 20} {
				b.Run(fmt.Sprintf("%s/%dMiB/downtime-limit=%d", accel, size>>20, dl), func(b *testing.B) {
					newMachine := func(initial vmm.RunState) *vmm.Machine {
						m, err := vmm.New(vmm.Config{MemSize: size, CPUs: 2, Accel: accel, DirtyRingSize: 4096,
							Initial: initial, Logf: func(string, ...any) {}})
						require.NoError(b, err)
						b.Cleanup(func() { m.Close() })
						return m
					}
					sm := newMachine(vmm.Running)
					fill(sm.Memory())
					src := New(Config{Machine: vmmMachine{m: sm}, DirtyRing: true})
					require.NoError(b, src.SetParameters(&SetParameters{MaxBandwidth: ptr(uint64(0)), DowntimeLimit: ptr(dl)}))
					dm := newMachine(vmm.InMigrate)
					b.SetBytes(int64(size))
					var downtime int64
					for b.Loop() {
						dm.SetRunState(vmm.InMigrate)
						dst := New(Config{Machine: vmmMachine{m: dm}, Incoming: true, Autostart: func() bool { return false }})
						uri := "unix:" + filepath.Join(b.TempDir(), "s")
						require.NoError(b, dst.MigrateIncoming(IncomingArgs{URI: &uri}))
						require.NoError(b, src.Migrate(MigrateArgs{URI: &uri}))
						<-src.Done()
						<-dst.IncomingDone()
						q := src.Query()
						require.Equal(b, StatusCompleted, q.Status, q.ErrorDesc)
						downtime += *q.Downtime
						require.NoError(b, sm.Cont())
					}
					b.ReportMetric(float64(downtime)/float64(b.N), "downtime-ms")
				})
			}
		}
	}
}
