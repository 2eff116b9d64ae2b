package qmptest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// Line is one message of a transcript: what the client sent ("send") or received ("recv").
type Line struct {
	Dir  string `json:"dir"`
	Data string `json:"data"`
}

// Load reads a transcript: one JSON object per line.
func Load(path string) ([]Line, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var lines []Line
	for i, raw := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		var l Line
		if err := json.Unmarshal(raw, &l); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, i+1, err)
		}
		if l.Dir != "send" && l.Dir != "recv" {
			return nil, fmt.Errorf("%s:%d: dir %q", path, i+1, l.Dir)
		}
		lines = append(lines, l)
	}
	return lines, nil
}

// DefaultTimeout is how long Replay waits for one expected message when Options.Timeout is 0.
const DefaultTimeout = 10 * time.Second

// Options tune a replay. The zero value compares everything that does not depend on the run.
type Options struct {
	// Timeout bounds the wait for each expected message.
	Timeout time.Duration
	// IgnoreKeys names members, at any depth of any message, whose values depend on the run
	// (thread-id, byte counts, times, rates): only their presence and JSON type are compared.
	IgnoreKeys []string
	// Ignore is asked about every member path not already ignored; true means compare
	// presence and type only. msg is the command a reply answers (known when the request had
	// an id, or was the last sent), the event name for an event, or "greeting". path is
	// rooted at the message: "return.ram.transferred", "return[0].thread-id", "data.status".
	Ignore func(msg, path string) bool
	// OnlyIDs restricts the comparison to replies whose id is listed (a string id as itself,
	// any other id as its compact JSON); all other replies are still awaited, but not compared.
	OnlyIDs []string
	// SkipIDs lists replies that are awaited but not compared.
	SkipIDs []string
	// IgnoreEvents drops events instead of awaiting and comparing them.
	IgnoreEvents bool
	// DropEvents names events that are neither awaited nor compared (both the transcript's
	// and the server's): those whose number depends on timing, as MIGRATION_PASS does for a
	// busy guest.
	DropEvents []string
	// Exact compares the greeting and replies byte for byte (events still by value, since
	// their timestamps differ), ignoring nothing in them.
	Exact bool
	// Rewrite, if set, is applied to every message of the transcript, sent or expected
	// (socket paths, ...).
	Rewrite func(data string) string
	// Poll names commands whose answer depends on when they are asked (a query sent "after
	// 1.5 s" in the recording, a migration's status): when a reply to one of them (with an id)
	// differs, the request is sent again every PollInterval until the reply matches or Timeout
	// passes, and only the last difference is reported.
	Poll func(cmd string) bool
	// MayAdd names members (by message and path, as Ignore) that the server may send although
	// the transcript lacks them: where migvisor deliberately does more than QEMU did.
	MayAdd func(msg, path string) bool
	// PollInterval is the pause between two polls; 0 means 50 ms.
	PollInterval time.Duration
}

// Replay plays the transcript at path over conn, a fresh connection to a QMP server: it writes
// every "send" exactly as recorded and checks that each "recv" arrives. Messages are compared
// as parsed JSON (member order is free); timestamps, version numbers and the package string
// are compared by presence and type only. Replies are matched by id, so out-of-band replies may
// overtake; events are matched by name in their own order, before or after the reply that
// caused them. Mismatches are reported with t.Errorf; a missing message ends the replay.
func Replay(t testing.TB, conn net.Conn, path string, opts Options) {
	t.Helper()
	NewPlayer(t, conn, path, opts).Rest()
}

// Player replays a transcript in steps, so that several connections can be interleaved as they
// were recorded (a migration's destination must be listening before the source migrates):
//
//	dst, src := qmptest.NewPlayer(t, dconn, dstPath, o), qmptest.NewPlayer(t, sconn, srcPath, o)
//	dst.Until("dst-incoming")
//	src.Rest()
//	dst.Rest()
type Player struct {
	r     *replayer
	path  string
	lines []Line
	next  int
	ended bool // a message did not arrive: the rest would only add noise
}

