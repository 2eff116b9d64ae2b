package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/migvisor/migvisor/qerr"
)

// Catalog is what the server knows of the QAPI schema (*schema.Schema satisfies it).
type Catalog interface {
	Exists(cmd string) bool
	AllowOOB(cmd string) bool
	// Validate checks cmd's arguments (nil when the request had none) and returns them
	// normalised, always as a JSON object.
	Validate(cmd string, args json.RawMessage) (json.RawMessage, error)
	CommandNames() []string
	Introspect() json.RawMessage
}

// Handler runs a command. args is the normalised argument object. A nil result answers {}; an
// error answers with qerr.As(err). ctx ends when the client hangs up or the server closes, so it
// suits waiting, not work that must outlive the request.
//
// The result is marshalled with encoding/json and written as QEMU writes it. QEMU's member
// order depends on the order members were inserted, so struct fields in schema order (as
// QEMU's visitors insert them) give byte-identical output.
type Handler func(ctx context.Context, args json.RawMessage) (any, error)

// Version is what the greeting and query-version report.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

// Defaults of the Server's limits.
const (
	DefaultOutputLimit = 16 << 20
	DefaultMaxSessions = 64
)

const (
	// queueLimit is how many in-band requests a client with the oob capability may have waiting
	// (QEMU's QMP_REQ_QUEUE_LEN_MAX); without it, reading stops until each reply is out.
	queueLimit = 8
	// flushTimeout bounds how long Close waits for a client to take its last replies.
	flushTimeout = 5 * time.Second
	// inLimit bounds the input read ahead of the parser.
	inLimit = 64 << 10
)

var builtins = []string{"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema"}

// Server is a QMP server: any number of listeners and clients, one session each.
type Server struct {
	// OutputLimit bounds the bytes waiting to be written to one client; a client that lets
	// more pile up is disconnected. Zero means DefaultOutputLimit. Set before Serve.
	OutputLimit int
	// MaxSessions bounds the clients served at once; more wait to be accepted. Zero means
	// DefaultMaxSessions. Set before Serve.
	MaxSessions int
	// Logf, if set, receives what no client can be told: dropped clients, handler panics,
	// events that cannot be marshalled.
	Logf func(format string, args ...any)

	cat     Catalog
	version Version

	mu        sync.Mutex
	handlers  map[string]Handler
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	starting  int        // slots reserved by Serve for connections being accepted
	slotFreed *sync.Cond // on mu: a session ended, or the server closed
	atLimit   bool       // the session limit was logged and not yet left behind
	logged    map[string]bool
	closed    bool
	fdsets    fdsets // add-fd's descriptor sets, server-wide as in QEMU

	// dispatch runs in-band commands one at a time across all clients, as QEMU's single
	// dispatcher does under its big lock; out-of-band commands do not take it.
	dispatch sync.Mutex
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	onPanic  func(any) // tests: surface recovered panics
	onLimit  func()    // tests: Serve waits for a session to end
}

// NewServer returns a server for the commands of cat, reporting version v.
func NewServer(cat Catalog, v Version) *Server {
	s := &Server{
		cat:       cat,
		version:   v,
		handlers:  make(map[string]Handler),
		listeners: make(map[net.Listener]struct{}),
		sessions:  make(map[*session]struct{}),
	}
	s.slotFreed = sync.NewCond(&s.mu)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.handlers["query-version"] = func(context.Context, json.RawMessage) (any, error) {
		return s.versionValue(), nil // built in QEMU's insertion order, see qdictOrder
	}
	s.handlers["query-commands"] = func(context.Context, json.RawMessage) (any, error) {
		type info struct {
			Name string `json:"name"`
		}
		names := s.cat.CommandNames()
		list := make([]info, len(names))
		for i, n := range names {
			list[i] = info{n}
		}
		return list, nil
	}
	s.handlers["query-qmp-schema"] = func(context.Context, json.RawMessage) (any, error) {
		return s.cat.Introspect(), nil
	}
	s.handleFDs()
	return s
}

