package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A backup of a mounted partition's device (no point-in-time copy:
// --snapshot none) stores the data the filesystem wrote and synced, not
// what an earlier read left in the device's page cache: the filesystem
// writes file data around that cache, so a buffered read of the device
// returned blocks as they were at the earlier read (a real loss, found
// on a loop device: restored files held their old bytes).
func TestBackupMountedDeviceNotStale(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "debugfs", "losetup")
	e := newEnv(t)
	img := e.path("part.img")
	sh(t, "truncate", "-s", "64M", img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	dev := losetup(t, img)
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	f := filepath.Join(mnt, "f")
	writeFile(t, f, bytes.Repeat([]byte("X"), 4<<20))
	sh(t, "sync")
	// A read of the whole device fills its page cache (as an earlier
	// backup, or any reader, would).
	sh(t, "dd", "if="+dev, "of=/dev/null", "bs=1M", "status=none")
	want := bytes.Repeat([]byte("Y"), 4<<20)
	w, err := os.OpenFile(f, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	w.Close()
	sh(t, "sync")
	e.ok("backup", dev, "--snapshot", "none")
	out := e.path("restored.img")
	e.ok("restore", "latest", out)
	got, err := exec.Command("debugfs", "-R", "cat /f", out).Output()
	if err != nil {
		t.Fatalf("debugfs cat /f of the restored image: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the restored file holds %q… (%d bytes), not the synced %q…: the backup read the device's stale page cache",
			strings.TrimSpace(string(got[:min(8, len(got))])), len(got), want[:8])
	}
}
