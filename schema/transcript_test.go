package schema

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/migvisor/migvisor/qerr"
)

const conformanceDir = "../testdata/conformance"

// validationError matches the texts that QEMU's QAPI input visitor produces, as opposed
// to errors raised by a command once its arguments were accepted (e.g. "Parameter
// 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000").
var validationError = regexp.MustCompile(`^(Parameter '[^']*' (is missing|is unexpected|does not accept value '.*'|expects (uint64|u?int(8|16|32)_t))|Invalid parameter type for '[^']*', expected: .*)$`)

// exchange is one request of a transcript that has an id, with QEMU's answer to it.
type exchange struct {
	file string
	id   string
	cmd  string
	args json.RawMessage // nil when the request had none
	resp struct {
		Return json.RawMessage `json:"return"`
		Error  *qerr.Error     `json:"error"`
	}
}

// loadExchanges reads every transcript and pairs each request that carries an "id" with
// the next response carrying the same id. Requests the JSON parser refuses and responses
// without an id are left out; events are skipped.
func loadExchanges(t *testing.T) []exchange {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(conformanceDir, "*.jsonl"))
	require.NoError(t, err)
	require.NotEmpty(t, files, "QEMU transcripts missing")
	var all []exchange
	for _, file := range files {
		f, err := os.Open(file)
		require.NoError(t, err)
		var pending []exchange
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<24)
		for sc.Scan() {
			var line struct{ Dir, Data string }
			require.NoError(t, json.Unmarshal(sc.Bytes(), &line))
			if line.Dir == "send" {
				pending = append(pending, requests(filepath.Base(file), line.Data)...)
				continue
			}
			var msg struct {
				ID json.RawMessage `json:"id"`
			}
			if json.Unmarshal([]byte(line.Data), &msg) != nil || msg.ID == nil {
				continue
			}
			for i, ex := range pending {
				if ex.id == compact(msg.ID) {
					require.NoError(t, json.Unmarshal([]byte(line.Data), &ex.resp))
					all = append(all, ex)
					pending = append(pending[:i], pending[i+1:]...)
					break
				}
			}
		}
		require.NoError(t, sc.Err())
		require.NoError(t, f.Close())
	}
	return all
}

// requests decodes the JSON objects one send wrote; it stops at the first malformed one.
func requests(file, data string) []exchange {
	var out []exchange
	dec := json.NewDecoder(strings.NewReader(data))
	for {
		var req struct {
			Execute   json.RawMessage `json:"execute"`
			ExecOOB   json.RawMessage `json:"exec-oob"`
			Arguments json.RawMessage `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if dec.Decode(&req) != nil {
			return out
		}
		name := req.Execute
		if name == nil {
			name = req.ExecOOB
		}
		var cmd *string
		if req.ID == nil || json.Unmarshal(name, &cmd) != nil || cmd == nil {
			continue
		}
		out = append(out, exchange{file: file, id: compact(req.ID), cmd: *cmd, args: req.Arguments})
	}
}

func compact(b json.RawMessage) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return string(b)
	}
	return buf.String()
}

// TestTranscripts replays every request of QEMU's transcripts through Validate: where QEMU
// answered with an argument error, Validate must give the same class and text; where QEMU
// accepted the arguments (success, or an error raised by the command itself), Validate must
// accept them too; where QEMU did not know the command, neither may the schema.
func TestTranscripts(t *testing.T) {
	s := Default()
	var refused, accepted int
	for _, ex := range loadExchanges(t) {
		t.Run(ex.file+"/"+ex.id, func(t *testing.T) {
			if e := ex.resp.Error; e != nil && e.Class == qerr.CommandNotFound && strings.HasSuffix(e.Desc, "has not been found") {
				require.False(t, s.Exists(ex.cmd), "QEMU does not know %s", ex.cmd)
				return
			}
			require.True(t, s.Exists(ex.cmd), "command %s missing from the schema", ex.cmd)
			if ex.args != nil && !bytes.HasPrefix(bytes.TrimSpace(ex.args), []byte("{")) {
				return // refused by the dispatcher before any validation
			}
			_, err := s.Validate(ex.cmd, ex.args)
			if e := ex.resp.Error; e != nil && validationError.MatchString(e.Desc) {
				refused++
				require.Equal(t, e, qerr.As(err), "arguments %s", ex.args)
				return
			}
			accepted++
			require.NoError(t, err, "QEMU accepted arguments %s (answer %+v)", ex.args, ex.resp.Error)
		})
	}
	// The transcripts hold several dozen argument errors; make sure they were found.
	require.Greater(t, refused, 30)
	require.Greater(t, accepted, 100)
}
