package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/migvisor/migvisor/unixsock"
)

// Channel is one entry of migrate's / migrate-incoming's "channels".
type Channel struct {
	ChannelType string  `json:"channel-type"`
	Addr        Address `json:"addr"`
}

// Address is MigrationAddress flattened: transport socket (type unix or inet), exec or file.
type Address struct {
	Transport string   `json:"transport"`
	Type      string   `json:"type,omitempty"` // socket: unix, inet, vsock, fd
	Path      string   `json:"path,omitempty"`
	Host      string   `json:"host,omitempty"`
	Port      string   `json:"port,omitempty"`
	Args      []string `json:"args,omitempty"`     // exec: argv
	Filename  string   `json:"filename,omitempty"` // file
	Offset    uint64   `json:"offset,omitempty"`
	Str       string   `json:"str,omitempty"` // socket fd: the name getfd gave the descriptor

	file *os.File // socket fd: the descriptor, taken from the client's table
}

// FDSource hands over the descriptor a client named with getfd (qmp.FDs.Take).
type FDSource func(name string) (*os.File, error)

// takeFD resolves an fd address: the descriptor leaves the client's table for the migration,
// as QEMU's monitor_get_fd takes it. The destination also takes a number for a descriptor
// migvisor inherited (QEMU's monitor_fd_param, for -incoming fd:N). As QEMU 10, only a
// socket or a pipe will do.
func (a *Address) takeFD(src FDSource, incoming bool) error {
	if a.Transport != "socket" || a.Type != "fd" {
		return nil
	}
	var f *os.File
	switch {
	case incoming && a.Str != "" && a.Str[0] >= '0' && a.Str[0] <= '9':
		n, err := strconv.ParseUint(a.Str, 10, 31)
		if err != nil {
			return errFDNumber(a.Str)
		}
		f = os.NewFile(uintptr(n), "fd:"+a.Str)
	case src == nil:
		return errFDNotFound(a.Str)
	default:
		var err error
		if f, err = src(a.Str); err != nil {
			return err
		}
	}
	fi, err := f.Stat()
	if err != nil || fi.Mode()&(os.ModeSocket|os.ModeNamedPipe) == 0 {
		f.Close()
		if err != nil {
			return errFDNumber(a.Str)
		}
		return errFDFile
	}
	a.file = f
	return nil
}

func (a Address) String() string {
	switch {
	case a.Transport == "socket" && a.Type == "unix":
		return "unix:" + a.Path
	case a.Transport == "socket" && a.Type == "fd":
		return "fd:" + a.Str
	case a.Transport == "socket":
		return "tcp:" + net.JoinHostPort(a.Host, a.Port)
	case a.Transport == "exec":
		return "exec:" + strings.Join(a.Args, " ")
	case a.Transport == "file":
		return "file:" + a.Filename
	}
	return a.Transport
}

// ParseURI turns the legacy URI form into an Address: unix:PATH, tcp:HOST:PORT, fd:NAME (a
// descriptor passed with getfd), exec:CMD (run by /bin/sh -c) and file:PATH[,offset=N].
func ParseURI(uri string) (Address, error) {
	scheme, rest, ok := strings.Cut(uri, ":")
	if !ok {
		return Address{}, errUnknownProtocol(uri)
	}
	switch scheme {
	case "unix":
		if rest == "" {
			return Address{}, errInvalidUnixAddress
		}
		return Address{Transport: "socket", Type: "unix", Path: rest}, nil
	case "tcp":
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return Address{}, errParseAddress(rest)
		}
		if port == "" {
			return Address{}, errParsePort(rest)
		}
		return Address{Transport: "socket", Type: "inet", Host: host, Port: port}, nil
	case "fd":
		return Address{Transport: "socket", Type: "fd", Str: rest}, nil
	case "exec":
		return Address{Transport: "exec", Args: []string{"/bin/sh", "-c", rest}}, nil
	case "file":
		name, opt, hasOpt := strings.Cut(rest, ",")
		a := Address{Transport: "file", Filename: name}
		if hasOpt {
			v, found := strings.CutPrefix(opt, "offset=")
			off, err := strconv.ParseUint(v, 0, 64)
			if !found || err != nil {
				return Address{}, errFileOffset(opt)
			}
			a.Offset = off
		}
		return a, nil
	case "rdma", "vsock":
		return Address{}, errUnsupportedTransport(scheme)
	}
	return Address{}, errUnknownProtocol(uri)
}

