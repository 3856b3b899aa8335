// Package qmp is a client of the QEMU Machine Protocol (QMP), the JSON
// monitor through which a running QEMU (qemu-system-*, qemu-storage-daemon)
// is queried and driven: sauve uses it to take point-in-time copies of a
// VM's drives (fleecing) and to track their writes (dirty bitmaps).
//
// A Client checks that the socket is QEMU's (its greeting), negotiates
// capabilities, and then runs commands (Execute), each with its own id,
// so that commands may be issued from several goroutines; asynchronous
// events go to subscribers (Subscribe). The monitor is untrusted input:
// lines are bounded (MaxLine) and every wait ends with its context or a
// default deadline (CallTimeout).
package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// MaxLine bounds one message of the monitor; a longer one ends the
// connection. QEMU's largest replies (query-named-block-nodes of a VM with
// many drives and bitmaps) are far smaller.
const MaxLine = 16 << 20

// GreetingTimeout is how long Dial waits for the greeting. A monitor that
// another client holds (libvirt keeps its VMs' monitors) accepts the
// connection but greets only once that client is gone.
const GreetingTimeout = 5 * time.Second

// CallTimeout bounds a command whose context has no deadline: QMP
// commands run in QEMU's main loop and return quickly (long work runs as
// jobs), so a monitor silent for this long is stuck.
const CallTimeout = time.Minute

// eventBuffer is how many events a subscriber may leave unread before
// later ones are dropped (and counted): a flood of events never grows
// memory.
const eventBuffer = 1024

// Client is a connection to a QMP monitor. Its methods are safe for
// concurrent use.
type Client struct {
	path    string
	conn    net.Conn
	version Version
	closing sync.Once
	done    chan struct{} // closed when the reader ends

	wmu sync.Mutex // serializes writes

	mu      sync.Mutex
	next    uint64
	pending map[uint64]chan message
	subs    map[*Subscription]struct{}
	err     error // why the connection ended
}

// Dial connects to the QMP monitor listening on the unix socket path,
// reads its greeting and leaves capabilities negotiation mode. A socket
// that does not greet as QEMU does is refused with an error saying so.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to QMP socket %s: %w", path, err)
	}
	c := &Client{path: path, conn: conn, done: make(chan struct{}), pending: map[uint64]chan message{}, subs: map[*Subscription]struct{}{}}
	br := bufio.NewReaderSize(conn, 64<<10)
	if c.version, err = c.greeting(ctx, br); err != nil {
		conn.Close()
		return nil, err
	}
	go c.read(br)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("QMP socket %s: %w", path, err)
	}
	return c, nil
}

// greeting reads and checks the first line of the monitor.
func (c *Client) greeting(ctx context.Context, br *bufio.Reader) (Version, error) {
	wait := GreetingTimeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
		wait = time.Until(d)
	}
	deadline := time.Now().Add(wait)
	c.conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { c.conn.SetReadDeadline(time.Now()) })
	line, err := readLine(br, MaxLine)
	stop()
	c.conn.SetReadDeadline(time.Time{})
	var ne net.Error
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		return Version{}, fmt.Errorf("QMP socket %s: waiting for its greeting: %w", c.path, ctx.Err())
	case errors.As(err, &ne) && ne.Timeout():
		return Version{}, fmt.Errorf("%s sent no QMP greeting within %v: it is not a QEMU monitor, or another client (libvirt?) holds it", c.path, wait.Round(time.Millisecond))
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return Version{}, fmt.Errorf("%s is not a QEMU monitor (QMP) socket: it closed the connection without a greeting", c.path)
	case err != nil:
		return Version{}, fmt.Errorf("%s is not a QEMU monitor (QMP) socket: %w", c.path, err)
	}
	m, err := parseMessage(line)
	if err == nil && m.kind != kindGreeting {
		err = errNotQMP
	}
	if err != nil {
		return Version{}, fmt.Errorf("%s is not a QEMU monitor (QMP) socket: it greeted with %q", c.path, abbreviate(line))
	}
	return m.version, nil
}

// abbreviate returns the start of what an unknown peer sent, for an
// error message.
func abbreviate(b []byte) string {
	b = bytes.TrimSpace(b)
	if len(b) > 60 {
		return string(b[:60]) + "..."
	}
	return string(b)
}

var errLineTooLong = fmt.Errorf("a message longer than %d MiB", MaxLine>>20)

// readLine reads one line of at most max bytes, without its newline.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > max+1 {
			return nil, errLineTooLong
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return bytes.TrimRight(line, "\r\n"), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// Version returns the QEMU version the monitor announced.
func (c *Client) Version() Version { return c.version }

// Path returns the socket's path.
func (c *Client) Path() string { return c.path }

