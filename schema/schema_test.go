package schema

import (
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"
)

// served is every command migvisor serves; the schema must define exactly these.
var served = []string{
	"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
	"query-status", "stop", "cont", "quit", "query-name", "query-uuid", "query-kvm",
	"query-cpus-fast", "query-memory-size-summary", "x-query-workload",
	"set-vcpu-dirty-limit", "cancel-vcpu-dirty-limit", "query-vcpu-dirty-limit",
	"calc-dirty-rate", "query-dirty-rate",
	"migrate", "migrate-incoming", "migrate_cancel", "migrate-pause", "query-migrate",
	"migrate-set-capabilities", "query-migrate-capabilities",
	"migrate-set-parameters", "query-migrate-parameters",
	"query-target", "query-machines", "query-current-machine", "query-hotpluggable-cpus",
	"query-cpu-definitions", "query-cpu-model-expansion", "query-tpm-models", "query-tpm-types", "query-sev-capabilities",
	"query-sgx-capabilities", "query-command-line-options",
	"qom-list", "qom-list-types", "qom-list-properties", "device-list-properties",
	"getfd", "closefd", "add-fd", "remove-fd", "query-fdsets", "migrate-continue",
}

func TestEmbeddedDefinitionsLoad(t *testing.T) {
	// Load resolves every type reference, base, branch and discriminator, so an error here
	// names the broken definition; Default would panic on it.
	s, err := Load(definitions)
	require.NoError(t, err)
	require.ElementsMatch(t, served, s.CommandNames())
	require.Equal(t, []string{"SHUTDOWN", "STOP", "RESUME", "MIGRATION", "MIGRATION_PASS"}, s.Events())
	for _, typ := range s.types {
		require.True(t, typ.complete, typ.name)
	}
	files, err := definitions.ReadDir("qapi")
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(files), 4, "definitions split by area")
}

func TestCatalog(t *testing.T) {
	s := Default()
	require.Same(t, s, Default())
	for _, c := range served {
		require.True(t, s.Exists(c), c)
		require.Equal(t, c == "migrate-pause", s.AllowOOB(c), c)
	}
	for _, c := range []string{"", "SHUTDOWN", "query_version", "QUERY-STATUS", "qmp-capabilities", "x-exit-preconfig"} {
		require.False(t, s.Exists(c), c)
		require.False(t, s.AllowOOB(c), c)
	}
}

func TestLoadRejects(t *testing.T) {
	for _, tc := range []struct{ name, defs, err string }{
		{"not a list", `{}`, "t.json: not a JSON array"},
		{"bad JSON", `[`, "t.json: EOF"},
		{"unknown kind", `[{"thing": "x"}]`, "t.json: definition of unknown kind"},
		{"two kinds", `[{"struct": "x", "enum": "x"}]`, "t.json: definition is both enum and struct"},
		{"unknown type", `[{"command": "c", "data": {"a": "Nope"}}]`, "c.a: unknown type Nope"},
		{"type twice", `[{"enum": "E", "data": ["a"]}, {"enum": "E", "data": ["b"]}]`, "t.json: type E defined twice"},
		{"command twice", `[{"command": "c"}, {"command": "c"}]`, "command c defined twice"},
		{"unknown key", `[{"command": "c", "returns": "int", "allow-preconfig": true}]`, `command c: unknown key "allow-preconfig"`},
		{"enum value twice", `[{"enum": "E", "data": ["a", "a"]}]`, "enum E: value a twice"},
		{"member twice", `[{"struct": "B", "data": {"a": "int"}}, {"struct": "S", "base": "B", "data": {"*a": "str"}}]`, "S: member a twice"},
		{"base cycle", `[{"struct": "S", "base": "S", "data": {}}]`, "type S contains itself as a base"},
		{"discriminator not enum", `[{"union": "U", "base": {"t": "str"}, "discriminator": "t", "data": {}}]`,
			"union U: discriminator t is not a mandatory enum member of the base"},
		{"branch not a value", `[{"enum": "E", "data": ["a"]}, {"struct": "S", "data": {}},
			{"union": "U", "base": {"t": "E"}, "discriminator": "t", "data": {"b": "S"}}]`, "union U: branch b is not a value of E"},
		{"branch not an object", `[{"enum": "E", "data": ["a"]},
			{"union": "U", "base": {"t": "E"}, "discriminator": "t", "data": {"a": "int"}}]`, "union U: branch a is not an object type"},
		{"ambiguous alternate", `[{"enum": "E", "data": ["a"]}, {"alternate": "A", "data": {"s": "str", "e": "E"}}]`,
			"alternate A: two branches take JSON string"},
		{"alternate of any", `[{"alternate": "A", "data": {"v": "any"}}]`, "alternate A: branch v cannot be told apart by JSON type"},
		{"boxed inline", `[{"command": "c", "boxed": true, "data": {"a": "int"}}]`, "c: boxed needs a named data type"},
		{"data not an object type", `[{"command": "c", "data": "int"}]`, "c: data int is not an object type"},
		{"bad list", `[{"command": "c", "data": {"a": ["int", "str"]}}]`, "c.a: bad type reference"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(fstest.MapFS{"qapi/t.json": {Data: []byte(tc.defs)}})
			require.EqualError(t, err, tc.err)
		})
	}
}

func TestLoadAcrossFiles(t *testing.T) {
	// A type may be used in one file and defined in a later one; entities keep file order.
	s, err := Load(fstest.MapFS{
		"qapi/a.json": {Data: []byte(`[{"command": "c", "data": {"x": "X"}, "returns": ["X"]}, {"event": "E"}]`)},
		"qapi/b.json": {Data: []byte(`[{"struct": "X", "data": {"*y": "uint8"}}, {"command": "d", "features": ["unstable"]}]`)},
	})
	require.NoError(t, err)
	require.Equal(t, []string{"c", "d"}, s.CommandNames())
	require.Equal(t, []string{"E"}, s.Events())
	require.JSONEq(t, `[
		{"name": "c", "meta-type": "command", "arg-type": "0", "ret-type": "[1]"},
		{"name": "E", "meta-type": "event", "arg-type": "2"},
		{"name": "d", "meta-type": "command", "arg-type": "2", "ret-type": "2", "features": ["unstable"]},
		{"name": "0", "meta-type": "object", "members": [{"name": "x", "type": "1"}]},
		{"name": "[1]", "meta-type": "array", "element-type": "1"},
		{"name": "1", "meta-type": "object", "members": [{"name": "y", "type": "int", "default": null}]},
		{"name": "2", "meta-type": "object", "members": []},
		{"name": "int", "meta-type": "builtin", "json-type": "int"}
	]`, string(s.Introspect()))
}
