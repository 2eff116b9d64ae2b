package schema

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"sync"
)

//go:embed qapi/*.json
var definitions embed.FS

// Schema is a parsed set of QAPI definitions: the commands migvisor serves, their
// argument and return types, and its events.
type Schema struct {
	types    map[string]*typ // named types, builtins included
	arrays   map[*typ]*typ   // array types by element type
	empty    *typ            // the empty object: arguments of commands without data
	entities []*entity       // commands and events in definition order
	commands map[string]*entity

	introspectOnce sync.Once
	introspection  json.RawMessage
}

type metaType string

const (
	metaBuiltin   metaType = "builtin"
	metaEnum      metaType = "enum"
	metaArray     metaType = "array"
	metaObject    metaType = "object"
	metaAlternate metaType = "alternate"
)

// typ is one QAPI type. Objects carry their base members first, as QEMU visits them.
type typ struct {
	name     string
	meta     metaType
	jsonType string // builtins: the SchemaInfoBuiltin json-type
	features []string

	values []enumValue // enum

	elem *typ // array

	members  []*member // object: base members, then its own
	tag      *member   // union: the discriminator, one of members
	variants []variant // union: the branches in definition order

	alts []variant // alternate

	def      *value // the definition, until completed
	complete bool
	busy     bool // completing, to catch a base that contains itself
}

type enumValue struct {
	name     string
	features []string
}

type member struct {
	name     string
	typ      *typ
	optional bool
	features []string
}

type variant struct {
	name string
	typ  *typ
}

type entity struct {
	name     string
	event    bool
	args     *typ // the empty object when the definition has no data
	ret      *typ // nil when the command returns nothing (introspected as the empty object)
	allowOOB bool
	features []string
}

var builtinJSONTypes = map[string]string{
	"str": "string", "number": "number", "bool": "boolean", "null": "null", "any": "value",
	"int": "int", "int8": "int", "int16": "int", "int32": "int", "int64": "int",
	"uint8": "int", "uint16": "int", "uint32": "int", "uint64": "int", "size": "int",
}

var defaultSchema = sync.OnceValue(func() *Schema {
	s, err := Load(definitions)
	if err != nil {
		panic("schema: embedded definitions: " + err.Error())
	}
	return s
})

// Default returns the schema embedded in migvisor, parsed once.
func Default() *Schema { return defaultSchema() }

// Load parses every qapi/*.json file of fsys, in name order; each holds a JSON array of
// definitions. Types may be referenced before their definition and across files.
func Load(fsys fs.FS) (*Schema, error) {
	names, err := fs.Glob(fsys, "qapi/*.json")
	if err != nil {
		return nil, err
	}
	s := &Schema{
		types:    map[string]*typ{},
		arrays:   map[*typ]*typ{},
		commands: map[string]*entity{},
	}
	for name, jt := range builtinJSONTypes {
		s.types[name] = &typ{name: name, meta: metaBuiltin, jsonType: jt, complete: true}
	}
	s.empty = &typ{name: "q_empty", meta: metaObject, complete: true}

	var pending []*value // entity definitions, resolved once every type is known
	for _, name := range names {
		data, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		doc, err := decodeValue(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path.Base(name), err)
		}
		if doc.kind != jArray {
			return nil, fmt.Errorf("%s: not a JSON array", path.Base(name))
		}
		for _, def := range doc.arr {
			meta, defName, err := defKind(def)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path.Base(name), err)
			}
			switch meta {
			case "command", "event":
				pending = append(pending, def)
				continue
			}
			if _, dup := s.types[defName]; dup {
				return nil, fmt.Errorf("%s: type %s defined twice", path.Base(name), defName)
			}
			m := metaObject
			switch meta {
			case "enum":
				m = metaEnum
			case "alternate":
				m = metaAlternate
			}
			s.types[defName] = &typ{name: defName, meta: m, def: def}
		}
	}
	for _, t := range s.types {
		if err := s.completeType(t); err != nil {
			return nil, err
		}
	}
	for _, def := range pending {
		e, err := s.parseEntity(def)
		if err != nil {
			return nil, err
		}
		if !e.event {
			if _, dup := s.commands[e.name]; dup {
				return nil, fmt.Errorf("command %s defined twice", e.name)
			}
			s.commands[e.name] = e
		}
		s.entities = append(s.entities, e)
	}
	return s, nil
}

