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

// cpuProps are a vCPU's CpuInstanceProperties: one socket, one thread per core.
type cpuProps struct {
	CoreID   int `json:"core-id"`
	ThreadID int `json:"thread-id"`
	SocketID int `json:"socket-id"`
}

// cpuQOMPath is where vCPU i sits in the QOM tree. QEMU's x86 machine puts another device
// between the first two CPUs in /machine/unattached, so CPU i > 0 sits at device[i+1]; the
// paths are kept as QEMU's so that a client that knows them finds them.
func cpuQOMPath(i int) string {
	if i > 0 {
		i++
	}
	return fmt.Sprintf("/machine/unattached/device[%d]", i)
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
		// There is no memory hotplug: nothing is ever plugged.
		return map[string]uint64{"base-memory": uint64(len(m.Memory())), "plugged-memory": 0}, nil
	}))
	srv.Handle("query-target", handle(func() (any, error) {
		return map[string]string{"arch": "x86_64"}, nil
	}))
	srv.Handle("query-machines", handle(func() (any, error) {
		// One machine type, migvisor's: no ACPI, no NUMA, no CPU hotplug, and no memory
		// backend (so no default-ram-id).
		return []map[string]any{{
			"name": machineName, "is-default": true, "cpu-max": m.MaxCPUs(),
			"hotpluggable-cpus": false, "numa-mem-supported": false, "deprecated": false,
			"default-cpu-type": cpuTypeName, "acpi": false,
		}}, nil
	}))
	srv.Handle("query-current-machine", handle(func() (any, error) {
		return map[string]bool{"wakeup-suspend-support": false}, nil // no suspend without ACPI
	}))
	srv.Handle("query-hotpluggable-cpus", handle(func() (any, error) {
		type hotpluggable struct {
			Type       string   `json:"type"`
			VCPUsCount int      `json:"vcpus-count"`
			Props      cpuProps `json:"props"`
			QOMPath    string   `json:"qom-path"`
		}
		// Every slot is filled (maxcpus is cpus): each vCPU with its path, no empty slot.
		cpus := make([]hotpluggable, m.NumCPUs())
		for i := range cpus {
			cpus[i] = hotpluggable{Type: cpuTypeName, VCPUsCount: 1, Props: cpuProps{CoreID: i}, QOMPath: cpuQOMPath(i)}
		}
		return cpus, nil
	}))
	srv.Handle("query-cpus-fast", handle(func() (any, error) {
		type cpuInfo struct {
			ThreadID int      `json:"thread-id"`
			Props    cpuProps `json:"props"`
			QOMPath  string   `json:"qom-path"`
			CPUIndex int      `json:"cpu-index"`
			Target   string   `json:"target"`
		}
		cpus := make([]cpuInfo, m.NumCPUs())
		for i := range cpus {
			cpus[i] = cpuInfo{ThreadID: m.ThreadID(i), Props: cpuProps{CoreID: i}, CPUIndex: i, Target: "x86_64",
				QOMPath: cpuQOMPath(i)}
		}
		return cpus, nil
	}))
	srv.Handle("x-query-workload", handle(func() (any, error) {
		return m.WorkloadStats(), nil
	}))
}
