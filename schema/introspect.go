package schema

import (
	"encoding/json"
	"slices"
	"strconv"
)

// Introspect returns the answer to query-qmp-schema: a list of SchemaInfo, built the way
// QEMU's scripts/qapi/introspect.py builds it. Commands and events come first, in definition
// order; then every type they use, in order of first use, each found type adding the
// ones it uses to the end of the queue. Type names are hidden: named and implicit types are
// numbered "0", "1", ... in order of first use, builtins keep their names, arrays are
// "[ELEMENT]", and every integer type shows as "int". Optional members carry
// "default": null; "allow-oob" and "features" appear only when set.
func (s *Schema) Introspect() json.RawMessage {
	s.introspectOnce.Do(func() {
		in := &introspector{s: s, names: map[*typ]string{}, queued: map[*typ]bool{}}
		var out []map[string]any
		for _, e := range s.entities {
			info := map[string]any{"name": e.name}
			if e.event {
				info["meta-type"] = "event"
				info["arg-type"] = in.use(e.args)
			} else {
				ret := e.ret
				if ret == nil {
					ret = s.empty
				}
				info["meta-type"] = "command"
				info["arg-type"] = in.use(e.args)
				info["ret-type"] = in.use(ret)
				if e.allowOOB {
					info["allow-oob"] = true
				}
			}
			addFeatures(info, e.features)
			out = append(out, info)
		}
		for i := 0; i < len(in.queue); i++ {
			out = append(out, in.describe(in.queue[i]))
		}
		b, err := json.Marshal(out)
		if err != nil {
			panic("schema: introspection: " + err.Error()) // maps of strings, slices and bools always marshal
		}
		s.introspection = b
	})
	return slices.Clone(s.introspection)
}

type introspector struct {
	s      *Schema
	names  map[*typ]string
	queue  []*typ
	queued map[*typ]bool
}

// use queues t for description (once) and returns the name it is introspected under.
func (in *introspector) use(t *typ) string {
	intT := in.s.types["int"]
	switch {
	case t.meta == metaBuiltin && t.jsonType == "int":
		t = intT
	case t.meta == metaArray && t.elem.meta == metaBuiltin && t.elem.jsonType == "int":
		t = in.s.arrayOf(intT)
	}
	if !in.queued[t] {
		in.queued[t] = true
		in.queue = append(in.queue, t)
	}
	switch t.meta {
	case metaBuiltin:
		return t.name
	case metaArray:
		return "[" + in.use(t.elem) + "]"
	}
	n, ok := in.names[t]
	if !ok {
		n = strconv.Itoa(len(in.names))
		in.names[t] = n
	}
	return n
}

func (in *introspector) describe(t *typ) map[string]any {
	info := map[string]any{"name": in.use(t), "meta-type": string(t.meta)}
	switch t.meta {
	case metaBuiltin:
		info["json-type"] = t.jsonType
	case metaArray:
		info["element-type"] = in.use(t.elem)
	case metaEnum:
		members := []map[string]any{}
		values := []string{}
		for _, v := range t.values {
			m := map[string]any{"name": v.name}
			addFeatures(m, v.features)
			members = append(members, m)
			values = append(values, v.name)
		}
		info["members"] = members
		info["values"] = values
	case metaAlternate:
		members := []map[string]any{}
		for _, a := range t.alts {
			members = append(members, map[string]any{"type": in.use(a.typ)})
		}
		info["members"] = members
	case metaObject:
		members := []map[string]any{}
		for _, m := range t.members {
			mi := map[string]any{"name": m.name, "type": in.use(m.typ)}
			if m.optional {
				mi["default"] = nil
			}
			addFeatures(mi, m.features)
			members = append(members, mi)
		}
		info["members"] = members
		if t.tag != nil {
			info["tag"] = t.tag.name
			info["variants"] = in.variants(t)
		}
	}
	addFeatures(info, t.features)
	return info
}

// variants lists a union's branches: the defined ones in definition order, then every
// other value of the discriminator in enum order with the empty object, as QEMU does.
func (in *introspector) variants(t *typ) []map[string]any {
	var out []map[string]any
	has := map[string]bool{}
	for _, v := range t.variants {
		has[v.name] = true
		out = append(out, map[string]any{"case": v.name, "type": in.use(v.typ)})
	}
	for _, ev := range t.tag.typ.values {
		if !has[ev.name] {
			out = append(out, map[string]any{"case": ev.name, "type": in.use(in.s.empty)})
		}
	}
	return out
}

func addFeatures(info map[string]any, features []string) {
	if len(features) > 0 {
		info["features"] = features
	}
}