// defKind returns which kind of definition def is and the name it defines.
func defKind(def *value) (kind, name string, err error) {
	if def.kind != jObject {
		return "", "", fmt.Errorf("definition is not an object")
	}
	for _, k := range []string{"enum", "struct", "union", "alternate", "command", "event"} {
		if v := def.get(k); v != nil {
			if kind != "" {
				return "", "", fmt.Errorf("definition is both %s and %s", kind, k)
			}
			if v.kind != jString || v.str == "" {
				return "", "", fmt.Errorf("%s name is not a string", k)
			}
			kind, name = k, v.str
		}
	}
	if kind == "" {
		return "", "", fmt.Errorf("definition of unknown kind")
	}
	return kind, name, nil
}

// allowedKeys lists the members each kind of definition may have.
var allowedKeys = map[string][]string{
	"enum":      {"data", "features"},
	"struct":    {"data", "base", "features"},
	"union":     {"data", "base", "discriminator", "features"},
	"alternate": {"data", "features"},
	"command":   {"data", "returns", "boxed", "allow-oob", "features"},
	"event":     {"data", "features"},
}

func checkKeys(def *value, kind, name string) error {
	for _, f := range def.obj {
		if f.key == kind {
			continue
		}
		ok := false
		for _, k := range allowedKeys[kind] {
			ok = ok || f.key == k
		}
		if !ok {
			return fmt.Errorf("%s %s: unknown key %q", kind, name, f.key)
		}
	}
	return nil
}

func (s *Schema) completeType(t *typ) error {
	if t.complete {
		return nil
	}
	if t.busy {
		return fmt.Errorf("type %s contains itself as a base", t.name)
	}
	t.busy = true
	defer func() { t.busy = false }()

	kind, _, _ := defKind(t.def)
	if err := checkKeys(t.def, kind, t.name); err != nil {
		return err
	}
	features, err := parseFeatures(t.def.get("features"))
	if err != nil {
		return fmt.Errorf("%s: %w", t.name, err)
	}
	t.features = features
	data := t.def.get("data")
	if data == nil {
		return fmt.Errorf("%s %s: no data", kind, t.name)
	}
	switch kind {
	case "enum":
		err = s.parseEnum(t, data)
	case "struct":
		err = s.parseStruct(t, data)
	case "union":
		err = s.parseUnion(t, data)
	case "alternate":
		err = s.parseAlternate(t, data)
	}
	if err != nil {
		return err
	}
	t.def = nil
	t.complete = true
	return nil
}

func (s *Schema) parseEnum(t *typ, data *value) error {
	if data.kind != jArray {
		return fmt.Errorf("enum %s: data is not an array", t.name)
	}
	seen := map[string]bool{}
	for _, v := range data.arr {
		var ev enumValue
		switch v.kind {
		case jString:
			ev.name = v.str
		case jObject:
			n := v.get("name")
			if n == nil || n.kind != jString {
				return fmt.Errorf("enum %s: value without a name", t.name)
			}
			f, err := parseFeatures(v.get("features"))
			if err != nil {
				return fmt.Errorf("enum %s: %w", t.name, err)
			}
			ev = enumValue{name: n.str, features: f}
		default:
			return fmt.Errorf("enum %s: bad value", t.name)
		}
		if seen[ev.name] {
			return fmt.Errorf("enum %s: value %s twice", t.name, ev.name)
		}
		seen[ev.name] = true
		t.values = append(t.values, ev)
	}
	return nil
}

func (s *Schema) parseStruct(t *typ, data *value) error {
	if base := t.def.get("base"); base != nil {
		b, err := s.baseType(t.name, base)
		if err != nil {
			return err
		}
		t.members = append(t.members, b.members...)
	}
	own, err := s.parseMembers(t.name, data)
	if err != nil {
		return err
	}
	t.members = append(t.members, own...)
	return checkUnique(t)
}

