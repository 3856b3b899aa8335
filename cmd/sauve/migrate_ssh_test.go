package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend/faultproxy"
	"github.com/sauve-backup/sauve/internal/backend/testsrv"
)

// sshTarget is a remote migration target: OpenSSH's sshd on 127.0.0.1
// reached through a fault proxy, and the environment that trusts it.
type sshTargetSetup struct {
	srv   *testsrv.SSHD
	proxy *faultproxy.Proxy
	e     *env
}

func startSSHTarget(t *testing.T) *sshTargetSetup {
	srv := testsrv.StartSSHD(t)
	p := startProxy(t, srv.Port)
	e := newBareEnv(t)
	host, port, _ := strings.Cut(p.Addr, ":")
	kh := e.path("known_hosts")
	hostKey := strings.SplitN(srv.HostKeyLine, " ", 2)[1]
	writeFile(t, kh, []byte(fmt.Sprintf("[%s]:%s %s\n", host, port, hostKey)))
	e.setenv("SAUVE_SSH_KEY", srv.Key)
	e.setenv("SAUVE_SSH_KNOWN_HOSTS", kh)
	// sshd's sessions do not have the test's PATH: name the binary.
	e.setenv("SAUVE_REMOTE_SAUVE", sauveBin)
	return &sshTargetSetup{srv: srv, proxy: p, e: e}
}

func (s *sshTargetSetup) url(path string) string {
	return fmt.Sprintf("ssh://%s@%s%s", s.srv.User, s.proxy.Addr, path)
}

