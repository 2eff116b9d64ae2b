package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/qmp"
	"github.com/migvisor/migvisor/vmm"
)

// What migvisor's machine is in QEMU's QOM terms: one machine type and one CPU model, named
// after migvisor because they are neither of QEMU's (no firmware, no ACPI, no devices, the
// vCPUs run with KVM's default CPUID).
const (
	machineName = vmm.MachineName
	cpuModel    = "migvisor"
	cpuTypeName = cpuModel + "-x86_64-cpu"
)

// qomType is one QOM type that exists here.
type qomType struct {
	name, parent string
	abstract     bool
	device       bool
}

// qomTypes is the little QOM hierarchy behind the machine: the machine, its CPUs, and the
// containers of the object tree.
var qomTypes = []qomType{
	{name: "object", abstract: true},
	{name: "container", parent: "object"},
	{name: "machine", parent: "object", abstract: true},
	{name: machineName + "-machine", parent: "machine"},
	{name: "device", parent: "object", abstract: true, device: true},
	{name: "cpu", parent: "device", abstract: true, device: true},
	{name: "x86_64-cpu", parent: "cpu", abstract: true, device: true},
	{name: cpuTypeName, parent: "x86_64-cpu", device: true},
}

func findType(name string) (qomType, bool) {
	i := slices.IndexFunc(qomTypes, func(t qomType) bool { return t.name == name })
	if i < 0 {
		return qomType{}, false
	}
	return qomTypes[i], true
}

// implements reports whether t is ancestor or one of its ancestors.
func (t qomType) implements(ancestor string) bool {
	for {
		if t.name == ancestor {
			return true
		}
		p, ok := findType(t.parent)
		if !ok {
			return false
		}
		t = p
	}
}

// QEMU's texts (qom/qom-qmp-cmds.c, target/i386/sev.c, system/vl.c) and migvisor's own for SGX.
func errNoDevice(name string) *qerr.Error {
	return qerr.New(qerr.DeviceNotFound, fmt.Sprintf("Device '%s' not found", name))
}

func errNoClass(name string) *qerr.Error {
	return qerr.New(qerr.DeviceNotFound, fmt.Sprintf("Class '%s' not found", name))
}

func errNoCPUModel(name string) *qerr.Error {
	return qerr.Generic("CPU model '%s' not found", name)
}

func errNoProperty(typename, prop string) *qerr.Error {
	return qerr.Generic("Property '%s.%s' not found", typename, prop)
}

func errBadOption(name string) *qerr.Error {
	return qerr.Generic("invalid option name: %s", name)
}

var (
	errNoSEV         = qerr.Generic("SEV is not enabled in KVM")
	errNotDeviceType = qerr.Generic("Parameter 'typename' expects a non-abstract device type")
	errNoSGX         = qerr.Generic("SGX is not supported by migvisor")
)

type objectProperty struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// qomChildren is the object tree: every path and its children with their types.
func qomChildren(m *vmm.Machine) map[string][]objectProperty {
	// The peripheral containers hold the devices a user added (libvirt lists them for its
	// aliases): there are none, as in a QEMU started with -nodefaults and no -device.
	tree := map[string][]objectProperty{
		"/": {{"machine", "child<" + machineName + "-machine>"}},
		"/machine": {{"unattached", "child<container>"}, {"peripheral", "child<container>"},
			{"peripheral-anon", "child<container>"}},
		"/machine/unattached":      nil,
		"/machine/peripheral":      nil,
		"/machine/peripheral-anon": nil,
	}
	for i := range m.NumCPUs() {
		p := cpuQOMPath(i)
		dir, base := path.Split(p)
		dir = strings.TrimSuffix(dir, "/")
		tree[dir] = append(tree[dir], objectProperty{base, "child<" + cpuTypeName + ">"})
		tree[p] = nil
	}
	return tree
}

