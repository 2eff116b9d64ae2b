package migration

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

func caps(list ...any) []CapabilityState {
	var out []CapabilityState
	for i := 0; i < len(list); i += 2 {
		out = append(out, CapabilityState{Capability: list[i].(string), State: list[i+1].(bool)})
	}
	return out
}

func onCaps(m *Migration) []string {
	var on []string
	for _, c := range m.QueryCapabilities() {
		if c.State {
			on = append(on, c.Capability)
		}
	}
	return on
}

func requireQErr(t *testing.T, err error, desc string) {
	t.Helper()
	require.Error(t, err)
	qe, ok := err.(*qerr.Error)
	require.True(t, ok, "%T is not a *qerr.Error", err)
	require.Equal(t, qerr.GenericError, qe.Class)
	require.Equal(t, desc, qe.Desc)
}

// The sequence of 07-migrate-params-ring / -noring.
func TestSetCapabilitiesTranscript07(t *testing.T) {
	const conflict = "dirty-limit conflicts with auto-converge either of then available currently"
	const needsRing = "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
	steps := []struct {
		name         string
		set          []CapabilityState
		ring, noring string // expected errors
		onRing       []string
		onNoring     []string
	}{
		{"dl+ac", caps("dirty-limit", true, "auto-converge", true), conflict, conflict, nil, nil},
		{"ac+dl", caps("auto-converge", true, "dirty-limit", true), conflict, conflict, nil, nil},
		{"dl", caps("dirty-limit", true), "", needsRing, []string{"dirty-limit"}, nil},
		{"ac-while-dl", caps("auto-converge", true), conflict, "", []string{"dirty-limit"}, []string{"auto-converge"}},
		{"dl-again", caps("dirty-limit", true), "", conflict, []string{"dirty-limit"}, []string{"auto-converge"}},
		{"dl-off+ac-on", caps("dirty-limit", false, "auto-converge", true), "", "", []string{"auto-converge"}, []string{"auto-converge"}},
		{"dl-while-ac", caps("dirty-limit", true), conflict, conflict, []string{"auto-converge"}, []string{"auto-converge"}},
		{"ac-off+dl-on", caps("auto-converge", false, "dirty-limit", true), "", needsRing, []string{"dirty-limit"}, []string{"auto-converge"}},
		{"dl-off", caps("dirty-limit", false), "", "", nil, []string{"auto-converge"}},
		{"dl-dup", caps("dirty-limit", true, "dirty-limit", false), "", "", nil, []string{"auto-converge"}},
		{"events-on", caps("events", true), "", "", []string{"events"}, []string{"auto-converge", "events"}},
		{"empty-list", caps(), "", "", []string{"events"}, []string{"auto-converge", "events"}},
	}
	for _, ring := range []bool{true, false} {
		m := New(Config{Machine: newFakeMachine(4, 1), DirtyRing: ring})
		for _, st := range steps {
			t.Run(map[bool]string{true: "ring/", false: "noring/"}[ring]+st.name, func(t *testing.T) {
				want, on := st.ring, st.onRing
				if !ring {
					want, on = st.noring, st.onNoring
				}
				err := m.SetCapabilities(st.set)
				if want == "" {
					require.NoError(t, err)
				} else {
					requireQErr(t, err, want)
				}
				require.Equal(t, on, onCaps(m))
			})
		}
	}
}

func TestQueryCapabilitiesListsEveryQEMUCapability(t *testing.T) {
	m := New(Config{Machine: newFakeMachine(4, 1)})
	got := m.QueryCapabilities()
	require.Len(t, got, 22)
	require.Equal(t, CapabilityState{Capability: "xbzrle"}, got[0])
	require.Equal(t, CapabilityState{Capability: "mapped-ram"}, got[21])
}

func TestSetCapabilitiesRules(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  []CapabilityState
		want string
	}{
		{"switchover-ack alone", caps("switchover-ack", true), "Capability 'switchover-ack' requires capability 'return-path'"},
		{"postcopy with multifd", caps("postcopy-ram", true, "multifd", true), "Postcopy is not yet compatible with multifd"},
		{"multifd with xbzrle", caps("multifd", true, "xbzrle", true), "Multifd is not compatible with xbzrle"},
		{"preempt alone", caps("postcopy-preempt", true), "Postcopy preempt requires postcopy-ram"},
		{"zero copy alone", caps("zero-copy-send", true), "Zero copy only available for non-compressed non-TLS multifd migration"},
		{"mapped-ram with xbzrle", caps("mapped-ram", true, "xbzrle", true), "Mapped-ram migration is incompatible with xbzrle"},
		{"background snapshot", caps("background-snapshot", true, "auto-converge", true), "Background-snapshot is not compatible with auto-converge"},
		{"unsupported", caps("xbzrle", true), "Capability 'xbzrle' is not supported by migvisor"},
		{"unsupported postcopy", caps("postcopy-ram", true), "Postcopy is not supported: migvisor migrates with precopy only"},
		{"unsupported colo", caps("x-colo", true), "QEMU compiled without replication module can't enable COLO"},
		{"pause-before-switchover", caps("pause-before-switchover", true), ""},
		{"no-ops", caps("zero-blocks", true, "late-block-activate", true, "events", true), ""},
		{"return-path", caps("return-path", true), ""},
		{"unsupported off", caps("multifd", false), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := New(Config{Machine: newFakeMachine(4, 1), DirtyRing: true})
			err := m.SetCapabilities(tc.set)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			requireQErr(t, err, tc.want)
			require.Empty(t, onCaps(m), "nothing applied on error")
		})
	}
}

