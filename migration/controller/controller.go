package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"time"

	"github.com/migvisor/migvisor/qmp"
)

// Config is one migration's settings. Zero values take the defaults documented per field.
type Config struct {
	URI       string        // the migration channel, as migrate and migrate-incoming take it
	Bandwidth uint64        // max-bandwidth, bytes/s; 0 leaves the source's
	Downtime  time.Duration // the downtime limit the steps end at; 0: 300 ms
	Policy    Policy        // "": auto
	// DowntimeSteps and DowntimeDelayPerGiB are Nova's live_migration_downtime_steps and
	// _delay; a zero delay is the time one GiB takes at Bandwidth. Steps 0: 3.
	DowntimeSteps       int
	DowntimeDelayPerGiB time.Duration
	// CompletionTimeoutPerGiB of guest memory (0: none) triggers OnTimeout ("": abort).
	CompletionTimeoutPerGiB time.Duration
	OnTimeout               TimeoutAction
	// ProgressTimeout is KubeVirt's: no new low of remaining bytes for this long is a stall
	// (0: 5 s; negative: never).
	ProgressTimeout time.Duration
	CalcTime        time.Duration // each dirty-rate measurement; 0: 1 s
	SampleInterval  time.Duration // query-migrate period; 0: 250 ms
	DryRun          bool          // probe, measure and plan, then stop

	// Hooks, called from Run's goroutine; any may be nil.
	OnSample func(Sample)
	OnAction func(Action)
	OnPass   func(Pass)
}

// Action is something the controller did, when and why.
type Action struct {
	Time    time.Time     `json:"time"`
	Elapsed time.Duration `json:"elapsed-ns"` // since Run started
	Kind    string        `json:"action"`
	Target  string        `json:"target"` // "source" or "destination"
	Reason  string        `json:"reason"`
	Error   string        `json:"error,omitempty"`
}

// Pass is a MIGRATION_PASS event.
type Pass struct {
	Pass    int64         `json:"pass"`
	Elapsed time.Duration `json:"elapsed-ns"` // since migrate
}

// Summary is the outcome. QEMU's names where QEMU has the figure.
type Summary struct {
	Status          string        `json:"status"` // QEMU's final status; "" for a dry run or a run that never started
	TotalTime       int64         `json:"total-time"`
	Downtime        int64         `json:"downtime"`
	SetupTime       int64         `json:"setup-time"`
	Transferred     uint64        `json:"transferred"`
	DirtySyncCount  int64         `json:"dirty-sync-count"`
	ErrorDesc       string        `json:"error-desc,omitempty"`
	Reason          string        `json:"reason,omitempty"` // why it did not complete, in one line
	URI             string        `json:"uri"`
	Policy          Policy        `json:"policy"`
	Source          Offer         `json:"source"`
	Plan            *Plan         `json:"plan,omitempty"`
	DirtyRateBefore *Rates        `json:"dirty-rate-before,omitempty"`
	DirtyRateAfter  *Rates        `json:"dirty-rate-after,omitempty"`
	Actions         []Action      `json:"actions"`
	Passes          []Pass        `json:"passes"`
	Samples         []Sample      `json:"-"`
	Elapsed         time.Duration `json:"elapsed-ns"`
}

func (c *Config) defaults() {
	if c.Policy == "" {
		c.Policy = PolicyAuto
	}
	if c.Downtime == 0 {
		c.Downtime = 300 * time.Millisecond
	}
	if c.DowntimeSteps == 0 {
		c.DowntimeSteps = 3
	}
	if c.DowntimeDelayPerGiB == 0 && c.Bandwidth > 0 {
		c.DowntimeDelayPerGiB = time.Duration(float64(time.Second) * (1 << 30) / float64(c.Bandwidth))
	}
	if c.OnTimeout == "" {
		c.OnTimeout = TimeoutAbort
	}
	if c.ProgressTimeout == 0 {
		c.ProgressTimeout = 5 * time.Second
	}
	if c.ProgressTimeout < 0 {
		c.ProgressTimeout = 0
	}
	if c.CalcTime == 0 {
		c.CalcTime = time.Second
	}
	if c.SampleInterval == 0 {
		c.SampleInterval = 250 * time.Millisecond
	}
}

// restoreTimeout bounds the clean-up, which runs even when Run's ctx is done.
const restoreTimeout = 30 * time.Second

type run struct {
	cfg      Config
	src, dst *qmp.Client
	srcState *state
	dstState *state
	start    time.Time
	sum      *Summary
}

func (r *run) log(kind, target, reason string, err error) {
	now := time.Now()
	a := Action{Time: now, Elapsed: now.Sub(r.start), Kind: kind, Target: target, Reason: reason}
	if err != nil {
		a.Error = err.Error()
	}
	r.sum.Actions = append(r.sum.Actions, a)
	if r.cfg.OnAction != nil {
		r.cfg.OnAction(a)
	}
}

