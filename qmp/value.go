package qmp

import (
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/migvisor/migvisor/qerr"
)

type kind uint8

const (
	kindNull kind = iota
	kindBool
	kindNumber
	kindString
	kindArray
	kindObject
)

// value is a parsed JSON value. Numbers keep their text, so arguments reach the catalog as the
// client wrote them (1.0 stays a float, 18446744073709551616 stays out of range). It is kept
// small: a message may hold a million of them.
type value struct {
	kind  kind
	b     bool
	float bool   // number written with a fraction or exponent
	str   string // string contents, or the number's text
	elems *elems // array elements or object members
}

type elems struct {
	keys  []string // object member names, in input order
	vals  []*value
	index map[string]int // built once an object grows large, for duplicate detection
}

func (v *value) members() *elems {
	if v.elems == nil {
		v.elems = &elems{}
	}
	return v.elems
}

// keys and vals read an array's or object's contents (nil when empty).
func (v *value) keys() []string {
	if v.elems == nil {
		return nil
	}
	return v.elems.keys
}

func (v *value) vals() []*value {
	if v.elems == nil {
		return nil
	}
	return v.elems.vals
}

func (v *value) append(item *value) {
	e := v.members()
	e.vals = append(e.vals, item)
}

func (v *value) has(key string) bool {
	if v.elems != nil && v.elems.index != nil {
		_, ok := v.elems.index[key]
		return ok
	}
	return slices.Contains(v.keys(), key)
}

func (v *value) add(key string, val *value) {
	const indexFrom = 16
	e := v.members()
	e.keys = append(e.keys, key)
	e.vals = append(e.vals, val)
	switch {
	case e.index != nil:
		e.index[key] = len(e.keys) - 1
	case len(e.keys) >= indexFrom:
		e.index = make(map[string]int, 2*len(e.keys))
		for i, k := range e.keys {
			e.index[k] = i
		}
	}
}

func (v *value) get(key string) *value {
	if v.elems != nil && v.elems.index != nil {
		if i, ok := v.elems.index[key]; ok {
			return v.elems.vals[i]
		}
		return nil
	}
	if i := slices.Index(v.keys(), key); i >= 0 {
		return v.elems.vals[i]
	}
	return nil
}

func str(s string) *value { return &value{kind: kindString, str: s} }

func object(kv ...any) *value {
	o := &value{kind: kindObject}
	for i := 0; i < len(kv); i += 2 {
		o.add(kv[i].(string), kv[i+1].(*value))
	}
	return o
}

// parseJSON parses one JSON document with the QMP reader, leniently: it reads JSON the server
// produced itself, such as a marshalled handler result.
func parseJSON(b []byte) (*value, *qerr.Error) {
	var (
		v   *value
		err *qerr.Error
		n   int
	)
	d := newDecoder(func(pv *value, perr *qerr.Error) {
		if n == 0 {
			v, err = pv, perr
		}
		n++
	})
	d.lenient = true
	d.feed(b)
	d.feedByte(' ') // ends a trailing number or keyword
	if n != 1 || d.state != lsStart || len(d.toks) != 0 {
		if err == nil {
			err = parseError(errPrematureEOI)
		}
		return nil, err
	}
	return v, err
}

// QEMU's QDict is a 512-bucket hash table iterated bucket by bucket, each bucket holding its
// newest member first. That order decides both the member order on the wire and which of
// several bad request members is reported, so it is reproduced here.
const qdictBuckets = 512

func qdictBucket(key string) uint32 {
	// gdbm's hash as QEMU uses it, over the key in modified UTF-8 (NUL as C0 80).
	n := uint32(len(key) + strings.Count(key, "\x00"))
	h := 0x238F13AF * n
	i := 0
	add := func(c byte) {
		h += uint32(c) << (uint(i*5) % 24)
		i++
	}
	for j := 0; j < len(key); j++ {
		if key[j] == 0 {
			add(0xC0)
			add(0x80)
		} else {
			add(key[j])
		}
	}
	return (1103515243*h + 12345) % qdictBuckets
}