// Handle registers the handler for command name, replacing any earlier one (the built-in
// queries too). qmp_capabilities belongs to the protocol: a handler for it is ignored.
func (s *Server) Handle(name string, h Handler) {
	if name == "qmp_capabilities" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[name] = h
}

func (s *Server) handler(name string) Handler {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handlers[name]
}

// Missing lists the catalog's commands that have no handler and the handlers whose command
// the catalog does not know, sorted. A complete server returns nothing.
func (s *Server) Missing() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	have := func(n string) bool { return s.handlers[n] != nil || n == "qmp_capabilities" }
	var out []string
	for _, n := range s.cat.CommandNames() {
		if !have(n) {
			out = append(out, n)
		}
	}
	for n := range s.handlers {
		if !s.cat.Exists(n) {
			out = append(out, n)
		}
	}
	if !s.cat.Exists("qmp_capabilities") {
		out = append(out, "qmp_capabilities")
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (s *Server) versionValue() *value {
	num := func(n int) *value { return &value{kind: kindNumber, str: strconv.Itoa(n)} }
	return object(
		"qemu", object("major", num(s.version.Major), "minor", num(s.version.Minor), "micro", num(s.version.Micro)),
		"package", str(s.version.Package))
}

func (s *Server) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

// logOnce logs the first failure of a kind (an event that cannot be marshalled, a handler that
// panics): one that recurs with every emit or request would otherwise flood the log.
func (s *Server) logOnce(key, format string, args ...any) {
	s.mu.Lock()
	seen := s.logged[key]
	if s.logged == nil {
		s.logged = make(map[string]bool)
	}
	s.logged[key] = true
	s.mu.Unlock()
	if !seen {
		s.logf(format, args...)
	}
}

// Serve accepts clients on l until Close; it may run for several listeners at once. It returns
// nil once the server is closed, or the listener's error once it is closed under Serve.
//
// With MaxSessions clients connected it accepts no more, as a QEMU socket chardev stops
// listening while it has its client: further clients wait in the listen backlog and are greeted
// once a session ends. Other accept errors (out of file descriptors, a connection aborted
// before it was accepted, ...) are retried with a growing pause, as net/http does.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var (
		backoff  time.Duration
		failures int
	)
	for {
		if !s.reserveSlot() {
			return nil
		}
		conn, err := l.Accept()
		if err != nil {
			s.releaseSlot()
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			if failures == 0 {
				s.logf("qmp: accepting a client on %v: %v; retrying", l.Addr(), err)
			}
			failures++
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
			}
			continue
		}
		if failures > 0 {
			s.logf("qmp: accepting clients on %v again, after %d failures", l.Addr(), failures)
		}
		backoff, failures = 0, 0
		s.start(conn)
	}
}

// reserveSlot waits until one more session may start, and counts it as starting; false means
// the server closed.
func (s *Server) reserveSlot() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for !s.closed && len(s.sessions)+s.starting >= s.maxSessions() {
		if !s.atLimit {
			s.atLimit = true
			s.logf("qmp: %d clients connected, the most allowed: new clients wait until one leaves", s.maxSessions())
		}
		if s.onLimit != nil {
			s.onLimit()
		}
		s.slotFreed.Wait()
	}
	s.starting++
	return !s.closed
}

func (s *Server) releaseSlot() {
	s.mu.Lock()
	s.starting--
	s.mu.Unlock()
}

func (s *Server) maxSessions() int {
	if s.MaxSessions > 0 {
		return s.MaxSessions
	}
	return DefaultMaxSessions
}

// Close stops the listeners, lets running commands finish and their replies (and the events
// they emitted) reach the clients, closes every session and waits for all goroutines.
// Commands still queued are dropped. Close must not be called from a handler.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	s.slotFreed.Broadcast()
	var err error
	for l := range s.listeners {
		if e := l.Close(); e != nil && err == nil {
			err = e
		}
	}
	sessions := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		sessions = append(sessions, ss)
	}
	s.mu.Unlock()

	s.cancel()
	for _, ss := range sessions {
		ss.shutdown()
	}
	s.wg.Wait()
	s.fdsets.close()
	return err
}

