package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A machine's disks backed up together make one snapshot that lists each;
// restore, export and check take them all, or one with --disk.
func TestSeveralDisksOneSnapshot(t *testing.T) {
	e := newEnv(t)
	a, b := e.path("vda.img"), e.path("vdb.img")
	writeFile(t, a, randomBytes(3<<20))
	writeFile(t, b, append(randomBytes(1<<20), make([]byte, 1<<20)...))
	var res struct {
		Snapshot string `json:"snapshot"`
		Disks    []struct {
			Disk      string `json:"disk"`
			Size      int64  `json:"size"`
			BytesRead int64  `json:"bytes_read"`
		} `json:"disks"`
		BytesRead int64 `json:"bytes_read"`
	}
	e.okJSON(&res, "backup", a, b)
	if len(res.Disks) != 2 || res.Disks[0].Disk != "vda.img" || res.Disks[1].Disk != "vdb.img" || res.Disks[1].Size != 2<<20 {
		t.Fatalf("backup --json disks: %+v", res.Disks)
	}
	if res.BytesRead != res.Disks[0].BytesRead+res.Disks[1].BytesRead {
		t.Errorf("bytes_read %d is not the disks' sum", res.BytesRead)
	}
	id := res.Snapshot[:8]
	if out := e.ok("snapshots"); !strings.Contains(out, "vda.img") || !strings.Contains(out, "vdb.img") {
		t.Errorf("snapshots lacks a disk:\n%s", out)
	}
	if out := e.ok("show", id); strings.Count(out, "\ndisk ") != 2 {
		t.Errorf("show lists %d disks:\n%s", strings.Count(out, "\ndisk "), out)
	}

	// Into a folder: each disk a file named after it.
	dir := e.path("restored")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.ok("restore", id, dir)
	sameFile(t, a, filepath.Join(dir, "vda.img"))
	sameFile(t, b, filepath.Join(dir, "vdb.img"))
	// One target per disk, in the snapshot's order.
	t1, t2 := e.path("t1"), e.path("t2")
	e.ok("restore", id, t1, t2)
	sameFile(t, a, t1)
	sameFile(t, b, t2)
	// One disk.
	e.ok("restore", id, "--disk", "vdb.img", e.path("only-b"))
	sameFile(t, b, e.path("only-b"))
	e.fail([]string{"holds 2 disks", "vda.img, vdb.img", "--disk"}, "restore", id, e.path("one-file"))
	e.fail([]string{`no disk "vdc"`, "it has: vda.img, vdb.img"}, "restore", id, "--disk", "vdc", e.path("x"))
	e.fail([]string{"stdout takes one"}, "restore", id, "-")

	// Export every disk into a folder; qemu-img reads each.
	out := e.path("vm")
	e.ok("export", id, out, "--format", "qcow2")
	for name, want := range map[string]string{"vda.img.qcow2": a, "vdb.img.qcow2": b} {
		if o, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", filepath.Join(out, name), want).CombinedOutput(); err != nil {
			t.Errorf("qemu-img compare %s: %v\n%s", name, err, o)
		}
	}
	e.fail([]string{"holds 2 disks", "--format"}, "export", id, e.path("vm.ova"))

	// check SNAPSHOT verifies every chunk of every disk, or of one.
	if o := e.ok("check", id); !strings.Contains(o, "disk vda.img") || !strings.Contains(o, "disk vdb.img") {
		t.Errorf("check %s:\n%s", id, o)
	}
	if o := e.ok("check", id, "--disk", "vdb.img"); strings.Contains(o, "vda.img") {
		t.Errorf("check --disk vdb.img verified vda.img too:\n%s", o)
	}
	e.fail([]string{"--disk needs a SNAPSHOT"}, "check", "--disk", "vda.img")
}

func TestSeveralDisksRefused(t *testing.T) {
	e := newEnv(t)
	for _, d := range []string{"x", "y"} {
		if err := os.Mkdir(e.path(d), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, e.path(d+"/disk.img"), randomBytes(1<<20))
	}
	e.fail([]string{"two sources named disk.img"}, "backup", e.path("x/disk.img"), e.path("y/disk.img"))
	e.fail([]string{"standard input (-) is backed up alone"}, "backup", e.path("x/disk.img"), "-")
	if out := e.ok("snapshots"); !strings.Contains(out, "0 snapshots") {
		t.Errorf("a refused backup stored a snapshot:\n%s", out)
	}
}

// check SNAPSHOT fails, naming the disk, when a chunk it needs is damaged.
func TestCheckSnapshotFindsDamage(t *testing.T) {
	e := newEnv(t)
	img := e.path("d.img")
	writeFile(t, img, randomBytes(2<<20))
	res := e.backup(img)
	packs, _ := filepath.Glob(filepath.Join(e.repo, "data", "*", "*"))
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	for _, p := range packs {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		data[len(data)/3] ^= 0xff
		writeFile(t, p, data)
	}
	if r := e.run("check", res.ShortID); r.code != 1 || !strings.Contains(r.stderr, "disk d.img of snapshot "+res.ShortID+" does not restore") {
		t.Fatalf("check of a damaged snapshot: exit %d\n%s", r.code, r.stderr)
	}
}

// A read-write mounted filesystem read with no copy: the snapshot says it
// may be torn; --require-consistent refuses instead.
func TestRequireConsistent(t *testing.T) {
	e := newEnv(t)
	if reflinkOK(e.dir) {
		t.Skip("the test folder makes reflink copies: the image would be copied, not read in use")
	}
	img := e.path("fs.img")
	writeFile(t, img, make([]byte, 32<<20))
	sh(t, "mkfs.ext4", "-q", "-F", img)
	dev := losetup(t, img)
	mnt := e.path("mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	e.fail([]string{"is in use", "mounted read-write at " + mnt, "--require-consistent"}, "backup", "--require-consistent", img)
	if out := e.ok("snapshots"); !strings.Contains(out, "0 snapshots") {
		t.Fatalf("--require-consistent stored a snapshot:\n%s", out)
	}
	r := e.run("backup", img)
	if r.code != 0 || !strings.Contains(r.stderr, "mounted read-write") {
		t.Fatalf("backup of a mounted image: exit %d\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stdout, "not one instant") {
		t.Errorf("backup output does not say the disk was read in use:\n%s", r.stdout)
	}
	if out := e.ok("snapshots"); !strings.Contains(out, "in use!") {
		t.Errorf("snapshots does not mark the disk read in use:\n%s", out)
	}
	var list []struct {
		Disks []struct {
			InUse string `json:"in_use"`
		} `json:"disks"`
	}
	e.okJSON(&list, "snapshots")
	if len(list) != 1 || !strings.Contains(list[0].Disks[0].InUse, mnt) {
		t.Errorf("snapshots --json: %+v", list)
	}
	if out := e.ok("show", "latest"); !bytes.Contains([]byte(out), []byte("may be torn")) {
		t.Errorf("show does not say the disk may be torn:\n%s", out)
	}
}