// pickAddress applies QEMU's rules for the uri/channels pair.
func pickAddress(uri *string, channels []Channel) (Address, error) {
	if (uri == nil) == (channels == nil) {
		return Address{}, errURIOrChannels
	}
	if uri != nil {
		return ParseURI(*uri)
	}
	var main *Channel
	seen := map[string]bool{}
	for i := range channels {
		t := channels[i].ChannelType
		if seen[t] {
			return Address{}, errDuplicateChannel(t)
		}
		seen[t] = true
		if t == "main" {
			main = &channels[i]
		}
	}
	if seen["cpr"] {
		return Address{}, errCPRChannel
	}
	if main == nil {
		return Address{}, errNoMainChannel
	}
	a := main.Addr
	switch {
	case a.Transport == "socket" && (a.Type == "unix" || a.Type == "inet" || a.Type == "fd"):
	case a.Transport == "socket":
		return Address{}, errUnsupportedTransport(a.Type)
	case a.Transport == "exec":
		if len(a.Args) == 0 {
			return Address{}, errExecNoArgs
		}
	case a.Transport == "file":
	default:
		return Address{}, errUnsupportedTransport(a.Transport)
	}
	return a, nil
}

// outgoing is the source's end of a transport.
type outgoing interface {
	io.Writer
	reply() io.Reader // the return path, nil when the transport has none
	finish() error    // the stream is complete: make it durable (close, wait for the command)
	abort()           // unblock writers and readers, drop everything
}

