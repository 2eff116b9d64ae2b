package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"

	"github.com/migvisor/migvisor/qmp"
)

// state is what the controller may change on an endpoint, as it found it, and what it changed.
type state struct {
	name   string
	ep     *qmp.Client
	caps   map[string]bool
	params map[string]json.RawMessage
	limits map[int]uint64 // the user's dirty limits

	setCaps   map[string]bool // capability → the value it had before the controller set it
	setParams map[string]json.RawMessage
	setLimits map[int]bool // vCPUs whose limit the controller set
	stopped   bool         // the controller stopped this guest
}

func snapshot(ctx context.Context, name string, ep *qmp.Client, limits bool) (*state, error) {
	s := &state{name: name, ep: ep, setCaps: map[string]bool{}, setParams: map[string]json.RawMessage{}, setLimits: map[int]bool{}}
	var caps []capability
	if err := ep.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return nil, fmt.Errorf("%s: query-migrate-capabilities: %w", name, err)
	}
	s.caps = map[string]bool{}
	for _, c := range caps {
		s.caps[c.Capability] = c.State
	}
	if err := ep.Execute(ctx, "query-migrate-parameters", nil, &s.params); err != nil {
		return nil, fmt.Errorf("%s: query-migrate-parameters: %w", name, err)
	}
	s.limits = map[int]uint64{}
	if limits {
		l, err := queryLimits(ctx, ep)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		s.limits = l
	}
	return s, nil
}

// setCapabilities sets those of want that are offered and differ, and remembers the old values.
func (s *state) setCapabilities(ctx context.Context, want map[string]bool) ([]capability, error) {
	var list []capability
	for name, on := range want {
		if cur, ok := s.caps[name]; ok && cur != on {
			list = append(list, capability{name, on})
		}
	}
	if len(list) == 0 {
		return nil, nil
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Capability < list[j].Capability })
	if err := s.ep.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
		return nil, fmt.Errorf("%s: migrate-set-capabilities: %w", s.name, err)
	}
	for _, c := range list {
		if _, done := s.setCaps[c.Capability]; !done {
			s.setCaps[c.Capability] = s.caps[c.Capability]
		}
	}
	return list, nil
}

// setParameters sets params and remembers the old values of those that exist.
func (s *state) setParameters(ctx context.Context, params map[string]any) error {
	if err := s.ep.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return fmt.Errorf("%s: migrate-set-parameters: %w", s.name, err)
	}
	for k := range params {
		if _, done := s.setParams[k]; !done {
			if old, ok := s.params[k]; ok {
				s.setParams[k] = old
			}
		}
	}
	return nil
}

func (s *state) setLimit(ctx context.Context, cpu int, rate uint64) error {
	if err := s.ep.Execute(ctx, "set-vcpu-dirty-limit", map[string]any{"cpu-index": cpu, "dirty-rate": rate}, nil); err != nil {
		return fmt.Errorf("%s: set-vcpu-dirty-limit vCPU %d: %w", s.name, cpu, err)
	}
	s.setLimits[cpu] = true
	return nil
}

// restore puts back everything the controller changed and says what it did. It tries every
// step and joins the errors.
func (s *state) restore(ctx context.Context) ([]string, error) {
	var done []string
	var errs []error
	cpus := make([]int, 0, len(s.setLimits))
	for cpu := range s.setLimits {
		cpus = append(cpus, cpu)
	}
	sort.Ints(cpus)
	for _, cpu := range cpus {
		if rate, ok := s.limits[cpu]; ok {
			if err := s.ep.Execute(ctx, "set-vcpu-dirty-limit", map[string]any{"cpu-index": cpu, "dirty-rate": rate}, nil); err != nil {
				errs = append(errs, fmt.Errorf("%s: giving vCPU %d its dirty limit back: %w", s.name, cpu, err))
				continue
			}
			done = append(done, fmt.Sprintf("vCPU %d: the user's dirty limit %d MB/s again", cpu, rate))
		} else {
			if err := s.ep.Execute(ctx, "cancel-vcpu-dirty-limit", map[string]any{"cpu-index": cpu}, nil); err != nil {
				errs = append(errs, fmt.Errorf("%s: cancel-vcpu-dirty-limit vCPU %d: %w", s.name, cpu, err))
				continue
			}
			done = append(done, fmt.Sprintf("vCPU %d: dirty limit cancelled", cpu))
		}
		delete(s.setLimits, cpu)
	}
	if len(s.setParams) > 0 {
		if err := s.ep.Execute(ctx, "migrate-set-parameters", s.setParams, nil); err != nil {
			errs = append(errs, fmt.Errorf("%s: restoring parameters: %w", s.name, err))
		} else {
			keys := make([]string, 0, len(s.setParams))
			for k := range s.setParams {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				done = append(done, fmt.Sprintf("%s %s again", k, s.setParams[k]))
			}
			s.setParams = map[string]json.RawMessage{}
		}
	}
	if len(s.setCaps) > 0 {
		var list []capability
		for name, on := range s.setCaps {
			list = append(list, capability{name, on})
		}
		sort.Slice(list, func(i, j int) bool { return list[i].Capability < list[j].Capability })
		if err := s.ep.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
			errs = append(errs, fmt.Errorf("%s: restoring capabilities: %w", s.name, err))
		} else {
			for _, c := range list {
				done = append(done, fmt.Sprintf("capability %s %v again", c.Capability, c.State))
			}
			s.setCaps = map[string]bool{}
		}
	}
	return done, errors.Join(errs...)
}