// qdictOrder returns the member indexes of object v in QEMU's iteration order.
func qdictOrder(v *value) []int {
	keys := v.keys()
	order := make([]int, len(keys))
	buckets := make([]uint32, len(keys))
	for i, k := range keys {
		order[i] = i
		buckets[i] = qdictBucket(k)
	}
	slices.SortStableFunc(order, func(a, b int) int {
		if buckets[a] != buckets[b] {
			return int(buckets[a]) - int(buckets[b])
		}
		return b - a // newest first within a bucket
	})
	return order
}

// appendQEMU writes v the way QEMU's JSON writer does: ", " and ": " separators, QDict member
// order, ASCII only, and numbers as QEMU holds them (int64, else uint64, else double printed
// with %.17g, infinities as "inf" and "-inf").
func appendQEMU(b []byte, v *value) []byte {
	switch v.kind {
	case kindNull:
		return append(b, "null"...)
	case kindBool:
		return strconv.AppendBool(b, v.b)
	case kindNumber:
		return appendQEMUNumber(b, v)
	case kindString:
		return appendQuoted(b, v.str)
	case kindArray:
		b = append(b, '[')
		for i, it := range v.vals() {
			if i > 0 {
				b = append(b, ", "...)
			}
			b = appendQEMU(b, it)
		}
		return append(b, ']')
	default:
		b = append(b, '{')
		for n, i := range qdictOrder(v) {
			if n > 0 {
				b = append(b, ", "...)
			}
			b = appendQuoted(b, v.elems.keys[i])
			b = append(b, ": "...)
			b = appendQEMU(b, v.elems.vals[i])
		}
		return append(b, '}')
	}
}

func appendQEMUNumber(b []byte, v *value) []byte {
	if !v.float {
		if i, err := strconv.ParseInt(v.str, 10, 64); err == nil {
			return strconv.AppendInt(b, i, 10)
		}
		if v.str[0] != '-' {
			if u, err := strconv.ParseUint(v.str, 10, 64); err == nil {
				return strconv.AppendUint(b, u, 10)
			}
		}
	}
	// QEMU reads the rest with strtod, which gives ±inf beyond a double's range, and prints
	// that as glibc's %.17g does: "inf", which is not JSON but is what QEMU's clients get.
	f, _ := strconv.ParseFloat(v.str, 64)
	switch {
	case math.IsInf(f, 1):
		return append(b, "inf"...)
	case math.IsInf(f, -1):
		return append(b, "-inf"...)
	}
	return strconv.AppendFloat(b, f, 'g', 17, 64)
}

// appendQuoted writes s as QEMU quotes strings: \uXXXX (upper case) for control characters and
// everything outside printable ASCII, U+FFFD for invalid sequences.
func appendQuoted(b []byte, s string) []byte {
	const hex = "0123456789ABCDEF"
	u := func(b []byte, cp int) []byte {
		return append(b, '\\', 'u', hex[cp>>12&0xF], hex[cp>>8&0xF], hex[cp>>4&0xF], hex[cp&0xF])
	}
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < 0x7F && c != '"' && c != '\\' {
			b = append(b, c)
			i++
			continue
		}
		cp, next := decodeModUTF8(s, i)
		i = next
		switch cp {
		case '"':
			b = append(b, '\\', '"')
		case '\\':
			b = append(b, '\\', '\\')
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			if cp < 0 {
				cp = 0xFFFD
			}
			if cp > 0xFFFF {
				b = u(b, 0xD800+(cp-0x10000)>>10)
				b = u(b, 0xDC00+(cp-0x10000)&0x3FF)
			} else {
				b = u(b, cp)
			}
		}
	}
	return append(b, '"')
}

// appendRaw writes v as compact standard JSON in input order, numbers exactly as the client
// wrote them: the form arguments are handed to the catalog in.
func appendRaw(b []byte, v *value) []byte {
	switch v.kind {
	case kindNull:
		return append(b, "null"...)
	case kindBool:
		return strconv.AppendBool(b, v.b)
	case kindNumber:
		return append(b, v.str...)
	case kindString:
		return appendQuoted(b, v.str)
	case kindArray:
		b = append(b, '[')
		for i, it := range v.vals() {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendRaw(b, it)
		}
		return append(b, ']')
	default:
		b = append(b, '{')
		for i, k := range v.keys() {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendQuoted(b, k)
			b = append(b, ':')
			b = appendRaw(b, v.elems.vals[i])
		}
		return append(b, '}')
	}
}
