package main

import (
	"context"
	"encoding/json"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/qmp"
)

// registerDirtyLimit serves the per-vCPU dirty limit and the dirty-rate meter. Build them on the
// machine with
//
//	lim := dirtylimit.NewLimiter(m, dirtylimit.Options{Algorithm: alg})
//	meter := dirtylimit.NewMeter(m, dirtylimit.Options{NewDirtyLog: func() dirtylimit.DirtyLog { return m.NewDirtyLog() }})
//
// and close both before the machine.
func registerDirtyLimit(srv *qmp.Server, lim *dirtylimit.Limiter, meter *dirtylimit.Meter) {
	srv.Handle("set-vcpu-dirty-limit", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			CPUIndex  *int64 `json:"cpu-index"`
			DirtyRate uint64 `json:"dirty-rate"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, lim.Set(a.CPUIndex, a.DirtyRate)
	})
	srv.Handle("cancel-vcpu-dirty-limit", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			CPUIndex *int64 `json:"cpu-index"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, lim.Cancel(a.CPUIndex)
	})
	srv.Handle("query-vcpu-dirty-limit", handle(func() (any, error) { return lim.Query(), nil }))
	srv.Handle("calc-dirty-rate", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			CalcTime    int64               `json:"calc-time"`
			Unit        dirtylimit.TimeUnit `json:"calc-time-unit"`
			SamplePages *int64              `json:"sample-pages"`
			Mode        dirtylimit.Mode     `json:"mode"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return nil, meter.Calc(dirtylimit.CalcArgs{CalcTime: a.CalcTime, Unit: a.Unit, SamplePages: a.SamplePages, Mode: a.Mode})
	})
	srv.Handle("query-dirty-rate", func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			Unit dirtylimit.TimeUnit `json:"calc-time-unit"`
		}
		if err := decode(args, &a); err != nil {
			return nil, err
		}
		return meter.Query(a.Unit), nil
	})
}
