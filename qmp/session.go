package qmp

import (
	"context"
	"encoding/json"
	"net"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migvisor/migvisor/qerr"
)

// A session is one client connection, served by four goroutines: netRead reads; parse parses
// and runs exec-oob commands at once (as QEMU's I/O thread does); dispatchLoop runs in-band
// requests, parse errors included, in order; write drains the output queue.
type session struct {
	srv    *Server
	conn   net.Conn
	ctx    context.Context // handlers' context: ends with the connection or the server
	cancel context.CancelFunc
	oob    atomic.Bool // the client enabled the oob capability
	fds    *FDs        // descriptors the client passed, closed with the session

	qmu       sync.Mutex
	qcond     *sync.Cond
	in        []byte // read, not yet parsed
	eof       bool   // the connection has no more input
	queue     []message
	running   bool // dispatchLoop is executing a request
	inputDone bool // parse has stopped
	closing   bool // the session is ending: read and run nothing more

	omu        sync.Mutex
	negotiated bool // guarded by omu, so a reply and the events around it stay in order
	out        [][]byte
	outLen     int
	finished   bool // nothing more will be queued
	dead       bool // the connection is being torn down
	wake       chan struct{}
}

type message struct {
	v   *value
	err *qerr.Error
}

func newSession(srv *Server, conn net.Conn) *session {
	ss := &session{srv: srv, conn: conn, fds: &FDs{}, wake: make(chan struct{}, 1)}
	ss.ctx, ss.cancel = context.WithCancel(context.WithValue(srv.ctx, fdsKey{}, ss.fds))
	ss.qcond = sync.NewCond(&ss.qmu)
	return ss
}

// netRead moves bytes from the connection to ss.in, a bounded buffer, so that a hang-up is
// seen (and handlers' contexts end) even while parsing is suspended behind a running command.
func (ss *session) netRead() {
	defer ss.srv.wg.Done()
	buf := make([]byte, 32<<10)
	uc, _ := ss.conn.(*net.UnixConn)
	var oob []byte
	if uc != nil {
		oob = make([]byte, oobSize)
	}
	for {
		ss.qmu.Lock()
		for len(ss.in) >= inLimit && !ss.closing {
			ss.qcond.Wait()
		}
		closing := ss.closing
		ss.qmu.Unlock()
		if closing {
			return
		}
		n, err := ss.read(uc, buf, oob)
		ss.qmu.Lock()
		ss.in = append(ss.in, buf[:n]...)
		ss.eof = err != nil
		ss.qcond.Broadcast()
		ss.qmu.Unlock()
		if err != nil {
			ss.cancel()
			return
		}
	}
}

// read reads input; descriptors that came with it are kept for the next getfd or add-fd
// (they arrive with the bytes of the command that claims them, so before it runs).
func (ss *session) read(uc *net.UnixConn, buf, oob []byte) (int, error) {
	if uc == nil {
		return ss.conn.Read(buf)
	}
	n, files, err := readFDs(uc, buf, oob)
	if files != nil {
		ss.fds.received(files)
	}
	return n, err
}

// parse feeds the input to the decoder, whose messages go to received.
func (ss *session) parse() {
	defer ss.srv.wg.Done()
	defer func() {
		if r := recover(); r != nil {
			ss.srv.recovered("parser", r)
			ss.kill()
		}
		ss.qmu.Lock()
		ss.inputDone = true
		ss.qcond.Broadcast()
		ss.qmu.Unlock()
	}()
	d := newDecoder(ss.received)
	var chunk []byte
	for {
		ss.qmu.Lock()
		for len(ss.in) == 0 && !ss.eof && !ss.closing {
			ss.qcond.Wait()
		}
		if ss.closing || len(ss.in) == 0 {
			ss.qmu.Unlock()
			return
		}
		chunk, ss.in = ss.in, chunk[:0]
		ss.qcond.Broadcast()
		ss.qmu.Unlock()
		d.feed(chunk)
	}
}

// received takes one message from the decoder. Like QEMU, it stops reading (by blocking the
// decoder) while the in-band queue is full: one request without oob, queueLimit with it.
func (ss *session) received(v *value, err *qerr.Error) {
	ss.qmu.Lock()
	defer ss.qmu.Unlock()
	for !ss.closing && ss.full() {
		ss.qcond.Wait()
	}
	if !ss.closing && v != nil && v.kind == kindObject && v.get("exec-oob") != nil && v.get("execute") == nil {
		ss.qmu.Unlock()
		ss.execute(message{v: v}, true)
		ss.qmu.Lock()
		return
	}
	if ss.closing {
		return
	}
	ss.queue = append(ss.queue, message{v, err})
	ss.qcond.Broadcast()
}

