// Package qmptest replays recorded QMP transcripts against a server and checks its answers, so
// that any package's tests can hold migvisor to what a real QEMU said.
//
// A transcript is a .jsonl file, one message a line: {"dir": "send"|"recv", "data": "<bytes>"}
// (testdata/conformance). Replay writes the sends verbatim and waits for each recv:
//
//	conn, _ := net.Dial("unix", sock)
//	qmptest.Replay(t, conn, "testdata/conformance/08-runstate.jsonl", qmptest.Options{
//		IgnoreKeys: []string{"thread-id"},
//	})
//
// Comparison is on parsed JSON, so member order does not matter; timestamps, version numbers
// and the package string are compared by presence and type only, and Options adds keys or paths
// whose values depend on the run. Events may arrive before or after the reply that caused them.
// Options.Exact asks for byte-identical replies instead.
//
// A Player replays in steps, for scenarios that interleave connections (a migration's
// destination and source): Until plays up to a given reply, Rest plays the remainder.
package qmptest