// dial opens the source's end.
func dial(ctx context.Context, a Address) (outgoing, error) {
	switch a.Transport {
	case "socket":
		if a.Type == "fd" {
			return fdOutgoing(a.file)
		}
		network, addr := "unix", a.Path
		if a.Type == "inet" {
			network, addr = "tcp", net.JoinHostPort(a.Host, a.Port)
		}
		if a.Type == "unix" && unixsock.CheckPath(a.Path) != nil {
			return nil, errUnixPathTooLong(a.Path)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, dialErr(a, err)
		}
		setSockBuf(c)
		return &sockOut{c}, nil
	case "file":
		flags := os.O_WRONLY | os.O_CREATE
		if a.Offset == 0 {
			flags |= os.O_TRUNC
		}
		f, err := os.OpenFile(a.Filename, flags, 0o660)
		if err != nil {
			return nil, errCreateFile(a.Filename, err)
		}
		if _, err := f.Seek(int64(a.Offset), io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
		return &fileOut{f: f}, nil
	case "exec":
		pr, pw, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		c, err := startChild(a.Args, func(cmd *exec.Cmd) { cmd.Stdin = pr })
		pr.Close()
		if err != nil {
			pw.Close()
			return nil, errRunCommand(err)
		}
		return &execOut{c: c, w: pw}, nil
	}
	return nil, errUnsupportedTransport(a.Transport)
}

// fdOutgoing is the fd transport's source end: a connected socket is one like any other (with
// its return path), a pipe a plain stream, as QEMU's qio_channel_new_fd tells them apart.
func fdOutgoing(f *os.File) (outgoing, error) {
	if f == nil {
		return nil, errFDNotFound("")
	}
	if c, err := net.FileConn(f); err == nil {
		f.Close() // FileConn holds its own duplicate
		setSockBuf(c)
		return &sockOut{c}, nil
	}
	return &fdOut{f: f}, nil
}

type fdOut struct {
	f    *os.File
	once sync.Once
}

func (o *fdOut) Write(b []byte) (int, error) { return o.f.Write(b) }
func (o *fdOut) reply() io.Reader            { return nil }
func (o *fdOut) finish() error               { return o.f.Close() }
func (o *fdOut) abort()                      { o.once.Do(func() { o.f.Close() }) }

type sockOut struct{ net.Conn }

func (s *sockOut) NetConn() net.Conn { return s.Conn } // for the encoder's writev
func (s *sockOut) reply() io.Reader  { return s.Conn }
func (s *sockOut) finish() error     { return s.Conn.Close() }
func (s *sockOut) abort()            { s.Conn.Close() }

type fileOut struct {
	f    *os.File
	once sync.Once
}

func (f *fileOut) Write(b []byte) (int, error) { return f.f.Write(b) }
func (f *fileOut) reply() io.Reader            { return nil }
func (f *fileOut) finish() error {
	if err := f.f.Sync(); err != nil {
		f.f.Close()
		return err
	}
	return f.f.Close()
}
func (f *fileOut) abort() { f.once.Do(func() { f.f.Close() }) }

type execOut struct {
	c    *child
	w    *os.File
	once sync.Once
}

// Write says why the command stopped reading: its exit status and stderr.
func (e *execOut) Write(b []byte) (int, error) {
	n, err := e.w.Write(b)
	if err != nil {
		err = fmt.Errorf("the migration command stopped reading the stream (%w); %s", err, e.c.describe(childWait))
	}
	return n, err
}
func (e *execOut) reply() io.Reader { return nil }
func (e *execOut) finish() error {
	e.w.Close()
	<-e.c.exited
	if e.c.err != nil {
		return fmt.Errorf("migration command failed: %s", e.c.describe(0))
	}
	return nil
}
func (e *execOut) abort() {
	e.once.Do(func() {
		e.w.Close()
		e.c.kill()
	})
}

// childWait bounds how long a failure waits for the command's exit status.
const childWait = 2 * time.Second

// child is a migration command, run in a process group of its own so that aborting kills what
// it started too (sh -c forks its commands). Its stderr goes to migvisor's, and the end of it
// is kept so that a failure can say why. Its stream end is an *os.File of the caller's: exec
// does not copy it, and nothing closes it under the caller's reads when the command exits.
type child struct {
	cmd    *exec.Cmd
	stderr tail
	exited chan struct{}
	err    error // cmd.Wait's, once exited is closed
}

func startChild(argv []string, stream func(*exec.Cmd)) (*child, error) {
	c := &child{cmd: exec.Command(argv[0], argv[1:]...), exited: make(chan struct{})}
	c.cmd.Stderr = io.MultiWriter(os.Stderr, &c.stderr)
	c.cmd.WaitDelay = childWait // a grandchild holding stderr open does not hold the exit up
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stream(c.cmd)
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

func (c *child) kill() { syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL) }

// describe says how the command ended, waiting for it at most wait, and what it last wrote
// to stderr.
func (c *child) describe(wait time.Duration) string {
	select {
	case <-c.exited:
	case <-time.After(wait):
	}
	select {
	case <-c.exited:
	default:
		return "the command is still running"
	}
	s := "the command exited with status 0"
	if c.err != nil {
		s = "the command ended with " + c.err.Error()
	}
	if t := strings.TrimSpace(c.stderr.String()); t != "" {
		s += fmt.Sprintf("; its stderr: %q", t)
	}
	return s
}

// tail keeps the last tailMax bytes written to it.
type tail struct {
	mu sync.Mutex
	b  []byte
}

const tailMax = 512

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > tailMax {
		t.b = append(t.b[:0], t.b[len(t.b)-tailMax:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// inConn is the destination's end of one incoming stream.
type inConn interface {
	io.Reader
	replyTo() io.Writer // nil when there is no return path
	Close() error
}

// listener waits for the one incoming stream.
type listener interface {
	accept() (inConn, error)
	Close() error
	addresses() []SocketAddress // for query-migrate; nil unless a socket
}

// listen opens the destination's end; errors here reach the migrate-incoming caller.
func listen(a Address) (listener, error) {
	switch a.Transport {
	case "socket":
		if a.Type == "fd" {
			return fdIncoming(a.file)
		}
		network, addr := "unix", a.Path
		if a.Type == "inet" {
			network, addr = "tcp", net.JoinHostPort(a.Host, a.Port)
		} else {
			if unixsock.CheckPath(a.Path) != nil {
				return nil, errUnixPathTooLong(a.Path)
			}
			// A stale socket from an earlier run goes, as QEMU unlinks it; unlike QEMU, no
			// other kind of file is ever removed (bind then finds the address in use).
			if fi, err := os.Lstat(a.Path); err == nil && fi.IsDir() {
				return nil, errUnixUnlink(a.Path, syscall.EISDIR)
			} else if err == nil && fi.Mode()&os.ModeSocket != 0 {
				os.Remove(a.Path)
			}
		}
		l, err := net.Listen(network, addr)
		if err != nil {
			return nil, listenErr(a, err)
		}
		return &sockListener{l: l}, nil
	case "file":
		f, err := os.Open(a.Filename)
		if err != nil {
			return nil, errOpenFile(a.Filename, err)
		}
		if _, err := f.Seek(int64(a.Offset), io.SeekStart); err != nil {
			f.Close()
			return nil, errOpenFile(a.Filename, err)
		}
		return &onceListener{c: fileIn{f}}, nil
	case "exec":
		pr, pw, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		c, err := startChild(a.Args, func(cmd *exec.Cmd) { cmd.Stdout = pw })
		pw.Close()
		if err != nil {
			pr.Close()
			return nil, errRunCommand(err)
		}
		return &onceListener{c: &execIn{c: c, r: pr}}, nil
	}
	return nil, errUnsupportedTransport(a.Transport)
}

// fdIncoming is the fd transport's destination end: the descriptor is the stream itself
// (QEMU's fd_start_incoming_migration), a connected socket with its return path or a pipe.
func fdIncoming(f *os.File) (listener, error) {
	if f == nil {
		return nil, errFDNotFound("")
	}
	if c, err := net.FileConn(f); err == nil {
		f.Close()
		setSockBuf(c)
		return &onceListener{c: sockIn{c}}, nil
	}
	return &onceListener{c: fileIn{f}}, nil
}

// listenErr words a failed listen as QEMU 10 does for the same step (resolve, bind, listen).
func listenErr(a Address, err error) error {
	var sys *os.SyscallError
	step := ""
	if errors.As(err, &sys) {
		step = sys.Syscall
	}
	switch {
	case a.Type == "unix" && step == "bind":
		return errUnixBind(a.Path, err)
	case step == "bind" && errors.Is(err, syscall.EADDRINUSE):
		return errNoPort(err)
	case step == "bind":
		return errInetBind(err)
	case step == "listen":
		return errListenSocket(err)
	case a.Type == "inet" && step == "":
		return errResolve(a.Host, a.Port, err)
	}
	return errInetBind(err)
}

// dialErr words a failed connect as QEMU 10 does.
func dialErr(a Address, err error) error {
	var sys *os.SyscallError
	switch {
	case a.Type == "unix":
		return errConnect(a.Path, err)
	case errors.As(err, &sys):
		return errConnect(a.Host+":"+a.Port, err)
	}
	return errResolve(a.Host, a.Port, err)
}

type sockListener struct{ l net.Listener }

func (s *sockListener) accept() (inConn, error) {
	c, err := s.l.Accept()
	s.l.Close() // one migration per listen, as QEMU
	if err != nil {
		return nil, err
	}
	setSockBuf(c)
	return sockIn{c}, nil
}

// sockBuf is asked of the kernel for both ends' socket buffers (it grants up to its
// net.core.[rw]mem_max). The default, some 200 KiB, holds less than a page run and its
// checksums take, so sender and receiver would take turns instead of working at once.
const sockBuf = 4 << 20

func setSockBuf(c net.Conn) {
	if b, ok := c.(interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}); ok {
		b.SetReadBuffer(sockBuf)
		b.SetWriteBuffer(sockBuf)
	}
}
func (s *sockListener) Close() error { return s.l.Close() }
func (s *sockListener) addresses() []SocketAddress {
	switch a := s.l.Addr().(type) {
	case *net.UnixAddr:
		return []SocketAddress{{Type: "unix", Path: a.Name}}
	case *net.TCPAddr:
		return []SocketAddress{{Type: "inet", Host: a.IP.String(), Port: strconv.Itoa(a.Port)}}
	}
	return nil
}

type sockIn struct{ net.Conn }

func (s sockIn) replyTo() io.Writer { return s.Conn }

type onceListener struct {
	c    inConn
	done bool
}

func (o *onceListener) accept() (inConn, error) {
	if o.done {
		return nil, errors.New("already accepted")
	}
	o.done = true
	return o.c, nil
}
func (o *onceListener) Close() error {
	if !o.done {
		return o.c.Close()
	}
	return nil
}
func (o *onceListener) addresses() []SocketAddress { return nil }

type fileIn struct{ *os.File }

func (fileIn) replyTo() io.Writer { return nil }

type execIn struct {
	c *child
	r *os.File
}

// Read ends the stream with the command's failure, if it failed, rather than a bare EOF.
func (e *execIn) Read(b []byte) (int, error) {
	n, err := e.r.Read(b)
	if err == io.EOF {
		select {
		case <-e.c.exited:
			if e.c.err != nil {
				err = fmt.Errorf("the migration command's stream ended: %s", e.c.describe(0))
			}
		case <-time.After(childWait):
		}
	}
	return n, err
}
func (e *execIn) replyTo() io.Writer { return nil }
func (e *execIn) Close() error {
	e.r.Close()
	e.c.kill()
	<-e.c.exited
	return e.c.err
}

// drain reads and drops what the peer still sends after a refusal, so that closing does not
// reset the connection before the peer has read the refusal.
func drain(r io.Reader, c io.Closer) {
	if d, ok := r.(interface{ SetReadDeadline(time.Time) error }); ok {
		d.SetReadDeadline(time.Now().Add(5 * time.Second))
	}
	io.Copy(io.Discard, r)
	c.Close()
}
