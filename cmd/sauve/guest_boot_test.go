package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const instantBootRun = "SAUVE_GUEST=1 go test -run TestInstantBootInGuest -timeout 30m -v ./cmd/sauve"

// TestInstantBootInGuest boots a real Linux system (the cached Debian 12
// guest of test/guest) from a writable NBD export of a snapshot of its
// root disk: the guest remounts its root read-write, writes a marker and
// 8 MiB, syncs and reads them back. Afterwards the repository is
// unchanged (check --read-data, the same files) and the overlay holds the
// writes: served again from it, the root filesystem has them (debugfs).
func TestInstantBootInGuest(t *testing.T) {
	limit := guestTest(t, 5*time.Minute, instantBootRun, "instant boot of a real Linux system from a writable export")
	needTools(t, "debugfs", "nbdcopy")
	build := exec.Command("bash", filepath.Join("..", "..", "test", "guest", "build-base.sh"))
	out, err := build.Output()
	if err != nil {
		t.Fatalf("build the guest image: %v", err)
	}
	base := strings.TrimSpace(string(out[bytes.LastIndexByte(bytes.TrimSpace(out), '\n')+1:]))
	root := filepath.Join(base, "root.img")
	e := newEnv(t)
	b := e.backup(root)
	before := repoState(t, e.repo)

	dir, err := os.MkdirTemp("", "sauve-ib")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock, ov := filepath.Join(dir, "s.sock"), e.path("root.overlay")
	serve := func(log string) *daemon {
		return startDaemon(t, "sauve serve nbd --writable", e.cmd(nil, "serve", "nbd", b.ShortID, "--writable", "--overlay", ov, "--listen", "unix:"+sock),
			e.path(log), syscall.SIGINT, func() bool { _, err := os.Stat(sock); return err == nil })
	}
	d := serve("serve1.log")
	ctx, cancel := context.WithTimeout(context.Background(), limit+2*time.Minute)
	defer cancel()
	cmd := guestCommand(ctx, t, limit, "SAUVE_BIN=none", "SAUVE_GUEST_SCRIPT=guest-writes.sh",
		"SAUVE_GUEST_ROOT=file=nbd:unix:"+sock+":exportname="+b.Disk+",format=raw,if=virtio,cache=writeback")
	var console bytes.Buffer
	cmd.Stdout, cmd.Stderr = &console, &console
	err = cmd.Run()
	t.Logf("guest console:\n%s", console.String())
	if result, _ := guestResult(console.String()); err != nil || result != "PASS" {
		t.Fatalf("the guest booted from the backup did not pass (run.sh: %v, result %q)\n%s", err, result, d.logText())
	}
	d.stop(t, syscall.SIGINT)

	if after := repoState(t, e.repo); after != before {
		t.Error("booting from the backup changed the repository")
	}
	e.ok("check", "--read-data")

	// Served again from the overlay, the guest's files are there.
	d = serve("serve2.log")
	img := e.path("booted.img")
	if o, err := exec.Command("nbdcopy", "nbd+unix:///"+b.Disk+"?socket="+sock, img).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, o)
	}
	d.stop(t, syscall.SIGINT)
	debugfs := func(req string) []byte {
		t.Helper()
		o, err := exec.Command("debugfs", "-R", req, img).Output()
		if err != nil {
			t.Fatalf("debugfs %s: %v", req, err)
		}
		return o
	}
	if m := debugfs("cat /instant-boot-proof"); !bytes.Contains(m, []byte("SAUVE INSTANT BOOT")) {
		t.Fatalf("the overlay lacks the guest's marker: %q", m)
	}
	blob := e.path("blob")
	debugfs("dump /var/lib/instant/blob " + blob)
	data, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if want := strings.Fields(string(debugfs("cat /instant-boot-sha"))); len(data) != 8<<20 || len(want) == 0 || want[0] != hex.EncodeToString(sum[:]) {
		t.Errorf("the guest's blob (%d bytes) is not what it wrote (%v)", len(data), want)
	}
	restored := e.path("restored.img")
	e.ok("restore", b.ShortID, restored)
	if o, _ := exec.Command("debugfs", "-R", "stat /instant-boot-proof", restored).CombinedOutput(); !bytes.Contains(o, []byte("not found")) {
		t.Errorf("a restore of the snapshot holds the guest's marker:\n%s", o)
	}
}