// registerProbe serves what libvirt's capability probe and domain start ask besides the
// machine's state: the QOM tree and types, the CPU model, and the features migvisor lacks
// (TPM, SEV, SGX), answered as QEMU answers where they are absent.
func registerProbe(srv *qmp.Server, m *vmm.Machine) {
	tree := qomChildren(m)
	srv.Handle("qom-list", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Path string `json:"path"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		children, ok := tree[a.Path]
		if !ok {
			return nil, errNoDevice(a.Path)
		}
		// Every object has its type; the rest are its children.
		return append([]objectProperty{{"type", "string"}}, children...), nil
	})
	srv.Handle("qom-list-types", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Implements *string `json:"implements"`
			Abstract   bool    `json:"abstract"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		type typeInfo struct {
			Name     string `json:"name"`
			Abstract bool   `json:"abstract,omitempty"`
			Parent   string `json:"parent,omitempty"`
		}
		out := []typeInfo{}
		for _, t := range qomTypes {
			if (t.abstract && !a.Abstract) || (a.Implements != nil && !t.implements(*a.Implements)) {
				continue
			}
			out = append(out, typeInfo{Name: t.name, Abstract: t.abstract, Parent: t.parent})
		}
		return out, nil
	})
	srv.Handle("qom-list-properties", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Typename string `json:"typename"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		if _, ok := findType(a.Typename); !ok {
			return nil, errNoClass(a.Typename)
		}
		return []objectProperty{{"type", "string"}}, nil
	})
	srv.Handle("device-list-properties", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Typename string `json:"typename"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		t, ok := findType(a.Typename)
		if !ok {
			return nil, errNoDevice(a.Typename)
		}
		if !t.device || t.abstract {
			return nil, errNotDeviceType
		}
		// The CPU has no configurable property (QEMU leaves out type, realized and the like).
		return []objectProperty{}, nil
	})
	srv.Handle("query-cpu-definitions", handle(func() (any, error) {
		return []map[string]any{{
			"name": cpuModel, "typename": cpuTypeName, "static": false,
			"migration-safe": true, "deprecated": false, "unavailable-features": []string{},
		}}, nil
	}))
	srv.Handle("query-cpu-model-expansion", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Model struct {
				Name  string         `json:"name"`
				Props map[string]any `json:"props"`
			} `json:"model"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		if a.Model.Name != cpuModel {
			return nil, errNoCPUModel(a.Model.Name)
		}
		// The model has no properties to set (migvisor gives its vCPUs no CPUID of its own),
		// so static and full expansion are the same: the model, with none.
		for p := range a.Model.Props {
			return nil, errNoProperty(cpuTypeName, p)
		}
		return map[string]any{"model": map[string]any{"name": cpuModel, "props": map[string]any{}}}, nil
	})
	srv.Handle("query-tpm-models", handle(func() (any, error) { return []string{}, nil }))
	srv.Handle("query-tpm-types", handle(func() (any, error) { return []string{}, nil }))
	srv.Handle("query-sev-capabilities", handle(func() (any, error) { return nil, errNoSEV }))
	srv.Handle("query-sgx-capabilities", handle(func() (any, error) { return nil, errNoSGX }))
	srv.Handle("query-command-line-options", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Option *string `json:"option"`
		}
		if err := decode(raw, &a); err != nil {
			return nil, err
		}
		type param struct {
			Name string `json:"name"`
			Type string `json:"type"`
		}
		type option struct {
			Option     string  `json:"option"`
			Parameters []param `json:"parameters"`
		}
		// The option groups migvisor takes as QEMU does (-accel's are QOM properties, which
		// QEMU does not list here either).
		all := []option{
			{"accel", []param{}},
			{"smp", []param{{"cpus", "number"}, {"maxcpus", "number"}}},
		}
		if a.Option == nil {
			return all, nil
		}
		for _, o := range all {
			if o.Option == *a.Option {
				return []option{o}, nil
			}
		}
		return nil, errBadOption(*a.Option)
	})
}
