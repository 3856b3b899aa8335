package agent

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// A freeze asked, a thaw asked within the window: held, and every step
// logged with the caller's key and address.
func TestFreezeThawHeld(t *testing.T) {
	w := newWorld(t, "")
	s := w.session()
	if info := s.Info(); info.Host != "guest1" || info.DefaultWindow != DefaultWindow || info.MaxWindow != DefaultMaxWindow || info.Key != PublicOf(w.agentKey) {
		t.Errorf("welcome: %+v", info)
	}
	rep, err := s.Freeze(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	if rep.Window != DefaultWindow || len(rep.Mounts) != 1 || rep.Mounts[0] != "/fake" || len(rep.Writers) != 1 || rep.Writers[0].Name != "fake" {
		t.Errorf("report %+v", rep)
	}
	if w.fake.windows[0] != DefaultWindow {
		t.Errorf("the freezer was given a window of %v", w.fake.windows[0])
	}
	th, err := s.Thaw(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "thaw", time.Second)
	if !th.Held || th.Reason != ThawRequest || th.Frozen <= 0 || th.Error != "" {
		t.Errorf("thaw report %+v", th)
	}
	fp, addr := PublicOf(w.callerKey).Fingerprint(), testPeer.Addr
	w.log.find(t, "auth", map[string]any{logKey: fp, logAddr: addr, logOutcome: outcomeAccepted})
	w.log.find(t, "freeze", map[string]any{logKey: fp, logAddr: addr, logOutcome: outcomeFrozen, "window": "10s"})
	w.log.find(t, "thaw", map[string]any{logKey: fp, logAddr: addr, logOutcome: outcomeThawed, "held": true, logReason: ThawRequest})

	// The session goes on: a second freeze and thaw.
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "thaw", time.Second)
}