// A loop-mounted ext4 migrated over SSH: the first pass sends less than
// it writes (compressible files), a delta pass little, a pass cut by the
// network fails clearly and the next resumes; after --final the remote
// file holds the same files as the source.
func TestMigrateSSH(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	s := startSSHTarget(t)
	e := s.e
	img, mnt := mountedExt4(t, e, "src", 96<<20, 8)
	for i := 0; i < 16; i++ {
		writeFile(t, filepath.Join(mnt, fmt.Sprintf("text%02d", i)), textBytes(uint64(i), 1<<20))
	}
	sh(t, "sync")
	// A name the remote shell must be given quoted.
	target := filepath.Join(t.TempDir(), "it's a $(disk).img")
	url := s.url(target)

	s.proxy.ResetStats()
	first, _ := parseMigrate(t, e.ok("migrate", img, url, "--json"))
	wire := s.proxy.Stats().Up
	if first[0].BytesWritten < 24<<20 {
		t.Fatalf("first pass: %+v", first[0])
	}
	t.Logf("first pass: %d bytes written, %d bytes on the wire (%.0f%%)", first[0].BytesWritten, wire, 100*float64(wire)/float64(first[0].BytesWritten))
	if wire >= first[0].BytesWritten*3/4 {
		t.Errorf("first pass sent %d bytes for %d written, of which 16 MiB text: not compressed", wire, first[0].BytesWritten)
	}
	if fi, err := os.Stat(target); err != nil || fi.Size() != 96<<20 {
		t.Fatalf("remote target: %v", err)
	}

	// A delta pass.
	writeFile(t, filepath.Join(mnt, "small"), randomBytes(1<<20))
	sh(t, "sync")
	delta, _ := parseMigrate(t, e.ok("migrate", img, url, "--json"))
	if d := delta[0]; d.Pass != 2 || d.BytesWritten == 0 || d.BytesWritten > first[0].BytesWritten/4 {
		t.Errorf("delta pass for a 1 MiB file: %+v (first pass wrote %d)", d, first[0].BytesWritten)
	}

	// A pass cut by the network midway fails, and says so.
	for i := 0; i < 12; i++ {
		writeFile(t, filepath.Join(mnt, fmt.Sprintf("more%02d", i)), randomBytes(1<<20))
	}
	sh(t, "sync")
	s.proxy.SetFaults(faultproxy.Faults{First: 4 << 20, Drop: 1})
	r := e.run("migrate", img, url)
	if r.code == 0 || !strings.Contains(r.stderr, "remote end") {
		t.Fatalf("a pass over a cut connection: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("the cut pass: %s", strings.TrimSpace(r.stderr))
	if s.proxy.Stats().Struck == 0 {
		t.Fatal("the proxy struck nothing")
	}
	s.proxy.SetFaults(faultproxy.Faults{})
	// The next pass resumes from the state; --final makes it exact.
	resumed, _ := parseMigrate(t, e.ok("migrate", img, url, "--json"))
	if p := resumed[0]; p.Pass != 3 || p.BytesWritten < 8<<20 {
		t.Errorf("pass after the cut: %+v", p)
	}
	// From another directory: the same state (the URL is not a path
	// relative to here).
	c := e.cmd(nil, "migrate", img, url, "--json")
	c.Dir = t.TempDir()
	elsewhere, err := c.Output()
	if err != nil {
		t.Fatalf("a pass from another directory: %v", err)
	}
	if p, _ := parseMigrate(t, string(elsewhere)); p[0].Pass != 4 {
		t.Errorf("a pass from another directory: %+v (another state?)", p[0])
	}
	writeFile(t, filepath.Join(mnt, "last"), []byte("written before the cut-over"))
	out := e.ok("migrate", img, url, "--final")
	if !strings.Contains(out, "cut-over: writes to "+mnt+" were frozen for ") {
		t.Errorf("final pass output:\n%s", out)
	}
	checkTarget(t, target, hashTree(t, mnt))

	// Another file in the remote target's place: the state, of the old
	// one's inode, is refused.
	// (Made before the old one goes, so that its inode differs.)
	sh(t, "truncate", "-s", fmt.Sprint(96<<20), target+".new")
	if err := os.Rename(target+".new", target); err != nil {
		t.Fatal(err)
	}
	e.fail([]string{"of another target"}, "migrate", img, url)
}

// A block device on the remote machine (a loop device over a file of old
// bytes, larger than the source): every chunk is written or zeroed over
// the wire, and the device then holds the source's files.
func TestMigrateSSHOntoBlockDevice(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "losetup")
	s := startSSHTarget(t)
	e := s.e
	img, mnt := mountedExt4(t, e, "src", 48<<20, 4)
	backing := filepath.Join(t.TempDir(), "old.img")
	writeFile(t, backing, textBytes(7, 64<<20))
	dev := losetup(t, backing)
	passes, _ := parseMigrate(t, e.ok("migrate", img, s.url(dev), "--json", "--final"))
	if p := passes[len(passes)-1]; p.ChunksChanged == 0 {
		t.Fatalf("passes onto the device: %+v", passes)
	}
	checkTarget(t, dev, hashTree(t, mnt))
}

// An unknown host key is refused before anything is sent, as the SFTP
// backend refuses it; so is a mounted target on the remote machine, and a
// remote end that is not sauve.
func TestMigrateSSHRefusals(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4")
	s := startSSHTarget(t)
	e := s.e
	img, _ := mountedExt4(t, e, "src", 32<<20, 1)
	target := filepath.Join(t.TempDir(), "remote.img")

	stranger := e.path("other_known_hosts")
	writeFile(t, stranger, []byte("[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"))
	e.setenv("SAUVE_SSH_KNOWN_HOSTS", stranger)
	e.fail([]string{"host key", "not known"}, "migrate", img, s.url(target))
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("the remote target was made despite the unknown host key: %v", err)
	}
	e.setenv("SAUVE_SSH_KNOWN_HOSTS", e.path("known_hosts"))

	// A target mounted on the remote machine.
	busy, _ := mountedExt4(t, e, "busy", 32<<20, 0)
	e.fail([]string{"mounted"}, "migrate", img, s.url(busy))

	// No sauve there.
	t0 := time.Now()
	t.Logf("no sauve: %s", e.fail([]string{"did not answer as sauve migrate-receive", "--remote-sauve"}, "migrate", img, s.url(target), "--remote-sauve", "/nonexistent/sauve"))
	if d := time.Since(t0); d > 8*time.Second {
		t.Errorf("a missing remote sauve took %v to report", d)
	}
	// Not an ssh:// URL.
	e.fail([]string{"ssh://USER@HOST"}, "migrate", img, "ftp://host/x")
}

