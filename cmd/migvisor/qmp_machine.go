package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/migvisor/migvisor/qmp"
	"github.com/migvisor/migvisor/vmm"
	"github.com/migvisor/migvisor/vmm/kvm"
)

// decode unmarshals a handler's arguments, already validated and normalised by the schema.
func decode(args json.RawMessage, v any) error {
	if err := json.Unmarshal(args, v); err != nil {
		// The schema validated these arguments: a mismatch is a bug between schema and handler.
		return fmt.Errorf("internal error: arguments do not fit their handler: %v", err)
	}
	return nil
}

// handle adapts a handler that takes no arguments (the schema has already refused any).
func handle(f func() (any, error)) qmp.Handler {
	return func(context.Context, json.RawMessage) (any, error) { return f() }
}

// registerMachine serves the run state, the machine's description and its workloads.
func registerMachine(srv *qmp.Server, m *vmm.Machine, d *daemon) {
	srv.Handle("query-status", handle(func() (any, error) {
		rs := m.RunState()
		return map[string]any{"status": rs, "running": rs == "running"}, nil
	}))
	srv.Handle("stop", handle(func() (any, error) {
		d.limiter.Wake() // a vCPU sleeping its penalty must not hold the stop up
		return nil, m.Stop()
	}))
	srv.Handle("cont", handle(func() (any, error) { return nil, m.Cont() }))
	srv.Handle("quit", handle(func() (any, error) {
		srv.Emit("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})
		d.shutdown()
		return nil, nil
	}))
	srv.Handle("query-name", handle(func() (any, error) {
		if d.cfg.name == "" {
			return struct{}{}, nil
		}
		return map[string]string{"name": d.cfg.name}, nil
	}))
	srv.Handle("query-uuid", handle(func() (any, error) {
		return map[string]string{"UUID": d.cfg.uuid}, nil
	}))
	srv.Handle("query-kvm", handle(func() (any, error) {
		return map[string]bool{"enabled": m.KVM(), "present": kvm.Available() == nil}, nil
	}))
	srv.Handle("query-memory-size-summary", handle(func() (any, error) {
		return map[string]uint64{"base-memory": uint64(len(m.Memory()))}, nil
	}))
	srv.Handle("query-cpus-fast", handle(func() (any, error) {
		type props struct {
			CoreID   int `json:"core-id"`
			ThreadID int `json:"thread-id"`
			SocketID int `json:"socket-id"`
		}
		type cpuInfo struct {
			ThreadID int    `json:"thread-id"`
			Props    props  `json:"props"`
			QOMPath  string `json:"qom-path"`
			CPUIndex int    `json:"cpu-index"`
			Target   string `json:"target"`
		}
		cpus := make([]cpuInfo, m.NumCPUs())
		for i := range cpus {
			// QEMU's x86 machine puts another device between the first two CPUs in
			// /machine/unattached, so CPU i > 0 sits at device[i+1].
			dev := i
			if i > 0 {
				dev = i + 1
			}
			cpus[i] = cpuInfo{ThreadID: m.ThreadID(i), Props: props{CoreID: i}, CPUIndex: i, Target: "x86_64",
				QOMPath: fmt.Sprintf("/machine/unattached/device[%d]", dev)}
		}
		return cpus, nil
	}))
	srv.Handle("x-query-workload", handle(func() (any, error) {
		return m.WorkloadStats(), nil
	}))
}
