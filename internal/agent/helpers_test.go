package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeFreezer records freezes and thaws; its knobs make freezes fail or
// hang.
type fakeFreezer struct {
	mu      sync.Mutex
	active  int // frozen now
	freezes int
	thaws   int
	windows []time.Duration
	events  chan string // "freeze", "thaw"

	failWith  error
	delay     time.Duration // before Freeze returns, ignoring ctx
	thawError error
}

func newFake() *fakeFreezer { return &fakeFreezer{events: make(chan string, 64)} }

func (f *fakeFreezer) Freeze(ctx context.Context, window time.Duration) (Frozen, error) {
	if f.delay > 0 {
		time.Sleep(f.delay)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWith != nil {
		return nil, f.failWith
	}
	f.active++
	f.freezes++
	f.windows = append(f.windows, window)
	f.events <- "freeze"
	return &fakeFrozen{f: f}, nil
}

func (f *fakeFreezer) counts() (active, freezes, thaws int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.active, f.freezes, f.thaws
}

type fakeFrozen struct {
	f    *fakeFreezer
	once sync.Once
}

func (z *fakeFrozen) Report() FreezeReport {
	return FreezeReport{Mounts: []string{"/fake"}, Writers: []WriterReport{{Name: "fake", Detail: "test writer"}}}
}

func (z *fakeFrozen) Thaw(ctx context.Context) error {
	z.once.Do(func() {
		z.f.mu.Lock()
		z.f.active--
		z.f.thaws++
		z.f.mu.Unlock()
		z.f.events <- "thaw"
	})
	return z.f.thawError
}

// waitEvent waits for the fake's next event.
func (f *fakeFreezer) waitEvent(t *testing.T, want string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	select {
	case e := <-f.events:
		if e != want {
			t.Fatalf("freezer: %s, want %s", e, want)
		}
	case <-time.After(within):
		t.Fatalf("freezer: no %s within %v", want, within)
	}
	return time.Since(start)
}

// noEvent checks that nothing was frozen or thawed.
func (f *fakeFreezer) noEvent(t *testing.T) {
	t.Helper()
	select {
	case e := <-f.events:
		t.Fatalf("freezer: unexpected %s", e)
	default:
	}
	if _, n, _ := f.counts(); n != 0 {
		t.Fatalf("freezer: %d freezes", n)
	}
}

// syncBuffer is a log sink tests read while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// lines parses the JSON lines logged so far.
func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// find waits for a log line with msg and the fields of want, and returns it.
func (s *syncBuffer) find(t *testing.T, msg string, want map[string]any) map[string]any {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		for _, l := range s.lines(t) {
			if l["msg"] != msg {
				continue
			}
			ok := true
			for k, v := range want {
				got, has := l[k]
				if sv, isStr := v.(string); isStr && strings.HasPrefix(sv, "~") {
					gs, _ := got.(string)
					ok = ok && has && strings.Contains(gs, sv[1:])
				} else {
					ok = ok && has && got == v
				}
			}
			if ok {
				return l
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line %q with %v in:\n%s", msg, want, s.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// world is an agent and a caller's keys.
type world struct {
	t         *testing.T
	agentKey  ed25519.PrivateKey
	callerKey ed25519.PrivateKey
	auth      *AuthorizedKeys
	fake      *fakeFreezer
	log       *syncBuffer
	srv       *Server
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// mustKey makes a key; t may be nil (fuzz seeds), as GenerateKey fails
// only without a random source.
func mustKey(t testing.TB) ed25519.PrivateKey {
	k, err := GenerateKey()
	if err != nil {
		panic(err)
	}
	return k
}

// newWorld starts an agent whose authorized keys hold the caller's key
// with opts (an authorized-keys options field, "" for none).
func newWorld(t *testing.T, opts string, tweak ...func(*Config)) *world {
	t.Helper()
	w := &world{t: t, agentKey: mustKey(t), callerKey: mustKey(t), fake: newFake(), log: &syncBuffer{}}
	line := PublicOf(w.callerKey).Line("backup@host")
	if opts != "" {
		line = opts + " " + line
	}
	ak, err := ParseAuthorized(strings.NewReader(line+"\n"), "authorized_keys")
	if err != nil {
		t.Fatal(err)
	}
	w.auth = ak
	cfg := Config{Key: w.agentKey, Authorized: func() (*AuthorizedKeys, error) { return w.auth, nil },
		Freezer: w.fake, Log: NewLogger(w.log), Host: "guest1", Version: "sauve test",
		HandshakeTimeout: 2 * time.Second, IdleTimeout: 5 * time.Second}
	for _, f := range tweak {
		f(&cfg)
	}
	w.srv, err = NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	t.Cleanup(func() {
		w.cancel()
		w.wg.Wait()
		if a, _, _ := w.fake.counts(); a != 0 {
			t.Errorf("%d freezes left frozen", a)
		}
	})
	return w
}

var testPeer = Peer{Addr: "10.0.0.5:40000", IP: netip.MustParseAddr("10.0.0.5")}

// pipe serves one connection on a net.Pipe from peer and returns the
// caller's end.
func (w *world) pipe(peer Peer) net.Conn {
	c, s := net.Pipe()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		w.srv.ServeConn(w.ctx, s, peer)
	}()
	return c
}

func (w *world) callerCfg() ClientConfig {
	return ClientConfig{Key: w.callerKey, AgentKey: PublicOf(w.agentKey), Timeout: 2 * time.Second}
}

// session opens an authenticated session over a pipe.
func (w *world) session() *Session {
	w.t.Helper()
	s, err := NewSession(context.Background(), w.pipe(testPeer), "pipe", w.callerCfg())
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { s.Close() })
	return s
}

func refusedCode(err error) string {
	var re *RefusedError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}
