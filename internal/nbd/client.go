package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Options for Dial.
type Options struct {
	// Export is the export's name ("" for the server's default).
	Export string
	// MetaContexts are the metadata contexts to ask for, such as
	// "base:allocation" or "qemu:dirty-bitmap:NAME".
	MetaContexts []string
}

// Extent is one range of a block status reply with its flags.
type Extent struct {
	Offset, Length int64
	Flags          uint32
}

// Client reads one export. ReadAt and BlockStatus are safe for concurrent
// use: requests are multiplexed over the connection by cookie, and one
// goroutine reads the replies.
type Client struct {
	conn     net.Conn
	addr     string
	export   string
	size     int64
	maxReq   int64
	contexts map[string]uint32 // agreed meta contexts by name

	wmu sync.Mutex // serialises requests on the wire
	mu  sync.Mutex
	// calls are the requests awaiting replies, by cookie; err, once set,
	// fails every request.
	calls  map[uint64]*call
	cookie uint64
	err    error
	done   chan struct{}
}

// call is one request in flight.
type call struct {
	typ     uint16
	off     int64
	length  int64
	buf     []byte // read: where the data goes
	covered int64  // read: bytes the replies filled
	ctxID   uint32 // block status: the context asked about
	extents []Extent
	err     error
	done    chan struct{}
}

// Dial connects to the NBD server at address ("unix" or "tcp" network)
// and opens an export. ctx bounds the handshake.
func Dial(ctx context.Context, network, address string, o Options) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("connect to NBD server %s: %w", address, err)
	}
	return open(ctx, conn, address, o)
}

// open negotiates the export on a connected conn.
func open(ctx context.Context, conn net.Conn, address string, o Options) (*Client, error) {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	c := &Client{conn: conn, addr: address, export: o.Export, maxReq: defaultMaxReq,
		contexts: map[string]uint32{}, calls: map[uint64]*call{}, done: make(chan struct{})}
	err := c.handshake(bufio.NewReader(conn), o)
	stop()
	if err != nil && (ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded)) {
		err = fmt.Errorf("no complete NBD handshake before the deadline: %w", err)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("NBD server %s, export %q: %w", address, o.Export, err)
	}
	conn.SetDeadline(time.Time{})
	go c.readReplies()
	return c, nil
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// Contexts lists the meta contexts the server agreed to.
func (c *Client) Contexts() []string {
	out := make([]string, 0, len(c.contexts))
	for n := range c.contexts {
		out = append(out, n)
	}
	return out
}

// ReadAt reads len(p) bytes at off, like a file: a read past the end
// returns what there is and io.EOF.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read of NBD export %q at negative offset %d", c.export, off)
	}
	if off >= c.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if rest := c.size - off; int64(len(p)) > rest {
		want = p[:rest]
	}
	done := 0
	for done < len(want) {
		n := min(int64(len(want)-done), c.maxReq)
		cl := &call{typ: cmdRead, off: off + int64(done), length: n, buf: want[done : done+int(n)]}
		if err := c.do(cl); err != nil {
			return done, fmt.Errorf("read NBD export %q at offset %d: %w", c.export, cl.off, err)
		}
		done += int(n)
	}
	if len(want) < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// BlockStatus asks for the flags of [off, off+length) in metaContext,
// repeating the request until the range is covered, and gives fn the
// extents in order.
func (c *Client) BlockStatus(ctx context.Context, metaContext string, off, length int64, fn func(e Extent) error) error {
	id, ok := c.contexts[metaContext]
	if !ok {
		return fmt.Errorf("NBD export %q: the server did not agree to the meta context %q", c.export, metaContext)
	}
	end := min(off+length, c.size)
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		cl := &call{typ: cmdBlockStatus, off: off, length: min(end-off, 1<<31), ctxID: id}
		if err := c.do(cl); err != nil {
			return fmt.Errorf("block status of NBD export %q at offset %d: %w", c.export, off, err)
		}
		if len(cl.extents) == 0 {
			return fmt.Errorf("block status of NBD export %q at offset %d: the server described nothing", c.export, off)
		}
		for _, e := range cl.extents {
			if e.Offset >= end {
				break
			}
			e.Length = min(e.Length, end-e.Offset)
			if err := fn(e); err != nil {
				return err
			}
			off = e.Offset + e.Length
		}
	}
	return nil
}

// Close ends the session (NBD_CMD_DISC) and closes the connection: calls
// still waiting fail.
func (c *Client) Close() error {
	c.wmu.Lock()
	var hdr [28]byte
	putRequest(hdr[:], cmdDisc, 0, 0, 0)
	c.conn.SetWriteDeadline(time.Now().Add(time.Second))
	c.conn.Write(hdr[:])
	c.wmu.Unlock()
	err := c.conn.Close()
	c.fail(errors.New("the client was closed"))
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		return nil // the connection had ended already (the server closed it)
	}
	return err
}

func putRequest(b []byte, typ uint16, cookie uint64, off int64, length uint32) {
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], 0)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], uint64(off))
	binary.BigEndian.PutUint32(b[24:], length)
}

// do sends a request and waits for its reply.
func (c *Client) do(cl *call) error {
	cl.done = make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.cookie++
	cookie := c.cookie
	c.calls[cookie] = cl
	c.mu.Unlock()
	var hdr [28]byte
	putRequest(hdr[:], cl.typ, cookie, cl.off, uint32(cl.length))
	c.wmu.Lock()
	_, err := c.conn.Write(hdr[:])
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("send request: %w", err))
	}
	<-cl.done
	return cl.err
}

// fail ends the connection's life: every pending call and every later one
// gets err.
func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	c.conn.Close()
	for k, cl := range c.calls {
		cl.err = err
		close(cl.done)
		delete(c.calls, k)
	}
}

// readReplies is the one reader of the connection.
func (c *Client) readReplies() {
	defer close(c.done)
	r := bufio.NewReaderSize(c.conn, 256<<10)
	for {
		if err := c.readReply(r); err != nil {
			c.mu.Lock()
			closed := c.err != nil
			c.mu.Unlock()
			if !closed {
				c.fail(fmt.Errorf("NBD server %s: %w", c.addr, err))
			}
			return
		}
	}
}

// take returns the call a reply's cookie names.
func (c *Client) take(cookie uint64, finish bool) (*call, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl, ok := c.calls[cookie]
	if !ok {
		return nil, fmt.Errorf("protocol error: a reply for cookie %d, which no request has", cookie)
	}
	if finish {
		delete(c.calls, cookie)
	}
	return cl, nil
}

func finish(cl *call, err error) {
	if err == nil && cl.err == nil && cl.typ == cmdRead && cl.covered != cl.length {
		err = fmt.Errorf("protocol error: the replies filled %d of %d bytes", cl.covered, cl.length)
	}
	if cl.err == nil {
		cl.err = err
	}
	close(cl.done)
}
