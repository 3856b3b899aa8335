package shadow

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

// btrfsMount mounts a fresh btrfs on a loop device and returns its mount
// point; run runs a command and fails the test if it fails.
func btrfsMount(t *testing.T) (mnt string, run func(args ...string) string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices, mount, btrfs snapshots (CI runs as root)")
	}
	for _, p := range []string{"mkfs.btrfs", "btrfs", "losetup", "chattr"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (btrfs-progs, util-linux, e2fsprogs)", p)
		}
	}
	run = func(args ...string) string {
		t.Helper()
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "btrfs.img")
	mnt = filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	run("truncate", "-s", "512M", img)
	run("mkfs.btrfs", "-q", img)
	loop := run("losetup", "-f", "--show", img)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	run("mount", loop, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt, run
}

// subvolumes lists the paths of the subvolumes of the btrfs at mnt.
func subvolumes(t *testing.T, run func(...string) string, mnt string) []string {
	var paths []string
	for _, line := range strings.Split(run("btrfs", "subvolume", "list", mnt), "\n") {
		if i := strings.Index(line, " path "); i >= 0 {
			paths = append(paths, line[i+len(" path "):])
		}
	}
	return paths
}

func ourSnapshots(paths []string) []string {
	var ours []string
	for _, p := range paths {
		if strings.HasPrefix(filepath.Base(p), snapMark) {
			ours = append(ours, p)
		}
	}
	return ours
}

// TestBtrfsSnapshotIsOneInstant snapshots the subvolume of an image file
// that a writer keeps rewriting, pass after pass, each 4 KiB block
// stamped with its pass number: auto takes a btrfs snapshot (not a
// reflink copy), the view is one instant (every block of pass g+1 before
// some offset, of pass g after it) that does not change afterwards, and
// Release deletes the snapshot.
//
// The writer writes with O_DIRECT, as QEMU does with cache=none: each
// write has reached the filesystem when it returns. Buffered writes are
// not ordered on disk (writeback flushes dirty pages in any order while
// the snapshot commits), so with them no snapshot, btrfs's or a crash's,
// is a prefix of the writes; only what was flushed is promised, and a
// guest flushes through fsync.
func TestBtrfsSnapshotIsOneInstant(t *testing.T) {
	mnt, run := btrfsMount(t)
	run("btrfs", "subvolume", "create", filepath.Join(mnt, "vms"))
	img := filepath.Join(mnt, "vms", "vm.img")
	const blocks = 2048
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|unix.O_DIRECT, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := alignedBlock()
	writePass := func(g uint64) {
		for i := 0; i < blocks; i++ {
			binary.LittleEndian.PutUint64(block, g)
			f.WriteAt(block, int64(i)*4096)
		}
	}
	writePass(1)
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for g := uint64(2); !stop.Load(); g++ {
			writePass(g)
		}
	}()
	views, err := New(Options{Mode: Auto}).Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	t.Cleanup(func() { Release(views) })
	read := func() []byte {
		b := make([]byte, blocks*4096)
		if _, err := views[0].At.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	first := read()
	held := ourSnapshots(subvolumes(t, run, mnt))
	second := read()
	stop.Store(true)
	wg.Wait()
	if views[0].Copy != "btrfs" || views[0].Live || views[0].Size != blocks*4096 {
		t.Fatalf("auto on btrfs took %q (live %v, size %d)", views[0].Copy, views[0].Live, views[0].Size)
	}
	if len(held) != 1 || !strings.HasPrefix(held[0], "vms/"+snapMark+strconv.Itoa(os.Getpid())+"-") {
		t.Errorf("snapshots while the view is read: %q, want one at the top of vms named for this process", held)
	}
	if !bytes.Equal(first, second) {
		t.Error("the snapshot changed while the source was written")
	}
	gen := func(i int) uint64 { return binary.LittleEndian.Uint64(first[i*4096:]) }
	cut := 0
	for cut < blocks && gen(cut) == gen(0) {
		cut++
	}
	for i := cut; i < blocks; i++ {
		if gen(i) != gen(0)-1 {
			t.Fatalf("block %d is of pass %d, block 0 of pass %d, the cut at %d: not one instant", i, gen(i), gen(0), cut)
		}
	}
	t.Logf("cut %d gen %d", cut, gen(0))
	now := make([]byte, blocks*4096)
	f.ReadAt(now, 0)
	if bytes.Equal(now, first) {
		t.Error("the writer made no progress: the test proves nothing")
	}
	if err := Release(views); err != nil {
		t.Fatal(err)
	}
	if left := ourSnapshots(subvolumes(t, run, mnt)); len(left) != 0 {
		t.Errorf("Release left %q", left)
	}
}

