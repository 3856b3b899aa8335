package nbdserve

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/nbd"
)

// Export is one disk the server offers.
type Export struct {
	// Name is what clients ask for; "" is also the default export
	// when no export has that name: the first one.
	Name, Description string
	Size              int64
	ReaderAt          io.ReaderAt
	// Data returns the ranges of [off, off+n) that hold data, in order;
	// the rest reads as zeros. Nil means all of the export holds data.
	Data func(off, n int64) ([]extent.Range, error)
	// Writer, when set, makes the export writable: writes, trims and
	// write-zeroes go to it, and what is read must be what it holds.
	Writer Writer
}

// Writer takes the writes of a writable export.
type Writer interface {
	io.WriterAt
	// Zero makes [off, off+n) read as zeros.
	Zero(off, n int64) error
	// Flush makes every write that returned before it durable.
	Flush() error
}

// Options tune Serve; the zero value is fine.
type Options struct {
	// Workers is the number of requests of one connection handled at
	// once (4 when 0).
	Workers int
	// HandshakeTimeout bounds a connection's handshake (30 s when 0), so
	// a client that connects and says nothing does not hold it for ever.
	HandshakeTimeout time.Duration
	// ReadBudget bounds the bytes of read replies held at once across
	// all connections (256 MiB when 0; at least 32 MiB), so that many
	// clients asking for 32 MiB each wait rather than exhaust memory.
	ReadBudget int64
	// Logf, when set, is told why connections ended abnormally.
	Logf func(format string, args ...any)
	// TLS, when set, is required: a client must upgrade with
	// NBD_OPT_STARTTLS before any other option, and the config decides
	// whom it accepts (client certificates, for sauve serve).
	TLS *tls.Config
	// MaxConns bounds the connections served at once (64 when 0); more
	// are closed as they come, so a client cannot exhaust the server.
	MaxConns int
}

// Limits of what a client may make the server hold or do.
const (
	// maxOption bounds an option's payload: the largest legitimate one
	// is a few names of at most maxName bytes.
	maxOption = 64 << 10
	// maxName is the protocol's limit on names and queries.
	maxName = 4096
	// maxRequest is the largest read, advertised as the maximum block
	// size.
	maxRequest = 32 << 20
	// preferredBlock is the advertised preferred block size.
	preferredBlock = 64 << 10
	// maxDescriptors bounds one block status reply; a client asks again
	// for the rest.
	maxDescriptors = 64 << 10
	// metaAllocation is the context ID of base:allocation, the only one.
	metaAllocation = 1
)

const baseAllocation = "base:allocation"

// transmissionFlags says the export is read-only, so clients send no
// writes, and that concurrent connections see the same data (it never
// changes). NBD_FLAG_SEND_DF only goes with structured replies, as the
// protocol requires.
const transmissionFlags = nbd.TFlagHasFlags | nbd.TFlagReadOnly | nbd.TFlagSendFlush |
	nbd.TFlagSendCache | nbd.TFlagMultiConn

// writableFlags are those of a writable export. Multi-conn still holds:
// every connection writes through the same Writer, whose Flush covers
// all of them.
const writableFlags = nbd.TFlagHasFlags | nbd.TFlagSendFlush | nbd.TFlagSendFUA |
	nbd.TFlagSendTrim | nbd.TFlagWriteZeroes | nbd.TFlagSendCache | nbd.TFlagMultiConn

// Serve accepts connections on ln and serves exports on each until ctx is
// cancelled, which closes ln and every connection; it returns nil then, or
// the error that stopped accepting.
func Serve(ctx context.Context, ln net.Listener, exports []Export, o Options) error {
	if err := checkExports(exports); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := newServer(ctx, exports, o)
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd server: accept on %s: %w", ln.Addr(), err)
			}
			// Out of file descriptors, say: the connections being
			// served will end and free some.
			backoff = min(max(2*backoff, 10*time.Millisecond), time.Second)
			if s.o.Logf != nil {
				s.o.Logf("nbd server: accept on %s: %v; retrying in %v", ln.Addr(), err, backoff)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if !s.conns.TryAcquire(1) {
			if s.o.Logf != nil {
				s.o.Logf("nbd server: refused a connection from %s: %d connections are being served already", remote(conn), s.o.MaxConns)
			}
			conn.Close()
			continue
		}
		wg.Go(func() {
			defer s.conns.Release(1)
			closeConn := context.AfterFunc(ctx, func() { conn.Close() })
			defer closeConn()
			if err := s.serveConn(conn); err != nil && ctx.Err() == nil && s.o.Logf != nil {
				s.o.Logf("nbd server: connection from %s: %v", remote(conn), err)
			}
		})
	}
}

