package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseKeyValues(t *testing.T) {
	file := filepath.Join(t.TempDir(), "caps.json")
	require.NoError(t, os.WriteFile(file, []byte(`[{"capability": "events", "state": true}]`), 0o644))
	for _, tc := range []struct {
		name  string
		words []string
		want  string // the arguments object as JSON; "" for none
		err   string
	}{
		{name: "none"},
		{name: "numbers and strings", words: []string{"cpu-index=0", "dirty-rate=100", "uri=unix:/tmp/x"},
			want: `{"cpu-index": 0, "dirty-rate": 100, "uri": "unix:/tmp/x"}`},
		{name: "json values", words: []string{`capabilities=[{"capability":"events","state":true}]`, "detach=true"},
			want: `{"capabilities": [{"capability": "events", "state": true}], "detach": true}`},
		{name: "value from a file", words: []string{"capabilities=@" + file},
			want: `{"capabilities": [{"capability": "events", "state": true}]}`},
		{name: "not key=value", words: []string{"oops"}, err: `argument "oops" is not key=value`},
		{name: "empty key", words: []string{"=1"}, err: "is not key=value"},
		{name: "missing file", words: []string{"x=@/nonexistent"}, err: "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseKeyValues(tc.words)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			if tc.want == "" {
				require.Nil(t, got)
				return
			}
			b, err := json.Marshal(got)
			require.NoError(t, err)
			require.JSONEq(t, tc.want, string(b))
		})
	}
}

func TestSocketAddr(t *testing.T) {
	for in, want := range map[string][2]string{
		"/tmp/m.sock":        {"unix", "/tmp/m.sock"},
		"unix:/tmp/m.sock":   {"unix", "/tmp/m.sock"},
		"tcp:127.0.0.1:4444": {"tcp", "127.0.0.1:4444"},
	} {
		n, a := socketAddr(in)
		require.Equal(t, want, [2]string{n, a}, in)
	}
}

func TestUsage(t *testing.T) {
	var out, errb bytes.Buffer
	require.Equal(t, 2, run(nil, &out, &errb))
	require.Contains(t, errb.String(), "usage: migctl SOCKET COMMAND")
	require.Equal(t, 1, run([]string{filepath.Join(t.TempDir(), "none.sock"), "query-status"}, &out, &errb))
	require.Contains(t, errb.String(), "migctl: ")
}
