package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/migvisor/migvisor/qerr"
)

// Event is an asynchronous QMP event as a client receives it.
type Event struct {
	Name      string
	Data      json.RawMessage // nil when the event has no data
	Timestamp time.Time
}

// EventBuffer is how many events a Client keeps for a slow consumer before it drops the oldest.
const EventBuffer = 1024

// ErrClosed is returned by Execute once the client is closed.
var ErrClosed = errors.New("qmp: client closed")

// Client is a QMP client. Its methods may be called concurrently; replies are matched to
// requests by id.
type Client struct {
	conn     net.Conn
	greeting json.RawMessage
	events   chan Event

	wmu sync.Mutex // one request on the wire at a time

	mu      sync.Mutex
	pending map[string]chan response
	nextID  uint64
	err     error // why the connection ended
	done    chan struct{}
}

type response struct {
	Return json.RawMessage `json:"return"`
	Error  *qerr.Error     `json:"error"`
}

// Dial connects to a QMP server, reads its greeting and negotiates capabilities.
func Dial(ctx context.Context, network, addr string) (*Client, error) {
	c, err := DialRaw(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// DialRaw connects and reads the greeting but leaves the session in capabilities negotiation
// mode, for tests of that mode (Execute "qmp_capabilities" to leave it).
func DialRaw(ctx context.Context, network, addr string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c, err := NewClient(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient runs a client over conn: it reads the greeting and does not negotiate.
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	dec := json.NewDecoder(conn)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	err := dec.Decode(&greeting)
	if !stop() {
		err = errors.Join(ctx.Err(), err)
	}
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		return nil, fmt.Errorf("qmp: reading greeting: %w", err)
	}
	if greeting.QMP == nil {
		return nil, errors.New("qmp: no greeting")
	}
	c := &Client{
		conn:     conn,
		greeting: greeting.QMP,
		events:   make(chan Event, EventBuffer),
		pending:  make(map[string]chan response),
		done:     make(chan struct{}),
	}
	go c.read(dec)
	return c, nil
}

// Greeting is the greeting's "QMP" member: version and capabilities.
func (c *Client) Greeting() json.RawMessage { return c.greeting }

// Events delivers the events the server sends; it is closed when the connection ends. If the
// consumer lags by more than EventBuffer events, the oldest are dropped.
func (c *Client) Events() <-chan Event { return c.events }

// Execute runs cmd with args (nil for none; anything encoding/json marshals to an object) and
// unmarshals the reply's "return" into result (nil to ignore it). A QMP error is returned as a
// *qerr.Error. When ctx ends first, Execute returns ctx's error; the reply is then discarded.
func (c *Client) Execute(ctx context.Context, cmd string, args, result any) error {
	req := struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments,omitempty"`
		ID        string          `json:"id"`
	}{Execute: cmd}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return err
		}
		if string(b) != "null" { // a typed nil means no arguments too
			req.Arguments = b
		}
	}

	if err := ctx.Err(); err != nil {
		return err
	}
	ch := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.nextID++
	req.ID = "migvisor-" + strconv.FormatUint(c.nextID, 10)
	c.pending[req.ID] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, req.ID)
		c.mu.Unlock()
	}()

	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	// A server that stops reading must not hold Execute past ctx; a request cut short
	// leaves the stream unusable, so the connection goes with it.
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Now()) })
	_, err = c.conn.Write(append(b, '\n'))
	if !stop() {
		c.conn.SetWriteDeadline(time.Time{})
	}
	c.wmu.Unlock()
	if err != nil {
		c.conn.Close()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}

	var r response
	select {
	case r = <-ch:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		// The reply may have arrived just before the connection ended (quit's does):
		// select picks among ready cases at random, so look again.
		select {
		case r = <-ch:
		default:
			return c.err
		}
	}
	if r.Error != nil {
		return r.Error
	}
	if result == nil {
		return nil
	}
	return json.Unmarshal(r.Return, result)
}

// Close closes the connection and waits for the reader to stop.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

func (c *Client) read(dec *json.Decoder) {
	var err error
	defer func() {
		c.mu.Lock()
		if errors.Is(err, net.ErrClosed) {
			err = ErrClosed
		}
		c.err = fmt.Errorf("qmp: connection ended: %w", err)
		c.mu.Unlock()
		close(c.events)
		close(c.done)
	}()
	for {
		var m struct {
			response
			ID        json.RawMessage `json:"id"`
			Event     string          `json:"event"`
			Data      json.RawMessage `json:"data"`
			Timestamp struct {
				Seconds      int64 `json:"seconds"`
				Microseconds int64 `json:"microseconds"`
			} `json:"timestamp"`
		}
		if err = dec.Decode(&m); err != nil {
			return
		}
		if m.Event != "" {
			c.deliver(Event{Name: m.Event, Data: m.Data, Timestamp: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)})
			continue
		}
		var id string
		if json.Unmarshal(m.ID, &id) != nil {
			continue // not a reply to this client's requests
		}
		c.mu.Lock()
		ch := c.pending[id]
		c.mu.Unlock()
		select {
		case ch <- m.response: // nil ch (nobody waiting) or a second reply: dropped
		default:
		}
	}
}

// deliver queues an event without ever blocking the reader: the oldest event gives way.
func (c *Client) deliver(e Event) {
	for {
		select {
		case c.events <- e:
			return
		default:
		}
		select {
		case <-c.events:
		default:
		}
	}
}