func remote(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "a local client"
}

func checkExports(exports []Export) error {
	if len(exports) == 0 {
		return errors.New("nbd server: no exports")
	}
	seen := make(map[string]bool, len(exports))
	for _, e := range exports {
		switch {
		case len(e.Name) > maxName:
			return fmt.Errorf("nbd server: export name of %d bytes exceeds %d", len(e.Name), maxName)
		case seen[e.Name]:
			return fmt.Errorf("nbd server: two exports named %q", e.Name)
		case e.Size < 0 || e.ReaderAt == nil:
			return fmt.Errorf("nbd server: export %q has no reader or a negative size", e.Name)
		}
		seen[e.Name] = true
	}
	return nil
}

type server struct {
	ctx     context.Context // ends with Serve
	exports []Export
	o       Options
	budget  *semaphore.Weighted // of ReadBudget
	conns   *semaphore.Weighted // of MaxConns
}

func newServer(ctx context.Context, exports []Export, o Options) *server {
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 30 * time.Second
	}
	if o.ReadBudget <= 0 {
		o.ReadBudget = 256 << 20
	}
	o.ReadBudget = max(o.ReadBudget, maxRequest)
	if o.MaxConns <= 0 {
		o.MaxConns = 64
	}
	return &server{ctx: ctx, exports: exports, o: o, budget: semaphore.NewWeighted(o.ReadBudget),
		conns: semaphore.NewWeighted(int64(o.MaxConns))}
}

// find returns the export named name; "" falls back to the first.
func (s *server) find(name string) *Export {
	for i := range s.exports {
		if s.exports[i].Name == name {
			return &s.exports[i]
		}
	}
	if name == "" {
		return &s.exports[0]
	}
	return nil
}

// serveConn runs one connection to its end and closes it.
func (s *server) serveConn(conn net.Conn) error {
	defer conn.Close()
	c := &session{s: s, conn: conn, br: bufio.NewReaderSize(conn, 64<<10), bw: bufio.NewWriterSize(conn, 64<<10)}
	if err := conn.SetDeadline(time.Now().Add(s.o.HandshakeTimeout)); err != nil {
		return fmt.Errorf("set the handshake deadline: %w", err)
	}
	e, err := c.handshake()
	if err != nil || e == nil {
		return err
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("clear the handshake deadline: %w", err)
	}
	c.export = e
	return c.transmit()
}

// session is one client connection's state.
type session struct {
	s    *server
	conn net.Conn
	br   *bufio.Reader

	// wmu keeps each reply whole on the wire.
	wmu sync.Mutex
	bw  *bufio.Writer

	noZeroes   bool
	tls        bool // the connection was upgraded with STARTTLS
	structured bool
	allocation bool // base:allocation was selected
	export     *Export
}

var be = binary.BigEndian

// errAbort ends a handshake the client abandoned: not a failure.
var errAbort = errors.New("client aborted the handshake")

func (c *session) flush(what string) error {
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("send %s: %w", what, err)
	}
	return nil
}

