package agent

import (
	"bufio"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Peer is who is at the other end of a connection, for the allow-list
// and the log.
type Peer struct {
	// Addr is printed in the log: "10.0.0.5:53422",
	// "serial:/dev/virtio-ports/org.sauve.agent.0".
	Addr string
	// IP is the peer's address; not valid when the transport has none.
	IP netip.Addr
	// Serial says the peer is the VM host, on the virtio-serial port.
	Serial bool
}

// peerOf is the peer at the other end of a network connection.
func peerOf(c net.Conn) Peer {
	p := Peer{Addr: c.RemoteAddr().String()}
	if ap, err := netip.ParseAddrPort(p.Addr); err == nil {
		p.IP = ap.Addr().Unmap()
	}
	return p
}

// deadliner is a transport whose reads and writes can time out (net.Conn,
// *os.File on a pollable device).
type deadliner interface {
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// channel is one connection, whatever carries it: TLS, a unix socket, the
// virtio-serial port, a net.Pipe in tests. Every read and write is
// bounded in time: by the transport's deadlines where it has them, else
// by a timer that closes the transport (a peer that stops mid-frame
// must not hold the agent, nor a freeze).
type channel struct {
	rwc      io.ReadWriteCloser
	br       *bufio.Reader
	peer     Peer
	exporter []byte    // TLS exporter; nil without TLS
	tlsKey   PublicKey // the peer's TLS certificate key, when TLS
	hasTLS   bool
	// resync: the transport is a stream that may hold what an earlier
	// session left (the serial port): the first frame is looked for.
	resync bool

	mu        sync.Mutex
	native    bool // rwc takes deadlines
	readTimer *time.Timer
	writeTmr  *time.Timer
	closed    bool
	aborted   bool
}

func newChannel(rwc io.ReadWriteCloser, peer Peer) *channel {
	c := &channel{rwc: rwc, br: bufio.NewReaderSize(rwc, 4096), peer: peer}
	if d, ok := rwc.(deadliner); ok && d.SetReadDeadline(time.Time{}) == nil {
		c.native = true
	}
	return c
}

// setReadDeadline bounds the reads until the next call; zero: unbounded.
func (c *channel) setReadDeadline(t time.Time) { c.setDeadline(t, true) }

func (c *channel) setWriteDeadline(t time.Time) { c.setDeadline(t, false) }

func (c *channel) setDeadline(t time.Time, read bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.aborted {
		// abort stays in force: a deadline set after it must not undo it.
		t = time.Unix(1, 0)
	}
	if c.native {
		d := c.rwc.(deadliner)
		if read {
			_ = d.SetReadDeadline(t)
		} else {
			_ = d.SetWriteDeadline(t)
		}
		return
	}
	if read {
		c.readTimer = c.rearm(c.readTimer, t)
	} else {
		c.writeTmr = c.rearm(c.writeTmr, t)
	}
}

// rearm replaces a fallback timer; c.mu is held.
func (c *channel) rearm(old *time.Timer, t time.Time) *time.Timer {
	if old != nil {
		old.Stop()
	}
	if t.IsZero() || c.closed {
		return nil
	}
	return time.AfterFunc(time.Until(t), c.close)
}

// close closes the transport; it may be called more than once, from any
// goroutine.
func (c *channel) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	for _, t := range []*time.Timer{c.readTimer, c.writeTmr} {
		if t != nil {
			t.Stop()
		}
	}
	c.mu.Unlock()
	_ = c.rwc.Close()
}

// abort makes the pending and future reads and writes fail now (a
// caller's ctx ended), without closing a transport that has deadlines.
func (c *channel) abort() {
	c.mu.Lock()
	c.aborted = true
	native := c.native
	c.mu.Unlock()
	if !native {
		c.close()
		return
	}
	c.setReadDeadline(time.Time{})
	c.setWriteDeadline(time.Time{})
}

// write sends one frame within timeout.
func (c *channel) write(k kind, payload []byte, timeout time.Duration) error {
	c.setWriteDeadline(time.Now().Add(timeout))
	defer c.setWriteDeadline(time.Time{})
	if err := writeFrame(c.rwc, k, payload); err != nil {
		return fmt.Errorf("send %s: %w", k, err)
	}
	return nil
}

// read receives one frame (with the read deadline set before).
func (c *channel) read() (kind, []byte, error) {
	k, p, err := readFrame(c.br)
	if err != nil {
		return 0, nil, readErr(err)
	}
	return k, p, nil
}

// readErr says what a failed read means.
func readErr(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, errProtocol):
		return err
	case errors.Is(err, io.EOF):
		return errors.New("connection closed")
	case errors.As(err, &ne) && ne.Timeout():
		return errors.New("timed out waiting for a message")
	case errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrClosedPipe):
		return errors.New("connection closed")
	}
	return err
}

// sealer signs the session messages one side sends, and opener checks
// those it receives, each counting its direction's messages.
type sealer struct {
	priv ed25519.PrivateKey
	id   [32]byte
	dir  byte
	seq  uint64
}

func (s *sealer) seal(k kind, body []byte) []byte {
	p := sealSession(s.priv, s.id, s.dir, s.seq, k, body)
	s.seq++
	return p
}

type opener struct {
	key PublicKey
	id  [32]byte
	dir byte
	seq uint64
}

func (o *opener) open(k kind, payload []byte) ([]byte, error) {
	if k < kindWelcome {
		return nil, protoErr("a %s message inside a session", k)
	}
	body, err := openSession(o.key, o.id, o.dir, o.seq, k, payload)
	if err != nil {
		return nil, fmt.Errorf("%s message %d: %w (tampered with, replayed or out of order)", k, o.seq, err)
	}
	o.seq++
	return body, nil
}
