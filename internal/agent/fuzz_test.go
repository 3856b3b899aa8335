package agent

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// Every parser of bytes a peer or a file controls has a fuzz target:
// go test ./internal/agent -fuzz FuzzReadFrame (and the others below).

// seedFrames are frames of every kind, valid and not.
func seedFrames() [][]byte {
	k := mustKey(nil)
	pub := PublicOf(k)
	n := make([]byte, nonceSize)
	var out [][]byte
	for _, f := range []struct {
		k kind
		v any
	}{
		{kindHello, helloMsg{Version: 1, Purpose: PurposeFreeze, Key: pub[:], Nonce: n, Time: 1}},
		{kindChallenge, challengeMsg{Key: pub[:], Nonce: n, Time: 1, Sig: make([]byte, sigSize)}},
		{kindAuth, authMsg{Sig: make([]byte, sigSize)}},
		{kindRefused, refusedMsg{Code: codeBusy, Message: "x"}},
		{kindWelcome, welcomeMsg{Agent: "a", DefaultWindow: 1, MaxWindow: 2}},
		{kindFreeze, freezeMsg{Window: 5}},
		{kindFrozen, frozenMsg{Report: FreezeReport{Mounts: []string{"/"}, Window: 1}}},
		{kindThawed, thawedMsg{Report: ThawReport{Held: true}}},
		{kindError, errorMsg{Code: "c", Message: "m"}},
	} {
		out = append(out, appendFrame(nil, f.k, mustJSON(f.v)))
	}
	return append(out, []byte("SVAG"), []byte("SVAG\x01\xff\xff\xff\xff"), []byte("GET / HTTP/1.1\r\n\r\n"))
}

// decodeAny runs the decoder of a frame's kind, as the agent or the
// caller would, signed frames first opened with a signature check.
func decodeAny(k kind, p []byte) {
	var id [32]byte
	switch k {
	case kindHello:
		decodeHello(p)
	case kindChallenge:
		decodeChallenge(p)
	case kindAuth:
		decodeAuth(p)
	case kindRefused:
		decodeRefused(p)
	default:
		openSession(PublicKey{}, id, dirToAgent, 0, k, p)
		if len(p) >= sigSize {
			p = p[sigSize:]
		}
		switch k {
		case kindWelcome:
			decodeWelcome(p)
		case kindFreeze:
			decodeFreeze(p)
		case kindFrozen:
			decodeFrozen(p)
		case kindThaw:
			decodeThaw(p)
		case kindThawed:
			decodeThawed(p)
		case kindError:
			decodeError(p)
		}
	}
}

func FuzzReadFrame(f *testing.F) {
	for _, s := range seedFrames() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReader(bytes.NewReader(data))
		for {
			k, p, err := readFrame(br)
			if err != nil {
				break
			}
			if len(p) > maxPayload(k) {
				t.Fatalf("a %s payload of %d bytes passed", k, len(p))
			}
			decodeAny(k, p)
		}
		br = bufio.NewReader(bytes.NewReader(data))
		for {
			k, p, _, err := syncFrame(br, -1)
			if err != nil {
				break
			}
			decodeAny(k, p)
		}
	})
}

func FuzzDecodeMessage(f *testing.F) {
	for _, s := range seedFrames() {
		if len(s) > headerSize {
			f.Add(s[4], s[headerSize:])
		}
	}
	f.Fuzz(func(t *testing.T, k byte, payload []byte) {
		decodeAny(kind(k), payload)
		if m, err := decodeRefused(payload); err == nil && strings.ContainsAny(m.Message+m.Code, "\n\r\x1b") {
			t.Fatalf("control characters passed: %q", m.Message)
		}
	})
}

func FuzzParseAuthorizedLine(f *testing.F) {
	k := PublicOf(mustKey(nil))
	for _, s := range []string{k.String(), `from="10.0.0.0/8,192.168.1.5,serial",window=30s ` + k.Line("c"),
		`from="::ffff:10.0.0.0/104" ` + k.String(), `window=1h ` + k.String(), `command="x" ` + k.String(), `from="a,b`, "# c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		a, ok, err := ParseAuthorizedLine(line)
		if err != nil || !ok {
			return
		}
		// What the parser accepts, the writer writes back the same.
		b, ok, err := ParseAuthorizedLine(a.String())
		if err != nil || !ok || b.String() != a.String() || b.Key != a.Key || b.Window != a.Window || b.Serial != a.Serial || len(b.From) != len(a.From) {
			t.Fatalf("%q: parsed as %q, which reads back as %q (%v)", line, a.String(), b.String(), err)
		}
		a.Allows(Peer{IP: testPeer.IP})
		a.Allows(Peer{Serial: true})
	})
}

func FuzzParseKnownLine(f *testing.F) {
	k := PublicOf(mustKey(nil))
	for _, s := range []string{"10.0.0.5:7412 " + k.String(), "unix:/run/a.sock " + k.Line("vm1"), "tcp:[::1]:1 " + k.String(), "h " + k.String()} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		a, ok, err := ParseKnownLine(line)
		if err != nil || !ok {
			return
		}
		b, ok, err := ParseKnownLine(a.String())
		if err != nil || !ok || b.Addr != a.Addr || b.Key != a.Key {
			t.Fatalf("%q: parsed as %q, which reads back as %+v (%v)", line, a.String(), b, err)
		}
	})
}

func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"10.0.0.5:7412", "agent://h", "tcp:[::1]:9", "unix:/x", "::1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAddress(s)
		if err != nil {
			return
		}
		b, err := ParseAddress(a.Key())
		if err != nil || b != a {
			t.Fatalf("%q: %v reads back as %v (%v)", s, a, b, err)
		}
	})
}

// Whatever a peer sends the agent before it authenticates, the agent
// neither panics, nor hangs, nor freezes.
func FuzzAgentHandshake(f *testing.F) {
	for _, s := range seedFrames() {
		f.Add(s)
	}
	fake := newFake()
	srv, err := NewServer(Config{Key: mustKey(nil), Freezer: fake, HandshakeTimeout: 200 * time.Millisecond,
		Authorized: func() (*AuthorizedKeys, error) { return &AuthorizedKeys{}, nil }})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, resync := range []bool{false, true} {
			c, s := net.Pipe()
			done := make(chan struct{})
			go func() {
				ch := newChannel(s, testPeer)
				ch.resync = resync
				srv.serve(context.Background(), ch)
				close(done)
			}()
			go io.Copy(io.Discard, c)
			c.Write(data)
			c.Close()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("the agent hangs")
			}
		}
		if _, n, _ := fake.counts(); n != 0 {
			t.Fatal("froze for an unauthenticated peer")
		}
	})
}

// Whatever an agent (or whoever answers in its place) sends the caller,
// the caller neither panics nor hangs, and opens no session.
func FuzzCallerHandshake(f *testing.F) {
	for _, s := range seedFrames() {
		f.Add(s)
	}
	key := mustKey(nil)
	cfg := ClientConfig{Key: key, AgentKey: PublicOf(key), Timeout: 200 * time.Millisecond}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, resync := range []bool{false, true} {
			c, s := net.Pipe()
			go func() {
				br := bufio.NewReader(s)
				readFrame(br) // the hello
				s.Write(data)
				io.Copy(io.Discard, s)
			}()
			ch := newChannel(c, Peer{Addr: "fuzz"})
			ch.resync = resync
			sess, err := newSession(context.Background(), ch, "fuzz", &cfg, func(PublicKey) error { return nil })
			if err == nil {
				sess.Close()
				t.Fatal("a session opened with an agent that signed nothing")
			}
			s.Close()
		}
	})
}
