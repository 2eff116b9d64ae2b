package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/qmp"
)

const usage = `usage: migctl SOCKET COMMAND [key=value ...]
       migctl migrate [flags] SRC DST (a whole migration; migctl migrate -h lists the flags)
       migctl bench-migrate [flags]   (migctl bench-migrate -h lists them)
       migctl bench-sweep [flags]     idle sizes and vCPU counts beside QEMU, the busy tail (-h lists them)

SOCKET is a unix socket path or tcp:HOST:PORT. Each value is read as JSON when it parses as JSON
(numbers, true/false, null, lists, objects) and as a string otherwise; key=@FILE reads the JSON
value from FILE. The reply is printed as indented JSON; a QMP error exits 1 with its class and text.
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "migrate" {
		return migrate(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "bench-migrate" {
		return benchMigrate(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "bench-sweep" {
		return benchSweep(args[1:], stdout, stderr)
	}
	if len(args) < 2 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmdArgs, err := parseKeyValues(args[2:])
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	network, addr := socketAddr(args[0])
	c, err := qmp.Dial(ctx, network, addr)
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 1
	}
	defer c.Close()
	var reply json.RawMessage
	var cmdArgsAny any
	if cmdArgs != nil {
		cmdArgsAny = cmdArgs
	}
	if err := c.Execute(ctx, args[1], cmdArgsAny, &reply); err != nil {
		var qe *qerr.Error
		if errors.As(err, &qe) {
			fmt.Fprintf(stderr, "migctl: %s: %s\n", qe.Class, qe.Desc)
		} else {
			fmt.Fprintf(stderr, "migctl: %v\n", err)
		}
		return 1
	}
	out, err := json.MarshalIndent(reply, "", "  ")
	if err != nil {
		fmt.Fprintf(stderr, "migctl: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, string(out))
	return 0
}

// socketAddr reads "tcp:HOST:PORT" or a unix socket path (optionally "unix:PATH").
func socketAddr(s string) (network, addr string) {
	if rest, ok := strings.CutPrefix(s, "tcp:"); ok {
		return "tcp", rest
	}
	return "unix", strings.TrimPrefix(s, "unix:")
}

// parseKeyValues turns key=value words into a QMP arguments object (nil when there are none).
func parseKeyValues(words []string) (map[string]json.RawMessage, error) {
	if len(words) == 0 {
		return nil, nil
	}
	out := make(map[string]json.RawMessage, len(words))
	for _, w := range words {
		k, v, ok := strings.Cut(w, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("argument %q is not key=value", w)
		}
		if file, isFile := strings.CutPrefix(v, "@"); isFile {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, err
			}
			if !json.Valid(b) {
				return nil, fmt.Errorf("%s: not valid JSON", file)
			}
			out[k] = json.RawMessage(b)
			continue
		}
		if json.Valid([]byte(v)) {
			out[k] = json.RawMessage(v)
			continue
		}
		s, _ := json.Marshal(v)
		out[k] = s
	}
	return out, nil
}
