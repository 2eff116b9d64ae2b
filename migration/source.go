package migration

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MigrateArgs is migrate's argument (detach is accepted and ignored, as QEMU does).
type MigrateArgs struct {
	URI      *string   `json:"uri"`
	Channels []Channel `json:"channels"`
	Detach   *bool     `json:"detach"`
	Resume   *bool     `json:"resume"`
	FDs      FDSource  `json:"-"` // the client's descriptors, for fd:NAME
}

var errCancelled = errors.New("migration cancelled")

const (
	bufferDelay  = 100 * time.Millisecond // QEMU's BUFFER_DELAY: bandwidth window and rate-limit slice
	maxIterWait  = 50 * time.Millisecond  // QEMU's MAX_WAIT for one iteration
	syncPeriod   = time.Second            // dirty-rate and throttle-trigger period
	runPages     = 64                     // largest page run the sender builds
	defaultDLPer = time.Second            // the dirty-limit period outside migration
	forcedSync   = 5 * time.Second        // auto-converge's longest time without a sync
)

// Migrate is migrate: checks, then the migration runs in the background; MIGRATION setup is
// emitted before the reply.
func (m *Migration) Migrate(a MigrateArgs) error {
	addr, err := pickAddress(a.URI, a.Channels)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if a.Resume != nil && *a.Resume {
		return errNoPausedResume
	}
	if m.running() {
		return errInProgress
	}
	switch m.cfg.Machine.RunState() {
	case RunInmigrate:
		return errWaitingIncoming
	case RunPostmigrate:
		return errPostmigrate
	}
	switch m.params.Mode {
	case "normal":
	case "cpr-transfer":
		return errCPRMode
	default:
		return errUnsupportedParameter("mode", m.params.Mode)
	}
	if m.params.TLSCreds != "" {
		return errNoTLSCreds(m.params.TLSCreds)
	}
	if err := addr.takeFD(a.FDs, false); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &sourceRun{
		m: m, addr: addr, ctx: ctx, cancel: cancel, done: make(chan struct{}),
		events:       m.caps["events"],
		autoConverge: m.caps["auto-converge"],
		dirtyLimit:   m.caps["dirty-limit"] && m.cfg.Limiter != nil,
		start:        time.Now(),
		expected:     int64(m.params.DowntimeLimit),
		zeroCheck:    m.params.ZeroPageDetection != "none",
		pauseBefore:  m.caps["pause-before-switchover"],
		continued:    make(chan struct{}, 1),
	}
	r.limit.Store(int64(m.params.MaxBandwidth / 10))
	r.stats.PageSize = PageSize
	r.stats.Total = int64(len(m.cfg.Machine.Memory()))
	if r.dirtyLimit {
		l := m.cfg.Limiter
		l.SetMigrationActive(true)
		l.SetPeriod(time.Duration(m.params.XVCPUDirtyLimitPeriod) * time.Millisecond)
	}
	m.src = r
	r.setState(StatusSetup)
	go r.run()
	return nil
}

// Cancel is migrate_cancel: {} always; a running migration goes cancelling, then cancelled
// with the guest as it was.
func (m *Migration) Cancel() error {
	m.mu.Lock()
	r := m.src
	m.mu.Unlock()
	if r != nil {
		r.requestCancel()
	}
	return nil
}

// Continue is migrate-continue: the go-ahead for a migration waiting in state (which must be
// the state it is in, pre-switchover in practice).
func (m *Migration) Continue(state string) error {
	m.mu.Lock()
	r := m.src
	m.mu.Unlock()
	cur := StatusNone
	if r != nil {
		r.mu.Lock()
		cur = r.state
		r.mu.Unlock()
	}
	if cur != state {
		return errNotInState(cur)
	}
	if r != nil {
		select {
		case r.continued <- struct{}{}:
		default: // already given
		}
	}
	return nil
}

// Done returns a channel closed when the current (or last) outgoing migration has ended,
// nil if there was none.
func (m *Migration) Done() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.src == nil {
		return nil
	}
	return m.src.done
}

