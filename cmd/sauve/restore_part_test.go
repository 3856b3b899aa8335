package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// partDisk makes a 24 MiB GPT disk: a BIOS boot partition of boot
// loader bytes, an ext4 filesystem labelled root, and a partition of
// random bytes, with boot code in the MBR and a loader in the gap
// before the first partition. It returns the image and the filesystem.
func partDisk(t *testing.T, e *env) (img string, fs []byte) {
	t.Helper()
	const mib = 1 << 20
	img = e.path("gpt.img")
	writeFile(t, img, make([]byte, 24*mib))
	sfdisk(t, img, "label: gpt\n"+
		"start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"+
		"start=4096, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"+
		"start=20480, size=24576, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
	fsImg := e.path("root.ext4")
	writeFile(t, fsImg, nil)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", "root", fsImg, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	fs, err := os.ReadFile(fsImg)
	if err != nil {
		t.Fatal(err)
	}
	writeAt(t, img, 2*mib, fs)
	writeAt(t, img, 0, randomBytes(440))             // MBR boot code
	writeAt(t, img, 40*512, randomBytes(50000))      // a loader in the gap
	writeAt(t, img, mib, randomBytes(mib))           // the BIOS boot partition
	writeAt(t, img, 10*mib, randomBytes(12*mib-512)) // partition 3
	return img, fs
}

// TestRestorePartition restores one partition alone, by number and by
// label, onto new files, an existing one of another filesystem (refused
// without --force) and itself (--delta).
func TestRestorePartition(t *testing.T) {
	needTools(t, "sfdisk", "mkfs.ext4", "e2fsck")
	e := newEnv(t)
	img, fs := partDisk(t, e)
	e.backup(img)

	for _, spec := range []string{"latest:2", "latest:root"} {
		out := e.path(strings.ReplaceAll(spec, ":", "-") + ".img")
		var res map[string]any
		e.okJSON(&res, "restore", spec, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fs) {
			t.Fatalf("restore %s: %d bytes, not partition 2's %d", spec, len(got), len(fs))
		}
		if res["partition"] != float64(2) || res["size"] != float64(len(fs)) {
			t.Errorf("restore %s --json: %v", spec, res)
		}
		if b, _ := res["bytes_fetched"].(float64); b > float64(len(fs)+2<<20) {
			t.Errorf("restore %s fetched %v bytes for a partition of %d", spec, b, len(fs))
		}
		if out, err := exec.Command("e2fsck", "-fn", out).CombinedOutput(); err != nil {
			t.Errorf("e2fsck of the restored partition: %v\n%s", err, out)
		}
	}

	// Onto another filesystem: refused without --force, nothing written.
	other := e.path("other.ext4")
	writeFile(t, other, nil)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", other, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	before, _ := os.ReadFile(other)
	r := e.run("restore", "latest:2", other)
	if r.code == 0 || !strings.Contains(r.stderr, "--force") {
		t.Fatalf("restore onto another filesystem: exit %d, %q", r.code, r.stderr)
	}
	if now, _ := os.ReadFile(other); !bytes.Equal(now, before) {
		t.Fatal("a refused restore wrote the target")
	}
	e.ok("restore", "latest:2", other, "--force")
	if now, _ := os.ReadFile(other); !bytes.Equal(now, fs) {
		t.Fatal("restore --force of the partition differs")
	}

	// A rollback of the partition onto itself: --delta writes one chunk.
	writeAt(t, other, 3<<20, []byte("changed"))
	var res map[string]any
	e.okJSON(&res, "restore", "latest:2", other, "--delta")
	if now, _ := os.ReadFile(other); !bytes.Equal(now, fs) {
		t.Fatal("restore --delta of the partition differs")
	}
	if w, same := res["bytes_written"].(float64), res["chunks_unchanged"].(float64); w == 0 || w > 1<<20 || same == 0 {
		t.Errorf("restore --delta wrote %v bytes (%v chunks unchanged) for 7 changed", w, same)
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"restore", "latest:9", e.path("x")}, `no partition "9"`},
		{[]string{"restore", "latest:2", "-"}, "not stdout"},
		{[]string{"restore", "latest:2/etc", e.path("x")}, "no PATH"},
		{[]string{"restore", "latest:2", e.path("x"), "--boot-only"}, "no --boot-only"},
	} {
		r := e.run(c.args...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", c.args, r.code, r.stderr, c.want)
		}
	}
	if _, err := os.Stat(e.path("x")); !os.IsNotExist(err) {
		t.Error("a refused restore created its target")
	}
}

// TestRestoreBootOnly restores the boot areas alone onto a disk of
// garbage: MBR, GPT and its backup, the gap's loader and the BIOS boot
// partition are the backup's, the partitions' contents untouched.
func TestRestoreBootOnly(t *testing.T) {
	needTools(t, "sfdisk", "mkfs.ext4")
	e := newEnv(t)
	img, _ := partDisk(t, e)
	e.backup(img)
	orig, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	garbage := randomBytes(len(orig))
	target := e.path("target.img")
	writeFile(t, target, garbage)
	var res map[string]any
	e.okJSON(&res, "restore", "latest", target, "--boot-only", "--force")
	got, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	const mib = 1 << 20
	areas := [][2]int{{0, 2 * mib}, {22 * mib, len(orig)}}       // up to partition 2; after 3, with the backup GPT
	parts := [][2]int{{2 * mib, 10 * mib}, {10 * mib, 22 * mib}} // partitions 2 and 3
	for _, a := range areas {
		if !bytes.Equal(got[a[0]:a[1]], orig[a[0]:a[1]]) {
			t.Errorf("boot area [%d, %d) is not the backup's", a[0], a[1])
		}
	}
	for _, p := range parts {
		if !bytes.Equal(got[p[0]:p[1]], garbage[p[0]:p[1]]) {
			t.Errorf("partition [%d, %d) was written by --boot-only", p[0], p[1])
		}
	}
	if res["boot_only"] != true {
		t.Errorf("--json: %v", res)
	}
	if out, err := exec.Command("sfdisk", "--verify", target).CombinedOutput(); err != nil {
		t.Errorf("sfdisk --verify of the restored table: %v\n%s", err, out)
	}

	plain := e.path("plain.img")
	writeFile(t, plain, randomBytes(1<<20))
	e.backup(plain)
	if r := e.run("restore", "latest", "--source", plain, e.path("y"), "--boot-only"); r.code == 0 || !strings.Contains(r.stderr, "no partition table") {
		t.Errorf("--boot-only of a disk without a table: exit %d, %q", r.code, r.stderr)
	}
}
