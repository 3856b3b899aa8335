package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// Refusals: each is logged with the caller's key and address and why,
// the caller hears a clear error, and nothing is frozen.
func TestRefusals(t *testing.T) {
	stranger := mustKey(t)
	for _, tc := range []struct {
		name     string
		opts     string
		peer     Peer
		cfg      func(w *world, c *ClientConfig)
		tweak    func(*Config)
		code     string // refusal code, or "" for a caller-side error
		errHas   string
		logHas   string // in the log's reason
		noLogKey bool
	}{
		{name: "unknown key", cfg: func(w *world, c *ClientConfig) { c.Key = stranger },
			code: codeUnauthorized, errHas: "is not authorized from 10.0.0.5:40000", logHas: "unknown key"},
		{name: "address not allowed", opts: `from="192.168.1.0/24,10.1.0.5"`,
			code: codeUnauthorized, errHas: "is not authorized from 10.0.0.5:40000", logHas: `address not allowed: authorized_keys line 1 allows from="192.168.1.0/24,10.1.0.5"`},
		{name: "serial not allowed", opts: `from="10.0.0.0/8"`, peer: Peer{Addr: "serial:/dev/vport0p1", Serial: true},
			code: codeUnauthorized, errHas: "is not authorized from serial:", logHas: "address not allowed"},
		{name: "stale timestamp", cfg: func(w *world, c *ClientConfig) { c.Now = func() time.Time { return time.Now().Add(-10 * time.Minute) } },
			code: codeClock, errHas: "10m0s behind", logHas: "10m0s behind"},
		{name: "future timestamp", cfg: func(w *world, c *ClientConfig) { c.Now = func() time.Time { return time.Now().Add(3 * time.Minute) } },
			code: codeClock, errHas: "3m0s ahead", logHas: "3m0s ahead"},
		{name: "authorized keys unreadable", tweak: func(c *Config) {
			c.Authorized = func() (*AuthorizedKeys, error) {
				return nil, errors.New("authorized_keys:3: unknown option \"command\"")
			}
		}, code: codeUnavailable, errHas: "cannot read its authorized keys", logHas: `unknown option`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tweaks := []func(*Config){}
			if tc.tweak != nil {
				tweaks = append(tweaks, tc.tweak)
			}
			w := newWorld(t, tc.opts, tweaks...)
			cfg := w.callerCfg()
			if tc.cfg != nil {
				tc.cfg(w, &cfg)
			}
			peer := testPeer
			if tc.peer.Addr != "" {
				peer = tc.peer
			}
			_, err := NewSession(context.Background(), w.pipe(peer), "pipe", cfg)
			if err == nil {
				t.Fatal("session opened")
			}
			if got := refusedCode(err); got != tc.code || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("error %q (code %q), want code %q and %q", err, got, tc.code, tc.errHas)
			}
			t.Log(err)
			w.log.find(t, "auth", map[string]any{logOutcome: outcomeRefused, logAddr: peer.Addr,
				logKey: PublicOf(cfg.Key).Fingerprint(), logReason: "~" + tc.logHas})
			w.fake.noEvent(t)
		})
	}
}

// A serial peer is admitted by a from= list that names "serial", and by
// a key without one.
func TestSerialFromAllowed(t *testing.T) {
	for _, opts := range []string{`from="10.0.0.0/8,serial"`, ""} {
		w := newWorld(t, opts)
		peer := Peer{Addr: "serial:/dev/vport0p1", Serial: true}
		s, err := NewSession(context.Background(), w.pipe(peer), "pipe", w.callerCfg())
		if err != nil {
			t.Fatalf("%q: %v", opts, err)
		}
		s.Close()
	}
}