// sourceRun is one outgoing migration.
type sourceRun struct {
	m            *Migration
	addr         Address
	ctx          context.Context
	cancel       context.CancelFunc
	done         chan struct{}
	events       bool
	autoConverge bool
	dirtyLimit   bool
	zeroCheck    bool
	pauseBefore  bool          // pause-before-switchover: wait in pre-switchover once stopped
	continued    chan struct{} // migrate-continue's go-ahead

	limit atomic.Int64 // bytes per 100 ms window, 0 = unlimited; set-parameters changes it live

	// owned by the migration goroutine
	paused    bool
	oldState  string
	dlApplied bool
	dlQuota   uint64
	throttle  *throttle
	replies   chan error
	downStart time.Time

	mu              sync.Mutex
	state           string
	errDesc         string
	cancelRequested bool
	committed       bool
	out             outgoing
	start           time.Time
	setupTime       int64
	totalTime       int64
	downtime        int64
	expected        int64
	throttlePct     int64
	stats           MigrationStats
}

func (r *sourceRun) isRunning() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case StatusSetup, StatusActive, StatusCancelling, StatusPreSwitchover, StatusDevice:
		return true
	}
	return false
}

func (r *sourceRun) setState(s string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.setStateLocked(s)
}

func (r *sourceRun) setStateLocked(s string) {
	r.state = s
	r.m.emitMigration(r.events, "MIGRATION", map[string]any{"status": s})
}

func (r *sourceRun) requestCancel() {
	r.mu.Lock()
	switch r.state {
	case StatusSetup, StatusActive, StatusPreSwitchover, StatusDevice:
	default:
		r.mu.Unlock()
		return
	}
	if r.committed {
		r.mu.Unlock()
		return
	}
	r.cancelRequested = true
	r.setStateLocked(StatusCancelling)
	out := r.out
	r.mu.Unlock()
	r.cancel()
	if out != nil {
		out.abort()
	}
}

func (r *sourceRun) run() {
	err := r.precopy()
	r.finish(err)
}

// finish leaves the guest as the migration found it unless it completed, lifts what the
// migration imposed, and records the outcome.
func (r *sourceRun) finish(err error) {
	mach := r.m.cfg.Machine
	defer close(r.done)
	r.stopThrottle()
	r.liftLimits()
	r.cancel()
	r.mu.Lock()
	out, cancelled := r.out, r.cancelRequested
	r.mu.Unlock()
	if err != nil && out != nil {
		out.abort()
	}
	// A migrate issued meanwhile sees the run state and the outcome together.
	r.m.mu.Lock()
	defer r.m.mu.Unlock()
	if err == nil {
		end := time.Now()
		r.mu.Lock()
		r.totalTime = end.Sub(r.start).Milliseconds()
		r.downtime = end.Sub(r.downStart).Milliseconds()
		if t := r.totalTime - r.setupTime; t > 0 {
			r.stats.Mbps = float64(r.stats.Transferred) * 8 / float64(t) / 1000
		}
		r.stats.Remaining = 0
		r.stats.DirtyPagesRate = 0
		r.mu.Unlock()
		mach.SetRunState(RunPostmigrate)
		r.setState(StatusCompleted)
		return
	}
	if !cancelled {
		r.m.cfg.Logf("migration to %s failed: %v", r.addr, err)
		r.mu.Lock()
		r.errDesc = err.Error()
		r.setStateLocked(StatusFailed)
		r.mu.Unlock()
	}
	if r.paused {
		if r.oldState == RunRunning {
			if rerr := mach.Resume(); rerr != nil {
				r.m.cfg.Logf("migration: cannot resume the guest: %v", rerr)
			}
		} else {
			mach.SetRunState(r.oldState)
		}
	}
	if cancelled {
		r.setState(StatusCancelled)
	}
}

