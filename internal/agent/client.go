package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Defaults of a ClientConfig.
const (
	DefaultClientTimeout = 10 * time.Second
)

// ClientConfig is what a caller needs to talk to an agent.
type ClientConfig struct {
	// Key is the caller's key, which the agent's authorized keys list.
	Key ed25519.PrivateKey
	// AgentKey, when set, is the key the agent must prove it holds.
	// Otherwise KnownFile lists agents by address (known.go).
	AgentKey  PublicKey
	KnownFile string
	// TrustNew, with KnownFile, accepts the key of an agent that the file
	// does not list and records it there (pinning on first use). Only
	// when asked for: the first connection is then not authenticated.
	TrustNew bool
	// Timeout bounds connecting, each handshake step and each answer
	// but the freeze's (which the window bounds). Default 10s.
	Timeout time.Duration
	// MaxSkew is how far the agent's clock may be from ours.
	MaxSkew time.Duration
	// Now is the clock (tests move it).
	Now func() time.Time
}

func (c *ClientConfig) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return DefaultClientTimeout
}

func (c *ClientConfig) maxSkew() time.Duration {
	if c.MaxSkew > 0 {
		return c.MaxSkew
	}
	return DefaultMaxSkew
}

func (c *ClientConfig) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// AgentInfo is what the agent said of itself when the session opened.
type AgentInfo struct {
	Key           PublicKey
	Agent, Host   string
	DefaultWindow time.Duration
	// MaxWindow is the longest freeze this caller's key may ask.
	MaxWindow time.Duration
}

// pin is the key expected of the agent at an address.
type pin struct {
	key   PublicKey
	where string // where it was pinned, for errors
	isSet bool
	trust bool // no key known: take the one presented and record it
}

// resolvePin finds the key expected of the agent at a (an Address.Key).
func resolvePin(a string, cfg *ClientConfig) (pin, error) {
	if cfg.AgentKey != (PublicKey{}) {
		return pin{key: cfg.AgentKey, where: "the key given", isSet: true}, nil
	}
	if cfg.KnownFile == "" {
		return pin{}, fmt.Errorf("agent %s: no key to check it by: give the agent's public key, or a known-agents file", a)
	}
	ka, err := LoadKnown(cfg.KnownFile)
	if err != nil {
		return pin{}, err
	}
	if k, ok := ka.Lookup(a); ok {
		return pin{key: k.Key, where: fmt.Sprintf("%s line %d", cfg.KnownFile, k.Line), isSet: true}, nil
	}
	if !cfg.TrustNew {
		return pin{}, fmt.Errorf("agent %s is not in %s: give its public key (the .pub file its 'sauve agent keygen' wrote), or trust the key it presents on this first connection and record it (--trust-new)", a, cfg.KnownFile)
	}
	return pin{trust: true}, nil
}

// check fails for a key that is not the pinned one.
func (p *pin) check(addr string, k PublicKey) error {
	if !p.isSet || k == p.key {
		return nil
	}
	return &pinError{fmt.Sprintf("agent %s: key %s is not the pinned key for this agent (pinned: %s, %s); if the agent's key changed on purpose, update the pin",
		addr, k.Fingerprint(), p.key.Fingerprint(), p.where)}
}

// Dial connects to the agent at addr (HOST:PORT, tcp:HOST:PORT or
// unix:PATH; see ParseAddress) and authenticates both ways.
func Dial(ctx context.Context, addr string, cfg ClientConfig) (*Session, error) {
	if len(cfg.Key) != ed25519.PrivateKeySize {
		return nil, errors.New("agent client: no key")
	}
	a, err := ParseAddress(addr)
	if err != nil {
		return nil, err
	}
	p, err := resolvePin(a.Key(), &cfg)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, cfg.timeout())
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(dctx, a.Network, a.Addr)
	if err != nil {
		return nil, fmt.Errorf("agent %s: connect: %w", a, err)
	}
	var ch *channel
	check := func(k PublicKey) error { return p.check(a.Key(), k) }
	if a.Network == "tcp" {
		if ch, err = clientTLSChannel(dctx, conn, a, &cfg, &p); err != nil {
			return nil, err
		}
		tlsKey := ch.tlsKey
		check = func(k PublicKey) error {
			if k != tlsKey {
				return &pinError{fmt.Sprintf("agent %s: its challenge names key %s, its TLS certificate %s", a, k.Fingerprint(), tlsKey.Fingerprint())}
			}
			return nil
		}
	} else {
		ch = newChannel(conn, Peer{Addr: a.Key()})
		ch.resync = true
	}
	s, err := newSession(ctx, ch, a.Key(), &cfg, check)
	if err != nil {
		return nil, err
	}
	if p.trust {
		if err := AppendKnown(cfg.KnownFile, KnownAgent{Addr: a.Key(), Key: s.agentKey}); err != nil {
			s.Close()
			return nil, fmt.Errorf("agent %s: record its key: %w", a, err)
		}
	}
	return s, nil
}

// clientTLSChannel runs TLS on conn, checking the agent's certificate
// key against p.
func clientTLSChannel(ctx context.Context, conn net.Conn, a Address, cfg *ClientConfig, p *pin) (*channel, error) {
	cert, err := selfSigned(cfg.Key)
	if err != nil {
		conn.Close()
		return nil, err
	}
	var pinErr error
	tc := tls.Client(conn, clientTLS(cert, func(k PublicKey) error {
		pinErr = p.check(a.Key(), k)
		return pinErr
	}))
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		if pinErr != nil {
			// The TLS alert says less than the pin's check.
			return nil, pinErr
		}
		return nil, fmt.Errorf("agent %s: TLS: %w", a, err)
	}
	cs := tc.ConnectionState()
	ch := newChannel(tc, Peer{Addr: a.Key()})
	ch.hasTLS = true
	if ch.exporter, err = exporterOf(cs); err == nil {
		ch.tlsKey, err = certKey(cs)
	}
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("agent %s: %w", a, err)
	}
	return ch, nil
}

// NewSession authenticates to an agent over a transport the caller
// opened itself, without TLS (a virtio-serial chardev socket that QEMU
// gave, a pipe in tests). addr names the agent in errors and in the
// known-agents file; cfg must pin its key (AgentKey, or KnownFile
// listing addr; TrustNew does not apply). rwc is closed when the
// session ends or fails.
func NewSession(ctx context.Context, rwc io.ReadWriteCloser, addr string, cfg ClientConfig) (*Session, error) {
	if len(cfg.Key) != ed25519.PrivateKeySize {
		rwc.Close()
		return nil, errors.New("agent client: no key")
	}
	cfg.TrustNew = false
	p, err := resolvePin(addr, &cfg)
	if err != nil {
		rwc.Close()
		return nil, err
	}
	ch := newChannel(rwc, Peer{Addr: addr})
	ch.resync = true
	return newSession(ctx, ch, addr, &cfg, func(k PublicKey) error { return p.check(addr, k) })
}

// newSession runs the handshake on ch, abandoning it when ctx ends.
func newSession(ctx context.Context, ch *channel, addr string, cfg *ClientConfig, check pinCheck) (*Session, error) {
	stop := context.AfterFunc(ctx, ch.abort)
	s, err := callerHandshake(ch, addr, cfg, check)
	if !stop() || ctx.Err() != nil {
		ch.close()
		return nil, fmt.Errorf("agent %s: %w", addr, ctx.Err())
	}
	if err != nil {
		ch.close()
		return nil, err
	}
	return s, nil
}
