package main

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// qemuSchema is QEMU 10's query-qmp-schema, by entity name.
type qemuSchema map[string]map[string]any

func loadQEMUSchema(t *testing.T) qemuSchema {
	t.Helper()
	raw, err := os.ReadFile(conformancePath("query-qmp-schema.json"))
	require.NoError(t, err)
	var list []map[string]any
	require.NoError(t, json.Unmarshal(raw, &list))
	s := qemuSchema{}
	for _, e := range list {
		s[e["name"].(string)] = e
	}
	return s
}

// check reports how v departs from QEMU's type ref: a missing or unknown member, a value of
// the wrong JSON type, an enum value QEMU does not have.
func (s qemuSchema) check(ref string, v any, path string) error {
	e := s[ref]
	switch e["meta-type"] {
	case "builtin":
		ok := map[string]bool{
			"int":    isNumber(v),
			"number": isNumber(v),
			"str":    isString(v),
			"bool":   isBool(v),
			"null":   v == nil,
			"any":    true,
		}[e["name"].(string)]
		if !ok {
			return fmt.Errorf("%s: %v is not a %s", path, v, e["name"])
		}
	case "enum":
		if !slices.Contains(e["values"].([]any), v) {
			return fmt.Errorf("%s: %v is not one of %v", path, v, e["values"])
		}
	case "array":
		l, ok := v.([]any)
		if !ok {
			return fmt.Errorf("%s: not a list", path)
		}
		for i, x := range l {
			if err := s.check(e["element-type"].(string), x, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case "object":
		o, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: not an object", path)
		}
		members := e["members"].([]any)
		if tag, ok := e["tag"].(string); ok { // a union: the branch's members too
			for _, vv := range e["variants"].([]any) {
				if vr := vv.(map[string]any); vr["case"] == o[tag] {
					members = append(slices.Clone(members), s[vr["type"].(string)]["members"].([]any)...)
				}
			}
		}
		known := map[string]bool{}
		for _, mm := range members {
			m := mm.(map[string]any)
			name := m["name"].(string)
			known[name] = true
			x, present := o[name]
			if !present {
				if _, optional := m["default"]; !optional {
					return fmt.Errorf("%s: member %s missing", path, name)
				}
				continue
			}
			if err := s.check(m["type"].(string), x, path+"."+name); err != nil {
				return err
			}
		}
		for k := range o {
			if !known[k] {
				return fmt.Errorf("%s: member %s is not QEMU's", path, k)
			}
		}
	default:
		return fmt.Errorf("%s: meta-type %v not checked here", path, e["meta-type"])
	}
	return nil
}

func isNumber(v any) bool { _, ok := v.(float64); return ok }
func isString(v any) bool { _, ok := v.(string); return ok }
func isBool(v any) bool   { _, ok := v.(bool); return ok }

// TestLibvirtProbe replays the commands of libvirt's capability probe of QEMU 10.0 in its
// order (tests/qemucapabilitiesdata/caps_10.0.0_x86_64.replies, from qemu_capabilities.c's
// virQEMUCapsInitQMPMonitor), then those of its domain start, and checks every answer
// against QEMU 10's own schema: a return in QEMU's shape, or QEMU's error where the feature,
// device or CPU model is absent.
func TestLibvirtProbe(t *testing.T) {
	qemu := loadQEMUSchema(t)
	p := startInProcess(t, ringMachine...)
	type step struct {
		cmd, args string
		errClass  string // "": a return is expected
		errDesc   string // QEMU 10's text, where the test checks it
	}
	steps := []step{
		{cmd: "qmp_capabilities"},
		{cmd: "query-version"},
		{cmd: "query-target"},
		{cmd: "query-qmp-schema"},
		{cmd: "query-kvm"},
		{cmd: "qom-list-types"},
		{cmd: "qom-list-types", args: `{"implements": "machine", "abstract": true}`},
		{cmd: "device-list-properties", args: `{"typename": "virtio-blk-pci"}`, errClass: "DeviceNotFound", errDesc: "Device 'virtio-blk-pci' not found"},
		{cmd: "device-list-properties", args: `{"typename": "migvisor-x86_64-cpu"}`},
		{cmd: "device-list-properties", args: `{"typename": "migvisor-machine"}`, errClass: "GenericError", errDesc: "Parameter 'typename' expects a non-abstract device type"},
		{cmd: "qom-list-properties", args: `{"typename": "memory-backend-file"}`, errClass: "DeviceNotFound", errDesc: "Class 'memory-backend-file' not found"},
		{cmd: "query-machines"},
		{cmd: "qom-list-properties", args: `{"typename": "migvisor-machine"}`},
		{cmd: "query-tpm-models"},
		{cmd: "query-tpm-types"},
		{cmd: "query-command-line-options"},
		{cmd: "query-migrate-capabilities"},
		{cmd: "query-sev-capabilities", errClass: "GenericError", errDesc: "SEV is not enabled in KVM"},
		{cmd: "query-sgx-capabilities", errClass: "GenericError"},
		{cmd: "query-cpu-definitions"},
		// libvirt takes a GenericError here as "no such model" and goes on.
		{cmd: "query-cpu-model-expansion", args: `{"type": "full", "model": {"name": "host"}}`, errClass: "GenericError", errDesc: "CPU model 'host' not found"},
		{cmd: "query-cpu-model-expansion", args: `{"type": "static", "model": {"name": "migvisor"}}`},
		{cmd: "query-cpu-model-expansion", args: `{"type": "full", "model": {"name": "migvisor", "props": {"vmx": true}}}`, errClass: "GenericError", errDesc: "Property 'migvisor-x86_64-cpu.vmx' not found"},
		// domain start
		{cmd: "query-current-machine"},
		{cmd: "query-hotpluggable-cpus"},
		{cmd: "query-cpus-fast"},
		{cmd: "qom-list", args: `{"path": "/"}`},
		{cmd: "qom-list", args: `{"path": "/machine"}`},
		{cmd: "qom-list", args: `{"path": "/machine/peripheral"}`},
		{cmd: "qom-list", args: `{"path": "/machine/nope"}`, errClass: "DeviceNotFound", errDesc: "Device '/machine/nope' not found"},
		{cmd: "query-memory-size-summary"},
	}
	reqs := make([]string, len(steps))
	for i, st := range steps {
		args := ""
		if st.args != "" {
			args = `, "arguments": ` + st.args
		}
		reqs[i] = fmt.Sprintf(`{"execute": %q%s, "id": "libvirt-%d"}`, st.cmd, args, i+1)
	}
	replies := exchange(t, p.dial(t), reqs...)
	results := map[string]any{}
	for i, st := range steps {
		t.Run(fmt.Sprintf("%02d-%s", i+1, st.cmd), func(t *testing.T) {
			r := replies[i]
			if st.errClass != "" {
				require.NotNil(t, r.Error, "a return where QEMU's error was expected")
				require.Equal(t, st.errClass, r.Error.Class, r.Error.Desc)
				if st.errDesc != "" {
					require.Equal(t, st.errDesc, r.Error.Desc)
				}
				return
			}
			require.Nil(t, r.Error, "%+v", r.Error)
			var v any
			require.NoError(t, json.Unmarshal(r.Return, &v))
			results[st.cmd+st.args] = v
			e, ok := qemu[st.cmd]
			require.True(t, ok, "QEMU 10 has no %s", st.cmd)
			require.NoError(t, qemu.check(e["ret-type"].(string), v, "return"))
		})
	}

	// What the answers say must agree with the machine and with each other.
	machines := results["query-machines"].([]any)
	require.Len(t, machines, 1)
	mach := machines[0].(map[string]any)
	require.Equal(t, true, mach["is-default"])
	require.Equal(t, float64(p.d.machine.MaxCPUs()), mach["cpu-max"])
	cpus := results["query-cpu-definitions"].([]any)
	require.Equal(t, mach["default-cpu-type"], cpus[0].(map[string]any)["typename"])
	require.Equal(t, map[string]any{"arch": "x86_64"}, results["query-target"])
	require.Equal(t, map[string]any{"base-memory": float64(256 << 20), "plugged-memory": float64(0)},
		results["query-memory-size-summary"])

	// The CPUs are where query-cpus-fast and query-hotpluggable-cpus say, and qom-list finds
	// them there.
	hot := results["query-hotpluggable-cpus"].([]any)
	fast := results["query-cpus-fast"].([]any)
	require.Len(t, hot, 2)
	require.Len(t, fast, 2)
	var paths []string
	for i := range hot {
		h, f := hot[i].(map[string]any), fast[i].(map[string]any)
		require.Equal(t, f["qom-path"], h["qom-path"])
		require.Equal(t, f["props"], h["props"])
		require.Equal(t, mach["default-cpu-type"], h["type"])
		paths = append(paths, h["qom-path"].(string))
	}
	require.Equal(t, []any{map[string]any{"name": "type", "type": "string"}},
		results[`qom-list{"path": "/machine/peripheral"}`], "no devices")
	root := results[`qom-list{"path": "/"}`].([]any)
	require.Contains(t, root, map[string]any{"name": "machine", "type": "child<migvisor-machine>"})
	require.Contains(t, results[`qom-list{"path": "/machine"}`].([]any),
		map[string]any{"name": "unattached", "type": "child<container>"})
	c := p.dial(t)
	var reqList []string
	reqList = append(reqList, `{"execute": "qmp_capabilities"}`,
		`{"execute": "qom-list", "arguments": {"path": "/machine/unattached"}}`)
	for _, path := range paths {
		reqList = append(reqList, fmt.Sprintf(`{"execute": "qom-list", "arguments": {"path": %q}}`, path))
	}
	more := exchange(t, c, reqList...)
	var unattached []map[string]any
	require.NoError(t, json.Unmarshal(more[1].Return, &unattached))
	require.Contains(t, unattached, map[string]any{"name": "device[0]", "type": "child<migvisor-x86_64-cpu>"})
	require.Contains(t, unattached, map[string]any{"name": "device[2]", "type": "child<migvisor-x86_64-cpu>"})
	for i := range paths {
		require.Nil(t, more[2+i].Error, paths[i])
	}
}