// The agent at the address has another key than the pinned one: the
// caller stops before it signs anything.
func TestWrongAgentKey(t *testing.T) {
	w := newWorld(t, "")
	cfg := w.callerCfg()
	other := mustKey(t)
	cfg.AgentKey = PublicOf(other)
	_, err := NewSession(context.Background(), w.pipe(testPeer), "10.0.0.9:7412", cfg)
	want := "agent 10.0.0.9:7412: key " + PublicOf(w.agentKey).Fingerprint() + " is not the pinned key for this agent (pinned: " + PublicOf(other).Fingerprint()
	if !errors.Is(err, errPinned) || !strings.Contains(err.Error(), want) {
		t.Fatalf("wrong agent key: %v\nwant %s", err, want)
	}
	t.Log(err)
	w.log.find(t, "handshake failed", map[string]any{logAddr: testPeer.Addr})
	w.fake.noEvent(t)
}

// The agent's clock is far from the caller's: the caller refuses its
// challenge (a stale answer).
func TestAgentClockSkew(t *testing.T) {
	w := newWorld(t, "", func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(10 * time.Minute) }
		c.MaxSkew = time.Hour
	})
	_, err := NewSession(context.Background(), w.pipe(testPeer), "pipe", w.callerCfg())
	if err == nil || !strings.Contains(err.Error(), "its clock is 10m0s ahead") {
		t.Fatalf("agent 10 minutes ahead: %v", err)
	}
	w.fake.noEvent(t)
}

// tap records what a caller writes.
type tap struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (t *tap) Write(p []byte) (int, error) {
	t.mu.Lock()
	t.out.Write(p)
	t.mu.Unlock()
	return t.Conn.Write(p)
}

// rawAgent is a connection to the agent that a test drives byte by byte;
// what the agent sends is collected until it closes.
type rawAgent struct {
	conn net.Conn
	got  chan []byte
}

func (w *world) raw(peer Peer) *rawAgent {
	c := w.pipe(peer)
	r := &rawAgent{conn: c, got: make(chan []byte, 1)}
	go func() {
		b, _ := io.ReadAll(c)
		r.got <- b
	}()
	return r
}

// frames waits for the agent to close and returns the frames it sent.
func (r *rawAgent) frames(t *testing.T, within time.Duration) []kind {
	t.Helper()
	select {
	case b := <-r.got:
		var ks []kind
		br := bufio.NewReader(bytes.NewReader(b))
		for {
			k, _, err := readFrame(br)
			if err != nil {
				return ks
			}
			ks = append(ks, k)
		}
	case <-time.After(within):
		t.Fatalf("the agent did not close the connection within %v", within)
	}
	return nil
}

