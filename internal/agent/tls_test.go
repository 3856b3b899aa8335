package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// listen serves the world's agent on TLS at a fresh local port.
func (w *world) listen() string {
	w.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		w.t.Fatal(err)
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		if err := w.srv.ServeTLS(w.ctx, ln); err != nil {
			w.t.Error(err)
		}
	}()
	return ln.Addr().String()
}

// Freeze and thaw over TCP and TLS, the agent's key pinned.
func TestTLSFreezeThaw(t *testing.T) {
	w := newWorld(t, `from="127.0.0.1"`)
	addr := w.listen()
	s, err := Dial(context.Background(), "tcp:"+addr, w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Freeze(context.Background(), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	th, err := s.Thaw(context.Background())
	if err != nil || !th.Held {
		t.Fatalf("thaw: %+v %v", th, err)
	}
	w.log.find(t, "auth", map[string]any{logOutcome: outcomeAccepted, logAddr: "~127.0.0.1:"})
}

// The agent presents a certificate with another key than the pinned one:
// the TLS handshake fails, and the error says which keys.
func TestTLSWrongServerKey(t *testing.T) {
	w := newWorld(t, "")
	addr := w.listen()
	cfg := w.callerCfg()
	other := mustKey(t)
	cfg.AgentKey = PublicOf(other)
	_, err := Dial(context.Background(), addr, cfg)
	want := "agent " + addr + ": key " + PublicOf(w.agentKey).Fingerprint() + " is not the pinned key for this agent (pinned: " + PublicOf(other).Fingerprint() + ", the key given)"
	if !errors.Is(err, errPinned) || !strings.Contains(err.Error(), want) {
		t.Fatalf("wrong server key: %v\nwant %s", err, want)
	}
	t.Log(err)
	w.log.find(t, "refused", map[string]any{logOutcome: outcomeRefused, logReason: "~TLS handshake"})
	w.fake.noEvent(t)
}

// The known-agents file: an agent it does not list is refused unless
// the caller asks to trust it; its key is then recorded and checked on
// the next connection; a changed key is refused even with trust-new.
func TestTLSKnownAgents(t *testing.T) {
	w := newWorld(t, "")
	addr := w.listen()
	known := filepath.Join(t.TempDir(), "known_agents")
	cfg := w.callerCfg()
	cfg.AgentKey = PublicKey{}
	cfg.KnownFile = known
	_, err := Dial(context.Background(), addr, cfg)
	if err == nil || !strings.Contains(err.Error(), "is not in "+known) || !strings.Contains(err.Error(), "--trust-new") {
		t.Fatalf("unknown agent: %v", err)
	}
	if _, err := os.Stat(known); !os.IsNotExist(err) {
		t.Errorf("a refused dial wrote the known-agents file: %v", err)
	}
	cfg.TrustNew = true
	s, err := Dial(context.Background(), addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	data, _ := os.ReadFile(known)
	if want := addr + " " + PublicOf(w.agentKey).String() + "\n"; string(data) != want {
		t.Errorf("known agents:\n%s\nwant %s", data, want)
	}
	cfg.TrustNew = false
	s, err = Dial(context.Background(), "agent://"+addr, cfg)
	if err != nil {
		t.Fatalf("dial of a recorded agent: %v", err)
	}
	s.Close()

	// Another agent, another key, at the same address.
	w.cancel()
	w.wg.Wait()
	w2 := newWorld(t, "")
	w2.callerKey = w.callerKey
	w2.auth = w.auth
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("listen again on %s: %v", addr, err)
	}
	w2.wg.Add(1)
	go func() { defer w2.wg.Done(); w2.srv.ServeTLS(w2.ctx, ln) }()
	cfg.TrustNew = true
	_, err = Dial(context.Background(), addr, cfg)
	if !errors.Is(err, errPinned) || !strings.Contains(err.Error(), known+" line 1") {
		t.Fatalf("changed agent key: %v", err)
	}
	t.Log(err)
}

// A caller whose hello names another key than its TLS certificate is
// refused.
func TestTLSHelloKeyMismatch(t *testing.T) {
	w := newWorld(t, "")
	addr := w.listen()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	certCfg := ClientConfig{Key: mustKey(t), AgentKey: PublicOf(w.agentKey)}
	p := pin{key: PublicOf(w.agentKey), isSet: true}
	ch, err := clientTLSChannel(context.Background(), conn, Address{Network: "tcp", Addr: addr}, &certCfg, &p)
	if err != nil {
		t.Fatal(err)
	}
	cfg := w.callerCfg() // the authorized key, not the certificate's
	_, err = newSession(context.Background(), ch, addr, &cfg, func(PublicKey) error { return nil })
	if refusedCode(err) != codeUnauthorized {
		t.Fatalf("hello key is not the certificate's: %v", err)
	}
	w.log.find(t, "auth", map[string]any{logOutcome: outcomeRefused, logReason: "~but the TLS certificate carries"})
	w.fake.noEvent(t)
}

// TLS 1.2 is refused.
func TestTLSOldVersionRefused(t *testing.T) {
	w := newWorld(t, "")
	addr := w.listen()
	cert, _ := selfSigned(w.callerKey)
	c, err := tls.Dial("tcp", addr, &tls.Config{MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
	if err == nil {
		c.Close()
		t.Fatal("a TLS 1.2 handshake succeeded")
	}
}

// Dial's errors name the address and what failed.
func TestDialErrors(t *testing.T) {
	key := mustKey(t)
	cfg := ClientConfig{Key: key, AgentKey: PublicOf(key), Timeout: time.Second}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	for _, tc := range []struct{ addr, want string }{
		{addr, "agent " + addr + ": connect:"},
		{"unix:" + filepath.Join(t.TempDir(), "none.sock"), "agent unix:"},
		{"host:port", "want HOST:PORT"},
		{"", "empty agent address"},
	} {
		_, err := Dial(context.Background(), tc.addr, cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("dial %q: %v, want %q", tc.addr, err, tc.want)
		}
	}
	if _, err := Dial(context.Background(), "127.0.0.1:1", ClientConfig{Key: key}); err == nil || !strings.Contains(err.Error(), "no key to check it by") {
		t.Errorf("dial without a pin: %v", err)
	}
}
