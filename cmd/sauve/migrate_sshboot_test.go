package main

import (
	"encoding/hex"
	"path/filepath"
	"strings"
	"testing"
)

// --test-boot of an ssh:// target boots it on the remote machine (here,
// through OpenSSH's sshd on 127.0.0.1) under QEMU (TCG): the serial
// marker is reported reached; a marker never printed exits 4 with the
// console's last lines, sent back; a remote host without QEMU is a clear
// error. The target is left as it was.
func TestMigrateSSHTestBoot(t *testing.T) {
	requireRoot(t)
	needTools(t, "qemu-system-x86_64", "env")
	s := startSSHTarget(t)
	e := s.e
	src := e.path("boot.img")
	line := "SAUVE REMOTE BOOT " + hex.EncodeToString(randomBytes(4))
	bootDisk(t, src, line)
	target := filepath.Join(t.TempDir(), "remote.img")
	url := s.url(target)
	bootArgs := []string{"--boot-accel", "tcg", "--boot-memory", "32"}
	out := e.ok(append([]string{"migrate", src, url, "--test-boot", "--boot-marker", line, "--boot-timeout", "60s"}, bootArgs...)...)
	if !strings.Contains(out, "test boot: "+url+" reached") {
		t.Fatalf("--test-boot did not report the remote boot:\n%s", out)
	}
	before := fileHash(t, target, -1)
	if fileHash(t, src, -1) != before {
		t.Fatal("the remote target differs from the source")
	}
	r := e.run(append([]string{"migrate", src, url, "--test-boot", "--boot-marker", "never printed", "--boot-timeout", "5s"}, bootArgs...)...)
	if r.code != 4 || !strings.Contains(r.stdout, "did not reach") || !strings.Contains(r.stdout, line) {
		t.Errorf("a marker never printed: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	// A remote host without QEMU: its PATH lacks it.
	e.fail([]string{"no qemu-system-x86_64", "install QEMU there"},
		append([]string{"migrate", src, url, "--test-boot", "--remote-sauve", "env PATH=/nonexistent " + sauveBin}, bootArgs...)...)
	if fileHash(t, target, -1) != before {
		t.Error("the test boots wrote the target")
	}
}
