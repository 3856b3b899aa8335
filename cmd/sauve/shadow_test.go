package main

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// A VM disk image on XFS with reflink, rewritten pass after pass while it
// is backed up (each 4 KiB block stamped with its pass): by default the
// backup reads a reflink copy, so the snapshot is one instant of the file
// (blocks of pass g+1 before some offset, of pass g after it), and no copy
// is left beside the image.
func TestBackupReflinkCopy(t *testing.T) {
	e := newEnv(t)
	mnt := reflinkXFS(t, e)
	img := filepath.Join(mnt, "vm.img")
	const blocks = 8192 // 32 MiB
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 4096)
	pass := func(g uint64) {
		for i := range blocks {
			for k := 0; k < 4096; k += 8 {
				binary.LittleEndian.PutUint64(block[k:], g*1e6+uint64(i))
			}
			f.WriteAt(block, int64(i)*4096)
		}
	}
	pass(1)
	var stop atomic.Bool
	var passes atomic.Uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for g := uint64(2); !stop.Load(); g++ {
			pass(g)
			passes.Store(g)
		}
	}()
	var res struct {
		Snapshot string `json:"snapshot"`
		Copy     string `json:"point_in_time_copy"`
	}
	e.okJSON(&res, "backup", "--no-fs-skip", img)
	stop.Store(true)
	wg.Wait()
	if res.Copy != "reflink" {
		t.Fatalf("point_in_time_copy %q, want reflink", res.Copy)
	}
	if passes.Load() < 2 {
		t.Fatal("the writer made no pass during the test: it proves nothing")
	}
	out := e.path("restored.img")
	e.ok("restore", res.Snapshot, out)
	got := mustRead(t, out)
	gen := func(i int) uint64 { return binary.LittleEndian.Uint64(got[i*4096:]) / 1e6 }
	cut := 0
	for cut < blocks && gen(cut) == gen(0) {
		cut++
	}
	for i := cut; i < blocks; i++ {
		if gen(i) != gen(0)-1 {
			t.Fatalf("block %d is of pass %d, block 0 of pass %d (cut at block %d): the snapshot is not one instant", i, gen(i), gen(0), cut)
		}
	}
	if out := e.ok("show", res.Snapshot); !strings.Contains(out, "read from a reflink copy") {
		t.Errorf("show does not say the disk was read from a reflink copy:\n%s", out)
	}
	var sn []struct {
		Disks []struct {
			PointInTime string `json:"point_in_time"`
		} `json:"disks"`
	}
	e.okJSON(&sn, "snapshots")
	if len(sn) != 1 || len(sn[0].Disks) != 1 || sn[0].Disks[0].PointInTime != "reflink" {
		t.Errorf("the manifest does not record the reflink copy: %+v", sn)
	}
	if left, _ := filepath.Glob(filepath.Join(mnt, ".vm.img.sauve-copy-*")); len(left) != 0 {
		t.Fatalf("copies left beside the image: %v", left)
	}
}

func TestBackupSnapshotFlag(t *testing.T) {
	e := newEnv(t)
	img := e.path("d.img")
	writeFile(t, img, randomBytes(1<<20))
	if r := e.run("backup", "--snapshot", "zfs", img); r.code != 2 || !strings.Contains(r.stderr, "choose auto, none, lvm, btrfs, reflink, qemu") {
		t.Errorf("--snapshot zfs: exit %d, stderr %q: want a usage error", r.code, r.stderr)
	}
	if reflinkOK(e.dir) {
		t.Skip("the test folder's filesystem makes reflink copies")
	}
	e.fail([]string{"no reflink copy of " + img, "cannot make reflink copies"}, "backup", "--snapshot", "reflink", img)
	var res struct {
		Copy string `json:"point_in_time_copy"`
	}
	e.okJSON(&res, "backup", img)
	if res.Copy != "none" {
		t.Errorf("auto where reflink is not possible took %q", res.Copy)
	}
}

// reflinkOK reports whether dir's filesystem makes reflink copies.
func reflinkOK(dir string) bool {
	a, b := filepath.Join(dir, ".probe-a"), filepath.Join(dir, ".probe-b")
	os.WriteFile(a, []byte("x"), 0o644)
	defer os.Remove(a)
	defer os.Remove(b)
	out, err := exec.Command("cp", "--reflink=always", a, b).CombinedOutput()
	return err == nil && !strings.Contains(string(out), "failed")
}

// An image file on XFS holding an ext4 that is loop-mounted read-write
// and written to: the backup freezes the ext4 for the instant of the
// reflink copy (and says for how long), the snapshot is not marked in use,
// and the restored image's filesystem holds every file written before.
func TestBackupFreezesLoopMountedImage(t *testing.T) {
	e := newEnv(t)
	fsimg := e.path("xfs.img")
	sh(t, "truncate", "-s", "400M", fsimg)
	sh(t, "mkfs.xfs", "-q", "-m", "reflink=1", fsimg)
	dev := losetup(t, fsimg)
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	img := filepath.Join(mnt, "vm.img")
	sh(t, "truncate", "-s", "64M", img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	inner := e.path("inner")
	os.Mkdir(inner, 0o755)
	sh(t, "mount", "-o", "loop", img, inner)
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", inner).Run(); exec.Command("umount", inner).Run() })
	writeFile(t, filepath.Join(inner, "before.txt"), []byte("written before the backup"))
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			os.WriteFile(filepath.Join(inner, "busy.dat"), randomBytes(1<<20), 0o644)
		}
	}()
	var res struct {
		Snapshot string   `json:"snapshot"`
		Copy     string   `json:"point_in_time_copy"`
		Frozen   float64  `json:"frozen_seconds"`
		Mounts   []string `json:"frozen_mounts"`
		Disks    []struct {
			InUse string `json:"in_use"`
		} `json:"disks"`
	}
	e.okJSON(&res, "backup", img)
	stop.Store(true)
	wg.Wait()
	if res.Copy != "reflink" || len(res.Mounts) != 1 || res.Mounts[0] != inner || res.Frozen <= 0 || res.Frozen > 5 {
		t.Fatalf("backup: copy %q, frozen %v s of %v", res.Copy, res.Frozen, res.Mounts)
	}
	if res.Disks[0].InUse != "" {
		t.Errorf("a frozen copy recorded as read in use: %q", res.Disks[0].InUse)
	}
	// Writes go on after the backup: nothing stays frozen.
	writeFile(t, filepath.Join(inner, "after.txt"), []byte("after"))
	out := e.path("restored.img")
	e.ok("restore", res.Snapshot[:8], out)
	if got := sh(t, "debugfs", "-R", "cat /before.txt", out); !strings.Contains(got, "written before the backup") {
		t.Errorf("the restored filesystem lacks before.txt: %q", got)
	}
	if o := e.ok("show", res.Snapshot[:8]); !strings.Contains(o, "read from a reflink copy") {
		t.Errorf("show:\n%s", o)
	}
}
