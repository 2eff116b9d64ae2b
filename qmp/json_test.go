package qmp

import (
	"strings"
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

// decodeAll feeds input in pieces of size chunk (0: all at once) and renders every message the
// decoder emits: the value as QEMU would echo it, or "error: " and the text as quoted on the wire.
func decodeAll(input string, chunk int) []string {
	var out []string
	d := newDecoder(func(v *value, err *qerr.Error) {
		if err != nil {
			q := appendQuoted(nil, err.Desc) // as on the wire
			out = append(out, "error: "+string(q[1:len(q)-1]))
			return
		}
		out = append(out, string(appendQEMU(nil, v)))
	})
	if chunk == 0 {
		d.feed([]byte(input))
		return out
	}
	for len(input) > 0 {
		n := min(chunk, len(input))
		d.feed([]byte(input[:n]))
		input = input[n:]
	}
	return out
}

func pe(s string) string { return "error: JSON parse error, " + s }

func TestDecoder(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  []string
	}{
		// Transcript 02.
		{"missing value", "{\"execute\": }\n", []string{pe("expecting value")}},
		{"bare keyword", "hello\n", []string{pe("invalid keyword 'hello'")}},
		{"wrong closer", "{\"execute\": \"query-version\"]\n", []string{pe("expected separator in dict")}},
		{"trailing comma", `{"execute": "x", "id": "t",}`, []string{pe("expecting value")}},
		{"bad escape", `{"execute": "x", "id": "bad-escape-\x"}`, []string{pe("invalid escape sequence in string")}},
		{"duplicate key", `{"execute": "x", "id": "dup", "id": "dup2"}`, []string{pe("duplicate key")}},
		{"single quotes", `{'execute': 'query-version', 'id': 'it\'s "q"'}`,
			[]string{`{"execute": "query-version", "id": "it's \"q\""}`}},

		// Other parser errors.
		{"missing colon", `{"a" 1}`, []string{pe("missing : in object pair")}},
		{"keyword for colon", `{"a" x "b"}`, []string{pe("missing : in object pair")}},
		{"key not string", `{1: 2}`, []string{pe("key is not a string in object")}},
		{"key invalid keyword", `{nul: 2}`, []string{pe("invalid keyword 'nul'")}},
		{"list separator", `[1 2]`, []string{pe("expected separator in list")}},
		{"list trailing comma", `[1,]`, []string{pe("expecting value")}},
		{"lone closer", `}`, []string{pe("expecting value")}},
		{"lone bracket", `]`, []string{pe("expecting value")}},
		{"object closed by bracket", `{]`, []string{pe("expecting value")}},
		{"brace inside list keeps collecting", `[}]`, []string{pe("expecting value")}},
		{"colon", ":", []string{pe("expecting value")}},
		{"short keyword", "tru ", []string{pe("invalid keyword 'tru'")}},

		// Lexical errors and what recovery skips: up to a structural or control character.
		{"leading zero", `{"a": 01}`, []string{pe("stray '01'"), pe("expecting value")}},
		{"form feed", "\f", []string{pe("stray '\\f'")}},
		{"0xFF", "\xff", []string{pe("stray '\\uFFFD'")}},
		{"upper case keyword", "True\n", []string{pe("stray 'T'")}},
		{"recovery skips to brace", `@@ x {"a": 1}`, []string{pe("stray '@'"), `{"a": 1}`}},
		{"recovery skips tab, stops at newline", "@\tx\n1 ", []string{pe("stray '@'"), "1"}},
		{"recovery stops at control char", "@ x\x01", []string{pe("stray '@'"), pe("stray '\\u0001'")}},
		{"0xFF resets a message", "{\"a\": \xff{\"b\": 1}", []string{pe("stray '\\uFFFD'"), `{"b": 1}`}},
		{"bad minus", "-x", []string{pe("stray '-x'")}},
		{"bad fraction", "1.x", []string{pe("stray '1.x'")}},
		{"bad exponent", "1e}", []string{pe("stray '1e}'")}},
		{"bad exponent sign", "1e+]", []string{pe("stray '1e+]'")}},
		{"control char in string", "\"a\x01\"", []string{pe(`stray '\"a\u0001'`)}},
		{"0xFE in string", "\"é\xfe", []string{pe(`stray '\"\u00E9\uFFFD'`)}},
		{"percent", "%d", []string{pe("stray '%'")}},
		{"NUL ends the quoted token", "\"ab\x00", []string{pe(`stray '\"ab'`)}},
		{"NUL", "\x00", []string{pe("stray ''")}},
		{"long keyword cut at 1023 bytes", strings.Repeat("a", 2000) + " ",
			[]string{pe("invalid keyword '" + strings.Repeat("a", 1023-len("invalid keyword '")))}},

		// Values as QEMU echoes them.
		{"integer", "42 ", []string{"42"}},
		{"negative zero", "-0 ", []string{"0"}},
		{"float", "4.5 ", []string{"4.5"}},
		{"float as %.17g", "0.1 ", []string{"0.10000000000000001"}},
		{"integral float", "1.0 ", []string{"1"}},
		{"exponent", "1E2 ", []string{"100"}},
		{"uint64", "18446744073709551615 ", []string{"18446744073709551615"}},
		{"beyond uint64", "18446744073709551616 ", []string{"1.8446744073709552e+19"}},
		{"beyond int64", "-9223372036854775809 ", []string{"-9.2233720368547758e+18"}},
		{"beyond a double", "1e400 ", []string{"inf"}},
		{"literals", "[true, false, null]", []string{"[true, false, null]"}},
		{"empty containers", "{} []", []string{"{}", "[]"}},
		{"nested", `{"a": [1, {"b": "c"}]}`, []string{`{"a": [1, {"b": "c"}]}`}},

		// Strings.
		{"escapes", `"\"\\\/\b\f\n\r\t"`, []string{`"\"\\/\b\f\n\r\t"`}},
		{"unicode escape", `"\u00e9"`, []string{`"\u00E9"`}},
		{"raw UTF-8", `"é€😀"`, []string{`"\u00E9\u20AC\uD83D\uDE00"`}},
		{"surrogate pair", `"\ud83d\ude00"`, []string{`"\uD83D\uDE00"`}},
		{"NUL escape", `"a\u0000b"`, []string{`"a\u0000b"`}},
		{"modified UTF-8 NUL", "\"\xc0\x80\"", []string{`"\u0000"`}},
		{"DEL", "\"\x7f\"", []string{`"\u007F"`}},
		{"lone high surrogate", `"\ud800"`, []string{pe(`\\ud800 is not a valid Unicode character`)}},
		{"high surrogate then letter", `"\ud800\u0041"`, []string{pe(`\\ud800 is not a valid Unicode character`)}},
		{"lone low surrogate", `"\udc00"`, []string{pe(`\\udc00 is not a valid Unicode character`)}},
		{"noncharacter escape", `"\uFFFF"`, []string{pe(`\\uFFFF is not a valid Unicode character`)}},
		{"bad hex", `"\u12G4"`, []string{pe(`\\u12G4 is not a valid Unicode character`)}},
		{"short hex", `"\u12"`, []string{pe(`\\u12\" is not a valid Unicode character`)}},
		{"truncated UTF-8", "\"\xc3\"", []string{pe("invalid UTF-8 sequence in string")}},
		{"overlong", "\"\xc1\xbf\"", []string{pe("invalid UTF-8 sequence in string")}},
		{"raw noncharacter", "\"\xef\xbf\xbf\"", []string{pe("invalid UTF-8 sequence in string")}},
		{"raw surrogate", "\"\xed\xa0\x80\"", []string{pe("invalid UTF-8 sequence in string")}},

		// Framing.
		{"whitespace only", "\n  \r\n\t\n", nil},
		{"pipelined", "{\"a\": 1}{\"b\": 2}\n{\"c\": 3}\n", []string{`{"a": 1}`, `{"b": 2}`, `{"c": 3}`}},
		{"scalars need a delimiter", "1 2 \"x\"null ", []string{"1", "2", `"x"`, "null"}},
		{"error then message", "{\"a\" 1}{\"b\": 2}", []string{pe("missing : in object pair"), `{"b": 2}`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, decodeAll(tc.input, 0))
			// The same input split anywhere gives the same messages.
			require.Equal(t, tc.want, decodeAll(tc.input, 1), "byte by byte")
			require.Equal(t, tc.want, decodeAll(tc.input, 3), "in threes")
		})
	}
}

