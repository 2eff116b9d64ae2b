package schema

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"

	"github.com/migvisor/migvisor/qerr"
)

// Validate checks the arguments of command cmd as QEMU's QAPI input visitor does and
// returns them normalised: a JSON object holding the members the schema knows, in schema
// order, with every uint64/size value as its unsigned decimal (negative input wraps to two's
// complement, as QEMU accepts it). args is nil when the request had no "arguments".
//
// Members are visited in schema order, base members first, then a union's branch; a
// mandatory member that is absent is reported before any unexpected member, and an object's
// unexpected members are reported after all of its known members were visited. Paths are
// QEMU's: "a.b", "a[0].b". Errors about a sized integer, an enum value or an alternate use
// only the member's own name, or "null" for a list element, as QEMU does. An alternate
// member such as StrOrNull keeps its JSON form (a string or null), so a handler that must
// tell null from absent decodes it into a json.RawMessage. Validate is safe for concurrent
// use.
func (s *Schema) Validate(cmd string, args json.RawMessage) (json.RawMessage, error) {
	e, ok := s.commands[cmd]
	if !ok {
		return nil, errNotFound(cmd)
	}
	in := &value{kind: jObject}
	if len(bytes.TrimSpace(args)) > 0 {
		v, err := decodeValue(args)
		if err != nil {
			return nil, qerr.Generic("%s", err.Error())
		}
		if v.kind != jObject {
			return nil, qerr.Generic(msgArgsNotObject)
		}
		in = v
	}
	out, err := visitObject(e.args, in, "")
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	out.encode(&b)
	return b.Bytes(), nil
}

// join is the path of member name inside the object at path (QEMU's full_name).
func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

// visit checks v against t. path is v's full path, leaf its member name ("null" for a list
// element).
func visit(t *typ, v *value, path, leaf string) (*value, error) {
	switch t.meta {
	case metaBuiltin:
		return visitBuiltin(t, v, path, leaf)
	case metaEnum:
		if v.kind != jString {
			return nil, errInvalidType(path, "string")
		}
		if !t.hasValue(v.str) {
			return nil, errEnumValue(leaf, v.str)
		}
		return v, nil
	case metaArray:
		if v.kind != jArray {
			return nil, errInvalidType(path, "array")
		}
		out := &value{kind: jArray, arr: make([]*value, 0, len(v.arr))}
		for i, e := range v.arr {
			ne, err := visit(t.elem, e, path+"["+strconv.Itoa(i)+"]", "null")
			if err != nil {
				return nil, err
			}
			out.arr = append(out.arr, ne)
		}
		return out, nil
	case metaAlternate:
		for _, a := range t.alts {
			if alternateKind(a.typ) == jsonKindName(v.kind) {
				return visit(a.typ, v, path, leaf)
			}
		}
		return nil, errInvalidType(leaf, t.name)
	default:
		return visitObject(t, v, path)
	}
}

func visitObject(t *typ, v *value, path string) (*value, error) {
	if v.kind != jObject {
		return nil, errInvalidType(path, "object")
	}
	out := &value{kind: jObject, obj: []field{}}
	visited := map[string]bool{}
	if err := visitMembers(t, v, path, out, visited); err != nil {
		return nil, err
	}
	for _, f := range v.obj {
		if !visited[f.key] {
			return nil, errUnexpected(join(path, f.key))
		}
	}
	return out, nil
}

// visitMembers visits t's members of the object v (a union's branch members live in the
// same JSON object as its base members) and appends them to out.
func visitMembers(t *typ, v *value, path string, out *value, visited map[string]bool) error {
	for _, m := range t.members {
		mv := v.get(m.name)
		if mv == nil {
			if m.optional {
				continue
			}
			return errMissing(join(path, m.name))
		}
		visited[m.name] = true
		nv, err := visit(m.typ, mv, join(path, m.name), m.name)
		if err != nil {
			return err
		}
		out.obj = append(out.obj, field{m.name, nv})
	}
	if t.tag == nil {
		return nil
	}
	tag := v.get(t.tag.name).str // present and valid: visited above
	for _, br := range t.variants {
		if br.name == tag {
			return visitMembers(br.typ, v, path, out, visited)
		}
	}
	return nil
}

// intRange gives the limits of QAPI's sized integer types and the C type QEMU names in
// its error.
var intRange = map[string]struct {
	min, max int64
	umax     uint64
	ctype    string
}{
	"int8":   {min: math.MinInt8, max: math.MaxInt8, ctype: "int8_t"},
	"int16":  {min: math.MinInt16, max: math.MaxInt16, ctype: "int16_t"},
	"int32":  {min: math.MinInt32, max: math.MaxInt32, ctype: "int32_t"},
	"uint8":  {umax: math.MaxUint8, ctype: "uint8_t"},
	"uint16": {umax: math.MaxUint16, ctype: "uint16_t"},
	"uint32": {umax: math.MaxUint32, ctype: "uint32_t"},
}

func visitBuiltin(t *typ, v *value, path, leaf string) (*value, error) {
	switch t.name {
	case "str":
		if v.kind != jString {
			return nil, errInvalidType(path, "string")
		}
		return v, nil
	case "bool":
		if v.kind != jBool {
			return nil, errInvalidType(path, "boolean")
		}
		return v, nil
	case "null":
		if v.kind != jNull {
			return nil, errInvalidType(path, "null")
		}
		return v, nil
	case "number":
		if v.kind != jNumber {
			return nil, errInvalidType(path, "number")
		}
		return v, nil
	case "any":
		return v, nil
	case "int", "int64", "int8", "int16", "int32":
		var i int64
		ok := v.kind == jNumber
		if ok {
			i, ok = parseQnum(v.num).int64()
		}
		if !ok {
			return nil, errInvalidType(path, "integer")
		}
		if r, sized := intRange[t.name]; sized && (i < r.min || i > r.max) {
			return nil, errInvalidValue(leaf, r.ctype)
		}
		return &value{kind: jNumber, num: strconv.FormatInt(i, 10)}, nil
	default: // uint64, size and the sized unsigned types
		var u uint64
		ok := v.kind == jNumber
		if ok {
			u, ok = parseQnum(v.num).uint64()
		}
		if !ok {
			return nil, errInvalidValue(path, "uint64")
		}
		if r, sized := intRange[t.name]; sized && u > r.umax {
			return nil, errInvalidValue(leaf, r.ctype)
		}
		return &value{kind: jNumber, num: strconv.FormatUint(u, 10)}, nil
	}
}

// alternateKind is the JSON kind that selects branch type t of an alternate.
func alternateKind(t *typ) string {
	switch t.meta {
	case metaEnum:
		return "string"
	case metaArray, metaObject:
		return string(t.meta)
	}
	switch t.jsonType {
	case "int":
		return "number"
	case "boolean", "string", "number", "null":
		return t.jsonType
	}
	return "value"
}

func jsonKindName(k jsonKind) string {
	return [...]string{"null", "boolean", "number", "string", "array", "object"}[k]
}