// handshake negotiates until the client picks an export, which it
// returns; nil with a nil error when the client left politely.
func (c *session) handshake() (*Export, error) {
	var b []byte
	b = be.AppendUint64(b, nbd.NBDMagic)
	b = be.AppendUint64(b, nbd.OptMagic)
	b = be.AppendUint16(b, nbd.FlagFixedNewstyle|nbd.FlagNoZeroes)
	c.bw.Write(b)
	if err := c.flush("the greeting"); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, fmt.Errorf("read the client flags: %w", err)
	}
	flags := be.Uint32(cf[:])
	if flags&^uint32(nbd.FlagCFixedNewstyle|nbd.FlagCNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", flags)
	}
	c.noZeroes = flags&nbd.FlagCNoZeroes != 0
	for {
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, fmt.Errorf("read an option: %w", err)
		}
		if m := be.Uint64(h[:]); m != nbd.OptMagic {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt, n := be.Uint32(h[8:]), be.Uint32(h[12:])
		if n > maxOption {
			// Skipping that much would let a client keep us reading;
			// nothing legitimate is that long.
			return nil, fmt.Errorf("option %d of %d bytes exceeds %d", opt, n, maxOption)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("read option %d: %w", opt, err)
		}
		e, err := c.option(opt, data)
		if errors.Is(err, errAbort) {
			return nil, nil
		}
		if err != nil || e != nil {
			return e, err
		}
	}
}

// reply sends one option reply.
func (c *session) reply(opt, typ uint32, data []byte) {
	var b [20]byte
	be.PutUint64(b[:], nbd.RepMagic)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], uint32(len(data)))
	c.bw.Write(b[:])
	c.bw.Write(data)
}

// refuse sends an error reply with a message for people.
func (c *session) refuse(opt, typ uint32, format string, args ...any) error {
	c.reply(opt, typ, fmt.Appendf(nil, format, args...))
	return c.flush("an option reply")
}

func (c *session) ack(opt uint32) error {
	c.reply(opt, nbd.RepAck, nil)
	return c.flush("an option reply")
}