// Run migrates src's guest to dst (started with -incoming defer). It always returns a
// Summary; the error says why the migration did not complete (nil when it did, or for a
// dry run). When ctx ends, a running migration is cancelled; in every case what Run changed
// on either end is restored before it returns.
func Run(ctx context.Context, src, dst *qmp.Client, cfg Config) (*Summary, error) {
	cfg.defaults()
	r := &run{cfg: cfg, src: src, dst: dst, start: time.Now(),
		sum: &Summary{URI: cfg.URI, Policy: cfg.Policy, Actions: []Action{}, Passes: []Pass{}}}
	err := r.run(ctx)
	if r.srcState != nil || r.dstState != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
		if rerr := r.restore(rctx); rerr != nil {
			err = errors.Join(err, rerr)
		}
		cancel()
	}
	r.sum.Elapsed = time.Since(r.start)
	if err != nil && r.sum.Reason == "" {
		r.sum.Reason = err.Error()
	}
	return r.sum, err
}

func (r *run) run(ctx context.Context) error {
	cfg := r.cfg
	if cfg.URI == "" && !cfg.DryRun {
		return errors.New("no migration URI")
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := r.dst.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("destination: query-status: %w", err)
	}
	if st.Status != "inmigrate" {
		return fmt.Errorf("the destination is %s, not waiting for a migration (start it with -incoming defer)", st.Status)
	}
	var mi MigrationInfo
	if err := r.src.Execute(ctx, "query-migrate", nil, &mi); err != nil {
		return fmt.Errorf("source: query-migrate: %w", err)
	}
	if mi.Status != "" && mi.Status != "none" && !Terminal(mi.Status) {
		return fmt.Errorf("the source is already migrating (status %s)", mi.Status)
	}
	if err := r.src.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("source: query-status: %w", err)
	}
	srcRunning := st.Status == "running"

	offer, err := Probe(ctx, r.src)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	r.sum.Source = offer
	r.log("probe", "source", fmt.Sprintf("%d vCPUs, %s, dirty ring %v, set-vcpu-dirty-limit %v, auto-converge %v",
		offer.VCPUs, FormatBytes(float64(offer.Memory)), offer.Ring, offer.DirtyLimit, hasCap(offer, "auto-converge")), nil)

	before, err := Measure(ctx, r.src, offer.Ring, cfg.CalcTime)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	r.sum.DirtyRateBefore = &before
	r.log("measure", "source", fmt.Sprintf("calc-dirty-rate %s over %s: %d MB/s %v", before.Mode, cfg.CalcTime, before.Total, before.VCPU), nil)

	bandwidth := cfg.Bandwidth
	if bandwidth == 0 {
		var p struct {
			MaxBandwidth uint64 `json:"max-bandwidth"`
		}
		if err := r.src.Execute(ctx, "query-migrate-parameters", nil, &p); err != nil {
			return fmt.Errorf("source: query-migrate-parameters: %w", err)
		}
		bandwidth = p.MaxBandwidth
	}
	plan, err := MakePlan(cfg.Policy, offer, before, bandwidth, cfg.Downtime)
	if err != nil {
		return err
	}
	r.sum.Plan = &plan
	r.log("plan", "source", fmt.Sprintf("%s: %s", plan.Strategy, plan.Reason), nil)
	if cfg.DryRun {
		return nil
	}

	if r.srcState, err = snapshot(ctx, "source", r.src, offer.Ring); err != nil {
		return err
	}
	if r.dstState, err = snapshot(ctx, "destination", r.dst, false); err != nil {
		return err
	}
	if err := r.apply(ctx, plan, offer); err != nil {
		return err
	}
	steps := DowntimeSteps(cfg.Downtime, cfg.DowntimeSteps, cfg.DowntimeDelayPerGiB, offer.Memory)
	esc := NewEscalator(EscalatorConfig{Steps: steps, ProgressTimeout: cfg.ProgressTimeout,
		CompletionTimeout: time.Duration(float64(cfg.CompletionTimeoutPerGiB) * float64(offer.Memory) / (1 << 30)),
		OnTimeout:         cfg.OnTimeout, Limits: plan.Limits, Fallback: plan.Fallback})
	// The first downtime step goes in before migrate.
	for _, d := range esc.Observe(Sample{MigrationInfo: MigrationInfo{Status: "setup"}}) {
		r.decide(ctx, d, srcRunning)
	}

	if err := r.dst.Execute(ctx, "migrate-incoming", map[string]any{"uri": cfg.URI}, nil); err != nil {
		r.log("migrate-incoming", "destination", cfg.URI, err)
		return fmt.Errorf("destination: migrate-incoming: %w", err)
	}
	r.log("migrate-incoming", "destination", cfg.URI, nil)
	migStart := time.Now()
	if err := r.src.Execute(ctx, "migrate", map[string]any{"uri": cfg.URI}, nil); err != nil {
		r.log("migrate", "source", cfg.URI, err)
		return fmt.Errorf("source: migrate: %w", err)
	}
	r.log("migrate", "source", cfg.URI, nil)

	final, err := r.watch(ctx, esc, offer, migStart, srcRunning)
	r.sum.Status, r.sum.TotalTime, r.sum.Downtime, r.sum.SetupTime = final.Status, final.TotalTime, final.Downtime, final.SetupTime
	r.sum.Transferred, r.sum.DirtySyncCount, r.sum.ErrorDesc = final.RAM.Transferred, final.RAM.DirtySyncCount, final.ErrorDesc
	if err != nil {
		return err
	}
	if final.Status != "completed" {
		why := "the migration " + final.Status
		if final.ErrorDesc != "" {
			why += ": " + final.ErrorDesc
		}
		if r.sum.Reason != "" {
			why += " (" + r.sum.Reason + ")"
		}
		r.sum.Reason = why
		return errors.New(why)
	}
	r.afterCompletion(ctx, srcRunning)
	return nil
}

