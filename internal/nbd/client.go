package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"
)

// Options for Dial.
type Options struct {
	// Export is the export name ("" = the default export).
	Export string
	// MetaContexts are negotiated with NBD_OPT_SET_META_CONTEXT, e.g.
	// "base:allocation", "qemu:dirty-bitmap:NAME"; Contexts says which
	// the server agreed to.
	MetaContexts []string
	// MaxRequest, when positive, caps the length of one read request
	// below the server's maximum block size (itself capped at 32 MiB).
	MaxRequest int
}

// defaultHandshakeTimeout bounds the handshake when Dial's context has no
// deadline, so a server that accepts and says nothing cannot hang it.
const defaultHandshakeTimeout = 30 * time.Second

// discTimeout bounds the sending of NBD_CMD_DISC on Close.
const discTimeout = time.Second

// Client is a connection to one export of an NBD server. Its methods are
// safe for concurrent use: requests from many goroutines share the
// connection, each tagged with its own cookie, and one reader goroutine
// hands each reply to its request.
type Client struct {
	conn   net.Conn
	addr   string
	info   *exportInfo
	maxReq int64
	align  int64

	wmu sync.Mutex // one request on the wire at a time

	mu      sync.Mutex
	pending map[uint64]*request
	cookie  uint64
	err     error // why the connection is unusable; set once
	dead    bool  // the reader has stopped: nothing more completes
	closing bool
	// statusRequests counts block status requests sent (tests read it).
	statusRequests int

	readerDone chan struct{}
}

// request is one command in flight. Only the reader goroutine writes to it
// (and to buf) until done is closed.
type request struct {
	cmd    uint16
	off    int64
	length uint32
	// buf is where a read's data goes; len(buf) == length.
	buf []byte
	// ctxID is the meta context whose extents a block status keeps.
	ctxID uint32

	err     error
	got     spans    // the parts of a read received so far
	extents []Extent // the kept context's extents
	seen    []uint32 // the contexts that sent their status
	done    chan struct{}
}

// Dial connects to the NBD server at address (network "unix" or "tcp")
// and negotiates the export of o. ctx bounds the connection and the
// handshake (30 s when it has no deadline); it does not bound the Client.
func Dial(ctx context.Context, network, address string, o Options) (*Client, error) {
	if err := o.check(network); err != nil {
		return nil, fmt.Errorf("nbd: dial %s %s: %w", network, address, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultHandshakeTimeout)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd: connect to %s %s: %w", network, address, err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	info, err := handshakeConn(ctx, conn, br, o)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd: handshake with %s %s: %w", network, address, err)
	}
	c := newClient(conn, network+":"+address, info, o)
	go c.readLoop(br)
	return c, nil
}

// handshakeConn runs the handshake with conn's deadline following ctx.
func handshakeConn(ctx context.Context, conn net.Conn, br *bufio.Reader, o Options) (*exportInfo, error) {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	info, err := handshake(br, conn, o)
	if !stop() {
		return nil, fmt.Errorf("%w (%w)", ctx.Err(), errOr(err))
	}
	if err != nil {
		return nil, err
	}
	return info, conn.SetDeadline(time.Time{})
}

func errOr(err error) error {
	if err == nil {
		return errors.New("handshake done too late")
	}
	return err
}

func (o Options) check(network string) error {
	if network != "unix" && network != "tcp" {
		return fmt.Errorf("network %q is not unix or tcp", network)
	}
	if len(o.Export) > maxString {
		return fmt.Errorf("export name of %d bytes is longer than %d", len(o.Export), maxString)
	}
	if len(o.MetaContexts) > maxContexts {
		return fmt.Errorf("%d meta contexts asked, at most %d", len(o.MetaContexts), maxContexts)
	}
	for _, m := range o.MetaContexts {
		if m == "" || len(m) > maxString {
			return fmt.Errorf("meta context name %q is empty or too long", m)
		}
	}
	return nil
}

func newClient(conn net.Conn, addr string, info *exportInfo, o Options) *Client {
	return &Client{
		conn:       conn,
		addr:       addr,
		info:       info,
		maxReq:     info.maxRequest(o.MaxRequest),
		align:      info.align(),
		pending:    make(map[uint64]*request),
		readerDone: make(chan struct{}),
	}
}

// Size returns the export's size in bytes.
func (c *Client) Size() int64 { return c.info.size }

// ReadOnly says whether the server refuses writes to the export.
func (c *Client) ReadOnly() bool { return c.info.flags&TFlagReadOnly != 0 }

// Contexts returns the meta contexts the server agreed to.
func (c *Client) Contexts() []string {
	out := make([]string, len(c.info.contexts))
	for i, m := range c.info.contexts {
		out[i] = m.name
	}
	return out
}

// ReadAt implements io.ReaderAt. A read past Size returns the bytes up to
// Size and io.EOF. Reads longer than the server's maximum block size are
// split, and unaligned ones widened to its minimum block size.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd %s: read at negative offset %d", c.addr, off)
	}
	want := int64(len(p))
	if off >= c.info.size {
		if want == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	p = p[:min(want, c.info.size-off)]
	n, err := c.read(p, off)
	if err != nil {
		return n, fmt.Errorf("nbd %s: read %d bytes at offset %d: %w", c.addr, len(p), off, err)
	}
	if int64(n) < want {
		return n, io.EOF
	}
	return n, nil
}