// baseType resolves the base of a struct or union: a struct name or an inline member list.
func (s *Schema) baseType(owner string, base *value) (*typ, error) {
	switch base.kind {
	case jString:
		b, ok := s.types[base.str]
		if !ok {
			return nil, fmt.Errorf("%s: unknown base %s", owner, base.str)
		}
		if err := s.completeType(b); err != nil {
			return nil, err
		}
		if b.meta != metaObject || b.tag != nil {
			return nil, fmt.Errorf("%s: base %s is not a struct", owner, base.str)
		}
		return b, nil
	case jObject:
		ms, err := s.parseMembers(owner, base)
		if err != nil {
			return nil, err
		}
		return &typ{name: "q_obj_" + owner + "-base", meta: metaObject, members: ms, complete: true}, nil
	}
	return nil, fmt.Errorf("%s: bad base", owner)
}

func (s *Schema) parseUnion(t *typ, data *value) error {
	base := t.def.get("base")
	disc := t.def.get("discriminator")
	if base == nil || disc == nil || disc.kind != jString {
		return fmt.Errorf("union %s: needs a base and a discriminator", t.name)
	}
	b, err := s.baseType(t.name, base)
	if err != nil {
		return err
	}
	t.members = append(t.members, b.members...)
	for _, m := range t.members {
		if m.name == disc.str {
			t.tag = m
		}
	}
	if t.tag == nil || t.tag.optional || t.tag.typ.meta != metaEnum {
		return fmt.Errorf("union %s: discriminator %s is not a mandatory enum member of the base", t.name, disc.str)
	}
	if err := s.completeType(t.tag.typ); err != nil {
		return err
	}
	if data.kind != jObject {
		return fmt.Errorf("union %s: data is not an object", t.name)
	}
	for _, f := range data.obj {
		if !t.tag.typ.hasValue(f.key) {
			return fmt.Errorf("union %s: branch %s is not a value of %s", t.name, f.key, t.tag.typ.name)
		}
		bt, err := s.typeRef(f.val)
		if err != nil {
			return fmt.Errorf("union %s: %w", t.name, err)
		}
		if err := s.completeType(bt); err != nil {
			return err
		}
		if bt.meta != metaObject {
			return fmt.Errorf("union %s: branch %s is not an object type", t.name, f.key)
		}
		t.variants = append(t.variants, variant{f.key, bt})
	}
	return checkUnique(t)
}

func (s *Schema) parseAlternate(t *typ, data *value) error {
	if data.kind != jObject || len(data.obj) == 0 {
		return fmt.Errorf("alternate %s: data is not a non-empty object", t.name)
	}
	seen := map[string]bool{}
	for _, f := range data.obj {
		at, err := s.typeRef(f.val)
		if err != nil {
			return fmt.Errorf("alternate %s: %w", t.name, err)
		}
		if err := s.completeType(at); err != nil {
			return err
		}
		k := alternateKind(at)
		if k == "value" {
			return fmt.Errorf("alternate %s: branch %s cannot be told apart by JSON type", t.name, f.key)
		}
		if seen[k] {
			return fmt.Errorf("alternate %s: two branches take JSON %s", t.name, k)
		}
		seen[k] = true
		t.alts = append(t.alts, variant{f.key, at})
	}
	return nil
}

func checkUnique(t *typ) error {
	seen := map[string]bool{}
	for _, m := range t.members {
		if seen[m.name] {
			return fmt.Errorf("%s: member %s twice", t.name, m.name)
		}
		seen[m.name] = true
	}
	return nil
}

func (t *typ) hasValue(v string) bool {
	for _, ev := range t.values {
		if ev.name == v {
			return true
		}
	}
	return false
}

// parseMembers reads a QAPI member list: {"name": TYPE, "*optional": TYPE,
// "name": {"type": TYPE, "features": [...]}}.
func (s *Schema) parseMembers(owner string, data *value) ([]*member, error) {
	if data.kind != jObject {
		return nil, fmt.Errorf("%s: members are not an object", owner)
	}
	var ms []*member
	for _, f := range data.obj {
		m := &member{name: strings.TrimPrefix(f.key, "*"), optional: strings.HasPrefix(f.key, "*")}
		ref := f.val
		if f.val.kind == jObject {
			ref = f.val.get("type")
			if ref == nil {
				return nil, fmt.Errorf("%s.%s: no type", owner, m.name)
			}
			feats, err := parseFeatures(f.val.get("features"))
			if err != nil {
				return nil, fmt.Errorf("%s.%s: %w", owner, m.name, err)
			}
			m.features = feats
		}
		t, err := s.typeRef(ref)
		if err != nil {
			return nil, fmt.Errorf("%s.%s: %w", owner, m.name, err)
		}
		m.typ = t
		ms = append(ms, m)
	}
	return ms, nil
}