func TestDecoderMemberOrder(t *testing.T) {
	// QEMU's hash order, as on the wire in transcript 01.
	for _, tc := range []struct{ in, want string }{
		{`{"error": 1, "id": 2}`, `{"id": 2, "error": 1}`},
		{`{"id": 2, "return": 1}`, `{"return": 1, "id": 2}`},
		{`{"major": 10, "minor": 0, "micro": 2}`, `{"micro": 2, "minor": 0, "major": 10}`},
		{`{"event": "STOP", "timestamp": 1}`, `{"timestamp": 1, "event": "STOP"}`},
	} {
		require.Equal(t, []string{tc.want}, decodeAll(tc.in, 0))
	}
}

func TestDecoderLimits(t *testing.T) {
	t.Run("nesting", func(t *testing.T) {
		ok := strings.Repeat("[", 1024) + strings.Repeat("]", 1024)
		require.Len(t, decodeAll(ok, 0), 1)
		require.NotContains(t, decodeAll(ok, 0)[0], "error")

		// The 1025th bracket fails; the streamer restarts there, so the remaining 1024 pairs
		// nest fine and each of the surplus 1025 closers is a message of its own.
		got := decodeAll(strings.Repeat("[", 2049)+strings.Repeat("]", 2049), 0)
		require.Len(t, got, 1+1+1025)
		require.Equal(t, "error: JSON nesting depth limit exceeded", got[0])
		require.True(t, strings.HasPrefix(got[1], "[[[["))
		require.Equal(t, pe("expecting value"), got[2])
	})
	t.Run("token count", func(t *testing.T) {
		// '[' then 1Mi of "0,": the last comma is token 2Mi+1.
		in := "[" + strings.Repeat("0,", 1<<20) + "0]"
		require.Equal(t, []string{"error: JSON token count limit exceeded", "0", pe("expecting value")}, decodeAll(in, 0))
	})
	t.Run("message size", func(t *testing.T) {
		half := strings.Repeat("a", 32<<20)
		in := `["` + half + `", "` + half + `"]{"ok": 1}`
		require.Equal(t, []string{"error: JSON token size limit exceeded", pe("expecting value"), `{"ok": 1}`}, decodeAll(in, 0))
	})
	t.Run("token size", func(t *testing.T) {
		// One token beyond the limit is cut off; lexing restarts inside it, here at a quote
		// that opens a string, and the newline inside that string is a lexical error.
		in := `"` + strings.Repeat("a", 64<<20) + "\"\n{\"ok\": 1}"
		got := decodeAll(in, 0)
		require.Equal(t, []string{"error: JSON token size limit exceeded", pe(`stray '\"\n'`), `{"ok": 1}`}, got)
	})
	t.Run("memory stays bounded", func(t *testing.T) {
		d := newDecoder(func(*value, *qerr.Error) {})
		chunk := []byte(`"` + strings.Repeat("a", 1<<20) + `",`)
		d.feed([]byte("["))
		for range 100 {
			d.feed(chunk)
			require.LessOrEqual(t, cap(d.buf), 2*(maxTokenSize+2))
		}
	})
}