// alignedBlock returns a 4 KiB buffer aligned for O_DIRECT.
func alignedBlock() []byte {
	b := make([]byte, 2*4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)
	return b[off%4096 : off%4096+4096]
}

// The image of a nested subvolume is read from a snapshot of that
// subvolume, not of the one around it; CopyUsed grows as the image is
// rewritten after the snapshot.
func TestBtrfsNestedSubvolume(t *testing.T) {
	mnt, run := btrfsMount(t)
	run("btrfs", "subvolume", "create", filepath.Join(mnt, "outer"))
	run("btrfs", "subvolume", "create", filepath.Join(mnt, "outer", "inner"))
	os.Mkdir(filepath.Join(mnt, "outer", "inner", "disks"), 0o755)
	img := filepath.Join(mnt, "outer", "inner", "disks", "d.img")
	want := bytes.Repeat([]byte("instant!"), 1<<17) // 1 MiB
	// VM images on btrfs are often nodatacow (chattr +C), which no
	// reflink copy can clone: a snapshot still takes them.
	os.WriteFile(img, nil, 0o644)
	run("chattr", "+C", img)
	if err := os.WriteFile(img, want, 0o644); err != nil {
		t.Fatal(err)
	}
	views, err := New(Options{Mode: Btrfs}).Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	defer Release(views)
	snaps := ourSnapshots(subvolumes(t, run, mnt))
	if len(snaps) != 1 || !strings.HasPrefix(snaps[0], "outer/inner/"+snapMark) {
		t.Fatalf("snapshots %q, want one at the top of outer/inner", snaps)
	}
	if w, err := os.OpenFile(filepath.Join(mnt, snaps[0], "disks", "d.img"), os.O_WRONLY, 0); err == nil {
		w.Close()
		t.Error("the image in the snapshot opens for writing: the snapshot is not read-only")
	}
	before := views[0].CopyUsed()
	if err := os.WriteFile(img, bytes.Repeat([]byte("changed!"), 1<<17), 0o644); err != nil {
		t.Fatal(err)
	}
	run("sync")
	got := make([]byte, len(want))
	if _, err := views[0].At.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the snapshot does not hold the image as it was (%v)", err)
	}
	if after := views[0].CopyUsed(); before > 64<<10 || after < int64(len(want)) {
		t.Errorf("CopyUsed %d before the image was rewritten, %d after: want about 0, then its 1 MiB", before, after)
	}
}

