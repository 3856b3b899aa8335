// Package netx holds the network plumbing the remote backends share: TCP
// connections that fail when the peer goes silent instead of hanging
// forever, and an HTTP client sized for many concurrent transfers.
//
// A stalled connection (a peer or middlebox that stops sending without
// closing) is the fault a retry cannot see unless something times it out;
// a per-request deadline would have to be as long as the slowest legitimate
// 32 MiB upload, so instead every read and write must make progress within
// an idle timeout.
package netx

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
	"time"
)

// DefaultIdleTimeout is how long a connection may make no progress.
const DefaultIdleTimeout = 60 * time.Second

// idleConn fails a Read or Write that makes no progress for timeout.
type idleConn struct {
	net.Conn
	timeout time.Duration
}

func (c *idleConn) Read(p []byte) (int, error) {
	if err := c.Conn.SetReadDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *idleConn) Write(p []byte) (int, error) {
	// A large write is split so that each piece has the full timeout:
	// the deadline bounds silence, not the size of the buffer.
	var done int
	for done < len(p) {
		end := min(len(p), done+1<<20)
		if err := c.Conn.SetWriteDeadline(time.Now().Add(c.timeout)); err != nil {
			return done, err
		}
		n, err := c.Conn.Write(p[done:end])
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// Dialer dials TCP connections with an idle timeout.
type Dialer struct {
	Timeout time.Duration // idle timeout; also bounds connection set-up
}

// DialContext dials addr and wraps the connection.
func (d Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = DefaultIdleTimeout
	}
	nd := net.Dialer{Timeout: min(timeout, 30*time.Second), KeepAlive: 30 * time.Second}
	c, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &idleConn{Conn: c, timeout: timeout}, nil
}

// HTTPClient returns a client for conns concurrent requests to one
// service, whose connections time out after idle of silence. It does not
// retry: the backends' retry wrapper does.
func HTTPClient(conns int, idle time.Duration) *http.Client {
	tr := &http.Transport{Proxy: http.ProxyFromEnvironment, ForceAttemptHTTP2: true}
	ConfigureTransport(tr, conns, idle)
	return &http.Client{Transport: tr}
}

// ConfigureTransport sets up tr as HTTPClient does (for SDKs that build
// their own transport).
func ConfigureTransport(tr *http.Transport, conns int, idle time.Duration) {
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	tr.DialContext = Dialer{Timeout: idle}.DialContext
	tr.MaxIdleConns = conns * 2
	tr.MaxIdleConnsPerHost = conns * 2
	tr.IdleConnTimeout = 90 * time.Second
	tr.TLSHandshakeTimeout = min(idle, 30*time.Second)
	tr.ResponseHeaderTimeout = idle
	tr.ExpectContinueTimeout = time.Second
	// Large buffers: packs are tens of MiB and the default 4 KiB costs a
	// system call per page.
	tr.WriteBufferSize = 256 << 10
	tr.ReadBufferSize = 256 << 10
}

// Cause returns the network error inside the wrappers that net/http and
// the SDKs put around it (their messages repeat the whole request URL),
// or err itself.
func Cause(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) && ue.Err != nil {
		return ue.Err
	}
	return err
}