// libvirt sends every capability it knows of that QEMU lists, with its state, at each
// migration (qemuMigrationParamsApplyCaps) and all of them false afterwards.
func TestSetCapabilitiesLibvirtLists(t *testing.T) {
	known := []string{"xbzrle", "auto-converge", "rdma-pin-all", "postcopy-ram", "pause-before-switchover",
		"late-block-activate", "multifd", "dirty-bitmaps", "return-path", "zero-copy-send"}
	list := func(on ...string) []CapabilityState {
		var l []CapabilityState
		for _, c := range known {
			l = append(l, CapabilityState{Capability: c, State: slices.Contains(on, c)})
		}
		return l
	}
	for _, tc := range []struct {
		name string
		on   []string
	}{
		{"source", []string{"pause-before-switchover", "return-path"}},
		{"destination", []string{"late-block-activate", "return-path"}},
		{"source auto-converge", []string{"auto-converge", "pause-before-switchover", "return-path"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := New(Config{Machine: newFakeMachine(4, 1), DirtyRing: true})
			require.NoError(t, m.SetCapabilities(caps("events", true)))
			require.NoError(t, m.SetCapabilities(list(tc.on...)))
			want := append([]string{"events"}, tc.on...)
			require.ElementsMatch(t, want, onCaps(m))
			require.NoError(t, m.SetCapabilities(list()))
			require.Equal(t, []string{"events"}, onCaps(m))
		})
	}
}

func setParams(t *testing.T, js string) *SetParameters {
	t.Helper()
	var s SetParameters
	require.NoError(t, json.Unmarshal([]byte(js), &s))
	return &s
}

func paramsJSON(t *testing.T, m *Migration) map[string]any {
	t.Helper()
	b, err := json.Marshal(m.QueryParameters())
	require.NoError(t, err)
	var out map[string]any
	require.NoError(t, json.Unmarshal(b, &out))
	return out
}

func TestQueryParametersDefaults(t *testing.T) {
	m := New(Config{Machine: newFakeMachine(4, 1)})
	want := `{"cpu-throttle-tailslow": false, "xbzrle-cache-size": 67108864, "cpu-throttle-initial": 20, "announce-max": 550, "direct-io": false, "avail-switchover-bandwidth": 0, "zero-page-detection": "multifd", "multifd-qatzip-level": 1, "multifd-channels": 2, "mode": "normal", "multifd-zstd-level": 1, "announce-initial": 50, "downtime-limit": 300, "tls-authz": "", "vcpu-dirty-limit": 1, "multifd-compression": "none", "announce-rounds": 5, "announce-step": 100, "tls-creds": "", "x-vcpu-dirty-limit-period": 1000, "multifd-zlib-level": 1, "max-cpu-throttle": 99, "max-postcopy-bandwidth": 0, "tls-hostname": "", "throttle-trigger-threshold": 50, "max-bandwidth": 134217728, "x-checkpoint-delay": 20000, "cpu-throttle-increment": 10}`
	var w map[string]any
	require.NoError(t, json.Unmarshal([]byte(want), &w))
	require.Equal(t, w, paramsJSON(t, m))
}