// piece is one read request of a ReadAt: the aligned range [start,
// start+len(buf)) of which p's part [pOff, pOff+pLen) is wanted.
type piece struct {
	req        *request
	buf        []byte
	bounce     bool // buf is not p's own memory
	pOff, pLen int
	err        error
}

// read reads p at off, within the export, as pieces sent all at once and
// then waited for, so a long read costs one round trip. It returns how
// many bytes of p, from its start, were read.
func (c *Client) read(p []byte, off int64) (int, error) {
	pieces := c.sendPieces(p, off)
	n := 0
	var first error
	for _, pc := range pieces {
		err := pc.err
		if err == nil {
			<-pc.req.done // whatever happens, so pc.buf is ours again
			err = pc.req.err
		}
		if err == nil && pc.bounce {
			skip := off + int64(pc.pOff) - pc.req.off
			copy(p[pc.pOff:pc.pOff+pc.pLen], pc.buf[skip:])
		}
		if first == nil && err != nil {
			first = err
		}
		if first == nil {
			n += pc.pLen
		}
	}
	return n, first
}

// sendPieces sends the requests that read p at off: at most maxReq bytes
// each, widened to the minimum block size (into a buffer of their own)
// where p is not aligned. It stops at the first that cannot be sent.
func (c *Client) sendPieces(p []byte, off int64) []piece {
	var pieces []piece
	end := off + int64(len(p))
	for pos := off; pos < end; {
		start := pos / c.align * c.align
		stop := min(end, start+c.maxReq)
		astop := min((stop+c.align-1)/c.align*c.align, c.info.size)
		pc := piece{pOff: int(pos - off), pLen: int(stop - pos)}
		if start == pos && astop == stop {
			pc.buf = p[pc.pOff : pc.pOff+pc.pLen]
		} else {
			pc.buf, pc.bounce = make([]byte, astop-start), true
		}
		pc.req, pc.err = c.send(&request{cmd: CmdRead, off: start, length: uint32(len(pc.buf)), buf: pc.buf})
		pieces = append(pieces, pc)
		if pc.err != nil {
			break
		}
		pos = stop
	}
	return pieces
}

// send registers r under a fresh cookie and writes its request. The
// returned request completes (done is closed) whatever happens, by the
// reader goroutine alone.
func (c *Client) send(r *request) (*request, error) {
	r.done = make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = r
	if r.cmd == CmdBlockStatus {
		c.statusRequests++
	}
	c.mu.Unlock()

	var flags uint16
	b := make([]byte, 0, 28)
	b = binary.BigEndian.AppendUint32(b, RequestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, r.cmd)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, uint64(r.off))
	b = binary.BigEndian.AppendUint32(b, r.length)
	c.wmu.Lock()
	_, err := c.conn.Write(b)
	c.wmu.Unlock()
	if err != nil {
		// The reader fails every pending request, this one too, once
		// the connection is closed.
		c.breakConn(fmt.Errorf("connection to %s lost: send request: %w", c.addr, err))
	}
	return r, nil
}

// breakConn records why the connection is unusable (the first reason
// wins) and closes it, which stops the reader.
func (c *Client) breakConn(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close()
}

// readLoop hands replies to their requests until the connection fails,
// then fails every pending request with the reason.
func (c *Client) readLoop(br *bufio.Reader) {
	defer close(c.readerDone)
	var err error
	for err == nil {
		err = c.readReply(br)
	}
	if !errors.Is(err, ErrProtocol) {
		err = fmt.Errorf("connection to %s lost: %w", c.addr, err)
	}
	c.breakConn(err)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dead = true
	for cookie, r := range c.pending {
		delete(c.pending, cookie)
		r.err = c.err
		close(r.done)
	}
}

// Close sends NBD_CMD_DISC and closes the connection. Requests still
// waiting fail with ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerDone
		return nil
	}
	c.closing = true
	alive := c.err == nil
	if alive {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	if alive {
		c.disconnect()
	}
	c.conn.Close()
	<-c.readerDone
	return nil
}

// disconnect sends NBD_CMD_DISC, not waiting long for a writer that a
// stuck server blocks.
func (c *Client) disconnect() {
	c.conn.SetWriteDeadline(time.Now().Add(discTimeout))
	b := make([]byte, 0, 28)
	b = binary.BigEndian.AppendUint32(b, RequestMagic)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, CmdDisc)
	b = append(b, make([]byte, 20)...)
	c.wmu.Lock()
	c.conn.Write(b)
	c.wmu.Unlock()
}

// contextID returns the ID of the agreed meta context name.
func (c *Client) contextID(name string) (uint32, error) {
	i := slices.IndexFunc(c.info.contexts, func(m metaContext) bool { return m.name == name })
	if i < 0 {
		return 0, fmt.Errorf("nbd %s: meta context %q was not agreed by the server (agreed: %q)", c.addr, name, c.Contexts())
	}
	return c.info.contexts[i].id, nil
}
