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

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in, err string
	}{
		{"auto", ""}, {"none", ""}, {"reflink", ""},
		{"lvm", ""}, {"btrfs", ""}, {"qemu", ""}, {"zfs", "choose auto, none, lvm, btrfs, reflink, qemu"},
	} {
		_, err := ParseMode(tc.in)
		if (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("ParseMode(%q) = %v, want %q", tc.in, err, tc.err)
		}
	}
}

func open(t *testing.T, path string) *source.Source {
	t.Helper()
	src, err := source.Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// reflinkable reports whether dir's filesystem makes reflink copies.
func reflinkable(dir string) bool {
	a, err := os.CreateTemp(dir, "probe")
	if err != nil {
		return false
	}
	defer os.Remove(a.Name())
	defer a.Close()
	b, err := os.CreateTemp(dir, "probe")
	if err != nil {
		return false
	}
	defer os.Remove(b.Name())
	defer b.Close()
	return unix.IoctlFileClone(int(b.Fd()), int(a.Fd())) == nil
}

func TestAutoWithoutReflink(t *testing.T) {
	dir := t.TempDir()
	if reflinkable(dir) {
		t.Skip("the test folder's filesystem makes reflink copies: TestReflinkXFS covers it")
	}
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 1<<20), 0o644)
	var warnings []string
	p := New(Options{Mode: Auto, Warn: func(s string) { warnings = append(warnings, s) }})
	views, err := p.Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	defer Release(views)
	if views[0].Copy != "" || !views[0].Live {
		t.Errorf("auto on a filesystem without reflink took %q (live %v)", views[0].Copy, views[0].Live)
	}
	if len(warnings) != 0 {
		t.Errorf("auto said %q where no copy can be made: want silence", warnings)
	}
	if names, _ := filepath.Glob(filepath.Join(dir, ".*")); len(names) != 0 {
		t.Errorf("auto wrote %v beside the image on a filesystem without reflink", names)
	}
	p = New(Options{Mode: Reflink})
	if _, err := p.Views(context.Background(), []*source.Source{open(t, img)}); err == nil || !strings.Contains(err.Error(), "reflink") {
		t.Errorf("--snapshot reflink on a filesystem without it: %v", err)
	}
}

func TestReflinkRefusesStreamsAndDevices(t *testing.T) {
	p := New(Options{Mode: Reflink})
	if _, err := p.Views(context.Background(), []*source.Source{open(t, "/dev/null")}); err == nil || !strings.Contains(err.Error(), "only taken of files") {
		t.Errorf("reflink of /dev/null: %v", err)
	}
	p = New(Options{Mode: Auto})
	views, err := p.Views(context.Background(), []*source.Source{open(t, "/dev/null")})
	if err != nil || views[0].Copy != "" {
		t.Errorf("auto on /dev/null: %v, %v", err, views)
	}
	Release(views)
}

// xfsDir mounts a fresh XFS with reflink on a loop device and returns a
// folder in it.
func xfsDir(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and mount (CI runs as root)")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	run := func(args ...string) string {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("truncate", "-s", "320M", img)
	run("mkfs.xfs", "-q", "-m", "reflink=1", img)
	loop := run("losetup", "-f", "--show", img)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	run("mount", loop, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

// TestReflinkXFS clones an image file that a writer keeps rewriting, pass
// after pass, each 4 KiB block stamped with its pass number: the copy is
// one instant of it (every block of pass g+1 before some offset, of pass
// g after it), does not change afterwards, and leaves no file behind.
func TestReflinkXFS(t *testing.T) {
	dir := xfsDir(t)
	img := filepath.Join(dir, "vm.img")
	const blocks = 2048
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 4096)
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
	p := New(Options{Mode: Auto})
	views, err := p.Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	read := func() []byte {
		b := make([]byte, blocks*4096)
		if _, err := views[0].At.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	first := read()
	names, _ := filepath.Glob(filepath.Join(dir, ".vm.img"+copyMark+"*"))
	second := read()
	stop.Store(true)
	wg.Wait()
	if views[0].Copy != "reflink" || views[0].Live {
		t.Fatalf("auto on XFS with reflink took %q", views[0].Copy)
	}
	if !bytes.Equal(first, second) {
		t.Error("the copy changed while the source was written")
	}
	if len(names) != 0 {
		t.Errorf("the copy is visible beside the image: %v", names)
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
	now := make([]byte, blocks*4096)
	f.ReadAt(now, 0)
	if bytes.Equal(now, first) {
		t.Error("the writer made no progress: the test proves nothing")
	}
	if err := Release(views); err != nil {
		t.Fatal(err)
	}
}

// A qcow2 that a running QEMU holds open (its image locks) is not cloned:
// a copy of the file is not an instant of the VM's disk.
func TestReflinkRefusesQEMULockedImage(t *testing.T) {
	dir := xfsDir(t)
	img := filepath.Join(dir, "vm.qcow2")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	holder, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	// As QEMU does: an open file description lock on byte 101.
	lk := unix.Flock_t{Type: unix.F_RDLCK, Start: 101, Len: 1}
	if err := unix.FcntlFlock(holder.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	_, err = New(Options{Mode: Auto}).Views(context.Background(), []*source.Source{open(t, img)})
	if err == nil || !strings.Contains(err.Error(), "running QEMU") {
		t.Fatalf("error %v, want the QEMU lock named", err)
	}
}

// A copy that a killed backup left (its process no longer runs) is removed
// on the next run, which says so; one of a running process is left alone.
func TestLeftoverRemovedXFS(t *testing.T) {
	dir := xfsDir(t)
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 1<<20), 0o644)
	dead := filepath.Join(dir, ".disk.img"+copyMark+"2147483646-abcdef")
	mine := filepath.Join(dir, ".disk.img"+copyMark+strconv.Itoa(os.Getpid())+"-abcdef")
	os.WriteFile(dead, []byte("old"), 0o600)
	os.WriteFile(mine, []byte("in use"), 0o600)
	var warnings []string
	p := New(Options{Mode: Auto, Warn: func(s string) { warnings = append(warnings, s) }})
	views, err := p.Views(context.Background(), []*source.Source{open(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	defer Release(views)
	if _, err := os.Stat(dead); err == nil {
		t.Error("the leftover of a dead process was not removed")
	}
	if _, err := os.Stat(mine); err != nil {
		t.Error("the copy of a running process was removed")
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "removed") || !strings.Contains(warnings[0], "2147483646") {
		t.Errorf("warnings %q: want one saying the leftover was removed", warnings)
	}
}
