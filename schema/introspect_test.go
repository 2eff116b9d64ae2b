package schema

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

type schemaInfos map[string]map[string]any

// indexInfos parses a query-qmp-schema answer into its entries by name, checking that
// names are unique.
func indexInfos(t *testing.T, raw []byte) (schemaInfos, []map[string]any) {
	t.Helper()
	var list []map[string]any
	require.NoError(t, json.Unmarshal(raw, &list))
	idx := schemaInfos{}
	for _, e := range list {
		name, ok := e["name"].(string)
		require.True(t, ok, "entry without a name: %v", e)
		require.NotContains(t, idx, name, "name %s twice", name)
		idx[name] = e
	}
	return idx, list
}

// expand replaces the type name ref by its full definition, recursively, so that two
// answers that number their hidden types differently can be compared.
func (idx schemaInfos) expand(t *testing.T, ref string) any {
	t.Helper()
	e, ok := idx[ref]
	require.True(t, ok, "type %s does not resolve", ref)
	out := map[string]any{}
	for k, v := range e {
		switch k {
		case "name":
			if e["meta-type"] == "builtin" {
				out[k] = v
			}
		case "element-type":
			out[k] = idx.expand(t, v.(string))
		case "members", "variants":
			var ms []any
			for _, m := range v.([]any) {
				mm := map[string]any{}
				for mk, mv := range m.(map[string]any) {
					if mk == "type" {
						mv = idx.expand(t, mv.(string))
					}
					mm[mk] = mv
				}
				ms = append(ms, mm)
			}
			out[k] = ms
		default:
			out[k] = v
		}
	}
	return out
}

func loadQEMUSchema(t *testing.T) schemaInfos {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(conformanceDir, "query-qmp-schema.json"))
	require.NoError(t, err)
	idx, _ := indexInfos(t, raw)
	return idx
}

// TestIntrospectMatchesQEMU compares every command and event migvisor shares with QEMU 10:
// the entry itself (allow-oob, features) and its argument and return types after resolving
// the numbered names on both sides.
func TestIntrospectMatchesQEMU(t *testing.T) {
	qemu := loadQEMUSchema(t)
	ours, _ := indexInfos(t, Default().Introspect())
	names := append(Default().CommandNames(), Default().Events()...)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			mine := ours[name]
			require.NotNil(t, mine)
			theirs, ok := qemu[name]
			if !ok {
				require.Equal(t, "x-query-workload", name, "only migvisor's extension may be missing from QEMU")
				return
			}
			for _, k := range []string{"meta-type", "allow-oob", "features"} {
				require.Equal(t, theirs[k], mine[k], k)
			}
			for _, k := range []string{"arg-type", "ret-type"} {
				if theirs[k] == nil {
					require.Nil(t, mine[k], k)
					continue
				}
				require.Equal(t, qemu.expand(t, theirs[k].(string)), ours.expand(t, mine[k].(string)), k)
			}
		})
	}
}

// TestIntrospectShape checks the answer on its own: every reference resolves, every
// command and event is listed once, hidden names are numbered densely from "0", and
// allow-oob appears only where true.
func TestIntrospectShape(t *testing.T) {
	s := Default()
	idx, list := indexInfos(t, s.Introspect())
	metaTypes := []string{"builtin", "enum", "array", "object", "alternate", "command", "event"}
	var numbered int
	for _, e := range list {
		mt, _ := e["meta-type"].(string)
		require.Contains(t, metaTypes, mt)
		for _, k := range []string{"arg-type", "ret-type", "element-type"} {
			if ref, ok := e[k]; ok {
				idx.expand(t, ref.(string))
			}
		}
		if oob, ok := e["allow-oob"]; ok {
			require.Equal(t, true, oob)
		}
		if mt != "command" && mt != "event" && mt != "builtin" && mt != "array" {
			numbered++
		}
	}
	for i := range numbered {
		require.Contains(t, idx, strconv.Itoa(i))
	}
	for _, c := range s.CommandNames() {
		require.Equal(t, "command", idx[c]["meta-type"], c)
	}
	for _, ev := range s.Events() {
		require.Equal(t, "event", idx[ev]["meta-type"], ev)
	}
	require.Equal(t, []any{"unstable"}, idx["x-query-workload"]["features"])
	// Introspection is computed once and stable.
	require.Equal(t, string(s.Introspect()), string(s.Introspect()))
}

// TestIntrospectOrderLikeQEMU checks QEMU's layout: commands and events first in
// definition order, then types; integer types are all "int".
func TestIntrospectOrderLikeQEMU(t *testing.T) {
	s := Default()
	_, list := indexInfos(t, s.Introspect())
	var entities []string
	for i, e := range list {
		mt := e["meta-type"]
		if mt == "command" || mt == "event" {
			require.Len(t, entities, i, "%s after a type", e["name"])
			entities = append(entities, e["name"].(string))
		}
	}
	require.ElementsMatch(t, append(s.CommandNames(), s.Events()...), entities)
	var builtins []string
	for _, e := range list {
		if e["meta-type"] == "builtin" {
			builtins = append(builtins, e["name"].(string))
		}
	}
	for _, b := range builtins {
		require.Contains(t, []string{"int", "str", "bool", "number", "null", "any"}, b)
	}
	require.True(t, slices.Contains(builtins, "int"))
	require.False(t, slices.Contains(builtins, "uint64"))
}
