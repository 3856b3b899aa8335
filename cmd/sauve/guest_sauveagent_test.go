package main

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sauveAgentRun is how to run the sauve-agent guest test by hand.
const sauveAgentRun = "SAUVE_GUEST=1 go test -run TestSauveAgentInGuest -timeout 30m -v ./cmd/sauve"

// TestSauveAgentInGuest backs up a live VM with sauve on the host while
// sauve's own agent, in the guest, freezes the data drive's filesystem:
// the guest of TestGuestAgentFreezeInGuest (guest-qga.sh: the ext4 data
// drive on /data, the writer), but run.sh puts a static sauve and the
// agent's keys (made here with 'sauve agent keygen' and 'authorize')
// on its payload, and guest-qga.sh runs 'sauve agent run --serial' on
// the port named org.sauve.agent.0 (found in /sys/class/virtio-ports)
// instead of qemu-ga, which does not run. The VM's chardev for that
// port is id sauve-agent, which is how sauve finds it. In one boot it
// checks that:
//
//   - two backups in turn (the agent serves the next session after the
//     first hung up) are application-consistent through the agent, whose
//     report names /data; the restored drive has no journal to recover,
//     a clean e2fsck -fn and whole files; the writer goes on after each;
//   - a caller key the agent does not know fails the backup with one
//     clear error naming the agent, stores nothing, and leaves nothing
//     frozen;
//   - the agent killed with kill -9 in the guest while it holds a freeze
//     ('sauve agent freeze --hold' from the host) does not leave /data
//     frozen: its thaw guard thaws it within seconds, well before the
//     window ends; restarted, the agent serves a backup again.
//
// Run it with:
//
//	SAUVE_GUEST=1 go test -run TestSauveAgentInGuest -timeout 30m -v ./cmd/sauve
func TestSauveAgentInGuest(t *testing.T) {
	limit := guestTest(t, 6*time.Minute, sauveAgentRun, "sauve's agent is tested in a QEMU (TCG) guest booted by test/guest/run.sh")
	needTools(t, "qemu-img", "dumpe2fs", "e2fsck", "debugfs")
	start := time.Now()
	dir := t.TempDir()
	seqfile := filepath.Join(dir, "seqfile")
	sh(t, "go", "build", "-o", seqfile, "../../test/guest/seqfile")
	e := newEnv(t)
	payload := filepath.Join(dir, "payload")
	keys := filepath.Join(payload, "agent")
	if err := os.MkdirAll(keys, 0o755); err != nil {
		t.Fatal(err)
	}
	agentPub := filepath.Join(keys, "agent.key.pub")
	callerKey := e.path("config/sauve/agent/caller.key")
	e.ok("agent", "keygen", "--out", filepath.Join(keys, "agent.key"))
	e.ok("agent", "keygen", "--out", callerKey)
	e.ok("agent", "authorize", callerKey+".pub", "--file", filepath.Join(keys, "authorized"), "--from", "serial")
	// run.sh builds the guest's sauve, static, from this checkout.
	g := bootGuest(t, dir, limit, guestChannel{id: "sauve-agent", socket: "agent.sock", port: "org.sauve.agent.0"},
		"SAUVE_GUEST_PAYLOAD="+payload)
	t.Logf("guest ready after %s; the agent: %s", time.Since(start).Round(time.Second), g.ctl("agent-log"))
	agentName := "agent unix:" + g.qga

	// Two backups in turn, each frozen through the agent.
	for _, name := range []string{"first", "second"} {
		done := guestStep(t, name+" backup")
		before := g.seq()
		s := time.Now()
		out, stderr := g.backup(e, "--agent-key", agentPub)
		took := time.Since(s)
		after := g.seq()
		q := out.Quiesce
		if q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != agentName ||
			!q.Writers[0].Frozen || !strings.Contains(q.Writers[0].Detail, "/data") {
			t.Errorf("%s backup: quiesce %+v; want application-consistent through %s, which froze /data", name, q, agentName)
		}
		if q != nil {
			t.Logf("%s backup %.8s (%s): quiesce %+v; stderr %q", name, out.Snapshot, took.Round(100*time.Millisecond), *q, stderr)
		}
		img := g.restore(e, out.Snapshot, name)
		if img.recovery || img.fsck != 0 {
			t.Errorf("the %s copy is no clean filesystem: needs_recovery %v, e2fsck -fn exit %d:\n%s", name, img.recovery, img.fsck, img.fsckOut)
		}
		files := checkFiles(t, seqfile, img.path)
		if files.last < before || files.last > after {
			t.Errorf("the %s copy's last file is %d: not between %d (before the backup) and %d (after)", name, files.last, before, after)
		}
		t.Logf("%s copy: features %q, e2fsck -fn exit %d, files: %s", name, img.features, img.fsck, files.report)
		g.progresses("after the " + name + " backup")
		done()
	}
	t.Logf("the agent's log: %s", g.ctl("agent-log"))

	// A caller the agent does not know.
	done := guestStep(t, "unknown caller")
	e.ok("agent", "keygen", "--out", e.path("stranger.key"))
	msg := g.backupFails(e, "a caller key the agent does not know", []string{agentName, "is not authorized"},
		"--agent-caller-key", e.path("stranger.key"), "--agent-key", agentPub)
	if n := strings.Count(msg, agentName); n > 1 {
		t.Errorf("the error names the agent %d times: %s", n, msg)
	}
	t.Logf("the agent's log: %s", g.ctl("agent-log"))
	g.progresses("after the refused caller")
	done()

	// The agent killed while it holds a freeze: its guard thaws /data.
	done = guestStep(t, "agent killed while frozen")
	freeze := e.cmd(nil, "agent", "freeze", "unix:"+g.qga, "--agent-key", agentPub, "--window", "50s", "--hold", "40s")
	stdout, err := freeze.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var ferr strings.Builder
	freeze.Stderr = &ferr
	if err := freeze.Start(); err != nil {
		t.Fatal(err)
	}
	defer freeze.Process.Kill()
	frozenLine := make(chan string, 1)
	var fout strings.Builder
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			fout.WriteString(sc.Text() + "\n")
			if strings.HasPrefix(sc.Text(), "frozen:") {
				frozenLine <- sc.Text()
			}
		}
		close(frozenLine)
	}()
	var line string
	select {
	case line = <-frozenLine:
	case <-time.After(time.Minute):
	}
	if line == "" {
		freeze.Process.Kill()
		t.Fatalf("sauve agent freeze did not freeze:\n%s", ferr.String())
	}
	frozenAt := time.Now()
	t.Logf("sauve agent freeze: %s", line)
	s0 := g.seq()
	time.Sleep(2 * time.Second)
	if s := g.seq(); s != s0 {
		t.Errorf("the writer went on from file %d to %d while the agent said /data was frozen", s0, s)
	}
	t.Logf("frozen %s, the writer held at file %d: %s", time.Since(frozenAt).Round(100*time.Millisecond), s0, g.ctl("agent-kill"))
	killedAt := time.Now()
	for g.seq() == s0 {
		if time.Since(killedAt) > 20*time.Second {
			t.Fatalf("/data is still frozen %s after the agent was killed (the window is 50 s): no guard thawed it",
				time.Since(killedAt).Round(100*time.Millisecond))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the agent killed during the freeze: the writer went on %s later", time.Since(killedAt).Round(100*time.Millisecond))
	// Its hold (40 s) is not over, and the chardev stays connected with
	// nobody behind it: it would only fail at its thaw's deadline.
	freeze.Process.Kill()
	freeze.Wait()
	for range frozenLine {
	}
	t.Logf("sauve agent freeze, its agent killed: stdout %q", fout.String())
	if got := g.ctl("agent-start"); got != "CTL agent-start done" {
		t.Fatalf("restarting the agent in the guest: %s", got)
	}
	t.Logf("the restarted agent's log: %s", g.ctl("agent-log"))
	s := time.Now()
	out, _ := g.backup(e, "--agent-key", agentPub)
	t.Logf("the backup through the restarted agent: %s", time.Since(s).Round(100*time.Millisecond))
	if q := out.Quiesce; q == nil || q.Consistency != "application" {
		t.Errorf("the backup after the agent's restart: quiesce %+v; want application-consistent", q)
	}
	g.progresses("after the backup through the restarted agent")
	done()

	g.finish()
	t.Logf("all steps in one boot: %s", time.Since(g.booted).Round(time.Second))
}
