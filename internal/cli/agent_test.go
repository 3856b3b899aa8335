package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is a stderr that a running command writes while the test
// reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestAgentKeygenAuthorize(t *testing.T) {
	e := newEnv(t)
	key := filepath.Join(e.dir, "agent", "key")
	out := e.ok("agent", "keygen", "--out", key, "--comment", "guest1")
	if !strings.HasPrefix(out, "sauve-ed25519 ") || !strings.HasSuffix(out, " guest1\n") {
		t.Errorf("keygen printed %q", out)
	}
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v %v", fi, err)
	}
	if pub, _ := os.ReadFile(key + ".pub"); string(pub) != out {
		t.Errorf("key.pub %q, printed %q", pub, out)
	}
	if code, _, errs := e.run("agent", "keygen", "--out", key); code != 1 || !strings.Contains(errs, "exists already") {
		t.Errorf("keygen over a key: %d %s", code, errs)
	}

	auth := filepath.Join(e.dir, "authorized_keys")
	line := e.ok("agent", "authorize", key+".pub", "--from", "10.0.0.0/8,192.168.1.5,serial", "--window", "30s", "--file", auth)
	want := `from="10.0.0.0/8,192.168.1.5,serial",window=30s ` + strings.TrimSpace(out)
	if strings.TrimSpace(line) != want {
		t.Errorf("authorize printed %q, want %q", line, want)
	}
	if data, _ := os.ReadFile(auth); string(data) != want+"\n" {
		t.Errorf("authorized_keys %q", data)
	}
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{strings.TrimSpace(out)}, 1, "is in " + auth + " already (line 1)"},
		{[]string{"ssh-ed25519 AAAA"}, 2, "neither a public key"},
		{[]string{key + ".pub", "--from", "db.example.com"}, 2, "host names are not accepted"},
		{[]string{key + ".pub", "--window", "2h"}, 2, "at most 1h"},
	} {
		code, _, errs := e.run(append([]string{"agent", "authorize", "--file", auth}, tc.args...)...)
		if code != tc.code || !strings.Contains(errs, tc.err) {
			t.Errorf("authorize %v: exit %d %s, want %d %q", tc.args, code, errs, tc.code, tc.err)
		}
	}
}

func TestAgentRunUsage(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		args []string
		err  string
	}{
		{nil, "give --listen tcp:HOST:PORT and/or --serial PATH"},
		{[]string{"--listen", "tcp:nowhere"}, "want tcp:HOST:PORT or HOST:PORT"},
		{[]string{"--listen", ":0", "--mount", "relative"}, "absolute path"},
		{[]string{"--listen", ":0", "--mount", "/", "--mount", "/"}, "given twice"},
	} {
		code, _, errs := e.run(append([]string{"agent", "run"}, tc.args...)...)
		if code != 2 || !strings.Contains(errs, tc.err) {
			t.Errorf("agent run %v: exit %d %s, want %q", tc.args, code, errs, tc.err)
		}
	}
	code, _, errs := e.run("agent", "run", "--listen", "127.0.0.1:0", "--key", filepath.Join(e.dir, "none"))
	if code != 1 || !strings.Contains(errs, "sauve agent keygen --out") {
		t.Errorf("agent run without a key: %d %s", code, errs)
	}
}

// 'agent run' and 'agent freeze' in process, with no mount to freeze
// (no root needed): the caller's key files and known-agents file.
func TestAgentRunFreeze(t *testing.T) {
	e := newEnv(t)
	p := func(n string) string { return filepath.Join(e.dir, n) }
	e.ok("agent", "keygen", "--out", p("agent.key"))
	callerKeyDir := filepath.Join(e.dir, "config", "sauve", "agent")
	e.ok("agent", "keygen", "--out", filepath.Join(callerKeyDir, "caller.key"))
	e.ok("agent", "authorize", filepath.Join(callerKeyDir, "caller.key.pub"), "--file", p("auth"), "--window", "5s")

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &lockedBuffer{}
	done := make(chan int)
	go func() {
		done <- Run(ctx, []string{"agent", "run", "--listen", "tcp:" + addr, "--key", p("agent.key"), "--authorized", p("auth"), "--state", p("state.json")}, &bytes.Buffer{}, logs)
	}()
	for i := 0; !strings.Contains(logs.String(), `"msg":"start","key"`); i++ {
		if i == 200 {
			t.Fatalf("the agent did not start:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Unknown agent without --trust-new: refused, named.
	code, _, errs := e.run("agent", "freeze", addr)
	if code != 1 || !strings.Contains(errs, "is not in ") || !strings.Contains(errs, "--trust-new") {
		t.Errorf("freeze of an unknown agent: %d %s", code, errs)
	}
	out := e.ok("agent", "freeze", addr, "--trust-new", "--hold", "100ms")
	if !strings.Contains(out, "frozen: nothing") || !strings.Contains(out, "thawed: held") {
		t.Errorf("freeze:\n%s", out)
	}
	out = e.ok("agent", "freeze", addr, "--json", "--window", "2s")
	var rep struct {
		Frozen struct {
			Window int64 `json:"window_ns"`
		}
		Thawed struct{ Held bool }
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.Thawed.Held || rep.Frozen.Window != int64(2*time.Second) {
		t.Errorf("freeze --json: %v\n%s", err, out)
	}
	// Longer than the key's window=5s.
	code, _, errs = e.run("agent", "freeze", addr, "--window", "6s")
	if code != 1 || !strings.Contains(errs, "this key may ask from 10ms to 5s") {
		t.Errorf("freeze beyond the key's window: %d %s", code, errs)
	}
	// The window ends before the thaw: exit 1, said.
	code, out, _ = e.run("agent", "freeze", addr, "--window", "100ms", "--hold", "300ms")
	if code != 1 || !strings.Contains(out, "did NOT hold") {
		t.Errorf("freeze outliving its window: %d %s", code, out)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("agent run exit %d:\n%s", code, logs.String())
	}
	if !strings.Contains(logs.String(), `"msg":"stop"`) {
		t.Errorf("no stop in the log:\n%s", logs.String())
	}
}
