package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// Defaults of a server's Config.
const (
	DefaultWindow      = 10 * time.Second
	DefaultMaxWindow   = time.Minute
	DefaultMaxSkew     = 2 * time.Minute
	DefaultHandshake   = 10 * time.Second
	DefaultIdleTimeout = time.Minute
	DefaultMaxSessions = 16
)

// thawTimeout bounds a thaw (the thaw guard answers within seconds, or is
// killed and the mounts thawed from the agent).
const thawTimeout = 30 * time.Second

// Config is what a Server needs.
type Config struct {
	// Key is the agent's own key: its TLS certificate's and its
	// handshake signatures'.
	Key ed25519.PrivateKey
	// Authorized returns the keys allowed to ask. It is called at every
	// connection, so that an edit of the file takes effect at once; an
	// error refuses every caller.
	Authorized func() (*AuthorizedKeys, error)
	// Freezer freezes; one freeze at a time.
	Freezer Freezer
	// Log receives one JSON line per event (nil: no log).
	Log *slog.Logger
	// DefaultWindow is the window of a freeze that asks for none (capped
	// by the key's); MaxWindow the longest a key without a window=
	// option may ask.
	DefaultWindow, MaxWindow time.Duration
	// MaxSkew is how far a caller's clock may be from the agent's.
	MaxSkew time.Duration
	// HandshakeTimeout bounds the handshake; IdleTimeout a session
	// that sends no request (and, after a window ended, the wait for
	// the thaw request that learns it).
	HandshakeTimeout, IdleTimeout time.Duration
	// MaxSessions bounds the connections served at once; more are
	// closed at once.
	MaxSessions int
	// Host and Version are sent to callers in the welcome.
	Host, Version string
	// Now is the clock (tests move it).
	Now func() time.Time
}

// Server is the agent: it authenticates callers and freezes for them.
type Server struct {
	cfg  Config
	pub  PublicKey
	cert tls.Certificate
	log  *slog.Logger
	sem  chan struct{}
	// serialRetry paces the opens of the serial port (tests shorten it).
	serialRetry time.Duration

	mu     sync.Mutex
	holder *holder // the freeze in progress, if any
}

// holder is who holds the freeze, for the message that refuses another.
type holder struct {
	key   string
	addr  string
	since time.Time
	until time.Time
}

// NewServer checks cfg and fills in its defaults.
func NewServer(cfg Config) (*Server, error) {
	if len(cfg.Key) != ed25519.PrivateKeySize {
		return nil, errors.New("agent: no key")
	}
	if cfg.Authorized == nil {
		return nil, errors.New("agent: no authorized keys")
	}
	if cfg.Freezer == nil {
		return nil, errors.New("agent: nothing to freeze")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.DefaultWindow, DefaultWindow)
	def(&cfg.MaxWindow, DefaultMaxWindow)
	def(&cfg.MaxSkew, DefaultMaxSkew)
	def(&cfg.HandshakeTimeout, DefaultHandshake)
	def(&cfg.IdleTimeout, DefaultIdleTimeout)
	if cfg.MaxWindow > MaxWindow || cfg.DefaultWindow > cfg.MaxWindow {
		return nil, fmt.Errorf("agent: windows of %s by default and %s at most: want default <= max <= %s", cfg.DefaultWindow, cfg.MaxWindow, MaxWindow)
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultMaxSessions
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Version == "" {
		cfg.Version = "sauve"
	}
	log := cfg.Log
	if log == nil {
		log = discardLogger()
	}
	cert, err := selfSigned(cfg.Key)
	if err != nil {
		return nil, err
	}
	return &Server{cfg: cfg, pub: PublicOf(cfg.Key), cert: cert, log: log, sem: make(chan struct{}, cfg.MaxSessions), serialRetry: serialRetry}, nil
}

// PublicKey is the agent's key, as callers pin it.
func (s *Server) PublicKey() PublicKey { return s.pub }

// ServeTLS accepts TCP connections on ln, speaks TLS on them, and serves
// each until ctx ends; then it closes ln, thaws, waits for its sessions
// to end and returns nil. Other errors of ln end it too.
func (s *Server) ServeTLS(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	tcfg := serverTLS(s.cert)
	for delay := time.Duration(0); ; {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of file descriptors and the like: wait, as
				// net/http does, instead of spinning or giving up.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		delay = 0
		peer := peerOf(conn)
		if !s.acquire() {
			s.log.Warn("connection refused", logAddr, peer.Addr, logOutcome, outcomeRefused, logReason, fmt.Sprintf("%d connections already", s.cfg.MaxSessions))
			conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.release()
			s.serveTLSConn(ctx, conn, peer, tcfg)
		}()
	}
}

// serveTLSConn runs the TLS handshake, then the session.
func (s *Server) serveTLSConn(ctx context.Context, conn net.Conn, peer Peer, tcfg *tls.Config) {
	tc := tls.Server(conn, tcfg)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		s.log.Warn("refused", logAddr, peer.Addr, logOutcome, outcomeRefused, logReason, "TLS handshake: "+err.Error())
		conn.Close()
		return
	}
	cs := tc.ConnectionState()
	ch := newChannel(tc, peer)
	ch.hasTLS = true
	if ch.exporter, err = exporterOf(cs); err == nil {
		ch.tlsKey, err = certKey(cs)
	}
	if err != nil {
		s.log.Warn("refused", logAddr, peer.Addr, logOutcome, outcomeRefused, logReason, err.Error())
		tc.Close()
		return
	}
	s.serve(ctx, ch)
}

// ServeConn serves one connection without TLS (a unix socket, a pipe in
// tests) and returns when it ends; peer says who is at the other end.
// A transport that keeps bytes across sessions (a serial port) wants
// ServeSerial instead.
func (s *Server) ServeConn(ctx context.Context, rwc io.ReadWriteCloser, peer Peer) {
	s.serve(ctx, newChannel(rwc, peer))
}

func (s *Server) acquire() bool {
	select {
	case s.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

func (s *Server) release() { <-s.sem }

// take makes h the holder of the freeze, or returns the one who holds it.
func (s *Server) take(h *holder) (*holder, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holder != nil {
		cp := *s.holder
		return &cp, false
	}
	s.holder = h
	return nil, true
}

func (s *Server) drop(h *holder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holder == h {
		s.holder = nil
	}
}
