package main

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// agentHost is a sauve agent run by the test, freezing an ext4 of its
// own, and the keys a caller needs.
type agentHost struct {
	addr, callerKey, agentPub, mnt, log string
}

func startAgent(t *testing.T, e *env, extra ...string) *agentHost {
	t.Helper()
	mnt := e.path("agentfs")
	fsimg := e.path("agentfs.img")
	sh(t, "truncate", "-s", "64M", fsimg)
	sh(t, "mkfs.ext4", "-q", "-F", fsimg)
	dev := losetup(t, fsimg)
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() {
		exec.Command("fsfreeze", "-u", mnt).Run()
		exec.Command("umount", mnt).Run()
	})
	return startAgentOn(t, e, mnt, extra...)
}

// startAgentOn runs a sauve agent that freezes mnt, with extra flags of
// 'sauve agent run' (writers, hooks).
func startAgentOn(t *testing.T, e *env, mnt string, extra ...string) *agentHost {
	t.Helper()
	h := &agentHost{callerKey: e.path("caller.key"), agentPub: e.path("agent.key.pub"), mnt: mnt, log: e.path("agent.log")}
	e.ok("agent", "keygen", "--out", e.path("agent.key"))
	e.ok("agent", "keygen", "--out", h.callerKey)
	e.ok("agent", "authorize", h.callerKey+".pub", "--file", e.path("authorized"), "--from", "127.0.0.1")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = l.Addr().String()
	l.Close()
	cmd := e.cmd(nil, append([]string{"agent", "run", "--listen", "tcp:" + h.addr, "--key", e.path("agent.key"), "--authorized", e.path("authorized"),
		"--mount", h.mnt, "--state", e.path("agent-state.json"), "--log", h.log, "--window", "10s"}, extra...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", h.addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent does not listen on %s", h.addr)
		}
	}
	return h
}

// writable fails the test unless a write to the agent's filesystem goes
// through at once (it is not left frozen).
func (h *agentHost) writable(t *testing.T, when string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(h.mnt+"/probe", []byte(when), 0o644) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: write to the agent's filesystem: %v", when, err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("%s: the agent's filesystem is still frozen", when)
	}
}

// --quiesce agent:// asks a real agent to freeze around the copy: the
// snapshot is application-consistent through it, the agent's filesystem
// is thawed after, and a caller or agent key that does not match stores
// nothing and leaves nothing frozen.
func TestBackupQuiesceAgent(t *testing.T) {
	e := newEnv(t)
	img := xfsImage(t, e)
	h := startAgent(t, e, "--pre-freeze", "echo $SAUVE_PHASE >> "+e.path("agent-hooks.txt"), "--post-thaw", "echo $SAUVE_PHASE >> "+e.path("agent-hooks.txt"))
	url := "agent://" + h.addr
	var res struct {
		Snapshot string       `json:"snapshot"`
		Quiesce  *quiesceJSON `json:"quiesce"`
	}
	e.okJSON(&res, "backup", img, "--quiesce", url, "--agent-caller-key", h.callerKey, "--agent-key", h.agentPub)
	q := res.Quiesce
	if q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != "agent "+h.addr || !q.Writers[0].Frozen {
		t.Fatalf("quiesce %+v, want application-consistent through the agent", q)
	}
	h.writable(t, "after the backup")
	if got := string(mustRead(t, e.path("agent-hooks.txt"))); got != "pre-freeze\npost-thaw\n" {
		t.Errorf("the agent's hooks wrote %q, want pre-freeze then post-thaw", got)
	}
	if d := q.Writers[0].Detail; !strings.Contains(d, "hooks") || !strings.Contains(d, h.mnt) {
		t.Errorf("the agent's report %q does not name its hooks and %s", d, h.mnt)
	}
	if out := e.ok("show", res.Snapshot); !strings.Contains(out, "application-consistent: agent "+h.addr) {
		t.Errorf("show does not say the agent held the applications:\n%s", out)
	}
	if log := string(mustRead(t, h.log)); !strings.Contains(log, "127.0.0.1") {
		t.Errorf("the agent logged no request from 127.0.0.1:\n%s", log)
	}

	n := snapshotsOf(t, e)
	e.ok("agent", "keygen", "--out", e.path("stranger.key"))
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown caller key", []string{"--agent-caller-key", e.path("stranger.key"), "--agent-key", h.agentPub}, "is not authorized"},
		{"another agent's key", []string{"--agent-caller-key", h.callerKey, "--agent-key", e.path("stranger.key.pub")}, "is not the pinned key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stderr := e.fail([]string{tc.want}, append([]string{"backup", img, "--quiesce", url}, tc.args...)...)
			t.Logf("refused: %s", strings.TrimSpace(stderr))
			if got := snapshotsOf(t, e); got != n {
				t.Errorf("%d snapshots, were %d: a refused agent stored one", got, n)
			}
			h.writable(t, tc.name)
		})
	}
	// Nobody there: a clear error, nothing stored.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	l.Close()
	e.fail([]string{dead}, "backup", img, "--quiesce", "agent://"+dead, "--agent-caller-key", h.callerKey, "--agent-key", h.agentPub)
	if got := snapshotsOf(t, e); got != n {
		t.Errorf("%d snapshots, were %d, after an agent that does not answer", got, n)
	}
}

// A VM that exposes a sauve agent channel (a chardev for the guest's
// org.sauve.agent.0 port) is quiesced through it with no --quiesce:
// without a caller key the backup goes on crash-consistent and says why;
// with one, an agent that does not answer (no guest here runs one) fails
// the backup with one clear error and stores nothing.
func TestBackupQEMUFindsSauveAgent(t *testing.T) {
	e := newEnv(t)
	chardev := e.path("agent.sock")
	vm := startLiveVM(t, e.dir, "-chardev", "socket,id=sauve-agent,path="+chardev+",server=on,wait=off")
	r := e.run("backup", "qemu:"+vm.sock, "--json")
	if r.code != 0 || !strings.Contains(r.stderr, "has a sauve agent channel (unix:"+chardev+")") {
		t.Fatalf("backup of a VM with an agent channel and no caller key: exit %d, stderr:\n%s", r.code, r.stderr)
	}
	var first struct {
		Quiesce *quiesceJSON `json:"quiesce"`
	}
	if err := jsonUnmarshal(r.stdout, &first); err != nil || first.Quiesce != nil {
		t.Fatalf("quiesce %+v (%v), want none", first.Quiesce, err)
	}
	n := snapshotsOf(t, e)
	e.ok("agent", "keygen", "--out", e.path("config/sauve/agent/caller.key"))
	e.ok("agent", "keygen", "--out", e.path("guest.key"))
	stderr := e.fail([]string{"agent unix:" + chardev}, "backup", "qemu:"+vm.sock, "--agent-key", e.path("guest.key.pub"), "--agent-timeout", "2s")
	t.Logf("refused: %s", strings.TrimSpace(stderr))
	if got := snapshotsOf(t, e); got != n {
		t.Errorf("%d snapshots, were %d, after an agent that did not answer", got, n)
	}
}