func hasCap(o Offer, name string) bool { _, ok := o.Capabilities[name]; return ok }

// apply sets the capabilities, parameters and limits of the plan on the source.
func (r *run) apply(ctx context.Context, plan Plan, offer Offer) error {
	caps := map[string]bool{"events": true, "auto-converge": plan.Strategy == StrategyAutoConverge,
		// The controller limits vCPUs itself; QEMU's capability would limit all of them.
		"dirty-limit": false}
	list, err := r.srcState.setCapabilities(ctx, caps)
	r.log("migrate-set-capabilities", "source", fmt.Sprintf("%v for %s", list, plan.Strategy), err)
	if err != nil {
		return err
	}
	params := map[string]any{}
	if r.cfg.Bandwidth > 0 {
		params["max-bandwidth"] = r.cfg.Bandwidth
	}
	if plan.Strategy == StrategyAutoConverge {
		params["cpu-throttle-initial"] = plan.ThrottleInitial
		params["cpu-throttle-increment"] = plan.ThrottleIncrement
	}
	if len(params) > 0 {
		err := r.srcState.setParameters(ctx, params)
		r.log("migrate-set-parameters", "source", fmt.Sprintf("%v", params), err)
		if err != nil {
			return err
		}
	}
	for _, l := range plan.Limits {
		err := r.srcState.setLimit(ctx, l.CPU, l.Rate)
		r.log("set-vcpu-dirty-limit", "source", fmt.Sprintf("vCPU %d to %d MB/s: %s", l.CPU, l.Rate, plan.Reason), err)
		if err != nil {
			return err
		}
	}
	return nil
}

// decide carries out one of the Escalator's decisions.
func (r *run) decide(ctx context.Context, d Decision, srcRunning bool) {
	switch d.Kind {
	case "set-downtime":
		err := r.srcState.setParameters(ctx, map[string]any{"downtime-limit": d.Downtime.Milliseconds()})
		r.log("set-downtime", "source", fmt.Sprintf("downtime-limit %d ms: %s", d.Downtime.Milliseconds(), d.Reason), err)
	case "tighten-limit":
		for _, l := range d.Limits {
			err := r.srcState.setLimit(ctx, l.CPU, l.Rate)
			r.log("tighten-limit", "source", fmt.Sprintf("vCPU %d to %d MB/s: %s", l.CPU, l.Rate, d.Reason), err)
		}
	case "stall":
		r.log("stall", "source", d.Reason, nil)
	case "abort":
		r.sum.Reason = d.Reason
		err := r.src.Execute(ctx, "migrate_cancel", nil, nil)
		r.log("migrate_cancel", "source", d.Reason, err)
	case "pause":
		err := r.src.Execute(ctx, "stop", nil, nil)
		if err == nil && srcRunning {
			r.srcState.stopped = true
		}
		r.log("stop", "source", d.Reason+": pausing the guest so that the migration completes", err)
	}
}