// precopy is the migration thread: setup, iterations, completion. Any error fails it.
func (r *sourceRun) precopy() error {
	mach := r.m.cfg.Machine
	out, err := dial(r.ctx, r.addr)
	if err != nil {
		if r.ctx.Err() != nil {
			return errCancelled
		}
		return err
	}
	r.mu.Lock()
	r.out = out
	cancelled := r.cancelRequested
	r.mu.Unlock()
	if cancelled {
		return errCancelled
	}
	var flags uint32
	rp := out.reply()
	if rp != nil {
		flags = FlagReturnPath
	}
	if mach.RunState() != RunRunning {
		flags |= FlagSourceStopped
	}
	mem := mach.Memory()
	s := &sender{
		r: r, mach: mach, enc: NewEncoder(out), mem: mem, npages: len(mem) / PageSize,
		sums: newPageSums(len(mem) / PageSize),
	}
	s.enc.SetGuestMemory(mem)
	defer s.enc.Close()
	err = s.enc.WriteHeader(Header{Version: StreamVersion, Flags: flags, Config: MachineConfig{
		MemSize: uint64(len(mem)), CPUs: uint32(mach.NumCPUs()), PageSize: PageSize,
		Workloads: r.m.cfg.Workloads,
	}})
	if err == nil {
		err = s.enc.Flush()
	}
	if err != nil {
		return r.ioError("sending the stream header", err)
	}
	if rp != nil {
		// The destination accepts the header (or refuses it, with its reason) before any
		// page moves; its final verdict comes after the trailer.
		r.replies = make(chan error, 2)
		go func() {
			err := readReply(rp)
			r.replies <- returnPathErr(err)
			if err == nil {
				r.replies <- returnPathErr(readReply(rp))
			}
		}()
		select {
		case err := <-r.replies:
			if err != nil {
				return err
			}
		case <-r.ctx.Done():
			return errCancelled
		}
	}
	s.log = mach.NewDirtyLog()
	defer s.log.Close()
	// Setup: every page that may hold data is dirty, the others go at once as zero runs, and
	// the first sync is pass 1. The log is open before memory is looked at, so a hole the
	// guest writes afterwards comes back through it.
	if err := s.setup(); err != nil {
		return err
	}
	now := time.Now()
	s.winStart, s.periodStart = now, now
	s.sync()
	r.mu.Lock()
	r.setupTime = time.Since(r.start).Milliseconds()
	if r.state == StatusSetup {
		r.setStateLocked(StatusActive)
	}
	r.mu.Unlock()
	if err := s.iterate(); err != nil {
		return err
	}
	return s.complete()
}

// returnPathErr words a broken return path; a refusal stays as the destination wrote it.
func returnPathErr(err error) error {
	var ref *RefusedError
	if err == nil || errors.As(err, &ref) {
		return err
	}
	return fmt.Errorf("the destination did not answer: %w", err)
}

// ioError prefers the destination's refusal, or the cancellation, to the write error it caused,
// and otherwise names what was being sent in which phase (setup, active, device).
func (r *sourceRun) ioError(what string, err error) error {
	if r.ctx.Err() != nil {
		return errCancelled
	}
	if r.replies != nil {
		select {
		case rerr := <-r.replies:
			if rerr != nil {
				var ref *RefusedError
				if errors.As(rerr, &ref) {
					return rerr
				}
			}
		case <-time.After(time.Second):
		}
	}
	r.mu.Lock()
	phase := r.state
	r.mu.Unlock()
	return fmt.Errorf("%s (%s phase): %w", what, phase, err)
}

// earlyReply reports a refusal (or a broken return path) that arrived while sending.
func (r *sourceRun) earlyReply() error {
	if r.replies == nil {
		return nil
	}
	select {
	case err := <-r.replies:
		if err == nil {
			return errors.New("the destination acknowledged before the end of the stream")
		}
		return err
	default:
		return nil
	}
}

// sender holds the migration goroutine's view of the precopy.
type sender struct {
	r      *sourceRun
	mach   Machine
	enc    *Encoder
	log    DirtyLog
	mem    []byte
	bm     []uint64
	npages int
	dirty  int
	cursor int
	// sums holds the checksum of what was last sent of each page (every page is sent in the
	// first pass); at the stop it is checked against memory, then digested.
	sums *pageSums
	zero [runPages]bool // writeRun's: which pages of the run are zero

	// The scrub: while precopy waits for its bandwidth window it rereads pages the dirty log
	// calls clean and compares them with sums. populated marks the pages that may hold data
	// (refreshed each round; holes are zero and were sent as such). A page that differs is a
	// suspect until the next sync tells whether the log has it too; one it has not is a write
	// the log missed, and goes again.
	populated []uint64
	scrubAt   int
	suspect   []uint64 // one bit a page
	suspects  int
	scratch   []uint64
	missed    int // writes the log missed, found by the scrub or at the stop
	firstMiss int
	stopSkip  []uint64 // what the check at the stop leaves out
	down      stopwatch
	checked   int // pages the check at the stop read

	winStart   time.Time
	winBytes   int64
	winPages   int64
	threshold  int64
	stopped    bool
	stopBytes  int64
	normal     int64
	duplicate  int64
	syncCount  int64
	dirtyRate  int64
	lastSync   int64 // dirty bytes at the last sync
	highCount  int
	periodPgs  int64
	periodXfer int64

	periodStart time.Time
	lastSyncAt  time.Time
}