// A snapshot that a killed backup left (its process no longer runs) is
// deleted on the next run, which says so; one of a running process, and a
// plain folder with such a name, are left alone.
func TestBtrfsLeftovers(t *testing.T) {
	mnt, run := btrfsMount(t)
	img := filepath.Join(mnt, "disk.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 1<<20), 0o644)
	dead := filepath.Join(mnt, snapMark+"2147483646-abcdef012345")
	mine := filepath.Join(mnt, snapMark+strconv.Itoa(os.Getpid())+"-abcdef012345")
	folder := filepath.Join(mnt, snapMark+"2147483645-abcdef012345")
	run("btrfs", "subvolume", "snapshot", "-r", mnt, dead)
	run("btrfs", "subvolume", "snapshot", "-r", mnt, mine)
	os.Mkdir(folder, 0o755)
	var warnings []string
	p := New(Options{Mode: Auto, Warn: func(s string) { warnings = append(warnings, s) }})
	views, err := p.Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	if err := Release(views); err != nil {
		t.Fatal(err)
	}
	subs := subvolumes(t, run, mnt)
	if contains(subs, filepath.Base(dead)) {
		t.Error("the leftover of a dead process was not deleted")
	}
	if !contains(subs, filepath.Base(mine)) {
		t.Error("the snapshot of a running process was deleted")
	}
	if _, err := os.Stat(folder); err != nil {
		t.Error("a folder named like a snapshot was removed")
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "removed "+dead) || !strings.Contains(warnings[0], "2147483646") {
		t.Errorf("warnings %q: want one saying the leftover was removed", warnings)
	}
}

// Where no snapshot can be taken the error is errUnsupported (auto then
// tries a reflink copy), and --snapshot btrfs names why.
func TestBtrfsUnsupported(t *testing.T) {
	mnt, run := btrfsMount(t)
	os.MkdirAll(filepath.Join(mnt, "sub", "dir"), 0o755)
	img := filepath.Join(mnt, "sub", "dir", "disk.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 1<<20), 0o644)

	// A folder of a subvolume bind-mounted elsewhere: the top of its
	// subvolume is out of reach, but the file can still be reflinked.
	bind := filepath.Join(t.TempDir(), "bind")
	os.Mkdir(bind, 0o755)
	run("mount", "--bind", filepath.Join(mnt, "sub", "dir"), bind)
	t.Cleanup(func() { exec.Command("umount", bind).Run() })
	views, err := New(Options{Mode: Auto}).Views(context.Background(), []*source.Source{open(t, filepath.Join(bind, "disk.img"))})
	if err != nil {
		t.Fatal(err)
	}
	if views[0].Copy != "reflink" {
		t.Errorf("auto on an image whose subvolume top is not mounted took %q, want a reflink copy", views[0].Copy)
	}
	Release(views)
	_, err = New(Options{Mode: Btrfs}).Views(context.Background(), []*source.Source{open(t, filepath.Join(bind, "disk.img"))})
	if err == nil || !strings.Contains(err.Error(), "is not mounted") {
		t.Errorf("--snapshot btrfs of it: %v", err)
	}

	ro := open(t, img)
	run("mount", "-o", "remount,ro", mnt)
	t.Cleanup(func() { exec.Command("mount", "-o", "remount,rw", mnt).Run() })
	if _, err := planBtrfs(ro, Options{Warn: func(string) {}}); !isUnsupported(err) || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("planBtrfs on a read-only btrfs: %v, want errUnsupported naming it", err)
	}

	other := filepath.Join(t.TempDir(), "disk.img")
	os.WriteFile(other, []byte("x"), 0o644)
	var sfs unix.Statfs_t
	if unix.Statfs(other, &sfs) == nil && uint32(sfs.Type) != btrfsMagic {
		if _, err := planBtrfs(open(t, other), Options{Warn: func(string) {}}); !isUnsupported(err) || !strings.Contains(err.Error(), "not btrfs") {
			t.Errorf("planBtrfs off btrfs: %v, want errUnsupported", err)
		}
	}
}

func TestSnapPID(t *testing.T) {
	for _, tc := range []struct {
		name string
		pid  int
	}{
		{snapMark + "123-abcdef012345", 123},
		{snapMark + "123-abcdef01234", 0},
		{snapMark + "123-abcdef0123456", 0},
		{snapMark + "123-ABCDEF012345", 0},
		{snapMark + "123-abcdeg012345", 0},
		{snapMark + "123", 0},
		{snapMark + "-abcdef012345", 0},
		{snapMark + "0-abcdef012345", 0},
		{snapMark + "+5-abcdef012345", 0},
		{snapMark + "x1-abcdef012345", 0},
		{"sauve-snap-123-abcdef012345", 0},
		{lvmMark + "123-abcdef012345", 0},
		{snapMark + "99999999999999999999-abcdef012345", 0},
	} {
		if got := snapPID(tc.name, snapMark); got != tc.pid {
			t.Errorf("snapPID(%q) = %d, want %d", tc.name, got, tc.pid)
		}
	}
}