// The window ends before the thaw request: the agent thaws at its end,
// and the thaw's answer says the copy is not quiesced.
func TestWindowExpiryThaws(t *testing.T) {
	w := newWorld(t, "")
	s := w.session()
	start := time.Now()
	if _, err := s.Freeze(context.Background(), 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	w.fake.waitEvent(t, "thaw", 2*time.Second)
	if d := time.Since(start); d < 250*time.Millisecond || d > 1500*time.Millisecond {
		t.Errorf("thawed %v after a freeze of 300ms", d)
	}
	th, err := s.Thaw(context.Background())
	if !errors.Is(err, ErrNotQuiesced) || th.Held || th.Reason != ThawWindow || !strings.Contains(th.Error, "ended before the thaw request") {
		t.Fatalf("thaw after the window: %+v, %v", th, err)
	}
	t.Log(err)
	w.log.find(t, "thaw", map[string]any{logReason: ThawWindow, "held": false})
	// And the session can freeze again.
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// The caller's connection drops while frozen: thawed at once.
func TestConnectionDropThaws(t *testing.T) {
	w := newWorld(t, "")
	s := w.session()
	if _, err := s.Freeze(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	s.Close()
	if d := w.fake.waitEvent(t, "thaw", time.Second); d > 500*time.Millisecond {
		t.Errorf("thawed %v after the connection closed", d)
	}
	w.log.find(t, "thaw", map[string]any{logReason: ThawConnection, "held": false})
}

// A caller whose ctx ends during the freeze: it closes, the agent thaws.
func TestCallerContextEndsThaws(t *testing.T) {
	w := newWorld(t, "")
	w.fake.delay = 300 * time.Millisecond
	s := w.session()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := s.Freeze(ctx, 5*time.Second)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("freeze with an ended ctx: %v", err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	w.fake.waitEvent(t, "thaw", time.Second)
	if _, err := s.Thaw(context.Background()); err == nil || !strings.Contains(err.Error(), "session ended") {
		t.Errorf("thaw on a broken session: %v", err)
	}
}

// Two callers: the second freeze is refused while the first holds, and
// says who holds it; it works once the first thawed.
func TestSecondFreezeRefused(t *testing.T) {
	w := newWorld(t, "")
	a, b := w.session(), w.session()
	if _, err := a.Freeze(context.Background(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	_, err := b.Freeze(context.Background(), time.Second)
	if refusedCode(err) != codeBusy || !strings.Contains(err.Error(), "another freeze is in progress") || !strings.Contains(err.Error(), PublicOf(w.callerKey).Fingerprint()) {
		t.Fatalf("second freeze: %v", err)
	}
	t.Log(err)
	w.log.find(t, "freeze", map[string]any{logOutcome: outcomeRefused, logReason: "~another freeze"})
	if _, err := a.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "thaw", time.Second)
	if _, err := b.Freeze(context.Background(), time.Second); err != nil {
		t.Fatalf("freeze once the first thawed: %v", err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	if _, err := b.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// Out-of-order requests are refused, and the session stays usable.
func TestRequestsOutOfOrder(t *testing.T) {
	w := newWorld(t, "")
	s := w.session()
	if _, err := s.Thaw(context.Background()); refusedCode(err) != codeState {
		t.Fatalf("thaw with nothing frozen: %v", err)
	}
	if _, err := s.Freeze(context.Background(), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(context.Background(), 2*time.Second); refusedCode(err) != codeState {
		t.Fatalf("freeze while frozen: %v", err)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, _, th := w.fake.counts(); th != 1 {
		t.Errorf("%d thaws", th)
	}
}

// A key's window= caps what it may ask, and its default.
func TestKeyWindowCap(t *testing.T) {
	w := newWorld(t, "window=1s")
	s := w.session()
	if s.Info().MaxWindow != time.Second || s.Info().DefaultWindow != time.Second {
		t.Errorf("welcome for a window=1s key: %+v", s.Info())
	}
	_, err := s.Freeze(context.Background(), 2*time.Second)
	if refusedCode(err) != codeWindow || !strings.Contains(err.Error(), "at most") && !strings.Contains(err.Error(), "to 1s") {
		t.Fatalf("a 2s freeze with a 1s key: %v", err)
	}
	t.Log(err)
	rep, err := s.Freeze(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Window != time.Second {
		t.Errorf("default window for a window=1s key: %v", rep.Window)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// The agent stopping (SIGTERM) thaws first.
func TestAgentStopThaws(t *testing.T) {
	w := newWorld(t, "")
	s := w.session()
	if _, err := s.Freeze(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	w.cancel()
	w.fake.waitEvent(t, "thaw", time.Second)
	w.wg.Wait()
	w.log.find(t, "thaw", map[string]any{logReason: ThawStopping})
	if _, err := s.Thaw(context.Background()); err == nil {
		t.Error("thaw after the agent stopped succeeded")
	}
}

// A freeze that fails is reported to the caller and logged; nothing is
// left held.
func TestFreezeFails(t *testing.T) {
	w := newWorld(t, "")
	w.fake.failWith = errors.New("FIFREEZE /srv: operation not permitted")
	s := w.session()
	_, err := s.Freeze(context.Background(), time.Second)
	if refusedCode(err) != codeFailed || !strings.Contains(err.Error(), "operation not permitted") {
		t.Fatalf("failed freeze: %v", err)
	}
	w.log.find(t, "freeze", map[string]any{logOutcome: outcomeFailed, logReason: "~operation not permitted"})
	// The freeze lock is free again.
	w.fake.failWith = nil
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A freezer that takes longer than the window: thawed and refused.
func TestFreezeLongerThanWindow(t *testing.T) {
	w := newWorld(t, "")
	w.fake.delay = 300 * time.Millisecond
	s := w.session()
	_, err := s.Freeze(context.Background(), 100*time.Millisecond)
	if refusedCode(err) != codeFailed || !strings.Contains(err.Error(), "longer than the window") {
		t.Fatalf("slow freeze: %v", err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	w.fake.waitEvent(t, "thaw", time.Second)
}

// A thaw that fails: not held, and the caller hears why.
func TestThawFails(t *testing.T) {
	w := newWorld(t, "")
	w.fake.thawError = errors.New("writes to /fake were thawed after the timeout")
	s := w.session()
	if _, err := s.Freeze(context.Background(), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	th, err := s.Thaw(context.Background())
	if !errors.Is(err, ErrNotQuiesced) || th.Held || !strings.Contains(th.Error, "thawed after the timeout") {
		t.Fatalf("thaw that failed: %+v %v", th, err)
	}
}

// A session that asks nothing is closed after the idle time.
func TestIdleSessionClosed(t *testing.T) {
	w := newWorld(t, "", func(c *Config) { c.IdleTimeout = 200 * time.Millisecond })
	s := w.session()
	time.Sleep(500 * time.Millisecond)
	if _, err := s.Freeze(context.Background(), time.Second); err == nil {
		t.Fatal("freeze on a session the agent closed for idleness succeeded")
	}
	w.fake.noEvent(t)
	w.log.find(t, "session end", map[string]any{logReason: "~timed out"})
}

// A caller frozen that says nothing: the window still ends the freeze,
// and the idle time after it the session.
func TestSilentCallerWhileFrozen(t *testing.T) {
	w := newWorld(t, "", func(c *Config) { c.IdleTimeout = 300 * time.Millisecond })
	s := w.session()
	if _, err := s.Freeze(context.Background(), 400*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	if d := w.fake.waitEvent(t, "thaw", 2*time.Second); d > time.Second {
		t.Errorf("thawed %v after the freeze, window 400ms", d)
	}
	w.log.find(t, "session end", map[string]any{logReason: "~timed out"})
}