// kill -9 of the local sauve mid-pass: the remote end sees its input
// close and exits (it holds nothing), and the next passes make the
// target exact.
func TestMigrateSSHKill9(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "pgrep")
	s := startSSHTarget(t)
	e := s.e
	img, mnt := mountedExt4(t, e, "src", 96<<20, 32)
	target := filepath.Join(t.TempDir(), "remote.img")
	url := s.url(target)
	running := func() bool { return exec.Command("pgrep", "-f", "migrate-receive "+target).Run() == nil }
	midPass := 0
	delays := []time.Duration{200 * time.Millisecond, 50 * time.Millisecond}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for range soakRounds(0, 10) {
		delays = append(delays, time.Duration(rng.IntN(800))*time.Millisecond)
	}
	for i, delay := range delays {
		if i > 0 {
			writeFile(t, filepath.Join(mnt, "data00"), randomBytes(8<<20))
			sh(t, "sync")
		}
		c := e.cmd(nil, "migrate", img, url, "--json")
		var out strings.Builder
		c.Stdout = &out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		// Killed once the remote end runs: mid-session (the first pass
		// asks, in a session of its own, whether the target exists,
		// before it creates it in another).
		deadline := time.Now().Add(20 * time.Second)
		for !(running() && fileExists(target)) {
			if time.Now().After(deadline) {
				t.Fatal("sauve migrate-receive never ran on the remote machine")
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(delay)
		c.Process.Kill()
		c.Wait()
		if !strings.Contains(out.String(), `"pass"`) {
			midPass++
		}
		// The remote end is gone as soon as sshd sees the connection
		// close.
		deadline = time.Now().Add(20 * time.Second)
		for running() {
			if time.Now().After(deadline) {
				t.Fatal("sauve migrate-receive still runs on the remote machine after the local sauve was killed")
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if midPass == 0 {
		t.Fatal("both passes ended before they were killed")
	}
	e.ok("migrate", img, url)
	e.ok("migrate", img, url, "--final")
	checkTarget(t, target, hashTree(t, mnt))
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// A link that goes silent mid-pass (a stalled middlebox, no reset) fails
// the pass after the idle timeout (60 s) instead of hanging it, and the
// next pass resumes.
func TestMigrateSSHStall(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	if testing.Short() {
		t.Skip("waits for the 60 s idle timeout")
	}
	s := startSSHTarget(t)
	e := s.e
	img, mnt := mountedExt4(t, e, "src", 64<<20, 16)
	target := filepath.Join(t.TempDir(), "remote.img")
	url := s.url(target)
	s.proxy.SetFaults(faultproxy.Faults{First: 4 << 20, Stall: 1, StallFor: 3 * time.Minute})
	t0 := time.Now()
	r := e.run("migrate", img, url)
	took := time.Since(t0)
	if r.code == 0 || !strings.Contains(r.stderr, "remote end") {
		t.Fatalf("a pass over a stalled link: exit %d after %v\n%s%s", r.code, took, r.stdout, r.stderr)
	}
	if took < 50*time.Second || took > 100*time.Second {
		t.Errorf("a pass over a stalled link failed after %v, not the idle timeout", took)
	}
	t.Logf("stalled pass failed after %v: %s", took.Round(time.Second), strings.TrimSpace(r.stderr))
	s.proxy.SetFaults(faultproxy.Faults{})
	e.ok("migrate", img, url, "--final")
	checkTarget(t, target, hashTree(t, mnt))
}