func (s *sender) iterate() error {
	r := s.r
	for {
		if r.ctx.Err() != nil {
			return errCancelled
		}
		if err := r.earlyReply(); err != nil {
			return err
		}
		s.tick(time.Now())
		if s.rateExceeded() {
			if err := s.enc.Flush(); err != nil {
				return r.ioError("sending pages", err)
			}
			s.scrub(s.winStart.Add(bufferDelay))
			select {
			case <-time.After(time.Until(s.winStart.Add(bufferDelay))):
			case <-r.ctx.Done():
				return errCancelled
			}
			continue
		}
		// Auto-converge needs syncs to see the guest slow down: past the first pass, one at
		// least every 5 s however long a pass takes (QEMU 9.2's dirty-sync timer).
		if r.autoConverge && s.syncCount > 1 && time.Since(s.lastSyncAt) >= forcedSync {
			s.sync()
		}
		pending := int64(s.dirty) * PageSize
		if pending < s.threshold {
			s.sync()
			pending = int64(s.dirty) * PageSize
		}
		// A guest that is not running (stopped before the migration) dirties nothing: send it
		// all before the switch-over, which then carries only the vCPU state, rather than
		// leaving a threshold's worth to the downtime as QEMU does.
		if pending == 0 || (pending < s.threshold && s.mach.RunState() == RunRunning) {
			return nil
		}
		if err := s.send(time.Now().Add(maxIterWait), true); err != nil {
			return err
		}
		if err := s.enc.WriteEndOfSection(uint64(s.syncCount)); err != nil {
			return r.ioError(fmt.Sprintf("ending pass %d", s.syncCount), err)
		}
		if err := s.enc.Push(); err != nil {
			return r.ioError(fmt.Sprintf("ending pass %d", s.syncCount), err)
		}
	}
}

// rateExceeded is migration_rate_exceeded: max-bandwidth/10 bytes per 100 ms window; a
// limit below 10 bytes/s means none, as in QEMU.
func (s *sender) rateExceeded() bool {
	l := s.r.limit.Load()
	return l > 0 && s.enc.Written()-s.winBytes >= l
}

// tick closes a bandwidth window every 100 ms: bandwidth, switch-over threshold, mbps,
// pages per second and expected downtime.
func (s *sender) tick(now time.Time) {
	el := now.Sub(s.winStart)
	if el < bufferDelay {
		return
	}
	ms := float64(el) / float64(time.Millisecond)
	bytes := s.enc.Written() - s.winBytes
	bw := float64(bytes) / ms
	p := s.r.m.paramsNow()
	switchBW := bw
	if p.AvailSwitchoverBandwidth != 0 {
		switchBW = float64(p.AvailSwitchoverBandwidth) / 1000
	}
	s.threshold = int64(switchBW * float64(p.DowntimeLimit))
	r := s.r
	r.mu.Lock()
	r.stats.Mbps = float64(bytes) * 8 / (ms / 1000) / 1e6
	r.stats.PagesPerSecond = uint64(float64(s.winPages) * 1000 / ms)
	if s.dirtyRate != 0 && bytes > 10000 && bw > 0 {
		r.expected = int64(float64(s.lastSync) / bw)
	}
	r.mu.Unlock()
	s.winStart, s.winBytes, s.winPages = now, s.enc.Written(), 0
}

// sync is migration_bitmap_sync: harvest the dirty log into the bitmap, a new pass.
func (s *sender) sync() {
	r := s.r
	added := s.syncLog()
	n := 0
	for _, w := range s.bm {
		n += bits.OnesCount64(w)
	}
	s.dirty = n
	s.syncCount++
	if !s.stopped {
		s.sums.refresh() // between passes, so that the digest at the stop has little to hash
	}
	s.lastSyncAt = time.Now()
	s.periodPgs += int64(added)
	s.lastSync = int64(n) * PageSize
	now := time.Now()
	if el := now.Sub(s.periodStart); el > syncPeriod {
		if !s.stopped {
			s.triggerThrottle()
		}
		s.dirtyRate = s.periodPgs * 1000 / el.Milliseconds()
		s.periodStart, s.periodPgs, s.periodXfer = now, 0, s.enc.Written()
	}
	r.mu.Lock()
	r.stats.DirtySyncCount = s.syncCount
	r.stats.DirtyPagesRate = s.dirtyRate
	r.stats.Remaining = s.lastSync
	r.m.emitMigration(r.events, "MIGRATION_PASS", map[string]any{"pass": s.syncCount})
	r.mu.Unlock()
}