// read dispatches the monitor's lines until the connection ends.
func (c *Client) read(br *bufio.Reader) {
	var err error
	for {
		var line []byte
		if line, err = readLine(br, MaxLine); err != nil {
			break
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var m message
		if m, err = parseMessage(line); err != nil {
			break
		}
		c.dispatch(m)
	}
	c.end(err)
}

func (c *Client) dispatch(m message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch m.kind {
	case kindReply:
		// A reply without an id, or to a command whose caller gave up,
		// has no one waiting.
		if ch, ok := c.pending[m.id]; ok && m.hasID {
			delete(c.pending, m.id)
			ch <- m
		}
	case kindEvent:
		for s := range c.subs {
			s.deliver(m.event)
		}
	}
}

// end records why the connection ended and wakes every waiter.
func (c *Client) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case errors.Is(err, net.ErrClosed):
		err = fmt.Errorf("QMP connection to %s closed", c.path)
	case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
		err = fmt.Errorf("QMP connection to %s closed by QEMU", c.path)
	default:
		err = fmt.Errorf("QMP connection to %s: %w", c.path, err)
	}
	c.err = err
	for id, ch := range c.pending {
		delete(c.pending, id)
		close(ch)
	}
	for s := range c.subs {
		delete(c.subs, s)
		close(s.ch)
	}
	c.conn.Close()
	close(c.done)
}

// request is a command on the wire.
type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        uint64 `json:"id"`
}

// Execute runs command with args (marshalled as its "arguments", nil for
// none) and unmarshals its "return" into result (nil to ignore it). An
// error reply is an *Error. Without a deadline in ctx, the call waits at
// most CallTimeout.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, command, args, result, nil)
}

// ExecuteWithFile is Execute for the commands that take a file descriptor
// along (getfd, add-fd): f is passed with the command (SCM_RIGHTS), and
// QEMU holds its own copy once the command succeeds.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args, result any, f *os.File) error {
	return c.execute(ctx, command, args, result, f)
}

func (c *Client) execute(ctx context.Context, command string, args, result any, f *os.File) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, CallTimeout)
		defer cancel()
	}
	ch := make(chan message, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("QMP %s: %w", command, c.err)
	}
	id := c.next
	c.next++
	c.pending[id] = ch
	c.mu.Unlock()
	b, err := json.Marshal(request{Execute: command, Arguments: args, ID: id})
	if err != nil {
		c.forget(id)
		return fmt.Errorf("QMP %s: %w", command, err)
	}
	if err := c.write(ctx, append(b, '\n'), f); err != nil {
		c.forget(id)
		if cerr := c.closedErr(); cerr != nil && errors.Is(err, net.ErrClosed) {
			// The reader saw the connection end first: say why.
			return fmt.Errorf("QMP %s: %w", command, cerr)
		}
		return fmt.Errorf("QMP %s to %s: %w", command, c.path, err)
	}
	select {
	case m, ok := <-ch:
		if !ok {
			return fmt.Errorf("QMP %s: %w", command, c.closedErr())
		}
		return m.result(command, result)
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("QMP %s to %s: no reply: %w", command, c.path, ctx.Err())
	}
}

func (m message) result(command string, result any) error {
	if m.err != nil {
		e := *m.err
		e.Command = command
		return &e
	}
	if result == nil {
		return nil
	}
	if err := json.Unmarshal(m.ret, result); err != nil {
		return fmt.Errorf("QMP %s: unexpected reply: %w", command, err)
	}
	return nil
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// write sends b whole, with f attached when it is set, or ends the
// connection: a command cut short would garble the next one.
func (c *Client) write(ctx context.Context, b []byte, f *os.File) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	d, _ := ctx.Deadline()
	c.conn.SetWriteDeadline(d)
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Now()) })
	var err error
	if f != nil {
		b, err = c.writeFile(b, f)
	}
	if err == nil && len(b) > 0 {
		_, err = c.conn.Write(b)
	}
	stop()
	if err != nil {
		c.conn.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
			err = ctx.Err()
		}
	}
	return err
}

// writeFile sends the start of b with f attached and returns the rest.
func (c *Client) writeFile(b []byte, f *os.File) ([]byte, error) {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return nil, errors.New("passing a file needs a unix socket")
	}
	n, _, err := uc.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil)
	runtime.KeepAlive(f)
	return b[n:], err
}

// Close ends the connection; commands waiting for a reply fail and
// subscriptions end. It may be called more than once.
func (c *Client) Close() error {
	c.closing.Do(func() { c.conn.Close() })
	<-c.done
	return nil
}

// Done is closed once the connection has ended (Close, or QEMU went
// away); Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, nil while it is open.
func (c *Client) Err() error { return c.closedErr() }

// Subscription receives the monitor's events of some names.
type Subscription struct {
	// C delivers the events, in the order QEMU sent them; it is closed
	// when the subscription or the connection ends.
	C <-chan Event

	c       *Client
	ch      chan Event
	names   map[string]bool
	dropped atomic.Int64
}

// Subscribe starts delivering the events named (every event when none
// is) to a new Subscription. Events its reader leaves unread pile up to a
// bound, after which new ones are dropped and counted (Dropped): a
// subscriber that may miss some queries the state it follows.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, ch: make(chan Event, eventBuffer)}
	s.C = s.ch
	if len(names) > 0 {
		s.names = map[string]bool{}
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		close(s.ch)
		return s
	}
	c.subs[s] = struct{}{}
	return s
}

// deliver runs with c.mu held, so that Close never races a send.
func (s *Subscription) deliver(e Event) {
	if s.names != nil && !s.names[e.Name] {
		return
	}
	select {
	case s.ch <- e:
	default:
		s.dropped.Add(1)
	}
}

// Dropped returns how many events were dropped because C was full.
func (s *Subscription) Dropped() int64 { return s.dropped.Load() }

// Close ends the subscription and closes C. It may be called more than
// once.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if _, ok := s.c.subs[s]; ok {
		delete(s.c.subs, s)
		close(s.ch)
	}
}