// typeRef resolves "Name" or ["Name"].
func (s *Schema) typeRef(v *value) (*typ, error) {
	switch {
	case v.kind == jString:
		t, ok := s.types[v.str]
		if !ok {
			return nil, fmt.Errorf("unknown type %s", v.str)
		}
		return t, nil
	case v.kind == jArray && len(v.arr) == 1 && v.arr[0].kind == jString:
		elem, err := s.typeRef(v.arr[0])
		if err != nil {
			return nil, err
		}
		return s.arrayOf(elem), nil
	}
	return nil, fmt.Errorf("bad type reference")
}

func (s *Schema) arrayOf(elem *typ) *typ {
	if a, ok := s.arrays[elem]; ok {
		return a
	}
	a := &typ{name: elem.name + "List", meta: metaArray, elem: elem, complete: true}
	s.arrays[elem] = a
	return a
}

func parseFeatures(v *value) ([]string, error) {
	if v == nil {
		return nil, nil
	}
	if v.kind != jArray {
		return nil, fmt.Errorf("features are not an array")
	}
	var fs []string
	for _, f := range v.arr {
		if f.kind != jString {
			return nil, fmt.Errorf("feature is not a string")
		}
		fs = append(fs, f.str)
	}
	return fs, nil
}

func (s *Schema) parseEntity(def *value) (*entity, error) {
	kind, name, _ := defKind(def)
	if err := checkKeys(def, kind, name); err != nil {
		return nil, err
	}
	e := &entity{name: name, event: kind == "event", args: s.empty}
	var err error
	if e.features, err = parseFeatures(def.get("features")); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if data := def.get("data"); data != nil {
		switch data.kind {
		case jObject:
			ms, err := s.parseMembers(name, data)
			if err != nil {
				return nil, err
			}
			e.args = &typ{name: "q_obj_" + name + "-arg", meta: metaObject, members: ms, complete: true}
			if err := checkUnique(e.args); err != nil {
				return nil, err
			}
		case jString:
			t, err := s.typeRef(data)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			if t.meta != metaObject {
				return nil, fmt.Errorf("%s: data %s is not an object type", name, t.name)
			}
			e.args = t
		default:
			return nil, fmt.Errorf("%s: bad data", name)
		}
	}
	if r := def.get("returns"); r != nil {
		if e.ret, err = s.typeRef(r); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	if b := def.get("boxed"); b != nil && (b.kind != jBool || !b.b || def.get("data") == nil || def.get("data").kind != jString) {
		return nil, fmt.Errorf("%s: boxed needs a named data type", name)
	}
	if oob := def.get("allow-oob"); oob != nil {
		if oob.kind != jBool {
			return nil, fmt.Errorf("%s: allow-oob is not a boolean", name)
		}
		e.allowOOB = oob.b
	}
	return e, nil
}

// Exists reports whether cmd is a command of the schema.
func (s *Schema) Exists(cmd string) bool {
	_, ok := s.commands[cmd]
	return ok
}

// AllowOOB reports whether cmd may be run with exec-oob.
func (s *Schema) AllowOOB(cmd string) bool {
	e, ok := s.commands[cmd]
	return ok && e.allowOOB
}

// CommandNames returns every command name in definition order.
func (s *Schema) CommandNames() []string {
	var names []string
	for _, e := range s.entities {
		if !e.event {
			names = append(names, e.name)
		}
	}
	return names
}

// Events returns every event name in definition order.
func (s *Schema) Events() []string {
	var names []string
	for _, e := range s.entities {
		if e.event {
			names = append(names, e.name)
		}
	}
	return names
}