func (ss *session) full() bool {
	if ss.oob.Load() {
		return len(ss.queue) >= queueLimit
	}
	return len(ss.queue) > 0 || ss.running
}

func (ss *session) dispatchLoop() {
	defer ss.srv.wg.Done()
	defer func() {
		if r := recover(); r != nil {
			ss.srv.recovered("dispatcher", r)
			ss.kill()
		}
		ss.omu.Lock()
		ss.finished = true
		ss.omu.Unlock()
		ss.signal()
	}()
	for {
		ss.qmu.Lock()
		for len(ss.queue) == 0 && !ss.inputDone && !ss.closing {
			ss.qcond.Wait()
		}
		if len(ss.queue) == 0 || ss.closing {
			ss.qmu.Unlock()
			return
		}
		m := ss.queue[0]
		ss.queue[0] = message{}
		ss.queue = ss.queue[1:]
		ss.running = true
		ss.qcond.Broadcast()
		ss.qmu.Unlock()

		ss.execute(m, false)

		ss.qmu.Lock()
		ss.running = false
		ss.qcond.Broadcast()
		ss.qmu.Unlock()
	}
}

// execute answers one message: QEMU's qmp_dispatch, checks in its order.
func (ss *session) execute(m message, oob bool) {
	if m.err != nil {
		ss.push(reply(nil, m.err, nil))
		return
	}
	v := m.v
	if v.kind != kindObject {
		ss.push(reply(nil, qerr.Generic(errNotObject), nil))
		return
	}
	id := v.get("id")
	ss.omu.Lock()
	negotiating := !ss.negotiated
	ss.omu.Unlock()

	name, qe := ss.checkRequest(v)
	if qe == nil {
		qe = ss.run(name, v, oob, negotiating, id)
	}
	if qe == nil {
		return // run sent the reply
	}
	if negotiating && qe.Class == qerr.CommandNotFound {
		// Before negotiation every other command is unknown; QEMU says why.
		qe = qerr.New(qerr.CommandNotFound, errExpectingNegotiation)
	}
	ss.push(reply(nil, qe, id))
}

// checkRequest validates the request envelope, visiting members in QEMU's QDict order, and
// returns the command name.
func (ss *session) checkRequest(v *value) (string, *qerr.Error) {
	allowOOB := ss.oob.Load()
	execKey := ""
	for _, i := range qdictOrder(v) {
		k, val := v.elems.keys[i], v.elems.vals[i]
		switch {
		case k == "execute" || (k == "exec-oob" && allowOOB):
			if val.kind != kindString {
				return "", errMustBeString(k)
			}
			if execKey != "" {
				return "", errClash(k, execKey)
			}
			execKey = k
		case k == "arguments":
			if val.kind != kindObject {
				return "", qerr.Generic(errArgsObject)
			}
		case k == "id":
		default:
			return "", errUnexpectedMember(k)
		}
	}
	if execKey == "" {
		return "", qerr.Generic(errLacksExecute)
	}
	return v.get(execKey).str, nil
}

// run executes command name and sends its reply, or returns the error to send.
func (ss *session) run(name string, req *value, oob, negotiating bool, id *value) *qerr.Error {
	srv := ss.srv
	if negotiating {
		if name != "qmp_capabilities" {
			return errCommandNotFound(name)
		}
	} else if !srv.cat.Exists(name) || (name != "qmp_capabilities" && srv.handler(name) == nil) {
		return errCommandNotFound(name)
	}
	if oob && !srv.cat.AllowOOB(name) {
		return errNoOOB(name)
	}
	var args json.RawMessage
	if a := req.get("arguments"); a != nil {
		args = appendRaw(nil, a)
	}
	norm, err := srv.cat.Validate(name, args)
	if err != nil {
		return qerr.As(err)
	}
	if name == "qmp_capabilities" {
		return ss.capabilities(norm, negotiating, id)
	}

	if !oob {
		srv.dispatch.Lock()
		defer srv.dispatch.Unlock()
	}
	res, err := ss.call(name, srv.handler(name), norm)
	if err != nil {
		return qerr.As(err)
	}
	ret, isValue := res.(*value)
	switch {
	case res == nil:
		ret = object()
	case !isValue:
		if ret, err = marshalValue(res); err != nil {
			srv.logf("qmp: %s: result: %v", name, err)
			return qerr.Generic("%v", err)
		}
	}
	ss.push(reply(ret, nil, id))
	return nil
}

