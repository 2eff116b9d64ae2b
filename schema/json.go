package schema

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// value is a decoded JSON value that keeps what encoding/json's generic decoding loses:
// object member order (QEMU reports the first unexpected member; the schema files depend on
// member order) and the exact text of numbers (so 2^64-1 or -2^63 are not rounded).
type value struct {
	kind jsonKind
	b    bool
	num  string // the literal, for jNumber
	str  string
	arr  []*value
	obj  []field
}

type field struct {
	key string
	val *value
}

type jsonKind uint8

const (
	jNull jsonKind = iota
	jBool
	jNumber
	jString
	jArray
	jObject
)

// get returns the member called key, or nil.
func (v *value) get(key string) *value {
	for _, f := range v.obj {
		if f.key == key {
			return f.val
		}
	}
	return nil
}

// decodeValue parses one JSON document.
func decodeValue(data []byte) (*value, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := decodeNext(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after JSON value")
	}
	return v, nil
}

func decodeNext(dec *json.Decoder) (*value, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case nil:
		return &value{kind: jNull}, nil
	case bool:
		return &value{kind: jBool, b: t}, nil
	case json.Number:
		return &value{kind: jNumber, num: string(t)}, nil
	case string:
		return &value{kind: jString, str: t}, nil
	case json.Delim:
		switch t {
		case '[':
			v := &value{kind: jArray, arr: []*value{}}
			for dec.More() {
				e, err := decodeNext(dec)
				if err != nil {
					return nil, err
				}
				v.arr = append(v.arr, e)
			}
			_, err := dec.Token()
			return v, err
		case '{':
			v := &value{kind: jObject, obj: []field{}}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				key, _ := kt.(string)
				e, err := decodeNext(dec)
				if err != nil {
					return nil, err
				}
				v.set(key, e)
			}
			_, err := dec.Token()
			return v, err
		}
	}
	return nil, fmt.Errorf("unexpected JSON token %v", tok)
}

// set replaces member key or appends it; a repeated key keeps its first position and its
// last value (QEMU's parser refuses duplicates before arguments get here).
func (v *value) set(key string, e *value) {
	for i := range v.obj {
		if v.obj[i].key == key {
			v.obj[i].val = e
			return
		}
	}
	v.obj = append(v.obj, field{key, e})
}

// encode appends v's JSON text to b.
func (v *value) encode(b *bytes.Buffer) {
	switch v.kind {
	case jNull:
		b.WriteString("null")
	case jBool:
		b.WriteString(strconv.FormatBool(v.b))
	case jNumber:
		b.WriteString(v.num)
	case jString:
		s, _ := json.Marshal(v.str) // a Go string always marshals
		b.Write(s)
	case jArray:
		b.WriteByte('[')
		for i, e := range v.arr {
			if i > 0 {
				b.WriteByte(',')
			}
			e.encode(b)
		}
		b.WriteByte(']')
	case jObject:
		b.WriteByte('{')
		for i, f := range v.obj {
			if i > 0 {
				b.WriteByte(',')
			}
			s, _ := json.Marshal(f.key)
			b.Write(s)
			b.WriteByte(':')
			f.val.encode(b)
		}
		b.WriteByte('}')
	}
}

// qnum is a JSON number as QEMU's parser represents it (QNum): a signed 64-bit integer
// when the literal is an integer that fits, else an unsigned 64-bit integer when it is a
// non-negative integer that fits, else a double (whose value no integer visitor needs: QEMU
// refuses doubles for every integer type, even integral ones like 1.0).
type qnum struct {
	kind qnumKind
	i    int64
	u    uint64
}

type qnumKind uint8

const (
	qnumI64 qnumKind = iota
	qnumU64
	qnumDouble
)

func parseQnum(lit string) qnum {
	if !strings.ContainsAny(lit, ".eE") {
		if i, err := strconv.ParseInt(lit, 10, 64); err == nil {
			return qnum{kind: qnumI64, i: i}
		}
		if lit[0] != '-' {
			if u, err := strconv.ParseUint(lit, 10, 64); err == nil {
				return qnum{kind: qnumU64, u: u}
			}
		}
	}
	return qnum{kind: qnumDouble}
}

// int64 is qnum_get_try_int: integers that fit int64 (an unsigned QNum never does).
func (q qnum) int64() (int64, bool) { return q.i, q.kind == qnumI64 }

// uint64 is QEMU's uint64 input rule: unsigned integers, and negative ones wrapped to two's
// complement for backward compatibility; doubles are refused even when integral.
func (q qnum) uint64() (uint64, bool) {
	switch q.kind {
	case qnumI64:
		return uint64(q.i), true
	case qnumU64:
		return q.u, true
	}
	return 0, false
}