// triggerThrottle is migration_trigger_throttle: when the guest dirtied more than
// throttle-trigger-threshold % of what was sent in two periods, throttle it.
func (s *sender) triggerThrottle() {
	r := s.r
	if !r.autoConverge && !r.dirtyLimit {
		return
	}
	p := r.m.paramsNow()
	xfer := s.enc.Written() - s.periodXfer
	dirtyBytes := s.periodPgs * PageSize
	threshold := xfer * int64(p.ThrottleTriggerThreshold) / 100
	if dirtyBytes > threshold {
		s.highCount++
		if s.highCount >= 2 {
			s.highCount = 0
			if r.autoConverge {
				r.throttleDown(p, dirtyBytes, threshold)
			} else if r.dirtyLimit {
				r.dirtyLimitGuest(p)
			}
		}
	}
}

// send writes dirty pages from the cursor on until none is left, the deadline passes or
// (limited) the window's byte budget is spent. Zero pages go as a flag alone.
func (s *sender) send(deadline time.Time, limited bool) error {
	r := s.r
	for s.dirty > 0 {
		first, n := s.nextRun()
		if err := s.writeRun(first, n); err != nil {
			what := fmt.Sprintf("sending pages %d-%d", first, first+n-1)
			if s.stopped {
				what = fmt.Sprintf("sending the last pages (%d-%d)", first, first+n-1)
			}
			return r.ioError(what, err)
		}
		if limited {
			if s.rateExceeded() {
				return nil
			}
			if time.Now().After(deadline) {
				return nil
			}
		}
		if r.ctx.Err() != nil {
			return errCancelled
		}
	}
	return nil
}

// nextRun finds the next dirty page at or after the cursor (wrapping) and takes up to
// runPages consecutive dirty pages, clearing their bits.
func (s *sender) nextRun() (int, int) {
	p := s.cursor
	if p >= s.npages {
		p = 0
	}
	for {
		w := s.bm[p/64] >> (p % 64)
		if w != 0 {
			p += bits.TrailingZeros64(w)
			break
		}
		p = (p/64 + 1) * 64
		if p >= s.npages {
			p = 0
		}
	}
	n := 0
	for q := p; q < s.npages && n < runPages && s.bm[q/64]&(1<<(q%64)) != 0; q++ {
		s.bm[q/64] &^= 1 << (q % 64)
		n++
	}
	s.dirty -= n
	s.cursor = p + n
	return p, n
}

func (s *sender) writeRun(first, n int) error {
	// One pass over the run, each page's lines requested a page ahead (eachPage), finds the
	// zero pages and checksums the others. The pages then go from guest memory uncopied: one
	// the guest changes between its checksum and its send was reported dirty and goes again,
	// and any other difference between what was summed and what was sent fails the digest.
	zero := s.zero[:n]
	touched.Add(uint32(eachPage(s.mem, first, first+n, nil, func(p int, page []byte) {
		z := s.r.zeroCheck && isZero(page)
		zero[p-first] = z
		if z {
			s.sums.set(p, zeroPageSum)
		} else {
			s.sums.set(p, PageSum(page))
		}
	})))
	var normal, zeroes int64
	for i := 0; i < n; {
		j := i + 1
		for j < n && zero[j] == zero[i] {
			j++
		}
		var err error
		if zero[i] {
			err = s.enc.WriteZeroPages(uint64(first+i), j-i)
			zeroes += int64(j - i)
		} else {
			err = s.enc.WriteGuestPages(uint64(first+i), j-i)
			normal += int64(j - i)
		}
		if err != nil {
			return err
		}
		i = j
	}
	s.normal += normal
	s.duplicate += zeroes
	s.winPages += int64(n)
	r := s.r
	written := s.enc.Written()
	r.mu.Lock()
	r.stats.Normal = s.normal
	r.stats.NormalBytes = s.normal * PageSize
	r.stats.Duplicate = s.duplicate
	r.stats.Transferred = written
	r.stats.Remaining = int64(s.dirty) * PageSize
	if s.stopped {
		r.stats.DowntimeBytes = uint64(written - s.stopBytes)
	} else {
		r.stats.PrecopyBytes = uint64(written)
	}
	r.mu.Unlock()
	return nil
}

// sendCPU sends the vCPU state.
func (s *sender) sendCPU() error {
	cpu, err := s.mach.SaveCPU()
	if err != nil {
		return fmt.Errorf("saving the vCPU state: %w", err)
	}
	if err := s.enc.WriteCPU(cpu); err != nil {
		return s.r.ioError("sending the vCPU state", err)
	}
	return nil
}