// A recorded session replayed whole: the agent's nonce is new, so the
// recorded signature does not verify; nothing is frozen.
func TestReplayRefused(t *testing.T) {
	w := newWorld(t, "")
	c := &tap{Conn: w.pipe(testPeer)}
	s, err := NewSession(context.Background(), c, "pipe", w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	w.fake.waitEvent(t, "freeze", time.Second)
	w.fake.waitEvent(t, "thaw", time.Second)

	r := w.raw(testPeer)
	go r.conn.Write(c.out.Bytes())
	ks := r.frames(t, 3*time.Second)
	if len(ks) != 2 || ks[0] != kindChallenge || ks[1] != kindRefused {
		t.Errorf("the agent answered a replay with %v", ks)
	}
	w.log.find(t, "auth", map[string]any{logOutcome: outcomeRefused, logReason: "~bad signature", logKey: PublicOf(w.callerKey).Fingerprint()})
	if _, n, _ := w.fake.counts(); n != 1 {
		t.Errorf("%d freezes, the replay froze", n)
	}
}

// callerSide runs the caller's handshake by hand on a raw connection, so
// that a test can sign what an honest caller would not.
func callerSide(t *testing.T, c net.Conn, key ed25519.PrivateKey, exporter []byte) []kind {
	t.Helper()
	tr := &transcript{purpose: PurposeFreeze, exporter: exporter, callerKey: PublicOf(key), callerNon: make([]byte, nonceSize), callerTime: time.Now().UnixNano()}
	rand.Read(tr.callerNon)
	h := helloMsg{Version: 1, Purpose: PurposeFreeze, Key: tr.callerKey[:], Nonce: tr.callerNon, Time: tr.callerTime}
	if err := writeFrame(c, kindHello, mustJSON(h)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	k, p, err := readFrame(br)
	if err != nil || k != kindChallenge {
		t.Fatalf("challenge: %v %v", k, err)
	}
	ch, err := decodeChallenge(p)
	if err != nil {
		t.Fatal(err)
	}
	tr.agentKey, tr.agentNon, tr.agentTime = PublicKey(ch.Key), ch.Nonce, ch.Time
	go writeFrame(c, kindAuth, mustJSON(authMsg{Sig: tr.sign(roleCaller, key)}))
	var ks []kind
	for {
		k, _, err := readFrame(br)
		if err != nil {
			return ks
		}
		ks = append(ks, k)
	}
}

// A relay: a party in the middle holds a TLS connection to each side
// and passes the messages on. Each side's exporter is its own
// connection's, so neither signature verifies at the other end.
func TestRelayRefused(t *testing.T) {
	w := newWorld(t, "")
	exporterA, exporterC := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)

	// The caller side: the agent's signature (over its exporter) fails.
	toAgent, agentEnd := net.Pipe()
	chA := newChannel(agentEnd, testPeer)
	chA.exporter = exporterA
	w.wg.Add(1)
	go func() { defer w.wg.Done(); w.srv.serve(w.ctx, chA) }()
	toRelay, relayEnd := net.Pipe()
	go io.Copy(toAgent, relayEnd)
	go io.Copy(relayEnd, toAgent)
	chC := newChannel(toRelay, Peer{Addr: "relay"})
	chC.exporter = exporterC
	cfg := w.callerCfg()
	_, err := newSession(context.Background(), chC, "10.0.0.1:7412", &cfg, func(k PublicKey) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "bad signature on its challenge") {
		t.Fatalf("caller through a relay: %v", err)
	}

	// The agent side: a caller's signature over the other connection's
	// exporter is refused.
	c, s := net.Pipe()
	chA2 := newChannel(s, testPeer)
	chA2.exporter = exporterA
	w.wg.Add(1)
	go func() { defer w.wg.Done(); w.srv.serve(w.ctx, chA2) }()
	if ks := callerSide(t, c, w.callerKey, exporterC); len(ks) != 1 || ks[0] != kindRefused {
		t.Errorf("the agent answered a relayed auth with %v", ks)
	}
	w.log.find(t, "auth", map[string]any{logOutcome: outcomeRefused, logReason: "~bad signature"})
	w.fake.noEvent(t)
}

// The same hand-made handshake with the right exporter works: the
// refusal above is the exporter's doing.
func TestCallerSideHandshake(t *testing.T) {
	w := newWorld(t, "")
	c, s := net.Pipe()
	ch := newChannel(s, testPeer)
	ch.exporter = bytes.Repeat([]byte{1}, 32)
	w.wg.Add(1)
	go func() { defer w.wg.Done(); w.srv.serve(w.ctx, ch) }()
	go func() { time.Sleep(300 * time.Millisecond); c.Close() }()
	if ks := callerSide(t, c, w.callerKey, ch.exporter); len(ks) == 0 || ks[0] != kindWelcome {
		t.Errorf("an honest hand-made handshake got %v", ks)
	}
}

// tamperer passes frames from the caller to the agent, flipping a byte of
// the first freeze request's body.
func tamperer(callerEnd, agentEnd net.Conn) {
	go func() {
		io.Copy(callerEnd, agentEnd)
		callerEnd.Close()
	}()
	br := bufio.NewReader(callerEnd)
	done := false
	for {
		k, p, err := readFrame(br)
		if err != nil {
			agentEnd.Close()
			return
		}
		if k == kindFreeze && !done {
			p[len(p)-2] ^= 1 // inside the JSON: {"window_ns":1000000000}
			done = true
		}
		if writeFrame(agentEnd, k, p) != nil {
			return
		}
	}
}

// A freeze request changed in transit fails its signature: the agent
// ends the session, freezes nothing, and logs why.
func TestTamperedRequest(t *testing.T) {
	w := newWorld(t, "")
	a, b := net.Pipe()
	go tamperer(b, w.pipe(testPeer))
	s, err := NewSession(context.Background(), a, "pipe", w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(context.Background(), time.Second); err == nil {
		t.Fatal("a tampered freeze request was answered")
	}
	w.log.find(t, "session end", map[string]any{logKey: PublicOf(w.callerKey).Fingerprint(), logReason: "~freeze message 0: bad signature (tampered with, replayed or out of order)"})
	w.fake.noEvent(t)
}

// Session messages replayed within the session, or reordered, fail too.
func TestSessionReplayRefused(t *testing.T) {
	w := newWorld(t, "")
	c := &tap{Conn: w.pipe(testPeer)}
	s, err := NewSession(context.Background(), c, "pipe", w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	before := c.out.Len()
	c.mu.Unlock()
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	freezeFrame := append([]byte(nil), c.out.Bytes()[before:]...)
	c.mu.Unlock()
	// The freeze and thaw frames again, as the caller's next messages.
	go c.Conn.Write(freezeFrame)
	w.log.find(t, "session end", map[string]any{logReason: "~freeze message 2: bad signature"})
	if _, n, _ := w.fake.counts(); n != 1 {
		t.Errorf("%d freezes: the replayed request froze", n)
	}
}

// Bytes that are not the protocol: the agent closes quickly, logs why,
// allocates nothing for a length it was told, and freezes nothing.
func TestGarbageRefused(t *testing.T) {
	header := func(k kind, n uint32) []byte {
		return binary.BigEndian.AppendUint32(append(frameMagic[:], byte(k)), n)
	}
	for _, tc := range []struct {
		name   string
		send   []byte
		closeW bool // close the caller's side after sending
		within time.Duration
		logHas string
		refuse bool // a refused frame is sent back
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: agent\r\n\r\n"), false, time.Second, "not a sauve agent frame", false},
		{"oversized", header(kindHello, 1<<31), false, time.Second, "more than its limit", false},
		{"unknown kind", header(99, 10), false, time.Second, "unknown message kind 99", false},
		{"session frame first", append(header(kindFreeze, 2), "{}"...), false, time.Second, "first message is a freeze", true},
		{"bad json", append(header(kindHello, 1), '{'), false, time.Second, "not valid JSON", true},
		{"short key", append(header(kindHello, 35), `{"v":1,"key":"AAAA","nonce":"AAAA"}`...), false, time.Second, "key is 3 bytes", true},
		{"version", append(header(kindHello, 8), `{"v":2}`+" "...), false, time.Second, "speaks protocol version 1, not 2", true},
		{"truncated header", []byte("SVA"), false, 3 * time.Second, "timed out", false},
		{"truncated payload", append(header(kindHello, 100), "0123456789"...), false, 3 * time.Second, "timed out", false},
		{"cut payload", append(header(kindHello, 100), "0123456789"...), true, time.Second, "cut short", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, "", func(c *Config) { c.HandshakeTimeout = 500 * time.Millisecond })
			r := w.raw(testPeer)
			go func() {
				r.conn.Write(tc.send)
				if tc.closeW {
					r.conn.Close()
				}
			}()
			ks := r.frames(t, tc.within)
			if tc.refuse != (len(ks) == 1 && ks[0] == kindRefused) {
				t.Errorf("the agent answered %v", ks)
			}
			msg := "handshake failed"
			if tc.refuse {
				msg = "auth"
			}
			w.log.find(t, msg, map[string]any{logAddr: testPeer.Addr, logOutcome: outcomeRefused, logReason: "~" + tc.logHas})
			w.fake.noEvent(t)
		})
	}
}

// A peer that floods the agent with more connections than it serves at
// once is turned away at the door.
func TestTooManyConnections(t *testing.T) {
	w := newWorld(t, "", func(c *Config) { c.MaxSessions = 2 })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w.wg.Add(1)
	go func() { defer w.wg.Done(); w.srv.ServeTLS(w.ctx, ln) }()
	var conns []net.Conn
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		defer c.Close()
	}
	w.log.find(t, "connection refused", map[string]any{logReason: "~2 connections already"})
	for _, c := range conns {
		c.Close()
	}
	// Freed again: a caller gets in.
	time.Sleep(100 * time.Millisecond)
	cfg := w.callerCfg()
	s, err := Dial(context.Background(), ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}
