// Package dirtylimit is migvisor's per-vCPU dirty page rate limit and dirty-rate meter: the
// behaviour behind set-vcpu-dirty-limit, cancel-vcpu-dirty-limit, query-vcpu-dirty-limit,
// calc-dirty-rate and query-dirty-rate, and the dirty-limit migration capability, with QEMU 10's
// checks, error texts and reply shapes. It is pure logic: it sees the machine through Machine
// (which *vmm.Machine satisfies), and all time through a Clock.
//
//	lim := dirtylimit.NewLimiter(m, dirtylimit.Options{}) // installs its ring-full hook on m
//	defer lim.Close()
//	err := lim.Set(nil, 50) // every vCPU to 50 MB/s
//	meter := dirtylimit.NewMeter(m, dirtylimit.Options{NewDirtyLog: ...})
//	err = meter.Calc(dirtylimit.CalcArgs{CalcTime: 1, Mode: dirtylimit.DirtyRing})
//
// The limit follows QEMU's four steps. Prepare: a goroutine, running while any vCPU is limited,
// measures every vCPU's rate over each period (1 s; x-vcpu-dirty-limit-period during a dirty-limit
// migration, through SetPeriod) from the machine's per-vCPU dirty counters. Calculate and set: a
// penalty per vCPU. Accept: at each ring-full event the machine calls RingFull on the vCPU's own
// thread, which sleeps the penalty; a vCPU that only reads never fills its ring and never pays.
//
// Two algorithms decide the penalty (Options.Algorithm). QEMU is QEMU 10's, step for step, kept as
// the reference: a per-vCPU sleep adjusted once a period, with a ring-full time taken from a
// high-water mark of rates that is never reset (so a vCPU that slows down, or shares the machine
// with a faster one, keeps a wrong ring-full time), a 25 MB/s dead band and a fixed step of a
// tenth of the ring-full time near the quota (which crawls). Migvisor, the default, paces in
// steps of a MiB instead of a ring (it asks the machine for a ring-full event every 256 pages,
// see SetRingFullPages): at each event it reads how many pages the vCPU dirtied since it was last
// released and sleeps until those pages, at the quota, are paid for. It needs no model and no
// period to settle: the first MiB is already paced, and a sleep that overran or a counter read
// late is paid back at the next event because the release time carries over; a vCPU that fell
// behind keeps at most 50 ms of credit. The periods then only report (current-rate, and the sleep
// per event for query-migrate).
//
// The meter's three modes are QEMU's, allowed where QEMU allows them: dirty-ring (with a ring
// only) sums the pages each vCPU's ring received in the window, per vCPU; dirty-bitmap (without a
// ring only) counts the distinct pages a dirty log collected; page-sampling (either) hashes random
// pages before and after. Each counts from a harvest at the start to the end of the last
// collection, so a writer sweeping more memory than it rewrites in the window gets its page rate
// from all three.
//
// One event costs at most 2 s (QEMU's caps at 99 ring-full times), so a stop of the machine
// waits at most that long for a sleeping vCPU. Any change of limits, Wake and Close cut every
// penalty being slept short; call Wake before pausing the machine so that no sleeping vCPU
// holds the pause up.
package dirtylimit
