package schema

import (
	"encoding/json"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/qerr"
)

type validateCase struct {
	name string
	cmd  string
	args string // "" means no "arguments"
	want string // normalised output, when err is ""
	err  string // GenericError text
}

func runValidateCases(t *testing.T, s *Schema, cases []validateCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var args json.RawMessage
			if tc.args != "" {
				args = json.RawMessage(tc.args)
			}
			out, err := s.Validate(tc.cmd, args)
			if tc.err != "" {
				require.Equal(t, qerr.New(qerr.GenericError, tc.err), qerr.As(err))
				require.Nil(t, out)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, string(out))
		})
	}
}

func TestValidateNumbers(t *testing.T) {
	runValidateCases(t, Default(), []validateCase{
		{"uint64 negative wraps", "set-vcpu-dirty-limit", `{"dirty-rate": -1}`, `{"dirty-rate":18446744073709551615}`, ""},
		{"uint64 int64 min wraps", "set-vcpu-dirty-limit", `{"dirty-rate": -9223372036854775808}`, `{"dirty-rate":9223372036854775808}`, ""},
		{"uint64 max", "set-vcpu-dirty-limit", `{"dirty-rate": 18446744073709551615}`, `{"dirty-rate":18446744073709551615}`, ""},
		{"uint64 above int64", "set-vcpu-dirty-limit", `{"dirty-rate": 9223372036854775808}`, `{"dirty-rate":9223372036854775808}`, ""},
		{"uint64 minus zero", "set-vcpu-dirty-limit", `{"dirty-rate": -0}`, `{"dirty-rate":0}`, ""},
		{"uint64 below int64 min", "set-vcpu-dirty-limit", `{"dirty-rate": -9223372036854775809}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"uint64 2^64", "set-vcpu-dirty-limit", `{"dirty-rate": 18446744073709551616}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"uint64 integral float", "set-vcpu-dirty-limit", `{"dirty-rate": 1.0}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"uint64 exponent", "set-vcpu-dirty-limit", `{"dirty-rate": 1e3}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"uint64 list", "set-vcpu-dirty-limit", `{"dirty-rate": [1]}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"uint64 object", "set-vcpu-dirty-limit", `{"dirty-rate": {}}`, "", "Parameter 'dirty-rate' expects uint64"},
		{"int integral float", "set-vcpu-dirty-limit", `{"cpu-index": 1.0, "dirty-rate": 1}`, "", "Invalid parameter type for 'cpu-index', expected: integer"},
		{"int null", "set-vcpu-dirty-limit", `{"cpu-index": null, "dirty-rate": 1}`, "", "Invalid parameter type for 'cpu-index', expected: integer"},
		{"int min", "set-vcpu-dirty-limit", `{"cpu-index": -9223372036854775808, "dirty-rate": 1}`, `{"cpu-index":-9223372036854775808,"dirty-rate":1}`, ""},
		{"int64 above max", "calc-dirty-rate", `{"calc-time": 9223372036854775808}`, "", "Invalid parameter type for 'calc-time', expected: integer"},
		{"uint8 above max", "migrate-set-parameters", `{"cpu-throttle-initial": 300}`, "", "Parameter 'cpu-throttle-initial' expects uint8_t"},
		{"uint8 negative", "migrate-set-parameters", `{"multifd-channels": -1}`, "", "Parameter 'multifd-channels' expects uint8_t"},
		{"uint8 string", "migrate-set-parameters", `{"cpu-throttle-initial": "x"}`, "", "Parameter 'cpu-throttle-initial' expects uint64"},
		{"uint8 max", "migrate-set-parameters", `{"max-cpu-throttle": 255}`, `{"max-cpu-throttle":255}`, ""},
		{"uint32 above max", "migrate-set-parameters", `{"x-checkpoint-delay": 4294967296}`, "", "Parameter 'x-checkpoint-delay' expects uint32_t"},
		{"size negative wraps", "migrate-set-parameters", `{"max-bandwidth": -1}`, `{"max-bandwidth":18446744073709551615}`, ""},
		{"size float", "migrate-set-parameters", `{"xbzrle-cache-size": 1.5}`, "", "Parameter 'xbzrle-cache-size' expects uint64"},
	})
}

func TestValidateMembers(t *testing.T) {
	runValidateCases(t, Default(), []validateCase{
		{"no arguments", "query-status", "", `{}`, ""},
		{"empty arguments", "query-status", `{}`, `{}`, ""},
		{"argument to a command without any", "query-migrate", `{"x": 1}`, "", "Parameter 'x' is unexpected"},
		{"schema order, type before missing", "set-vcpu-dirty-limit", `{"cpu-index": "0"}`, "", "Invalid parameter type for 'cpu-index', expected: integer"},
		{"missing before unexpected", "set-vcpu-dirty-limit", `{"bogus": 1}`, "", "Parameter 'dirty-rate' is missing"},
		{"first unexpected in input order", "cancel-vcpu-dirty-limit", `{"b": 1, "a": 2}`, "", "Parameter 'b' is unexpected"},
		{"output in schema order", "set-vcpu-dirty-limit", `{"dirty-rate": 5, "cpu-index": 1}`, `{"cpu-index":1,"dirty-rate":5}`, ""},
		{"optional absent", "calc-dirty-rate", `{"calc-time": 1}`, `{"calc-time":1}`, ""},
		{"optional null refused", "calc-dirty-rate", `{"calc-time": 1, "mode": null}`, "", "Invalid parameter type for 'mode', expected: string"},
		{"enum", "calc-dirty-rate", `{"calc-time": 1, "calc-time-unit": "millisecond", "mode": "dirty-ring", "sample-pages": 512}`,
			`{"calc-time":1,"calc-time-unit":"millisecond","sample-pages":512,"mode":"dirty-ring"}`, ""},
		{"enum not a string", "query-dirty-rate", `{"calc-time-unit": 1}`, "", "Invalid parameter type for 'calc-time-unit', expected: string"},
		{"bool", "migrate", `{"uri": "unix:/x", "detach": "yes"}`, "", "Invalid parameter type for 'detach', expected: boolean"},
		{"string", "migrate", `{"uri": 1}`, "", "Invalid parameter type for 'uri', expected: string"},
		{"strings keep escapes", "migrate", `{"uri": "exec:echo \"\u00e9\""}`, `{"uri":"exec:echo \"é\""}`, ""},
	})
}

func TestValidateLists(t *testing.T) {
	runValidateCases(t, Default(), []validateCase{
		{"caps ok", "qmp_capabilities", `{"enable": ["oob"]}`, `{"enable":["oob"]}`, ""},
		{"caps empty", "qmp_capabilities", `{"enable": []}`, `{"enable":[]}`, ""},
		{"caps not a list", "qmp_capabilities", `{"enable": "oob"}`, "", "Invalid parameter type for 'enable', expected: array"},
		{"caps null", "qmp_capabilities", `{"enable": null}`, "", "Invalid parameter type for 'enable', expected: array"},
		{"caps element type uses the path", "qmp_capabilities", `{"enable": [1]}`, "", "Invalid parameter type for 'enable[0]', expected: string"},
		{"caps element value uses null", "qmp_capabilities", `{"enable": ["oob", "bad"]}`, "", "Parameter 'null' does not accept value 'bad'"},
		{"second element missing member", "migrate-set-capabilities", `{"capabilities": [{"capability": "events", "state": true}, {"capability": "xbzrle"}]}`, "", "Parameter 'capabilities[1].state' is missing"},
		{"element missing first member", "migrate-set-capabilities", `{"capabilities": [{"state": true}]}`, "", "Parameter 'capabilities[0].capability' is missing"},
		{"element unexpected member", "migrate-set-capabilities", `{"capabilities": [{"capability": "events", "state": true, "x": 1}]}`, "", "Parameter 'capabilities[0].x' is unexpected"},
		{"element member type", "migrate-set-capabilities", `{"capabilities": [{"capability": "events", "state": "on"}]}`, "", "Invalid parameter type for 'capabilities[0].state', expected: boolean"},
		{"element enum type", "migrate-set-capabilities", `{"capabilities": [{"capability": 1, "state": true}]}`, "", "Invalid parameter type for 'capabilities[0].capability', expected: string"},
		{"element not an object", "migrate-set-capabilities", `{"capabilities": [1]}`, "", "Invalid parameter type for 'capabilities[0]', expected: object"},
		{"deep path", "migrate-set-parameters", `{"block-bitmap-mapping": [{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y", "transform": {"persistent": 1}}]}]}`,
			"", "Invalid parameter type for 'block-bitmap-mapping[0].bitmaps[0].transform.persistent', expected: boolean"},
		{"deep missing", "migrate-set-parameters", `{"block-bitmap-mapping": [{"node-name": "a", "alias": "b"}]}`, "", "Parameter 'block-bitmap-mapping[0].bitmaps' is missing"},
		{"deep unexpected", "migrate-set-parameters", `{"block-bitmap-mapping": [{"node-name": "a", "alias": "b", "bitmaps": [{"name": "x", "alias": "y", "z": 0}]}]}`,
			"", "Parameter 'block-bitmap-mapping[0].bitmaps[0].z' is unexpected"},
	})
}

func TestValidateUnionsAndAlternates(t *testing.T) {
	const unix = `{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/x"}}`
	runValidateCases(t, Default(), []validateCase{
		{"socket channel", "migrate", `{"channels": [` + unix + `]}`,
			`{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"unix","path":"/x"}}]}`, ""},
		{"incoming channel", "migrate-incoming", `{"channels": [` + unix + `], "exit-on-error": false}`,
			`{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"unix","path":"/x"}}],"exit-on-error":false}`, ""},
		{"inet channel", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "1", "to": 2}}]}`,
			`{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"h","port":"1","to":2}}]}`, ""},
		{"file offset wraps", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": "f", "offset": -1}}]}`,
			`{"channels":[{"channel-type":"main","addr":{"transport":"file","filename":"f","offset":18446744073709551615}}]}`, ""},
		{"addr missing", "migrate", `{"channels": [{"channel-type": "main"}]}`, "", "Parameter 'channels[0].addr' is missing"},
		{"discriminator missing", "migrate", `{"channels": [{"channel-type": "main", "addr": {}}]}`, "", "Parameter 'channels[0].addr.transport' is missing"},
		{"discriminator value", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "pipe"}}]}`, "", "Parameter 'transport' does not accept value 'pipe'"},
		{"nested union discriminator", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "path": "/x"}}]}`, "", "Parameter 'channels[0].addr.type' is missing"},
		{"branch member missing", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix"}}]}`, "", "Parameter 'channels[0].addr.path' is missing"},
		{"branch sized int", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "1", "to": 70000}}]}`, "", "Parameter 'to' expects uint16_t"},
		{"other branch's member", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/x", "host": "h"}}]}`, "", "Parameter 'channels[0].addr.host' is unexpected"},
		{"exec args element", "migrate", `{"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": ["a", 1]}}]}`, "", "Invalid parameter type for 'channels[0].addr.args[1]', expected: string"},
		{"channel type", "migrate", `{"channels": [{"channel-type": "x", "addr": {"transport": "exec", "args": []}}]}`, "", "Parameter 'channel-type' does not accept value 'x'"},
		{"StrOrNull null", "migrate-set-parameters", `{"tls-creds": null}`, `{"tls-creds":null}`, ""},
		{"StrOrNull string", "migrate-set-parameters", `{"tls-hostname": "", "tls-authz": "a"}`, `{"tls-hostname":"","tls-authz":"a"}`, ""},
		{"StrOrNull number", "migrate-set-parameters", `{"tls-creds": 1}`, "", "Invalid parameter type for 'tls-creds', expected: StrOrNull"},
		{"StrOrNull object", "migrate-set-parameters", `{"tls-authz": {}}`, "", "Invalid parameter type for 'tls-authz', expected: StrOrNull"},
		{"enum value of this build only", "migrate-set-parameters", `{"multifd-compression": "qpl"}`, "", "Parameter 'multifd-compression' does not accept value 'qpl'"},
	})
}