func TestParseJSON(t *testing.T) {
	v, err := parseJSON([]byte(`{"a": [1, 2.5, "x"], "b": null}`))
	require.Nil(t, err)
	require.Equal(t, `{"a":[1,2.5,"x"],"b":null}`, string(appendRaw(nil, v)))

	for _, in := range []string{`{"a":`, ``, `1 2`, `{} {}`} {
		_, err := parseJSON([]byte(in))
		require.NotNil(t, err, in)
	}
}

// FuzzDecoder checks that how the input is split never changes the messages, and that nothing
// panics.
func FuzzDecoder(f *testing.F) {
	for _, s := range []string{`{"a": [1, "b", {}]}`, "'x\\'y' 1e5 -0.5 [", "\xff}{\"", `{"a" 1}{"b": tru}`} {
		f.Add([]byte(s), uint8(1))
	}
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		require.Equal(t, decodeAll(string(in), 0), decodeAll(string(in), int(chunk)+1))
	})
}

// Results are written as QEMU's writer would print the Go values.
func TestMarshalValue(t *testing.T) {
	for _, tc := range []struct {
		in   any
		want string
	}{
		{"a\uffffb\xffc<>&\u2028", `"a\uFFFDb\uFFFDc<>&\u2028"`},
		{map[string]float64{"x": 0.1, "y": 3}, `{"x": 0.10000000000000001, "y": 3}`},
		{[]uint64{1 << 63, 18446744073709551615}, `[9223372036854775808, 18446744073709551615]`},
		{struct {
			A int64 `json:"a"`
		}{-1 << 63}, `{"a": -9223372036854775808}`},
	} {
		v, err := marshalValue(tc.in)
		require.NoError(t, err)
		require.Equal(t, tc.want, string(appendQEMU(nil, v)))
	}
}