// preSwitchover is QEMU's migration_switchover_prepare: with pause-before-switchover the
// stopped source waits in pre-switchover for migrate-continue, or for a cancel, which leaves
// the guest running here. The downtime counts on meanwhile, from the stop.
func (r *sourceRun) preSwitchover() error {
	if !r.pauseBefore {
		return nil
	}
	r.mu.Lock()
	if r.cancelRequested {
		r.mu.Unlock()
		return errCancelled
	}
	r.setStateLocked(StatusPreSwitchover)
	r.mu.Unlock()
	select {
	case <-r.continued:
		return nil
	case <-r.ctx.Done():
		return errCancelled
	}
}

// complete is migration_completion: stop the guest, send what is left and the vCPU state
// while all memory is checked against what was sent, then the digest of memory as it
// stopped, and (with a return path) commit only once the destination has verified it.
func (s *sender) complete() error {
	r := s.r
	r.stopThrottle()
	if l := r.m.cfg.Limiter; l != nil {
		l.Wake() // no vCPU asleep in a dirty-limit penalty holds the stop up
	}
	r.mu.Lock()
	if r.cancelRequested {
		r.mu.Unlock()
		return errCancelled
	}
	r.mu.Unlock()
	r.oldState = s.mach.RunState()
	r.downStart = time.Now()
	if err := s.mach.Pause(RunFinishMigrate); err != nil {
		return err
	}
	r.paused = true
	s.down = stopwatch{last: r.downStart}
	s.down.lap("stop")
	if err := r.preSwitchover(); err != nil {
		return err
	}
	r.mu.Lock()
	if r.state == StatusActive || r.state == StatusPreSwitchover {
		r.setStateLocked(StatusDevice)
	}
	r.mu.Unlock()
	s.stopped, s.stopBytes = true, s.enc.Written()
	s.sync()
	s.down.lap("sync")
	finalPages := s.dirty
	// Memory no longer changes: check it, within the downtime budget, while the rest goes
	// out, and send again what the dirty log missed; then the vCPU state.
	check := s.startStopCheck()
	if err := s.send(time.Time{}, false); err != nil {
		if check != nil {
			check.abandon()
		}
		return err
	}
	s.down.lap(fmt.Sprintf("send %d pages", finalPages))
	if check != nil {
		if err := s.finishStopCheck(check); err != nil {
			return err
		}
		s.down.lap(fmt.Sprintf("check %d pages", s.checked))
	}
	if err := s.sendCPU(); err != nil {
		return err
	}
	s.down.lap("vCPU state")
	// Every page holds what was last sent of it: the digest is that of memory as it stopped.
	if err := s.enc.WriteTrailer(s.sums.digest(uint64(len(s.mem)))); err != nil {
		return r.ioError("sending the memory digest", err)
	}
	if err := s.enc.Flush(); err != nil {
		return r.ioError("sending the memory digest", err)
	}
	s.down.lap("digest")
	r.mu.Lock()
	r.stats.Transferred = s.enc.Written()
	r.stats.DowntimeBytes = uint64(s.enc.Written() - s.stopBytes)
	out := r.out
	r.mu.Unlock()
	if r.replies != nil {
		select {
		case err := <-r.replies:
			if err != nil {
				return err
			}
		case <-r.ctx.Done():
			return errCancelled
		}
		s.down.lap("destination's verdict")
	}
	r.mu.Lock()
	if r.cancelRequested {
		r.mu.Unlock()
		return errCancelled
	}
	r.committed = true
	r.mu.Unlock()
	if r.replies != nil {
		if err := s.enc.WriteGo(); err != nil {
			return fmt.Errorf("sending the go-ahead: %w", err)
		}
	}
	err := out.finish()
	s.down.lap("close")
	r.m.cfg.Logf("migration to %s: downtime %s", r.addr, s.down)
	return err
}

// stopwatch times the steps of the downtime, for the log line that says where it went.
type stopwatch struct {
	last  time.Time
	total time.Duration
	laps  []string
}

func (w *stopwatch) lap(what string) {
	now := time.Now()
	d := now.Sub(w.last)
	w.last, w.total = now, w.total+d
	w.laps = append(w.laps, fmt.Sprintf("%s %.1f", what, float64(d.Microseconds())/1000))
}

func (w stopwatch) String() string {
	return fmt.Sprintf("%.1f ms: %s", float64(w.total.Microseconds())/1000, strings.Join(w.laps, ", "))
}