// Emit sends event name to every client that has completed capabilities negotiation. data is
// marshalled with encoding/json; nil means the event has no "data" member.
func (s *Server) Emit(name string, data any) {
	ev := &value{kind: kindObject}
	now := time.Now()
	ev.add("timestamp", object(
		"seconds", &value{kind: kindNumber, str: strconv.FormatInt(now.Unix(), 10)},
		"microseconds", &value{kind: kindNumber, str: strconv.Itoa(now.Nanosecond() / 1000)}))
	ev.add("event", str(name))
	if data != nil {
		d, err := marshalValue(data)
		if err != nil {
			s.logOnce("event "+name, "qmp: event %s dropped: %v", name, err)
			return
		}
		ev.add("data", d)
	}
	msg := append(appendQEMU(nil, ev), '\r', '\n')

	// Under s.mu, so that concurrent events reach every client in the same order.
	s.mu.Lock()
	defer s.mu.Unlock()
	for ss := range s.sessions {
		ss.pushEvent(msg)
	}
}

// marshalValue turns a Go value into the JSON value QEMU's writer would print.
func marshalValue(v any) (*value, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	pv, perr := parseJSON(b)
	if perr != nil {
		return nil, fmt.Errorf("qmp: re-reading %s: %s", b, perr.Desc)
	}
	return pv, nil
}

// start serves conn; the caller has reserved its slot.
func (s *Server) start(conn net.Conn) {
	ss := newSession(s, conn)
	s.mu.Lock()
	s.starting--
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.sessions[ss] = struct{}{}
	s.wg.Add(4)
	s.mu.Unlock()

	greeting := object("QMP", object("version", s.versionValue(), "capabilities", &value{kind: kindArray, elems: &elems{vals: []*value{str("oob")}}}))
	ss.push(append(appendQEMU(nil, greeting), '\r', '\n'))
	go ss.netRead()
	go ss.parse()
	go ss.dispatchLoop()
	go ss.write()
}

func (s *Server) removeSession(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sessions, ss)
	// The burst of refused clients is over once half the slots are free again.
	if len(s.sessions) <= (s.maxSessions()-1)/2 {
		s.atLimit = false
	}
	s.slotFreed.Broadcast()
}

// recovered reports a panic that escaped into the server's own goroutines.
func (s *Server) recovered(where string, r any) {
	s.logf("qmp: panic in %s: %v\n%s", where, r, debug.Stack())
	if s.onPanic != nil {
		s.onPanic(r)
	}
}

func (s *Server) outputLimit() int {
	if s.OutputLimit > 0 {
		return s.OutputLimit
	}
	return DefaultOutputLimit
}

// reply renders a response: the result or the error, and the request's id if it had one.
func reply(ret *value, qe *qerr.Error, id *value) []byte {
	r := &value{kind: kindObject}
	if qe != nil {
		r.add("error", object("class", str(string(qe.Class)), "desc", str(qe.Desc)))
	} else {
		r.add("return", ret)
	}
	if id != nil {
		r.add("id", id)
	}
	return append(appendQEMU(nil, r), '\r', '\n')
}

// capsArgs is the argument object of qmp_capabilities after validation.
type capsArgs struct {
	Enable []string `json:"enable"`
}

// offeredCaps are the capabilities the greeting offers.
var offeredCaps = []string{"oob"}

func capsError(enable []string) *qerr.Error {
	var unavailable []string
	for _, c := range enable {
		if !slices.Contains(offeredCaps, c) {
			unavailable = append(unavailable, c)
		}
	}
	if unavailable == nil {
		return nil
	}
	return qerr.Generic(errCapsNotAvailable, strings.Join(unavailable, ", "))
}