// TestValidateBuiltins covers the builtin types the embedded schema takes no arguments of,
// with a schema of its own.
func TestValidateBuiltins(t *testing.T) {
	s, err := Load(fstest.MapFS{"qapi/t.json": {Data: []byte(`[
		{"struct": "Obj", "data": {"a": "int"}},
		{"alternate": "Alt", "data": {"o": "Obj", "n": "int", "b": "bool"}},
		{"command": "t", "data": {"*i8": "int8", "*i16": "int16", "*i32": "int32", "*u16": "uint16",
			"*u8s": ["uint8"], "*any": "any", "*num": "number", "*alt": "Alt", "*alts": ["Alt"],
			"*nul": "null", "*sz": "size"}}
	]`)}})
	require.NoError(t, err)
	runValidateCases(t, s, []validateCase{
		{"int8 max", "t", `{"i8": 127}`, `{"i8":127}`, ""},
		{"int8 min", "t", `{"i8": -128}`, `{"i8":-128}`, ""},
		{"int8 above", "t", `{"i8": 128}`, "", "Parameter 'i8' expects int8_t"},
		{"int8 below", "t", `{"i8": -129}`, "", "Parameter 'i8' expects int8_t"},
		{"int8 string", "t", `{"i8": "1"}`, "", "Invalid parameter type for 'i8', expected: integer"},
		{"int16", "t", `{"i16": 40000}`, "", "Parameter 'i16' expects int16_t"},
		{"int32", "t", `{"i32": 2147483648}`, "", "Parameter 'i32' expects int32_t"},
		{"uint16", "t", `{"u16": 65536}`, "", "Parameter 'u16' expects uint16_t"},
		{"sized element uses null", "t", `{"u8s": [1, 256]}`, "", "Parameter 'null' expects uint8_t"},
		{"sized element type uses the path", "t", `{"u8s": [1, "x"]}`, "", "Parameter 'u8s[1]' expects uint64"},
		{"any", "t", `{"any": {"x": [1, null, 1e400]}}`, `{"any":{"x":[1,null,1e400]}}`, ""},
		{"number", "t", `{"num": 1.5}`, `{"num":1.5}`, ""},
		{"number integer", "t", `{"num": 18446744073709551616}`, `{"num":18446744073709551616}`, ""},
		{"number string", "t", `{"num": "1"}`, "", "Invalid parameter type for 'num', expected: number"},
		{"null", "t", `{"nul": null}`, `{"nul":null}`, ""},
		{"null refused", "t", `{"nul": 0}`, "", "Invalid parameter type for 'nul', expected: null"},
		{"alternate object branch", "t", `{"alt": {"a": 1}}`, `{"alt":{"a":1}}`, ""},
		{"alternate object path", "t", `{"alt": {"a": "x"}}`, "", "Invalid parameter type for 'alt.a', expected: integer"},
		{"alternate object unexpected", "t", `{"alt": {"a": 1, "b": 2}}`, "", "Parameter 'alt.b' is unexpected"},
		{"alternate int branch", "t", `{"alt": -3}`, `{"alt":-3}`, ""},
		{"alternate int branch refuses float", "t", `{"alt": 1.5}`, "", "Invalid parameter type for 'alt', expected: integer"},
		{"alternate no branch", "t", `{"alt": "s"}`, "", "Invalid parameter type for 'alt', expected: Alt"},
		{"alternate element no branch", "t", `{"alts": [true, "s"]}`, "", "Invalid parameter type for 'null', expected: Alt"},
		{"size", "t", `{"sz": 4096}`, `{"sz":4096}`, ""},
	})
}

func TestValidateRefusals(t *testing.T) {
	s := Default()
	_, err := s.Validate("no-such-command", nil)
	require.Equal(t, qerr.New(qerr.CommandNotFound, "The command no-such-command has not been found"), qerr.As(err))
	_, err = s.Validate("query-status", json.RawMessage(`[1]`))
	require.Equal(t, qerr.New(qerr.GenericError, "QMP input member 'arguments' must be an object"), qerr.As(err))
	_, err = s.Validate("query-status", json.RawMessage(`{`))
	require.Error(t, err)
}

// TestValidateOutputUnmarshals shows the intended use: the normalised object decodes into a
// handler's struct, with wrapped uint64s.
func TestValidateOutputUnmarshals(t *testing.T) {
	out, err := Default().Validate("set-vcpu-dirty-limit", json.RawMessage(`{"cpu-index": 1, "dirty-rate": -2}`))
	require.NoError(t, err)
	var args struct {
		CPUIndex  *int64 `json:"cpu-index"`
		DirtyRate uint64 `json:"dirty-rate"`
	}
	require.NoError(t, json.Unmarshal(out, &args))
	require.Equal(t, int64(1), *args.CPUIndex)
	require.Equal(t, ^uint64(1), args.DirtyRate)
}