// watch samples the migration until it ends, escalating on the way. When ctx ends it cancels
// the migration and waits for it to stop.
func (r *run) watch(ctx context.Context, esc *Escalator, offer Offer, migStart time.Time, srcRunning bool) (MigrationInfo, error) {
	tick := time.NewTicker(r.cfg.SampleInterval)
	defer tick.Stop()
	events := r.src.Events()
	var interrupted error
	for {
		select {
		case <-ctx.Done():
			if interrupted == nil {
				interrupted = fmt.Errorf("interrupted (%v): migration cancelled", context.Cause(ctx))
				r.sum.Reason = interrupted.Error()
				cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
				err := r.src.Execute(cctx, "migrate_cancel", nil, nil)
				cancel()
				r.log("migrate_cancel", "source", interrupted.Error(), err)
			}
			return r.waitEnd(context.WithoutCancel(ctx), migStart, interrupted)
		case ev, ok := <-events:
			if !ok {
				return MigrationInfo{Status: "failed"}, errors.New("source: QMP connection ended")
			}
			if ev.Name == "MIGRATION_PASS" {
				var p struct {
					Pass int64 `json:"pass"`
				}
				if json.Unmarshal(ev.Data, &p) == nil {
					pass := Pass{Pass: p.Pass, Elapsed: time.Since(migStart)}
					r.sum.Passes = append(r.sum.Passes, pass)
					if r.cfg.OnPass != nil {
						r.cfg.OnPass(pass)
					}
				}
			}
			continue
		case <-tick.C:
		}
		s, err := r.sample(ctx, esc, offer, migStart)
		if err != nil {
			if ctx.Err() != nil {
				continue // the cancel path above handles it
			}
			return s.MigrationInfo, err
		}
		if Terminal(s.Status) {
			return s.MigrationInfo, nil
		}
		for _, d := range esc.Observe(s) {
			r.decide(ctx, d, srcRunning)
		}
	}
}

func (r *run) sample(ctx context.Context, esc *Escalator, offer Offer, migStart time.Time) (Sample, error) {
	var s Sample
	if err := r.src.Execute(ctx, "query-migrate", nil, &s.MigrationInfo); err != nil {
		return s, fmt.Errorf("source: query-migrate: %w", err)
	}
	s.Elapsed = time.Since(migStart)
	for _, l := range esc.Limits() {
		s.LimitTotal += l.Rate
	}
	if offer.Workload && !Terminal(s.Status) {
		_ = r.src.Execute(ctx, "x-query-workload", nil, &s.Workload) // a progress figure only
	}
	r.sum.Samples = append(r.sum.Samples, s)
	if r.cfg.OnSample != nil {
		r.cfg.OnSample(s)
	}
	return s, nil
}

// waitEnd polls until the cancelled migration has ended.
func (r *run) waitEnd(ctx context.Context, migStart time.Time, why error) (MigrationInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	for {
		var mi MigrationInfo
		if err := r.src.Execute(ctx, "query-migrate", nil, &mi); err != nil {
			return mi, errors.Join(why, fmt.Errorf("source: query-migrate: %w", err))
		}
		if Terminal(mi.Status) {
			return mi, why
		}
		select {
		case <-ctx.Done():
			return mi, errors.Join(why, errors.New("the cancelled migration did not end"))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// afterCompletion resumes a guest the controller paused, now on the destination, and
// measures its dirty rate there.
func (r *run) afterCompletion(ctx context.Context, srcRunning bool) {
	if r.srcState.stopped {
		r.srcState.stopped = false // the guest lives on the destination now
		var st struct {
			Status string `json:"status"`
		}
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if err := r.dst.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "inmigrate" {
				break
			}
		}
		if st.Status == "paused" {
			err := r.dst.Execute(ctx, "cont", nil, nil)
			r.log("cont", "destination", "the guest was paused at the completion timeout and ran before", err)
		}
	}
	ring, err := startCalc(ctx, r.dst, "dirty-ring", 50*time.Millisecond)
	if err == nil && ring {
		_, err = waitCalc(ctx, r.dst)
	}
	if err == nil {
		var after Rates
		after, err = Measure(ctx, r.dst, ring, r.cfg.CalcTime)
		if err == nil {
			r.sum.DirtyRateAfter = &after
		}
	}
	reason := "the guest's dirty rate where it runs now"
	if r.sum.DirtyRateAfter != nil {
		reason = fmt.Sprintf("%s: %d MB/s %v", reason, r.sum.DirtyRateAfter.Total, r.sum.DirtyRateAfter.VCPU)
	}
	r.log("measure", "destination", reason, err)
}

// restore undoes the changes on both ends; a guest the controller paused and whose migration
// did not complete runs again.
func (r *run) restore(ctx context.Context) error {
	var errs []error
	if r.srcState != nil && r.srcState.stopped {
		err := r.src.Execute(ctx, "cont", nil, nil)
		r.log("cont", "source", "the migration did not complete: the guest paused for it runs again", err)
		errs = append(errs, err)
	}
	for _, s := range []*state{r.srcState, r.dstState} {
		if s == nil {
			continue
		}
		done, err := s.restore(ctx)
		for _, d := range done {
			r.log("restore", s.name, d, nil)
		}
		if err != nil {
			r.log("restore", s.name, "failed", err)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