// call runs a handler; a panic becomes an error reply instead of taking the daemon down.
func (ss *session) call(name string, h Handler, args json.RawMessage) (res any, err error) {
	defer func() {
		if r := recover(); r != nil {
			ss.srv.logOnce("panic "+name, "qmp: %s: handler panicked: %v\n%s", name, r, debug.Stack())
			res, err = nil, qerr.Generic("internal error: %v", r)
		}
	}()
	return h(ss.ctx, args)
}

func (ss *session) capabilities(norm json.RawMessage, negotiating bool, id *value) *qerr.Error {
	if !negotiating {
		return qerr.New(qerr.CommandNotFound, errAlreadyNegotiated)
	}
	var a capsArgs
	if err := json.Unmarshal(norm, &a); err != nil {
		return qerr.Generic("%v", err)
	}
	if qe := capsError(a.Enable); qe != nil {
		return qe
	}
	ss.qmu.Lock()
	ss.oob.Store(slices.Contains(a.Enable, "oob"))
	ss.qcond.Broadcast()
	ss.qmu.Unlock()
	// The reply and the switch to command mode are one step for Emit.
	ss.omu.Lock()
	ss.negotiated = true
	ss.pushLocked(reply(object(), nil, id))
	ss.omu.Unlock()
	return nil
}

// push queues msg for the client; a client whose queue overflows is disconnected.
func (ss *session) push(msg []byte) {
	ss.omu.Lock()
	ss.pushLocked(msg)
	ss.omu.Unlock()
}

func (ss *session) pushEvent(msg []byte) {
	ss.omu.Lock()
	if ss.negotiated {
		ss.pushLocked(msg)
	}
	ss.omu.Unlock()
}

func (ss *session) pushLocked(msg []byte) {
	if ss.dead {
		return
	}
	// One message always fits, however large; beyond that the limit holds.
	if len(ss.out) > 0 && ss.outLen+len(msg) > ss.srv.outputLimit() {
		ss.srv.logf("qmp: client %v dropped: more than %d bytes of output waiting", ss.conn.RemoteAddr(), ss.srv.outputLimit())
		// The writer is likely stuck in a write: closing the connection frees it, and it
		// finishes the teardown.
		ss.dead = true
		ss.signal()
		ss.cancel()
		ss.conn.Close()
		return
	}
	ss.out = append(ss.out, msg)
	ss.outLen += len(msg)
	ss.signal()
}

func (ss *session) signal() {
	select {
	case ss.wake <- struct{}{}:
	default:
	}
}

func (ss *session) write() {
	defer ss.srv.wg.Done()
	defer func() {
		ss.kill()
		ss.srv.removeSession(ss)
		ss.fds.close()
	}()
	for {
		ss.omu.Lock()
		for len(ss.out) == 0 && !ss.finished && !ss.dead {
			ss.omu.Unlock()
			<-ss.wake
			ss.omu.Lock()
		}
		if ss.dead || len(ss.out) == 0 {
			ss.omu.Unlock()
			return
		}
		bufs := net.Buffers(ss.out)
		ss.out, ss.outLen = nil, 0
		ss.omu.Unlock()
		if _, err := bufs.WriteTo(ss.conn); err != nil {
			return
		}
	}
}

// kill tears the connection down: the reader fails, queued work is dropped, the writer stops.
func (ss *session) kill() {
	ss.omu.Lock()
	ss.dead = true
	ss.omu.Unlock()
	ss.signal()
	ss.qmu.Lock()
	ss.closing = true
	ss.qcond.Broadcast()
	ss.qmu.Unlock()
	ss.cancel()
	ss.conn.Close()
}

// shutdown is the server closing: stop reading, let the running command finish, flush.
func (ss *session) shutdown() {
	ss.qmu.Lock()
	ss.closing = true
	ss.qcond.Broadcast()
	ss.qmu.Unlock()
	now := time.Now()
	ss.conn.SetReadDeadline(now)
	ss.conn.SetWriteDeadline(now.Add(flushTimeout))
}