// NewPlayer loads the transcript at path for replay over conn.
func NewPlayer(t testing.TB, conn net.Conn, path string, opts Options) *Player {
	t.Helper()
	lines, err := Load(path)
	if err != nil {
		t.Fatalf("qmptest: %v", err)
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultTimeout
	}
	r := &replayer{t: t, conn: conn, rd: bufio.NewReaderSize(conn, 64<<10), opts: opts,
		cmds: map[string]string{}, reqs: map[string]string{}}
	return &Player{r: r, path: path, lines: lines}
}

// Until plays the transcript up to and including the reply whose id is id (named as in
// Options.OnlyIDs). It reports false if the replay ended first.
func (p *Player) Until(id string) bool {
	p.r.t.Helper()
	for !p.ended && p.next < len(p.lines) {
		l := p.lines[p.next]
		p.step()
		if l.Dir == "recv" {
			var m struct{ ID json.RawMessage }
			if json.Unmarshal([]byte(l.Data), &m) == nil && m.ID != nil && idKey(m.ID) == id {
				return !p.ended
			}
		}
	}
	if !p.ended {
		p.r.t.Errorf("%s: no reply with id %q after line %d", p.path, id, p.next)
	}
	return false
}

// Rest plays the remaining lines, then reports replies nobody expected (and logs events).
func (p *Player) Rest() {
	p.r.t.Helper()
	for !p.ended && p.next < len(p.lines) {
		p.step()
	}
	for _, m := range p.r.replies {
		p.r.t.Errorf("%s: unexpected reply %s", p.path, m.raw)
	}
	for _, m := range p.r.events {
		p.r.t.Logf("%s: event not in the transcript: %s", p.path, m.raw)
	}
	p.r.replies, p.r.events = nil, nil
}

func (p *Player) step() {
	l := p.lines[p.next]
	p.next++
	where := fmt.Sprintf("%s:%d", p.path, p.next)
	data := l.Data
	if p.r.opts.Rewrite != nil {
		data = p.r.opts.Rewrite(data)
	}
	if l.Dir == "recv" {
		p.ended = !p.r.expect(where, data)
		return
	}
	p.r.noteSent(data)
	if _, err := io.WriteString(p.r.conn, data); err != nil {
		p.r.t.Errorf("%s: write: %v", where, err)
		p.ended = true
	}
}

type received struct {
	raw []byte
	v   map[string]any
}

type replayer struct {
	t       testing.TB
	conn    net.Conn
	rd      *bufio.Reader
	opts    Options
	replies []received // arrived before the transcript expected them
	events  []received
	cmds    map[string]string // request id -> command
	reqs    map[string]string // request id -> the request as sent, for Options.Poll
	lastCmd string
	pending []byte // a "send" split over several writes
}

// noteSent remembers which command each id belongs to, for Options.Ignore.
func (r *replayer) noteSent(data string) {
	r.pending = append(r.pending, data...)
	dec := json.NewDecoder(bytes.NewReader(r.pending))
	for {
		start := dec.InputOffset()
		var req struct {
			Execute string          `json:"execute"`
			ExecOOB string          `json:"exec-oob"`
			ID      json.RawMessage `json:"id"`
		}
		err := dec.Decode(&req)
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				r.pending = r.pending[dec.InputOffset():]
			} else {
				r.pending = nil // not JSON the transcript expects an answer to by name
			}
			return
		}
		cmd := req.Execute + req.ExecOOB
		r.lastCmd = cmd
		if req.ID != nil {
			r.cmds[idKey(req.ID)] = cmd
			r.reqs[idKey(req.ID)] = string(r.pending[start:dec.InputOffset()])
		}
	}
}