// option answers one option; it returns the export when the client
// chose one and transmission starts.
func (c *session) option(opt uint32, data []byte) (*Export, error) {
	if c.s.o.TLS != nil && !c.tls {
		switch opt {
		case nbd.OptStartTLS:
			return nil, c.startTLS(opt, data)
		case nbd.OptAbort:
		case nbd.OptExportName:
			// No error reply exists for it: close.
			return nil, errors.New("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")
		default:
			return nil, c.refuse(opt, nbd.RepErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
		}
	}
	switch opt {
	case nbd.OptExportName:
		if len(data) > maxName {
			return nil, fmt.Errorf("export name of %d bytes", len(data))
		}
		e := c.s.find(string(data))
		if e == nil {
			// This option has no error reply: the spec says to close.
			return nil, fmt.Errorf("unknown export %q", printable(data))
		}
		var b []byte
		b = be.AppendUint64(b, uint64(e.Size))
		b = be.AppendUint16(b, c.flags(e))
		if !c.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		c.bw.Write(b)
		return e, c.flush("the export's size")
	case nbd.OptAbort:
		c.ack(opt)
		return nil, errAbort
	case nbd.OptList:
		if len(data) != 0 {
			return nil, c.refuse(opt, nbd.RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range c.s.exports {
			var b []byte
			b = be.AppendUint32(b, uint32(len(e.Name)))
			b = append(b, e.Name...)
			b = append(b, e.Description...)
			c.reply(opt, nbd.RepServer, b)
		}
		return nil, c.ack(opt)
	case nbd.OptStartTLS:
		if c.tls {
			return nil, c.refuse(opt, nbd.RepErrInvalid, "TLS is already on")
		}
		return nil, c.refuse(opt, nbd.RepErrPolicy, "TLS is not offered on this socket")
	case nbd.OptInfo, nbd.OptGo:
		return c.infoGo(opt, data)
	case nbd.OptStructuredReply:
		if len(data) != 0 {
			return nil, c.refuse(opt, nbd.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return nil, c.ack(opt)
	case nbd.OptListMetaContext, nbd.OptSetMetaContext:
		return nil, c.metaContext(opt, data)
	}
	return nil, c.refuse(opt, nbd.RepErrUnsup, "option %d is not supported", opt)
}

// startTLS acknowledges NBD_OPT_STARTTLS and runs the TLS handshake;
// negotiation starts again over TLS, forgetting what came before, as
// the protocol requires.
func (c *session) startTLS(opt uint32, data []byte) error {
	if len(data) != 0 {
		return c.refuse(opt, nbd.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	}
	if err := c.ack(opt); err != nil {
		return err
	}
	if c.br.Buffered() != 0 {
		// Bytes sent before the reply would be read as plain text
		// while the client thinks them encrypted.
		return errors.New("data sent after NBD_OPT_STARTTLS before its reply")
	}
	tc := tls.Server(c.conn, c.s.o.TLS)
	if err := tc.HandshakeContext(c.s.ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.conn, c.tls = tc, true
	c.br, c.bw = bufio.NewReaderSize(tc, 64<<10), bufio.NewWriterSize(tc, 64<<10)
	c.structured, c.allocation = false, false
	return nil
}

// parseName reads a 32-bit length and that many bytes of name off b.
func parseName(b []byte) (name string, rest []byte, ok bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := be.Uint32(b)
	if n > maxName || int(n) > len(b)-4 {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}

func (c *session) infoGo(opt uint32, data []byte) (*Export, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 || len(rest) != 2+2*int(be.Uint16(rest)) {
		return nil, c.refuse(opt, nbd.RepErrInvalid, "malformed export name or information requests")
	}
	var wantName, wantDesc bool
	for i := 2; i < len(rest); i += 2 {
		switch be.Uint16(rest[i:]) {
		case nbd.InfoName:
			wantName = true
		case nbd.InfoDescription:
			wantDesc = true
		}
	}
	e := c.s.find(name)
	if e == nil {
		return nil, c.refuse(opt, nbd.RepErrUnknown, "no export named %q", printable([]byte(name)))
	}
	var b []byte
	b = be.AppendUint16(b, nbd.InfoExport)
	b = be.AppendUint64(b, uint64(e.Size))
	b = be.AppendUint16(b, c.flags(e))
	c.reply(opt, nbd.RepInfo, b)
	// Sent whether asked or not: the maximum tells clients to split
	// their requests, and a minimum of 1 constrains nothing.
	b = be.AppendUint16(b[:0], nbd.InfoBlockSize)
	b = be.AppendUint32(b, 1)
	b = be.AppendUint32(b, preferredBlock)
	b = be.AppendUint32(b, maxRequest)
	c.reply(opt, nbd.RepInfo, b)
	if wantName {
		c.reply(opt, nbd.RepInfo, append(be.AppendUint16(nil, nbd.InfoName), e.Name...))
	}
	if wantDesc && e.Description != "" {
		c.reply(opt, nbd.RepInfo, append(be.AppendUint16(nil, nbd.InfoDescription), e.Description...))
	}
	if err := c.ack(opt); err != nil || opt == nbd.OptInfo {
		return nil, err
	}
	return e, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and SET_META_CONTEXT:
// base:allocation is the one context there is.
func (c *session) metaContext(opt uint32, data []byte) error {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return c.refuse(opt, nbd.RepErrInvalid, "malformed meta context request")
	}
	n := be.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for range n {
		q, r, ok := parseName(rest)
		if !ok {
			return c.refuse(opt, nbd.RepErrInvalid, "malformed meta context query")
		}
		queries, rest = append(queries, q), r
	}
	if len(rest) != 0 {
		return c.refuse(opt, nbd.RepErrInvalid, "%d bytes after the meta context queries", len(rest))
	}
	set := opt == nbd.OptSetMetaContext
	if set && !c.structured {
		return c.refuse(opt, nbd.RepErrInvalid, "meta contexts need structured replies")
	}
	if c.s.find(name) == nil {
		return c.refuse(opt, nbd.RepErrUnknown, "no export named %q", printable([]byte(name)))
	}
	match := !set && len(queries) == 0
	for _, q := range queries {
		if q == baseAllocation || !set && q == "base:" {
			match = true
		}
	}
	if set {
		c.allocation = match
	}
	if match {
		c.reply(opt, nbd.RepMetaContext, append(be.AppendUint32(nil, metaAllocation), baseAllocation...))
	}
	return c.ack(opt)
}

// flags are the transmission flags of export e on this connection.
func (c *session) flags(e *Export) uint16 {
	f := uint16(transmissionFlags)
	if e.Writer != nil {
		f = writableFlags
	}
	if c.structured {
		f |= nbd.TFlagSendDF
	}
	return f
}

// printable keeps a client's name fit for a message.
func printable(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}