// The migrate-set-parameters sequence of transcript 07, values as the schema normalises
// them (-1 arrives as 18446744073709551615).
func TestSetParametersTranscript07(t *testing.T) {
	const period = "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"
	const limit = "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"
	const downtime = "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
	m := New(Config{Machine: newFakeMachine(4, 1)})
	for _, st := range []struct{ args, want string }{
		{`{"x-vcpu-dirty-limit-period": 0}`, period},
		{`{"x-vcpu-dirty-limit-period": 500}`, ""},
		{`{"x-vcpu-dirty-limit-period": 1001}`, period},
		{`{"x-vcpu-dirty-limit-period": 1}`, ""},
		{`{"x-vcpu-dirty-limit-period": 1000}`, ""},
		{`{"x-vcpu-dirty-limit-period": 18446744073709551615}`, period},
		{`{"x-vcpu-dirty-limit-period": 500}`, ""},
		{`{"vcpu-dirty-limit": 0}`, limit},
		{`{"vcpu-dirty-limit": 1}`, ""},
		{`{"vcpu-dirty-limit": 18446744073709551615}`, ""},
		{`{"vcpu-dirty-limit": 100}`, ""},
		{`{"downtime-limit": 0}`, ""},
		{`{"downtime-limit": 2000000}`, ""},
		{`{"downtime-limit": 2000001}`, downtime},
		{`{"downtime-limit": 18446744073709551615}`, downtime},
		{`{"max-bandwidth": 0}`, ""},
		{`{"max-bandwidth": 18446744073709551615}`, ""},
		{`{"max-bandwidth": 33554432, "downtime-limit": 500, "x-vcpu-dirty-limit-period": 0}`, period},
		{`{"downtime-limit": 500, "vcpu-dirty-limit": 0}`, limit},
		{`{}`, ""},
		{`{"throttle-trigger-threshold": 50, "cpu-throttle-initial": 20}`, ""},
	} {
		t.Run(st.args, func(t *testing.T) {
			before := m.QueryParameters()
			err := m.SetParameters(setParams(t, st.args))
			if st.want == "" {
				require.NoError(t, err)
				return
			}
			requireQErr(t, err, st.want)
			require.Equal(t, before, m.QueryParameters(), "nothing applied on error")
		})
	}
	got := paramsJSON(t, m)
	require.EqualValues(t, 2000000, got["downtime-limit"])
	require.EqualValues(t, 100, got["vcpu-dirty-limit"])
	require.EqualValues(t, 500, got["x-vcpu-dirty-limit-period"])
	require.EqualValues(t, uint64(18446744073709551615), m.QueryParameters().MaxBandwidth)
}

func TestSetParametersValidation(t *testing.T) {
	for _, tc := range []struct{ args, want string }{
		{`{"throttle-trigger-threshold": 0}`, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"},
		{`{"throttle-trigger-threshold": 100}`, ""},
		{`{"cpu-throttle-initial": 100}`, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"},
		{`{"cpu-throttle-increment": 0}`, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"},
		{`{"multifd-channels": 0}`, "Parameter 'multifd_channels' expects a value between 1 and 255"},
		{`{"multifd-zlib-level": 10}`, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"},
		{`{"multifd-qatzip-level": 0}`, "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"},
		{`{"multifd-zstd-level": 21}`, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"},
		{`{"xbzrle-cache-size": 4095}`, "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"},
		{`{"xbzrle-cache-size": 12288}`, "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"},
		{`{"max-cpu-throttle": 10}`, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"},
		{`{"max-cpu-throttle": 10, "cpu-throttle-initial": 5}`, ""},
		{`{"cpu-throttle-initial": 99, "max-cpu-throttle": 99}`, ""},
		{`{"announce-initial": 100001}`, "Parameter 'announce_initial' expects a value between 0 and 100000"},
		{`{"announce-max": 100001}`, "Parameter 'announce_max' expects a value between 0 and 100000"},
		{`{"announce-rounds": 1001}`, "Parameter 'announce_rounds' expects a value between 0 and 1000"},
		{`{"announce-step": 0}`, "Parameter 'announce_step' expects a value between 0 and 10000"},
		{`{"tls-creds": null, "tls-hostname": "h"}`, ""},
	} {
		t.Run(tc.args, func(t *testing.T) {
			m := New(Config{Machine: newFakeMachine(4, 1)})
			err := m.SetParameters(setParams(t, tc.args))
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			requireQErr(t, err, tc.want)
			require.Equal(t, DefaultParameters(), m.QueryParameters())
		})
	}
}

func TestBlockBitmapMappingEchoedOnlyWhenSet(t *testing.T) {
	m := New(Config{Machine: newFakeMachine(4, 1)})
	require.NotContains(t, paramsJSON(t, m), "block-bitmap-mapping")
	require.NoError(t, m.SetParameters(setParams(t, `{"block-bitmap-mapping": []}`)))
	require.Equal(t, []any{}, paramsJSON(t, m)["block-bitmap-mapping"])
}

func TestQueryMigrateBeforeAnyMigration(t *testing.T) {
	m := New(Config{Machine: newFakeMachine(4, 1)})
	b, err := json.Marshal(m.Query())
	require.NoError(t, err)
	require.JSONEq(t, `{}`, string(b))
	requireQErr(t, m.Pause(), "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
	require.NoError(t, m.Cancel())
}