func (r *replayer) expect(where, data string) bool {
	want, err := decode([]byte(data))
	if err != nil {
		r.t.Errorf("%s: transcript: %v", where, err)
		return true
	}
	if name, ok := want["event"].(string); ok {
		if r.opts.IgnoreEvents || slices.Contains(r.opts.DropEvents, name) {
			return true
		}
		got, ok := r.await(where, func(m received) bool { return isEvent(m.v) && m.v["event"] == name }, &r.events)
		if ok {
			r.compare(where, name, want, got)
		}
		return ok
	}
	wantID, hasID := want["id"]
	match := func(m received) bool {
		if isEvent(m.v) {
			return false
		}
		id, ok := m.v["id"]
		return ok == hasID && (!hasID || idKey(id) == idKey(wantID))
	}
	got, ok := r.await(where, match, &r.replies)
	if !ok {
		return false
	}
	msg := r.lastCmd
	switch {
	case want["QMP"] != nil:
		msg = "greeting"
	case hasID:
		msg = r.cmds[idKey(wantID)]
	}
	if hasID {
		k := idKey(wantID)
		if slices.Contains(r.opts.SkipIDs, k) || (r.opts.OnlyIDs != nil && !slices.Contains(r.opts.OnlyIDs, k)) {
			return true
		}
	} else if r.opts.OnlyIDs != nil {
		return true
	}
	if r.opts.Exact {
		if !bytes.Equal(got.raw, []byte(data)) {
			r.t.Errorf("%s: got %q, want %q", where, got.raw, data)
		}
		return true
	}
	if hasID && r.opts.Poll != nil && r.opts.Poll(msg) {
		return r.poll(where, msg, idKey(wantID), want, got, match)
	}
	r.compare(where, msg, want, got)
	return true
}

// poll asks request id again until its reply matches want or the timeout passes.
func (r *replayer) poll(where, msg, id string, want map[string]any, got received, match func(received) bool) bool {
	interval := r.opts.PollInterval
	if interval == 0 {
		interval = 50 * time.Millisecond
	}
	deadline := time.Now().Add(r.opts.Timeout)
	for {
		c := comparer{opts: r.opts, msg: msg, root: want}
		c.diff("", "", want, got.v)
		if len(c.diffs) == 0 || time.Now().After(deadline) {
			r.compare(where, msg, want, got)
			return true
		}
		time.Sleep(interval)
		if _, err := io.WriteString(r.conn, r.reqs[id]+"\n"); err != nil {
			r.t.Errorf("%s: write: %v", where, err)
			return false
		}
		var ok bool
		if got, ok = r.await(where, match, &r.replies); !ok {
			return false
		}
	}
}

// await returns the first message satisfying match, from pool or else from the connection;
// what arrives meanwhile is kept for later expectations.
func (r *replayer) await(where string, match func(received) bool, pool *[]received) (received, bool) {
	if i := slices.IndexFunc(*pool, match); i >= 0 {
		m := (*pool)[i]
		*pool = slices.Delete(*pool, i, i+1)
		return m, true
	}
	for {
		r.conn.SetReadDeadline(time.Now().Add(r.opts.Timeout))
		line, err := r.rd.ReadBytes('\n')
		if err != nil {
			r.t.Errorf("%s: no matching message: %v", where, err)
			return received{}, false
		}
		v, err := decode(line)
		if err != nil {
			r.t.Errorf("%s: server sent %q: %v", where, line, err)
			continue
		}
		m := received{raw: line, v: v}
		if match(m) {
			return m, true
		}
		if isEvent(v) {
			if name, _ := v["event"].(string); !r.opts.IgnoreEvents && !slices.Contains(r.opts.DropEvents, name) {
				r.events = append(r.events, m)
			}
		} else {
			r.replies = append(r.replies, m)
		}
	}
}

func (r *replayer) compare(where, msg string, want map[string]any, got received) {
	c := comparer{opts: r.opts, msg: msg, root: want}
	c.diff("", "", want, got.v)
	for _, d := range c.diffs {
		r.t.Errorf("%s: %s: %s\n\tgot: %s", where, msg, d, bytes.TrimSpace(got.raw))
	}
}

