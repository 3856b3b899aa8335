package main

import (
	"bytes"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

type exportOut struct {
	convertOut
	BytesSkipped int64 `json:"bytes_skipped"`
}

// TestExportSkipFree: a snapshot that holds a filesystem's free space (a
// backup with --no-fs-skip, a deleted file's blocks in it) exports with
// --skip-free without it: a smaller image, the same as the export of a
// backup that skipped free space itself, whose filesystem checks clean
// and holds the same files. Without --skip-free the export is exact.
func TestExportSkipFree(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "debugfs")
	requireRoot(t)
	e := newEnv(t)
	files := e.path("files")
	os.Mkdir(files, 0o755)
	writeFile(t, filepath.Join(files, "keep"), textBytes(3, 2<<20))
	writeFile(t, filepath.Join(files, "random"), randomBytes(1<<20))
	marker := []byte("DELETED-FILE-CONTENT-" + hex.EncodeToString(randomBytes(8)))
	writeFile(t, filepath.Join(files, "gone"), bytes.Repeat(marker, (8<<20)/len(marker)))
	raw := e.path("disk.raw")
	f, _ := os.Create(raw)
	f.Truncate(64 << 20)
	f.Close()
	c := exec.Command("sfdisk", "-q", raw)
	c.Stdin = strings.NewReader("label: dos\nstart=2048, type=83\n")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", files, raw, "62M")
	dev := losetup(t, raw, "-o", "1048576")
	sh(t, "debugfs", "-w", "-R", "rm gone", dev)
	exec.Command("losetup", "-d", dev).Run()
	os.Remove(filepath.Join(files, "gone"))
	if b, _ := os.ReadFile(raw); !bytes.Contains(b, marker) {
		t.Fatal("the deleted file's blocks should still hold its content")
	}
	whole := e.backup(raw, "--no-fs-skip")
	skipped := e.backup(raw) // free space skipped by the backup itself

	// Without --skip-free: exact, deleted blocks included.
	exact := e.path("exact.qcow2")
	var ex exportOut
	e.okJSON(&ex, "export", whole.ShortID, exact)
	if o, code := qemuImg(t, "compare", "-f", "raw", "-F", "qcow2", raw, exact); code != 0 {
		t.Fatalf("export differs from the disk: %s", o)
	}

	small := e.path("small.qcow2")
	var sm exportOut
	e.okJSON(&sm, "export", whole.ShortID, small, "--skip-free")
	if sm.BytesSkipped < 8<<20 || sm.BytesSkipped > 62<<20 {
		t.Fatalf("--skip-free skipped %d bytes; the deleted file alone is 8 MiB", sm.BytesSkipped)
	}
	if sm.Allocated > ex.Allocated-6<<20 || sm.DataBytes > ex.DataBytes-6<<20 {
		t.Fatalf("--skip-free export not smaller: %+v, without: %+v", sm, ex)
	}
	back := e.path("back.raw")
	sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", small, back)
	if b, _ := os.ReadFile(back); bytes.Contains(b, marker) {
		t.Fatal("--skip-free copied the free space")
	}
	// What the backup itself skipped is what export skips.
	plain := e.path("plain.qcow2")
	e.ok("export", skipped.ShortID, plain)
	if o, code := qemuImg(t, "compare", "-f", "qcow2", "-F", "qcow2", small, plain); code != 0 {
		t.Fatalf("--skip-free export differs from the export of a backup that skipped free space: %s", o)
	}
	// The filesystem checks clean and holds the same files.
	part := losetup(t, back, "-r", "-o", "1048576")
	sh(t, "e2fsck", "-fn", part)
	mnt := mountDev(t, e, part, "mnt")
	sh(t, "diff", "-r", "-x", "lost+found", files, mnt)

	// The text report says what was skipped.
	out := e.ok("export", whole.ShortID, e.path("text.qcow2"), "--skip-free")
	if !strings.Contains(out, "free space of the filesystems left unallocated: ") {
		t.Fatalf("text report:\n%s", out)
	}
}