func isEvent(v map[string]any) bool {
	_, ok := v["event"]
	return ok
}

func decode(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v map[string]any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("more than one JSON value")
	}
	if v == nil {
		return nil, errors.New("not a JSON object")
	}
	return v, nil
}

// idKey is how ids are named in Options: a string id as itself, anything else as compact JSON.
func idKey(id any) string {
	switch id := id.(type) {
	case string:
		return id
	case json.RawMessage:
		var s string
		if json.Unmarshal(id, &s) == nil {
			return s
		}
		var v any
		dec := json.NewDecoder(bytes.NewReader(id))
		dec.UseNumber()
		if dec.Decode(&v) == nil {
			return idKey(v)
		}
		return string(id)
	default:
		b, _ := json.Marshal(id)
		return string(b)
	}
}

type comparer struct {
	opts  Options
	msg   string
	root  map[string]any
	diffs []string
}

// ignored says whether the member at path (named key) is compared by presence and type only.
func (c *comparer) ignored(path, key string) bool {
	if slices.Contains(c.opts.IgnoreKeys, key) {
		return true
	}
	// Run-dependent by nature: when an event happened, which build answers.
	switch {
	case path == "timestamp" && isEvent(c.root):
		return true
	case path == "QMP.version":
		return true
	case path == "return.qemu" || path == "return.package":
		if ret, ok := c.root["return"].(map[string]any); ok && ret["qemu"] != nil && ret["package"] != nil {
			return true
		}
	}
	return c.opts.Ignore != nil && path != "" && c.opts.Ignore(c.msg, path)
}

func (c *comparer) diff(path, key string, want, got any) {
	if c.ignored(path, key) {
		if jsonType(want) != jsonType(got) {
			c.diffs = append(c.diffs, fmt.Sprintf("%s: want a %s, got a %s", path, jsonType(want), jsonType(got)))
		}
		return
	}
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			break
		}
		keys := make([]string, 0, len(w)+len(g))
		for k := range w {
			keys = append(keys, k)
		}
		for k := range g {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range slices.Compact(keys) {
			p := k
			if path != "" {
				p = path + "." + k
			}
			wv, inW := w[k]
			gv, inG := g[k]
			switch {
			case !inG:
				c.diffs = append(c.diffs, fmt.Sprintf("%s: missing, want %s", p, show(wv)))
			case !inW && c.opts.MayAdd != nil && c.opts.MayAdd(c.msg, p):
			case !inW:
				c.diffs = append(c.diffs, fmt.Sprintf("%s: unexpected %s", p, show(gv)))
			default:
				c.diff(p, k, wv, gv)
			}
		}
		return
	case []any:
		g, ok := got.([]any)
		if !ok {
			break
		}
		if len(w) != len(g) {
			c.diffs = append(c.diffs, fmt.Sprintf("%s: want %d elements, got %d: want %s, got %s", path, len(w), len(g), show(w), show(g)))
			return
		}
		for i := range w {
			c.diff(fmt.Sprintf("%s[%d]", path, i), key, w[i], g[i])
		}
		return
	case json.Number:
		if g, ok := got.(json.Number); ok && sameNumber(w, g) {
			return
		}
	default:
		if want == got {
			return
		}
	}
	c.diffs = append(c.diffs, fmt.Sprintf("%s: want %s, got %s", path, show(want), show(got)))
}

func sameNumber(a, b json.Number) bool {
	if a == b {
		return true
	}
	fa, errA := a.Float64()
	fb, errB := b.Float64()
	return errA == nil && errB == nil && fa == fb
}

func jsonType(v any) string {
	switch v.(type) {
	case map[string]any:
		return "object"
	case []any:
		return "array"
	case string:
		return "string"
	case json.Number:
		return "number"
	case bool:
		return "boolean"
	case nil:
		return "null"
	default:
		return fmt.Sprintf("%T", v)
	}
}

func show(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	s := string(b)
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return strings.ToValidUTF8(s, "?")
}
