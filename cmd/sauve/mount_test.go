package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountEntry finds dir in /proc/self/mountinfo: its filesystem type,
// source and per-mount options.
func mountEntry(dir string) (fstype, source, opts string, ok bool) {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[4] != dir {
			continue
		}
		for i, x := range f {
			if x == "-" && i+2 < len(f) {
				return f[i+1], f[i+2], f[5], true
			}
		}
	}
	return "", "", "", false
}

// startMount runs sauve mount ARGS... DIR in the background until it has
// mounted DIR; the mount is detached when the test ends, whatever
// happened.
func startMount(t *testing.T, e *env, dir string, args ...string) *daemon {
	t.Helper()
	t.Cleanup(func() {
		if _, _, _, ok := mountEntry(dir); ok {
			t.Errorf("%s still mounted at the end of the test: detached", dir)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	c := e.cmd(nil, append(append([]string{"mount"}, args...), dir)...)
	return startDaemon(t, "sauve mount", c, e.path("mount.log"), syscall.SIGTERM, func() bool {
		_, _, _, ok := mountEntry(dir)
		return ok
	})
}

// TestMount: a repository's snapshots mounted with FUSE: the disk image
// is the original byte for byte; a partition image loop-mounts and holds
// the original files; the --files view shows them with their metadata;
// concurrent readers agree; SIGTERM unmounts, or says the mount is busy
// and keeps serving.
func TestMount(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "mount", "umount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t, "--chunk-size", "64K")
	files := e.path("files")
	extTree(t, files)
	raw := partitionedExt4(t, e, files)
	b1 := e.backup(raw)
	// A second snapshot: a filesystem without a partition table.
	files2 := e.path("files2")
	writeTree(t, filepath.Join(files2, "only/here.txt"), textBytes(9, 5000))
	whole := e.path("whole.img")
	sh(t, "truncate", "-s", "16M", whole)
	sh(t, "mkfs.ext4", "-q", "-F", "-d", files2, whole)
	b2 := e.backup(whole)

	d1, d2 := imageBase(b1.Disk), imageBase(b2.Disk)
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	d := startMount(t, e, dir, "--files")
	if fstype, source, opts, _ := mountEntry(dir); fstype != "fuse.sauve" || source != "sauve" || !strings.HasPrefix(opts, "ro,") {
		t.Fatalf("mount entry: type %q source %q options %q", fstype, source, opts)
	}
	snaps := dirNames(t, dir)
	if len(snaps) != 2 || !strings.HasSuffix(snaps[0], "_"+b1.ShortID) || !strings.HasSuffix(snaps[1], "_"+b2.ShortID) || strings.Contains(snaps[0], ":") {
		t.Fatalf("snapshot folders: %q (want one per snapshot, oldest first, named by time and ID)", snaps)
	}
	s1, s2 := filepath.Join(dir, snaps[0]), filepath.Join(dir, snaps[1])
	if got, want := dirNames(t, s1), []string{d1 + "-part1", d1 + "-part1.img", d1 + ".img"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("snapshot folder: %q, want %q", got, want)
	}

	// The disk image is the original.
	img := filepath.Join(s1, d1+".img")
	sh(t, "cmp", raw, img)

	// Several readers at once, at different places, agree with it.
	orig, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.Open(img)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			buf := make([]byte, 200<<10+i*4096)
			for off := int64(i) * 777777; off < int64(len(orig)); off += int64(len(buf)) * 5 {
				n, err := f.ReadAt(buf, off)
				if (err != nil && err != io.EOF) || !bytes.Equal(buf[:n], orig[off:off+int64(n)]) {
					t.Errorf("reader %d at %d: %d bytes, %v, or they differ", i, off, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()

	// The partition image loop-mounts: the kernel's ext4 reads the files.
	p1 := e.path("p1")
	os.Mkdir(p1, 0o755)
	sh(t, "mount", "-o", "loop,ro", filepath.Join(s1, d1+"-part1.img"), p1)
	loopMounted := true
	defer func() {
		if loopMounted {
			exec.Command("umount", p1).Run()
		}
	}()
	sameTree(t, hashTree(t, files), hashTree(t, p1))
	// The files view: contents, and the metadata ls and stat show, as
	// the kernel's ext4 shows them.
	view := filepath.Join(s1, d1+"-part1")
	// Its folder shows the filesystem's root once that is open.
	dirNames(t, view)
	waitFor(t, "the files view's folder to show the filesystem's root", func() bool {
		var st syscall.Stat_t
		return syscall.Stat(view, &st) == nil && st.Mode == syscall.S_IFDIR|0o755 && st.Nlink == 6
	})
	sameMetadata(t, p1, view, true)
	sh(t, "umount", p1)
	loopMounted = false

	// And as they went in, to several readers at once.
	want := hashTree(t, files)
	errs := make(chan error, 4)
	for range 4 {
		go func() { errs <- sameTreeErr(want, view) }()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	sameMetadata(t, files, view, false)
	var a, h syscall.Stat_t
	syscall.Lstat(filepath.Join(view, "etc/app/app.conf"), &a)
	syscall.Lstat(filepath.Join(view, "home/ann/app.conf.link"), &h)
	if a.Ino != h.Ino || a.Nlink != 2 {
		t.Fatalf("hard links: inodes %d and %d, %d links", a.Ino, h.Ino, a.Nlink)
	}
	if out := sh(t, "ls", "-ln", filepath.Join(view, "home/ann")); !strings.Contains(out, "-rw-r----- 1 1000 1001 30000 ") || !strings.Contains(out, "rel-link -> ../../etc/app/app.conf") {
		t.Fatalf("ls -ln of the files view:\n%s", out)
	}
	if err := os.WriteFile(filepath.Join(view, "new"), nil, 0o644); err == nil {
		t.Fatal("wrote a file into the mount")
	}
	// The snapshot without a partition table: its files, under -files.
	if got := dirNames(t, s2); strings.Join(got, " ") != d2+"-files "+d2+".img" {
		t.Fatalf("folder of an unpartitioned disk: %q", got)
	}
	sameTree(t, hashTree(t, files2), hashTree(t, filepath.Join(s2, d2+"-files")))
	sh(t, "cmp", whole, filepath.Join(s2, d2+".img"))

	// Busy: a file open in the mount keeps it mounted and served.
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, "the busy message", func() bool { return strings.Contains(d.logText(), "is busy") })
	select {
	case <-d.exited:
		t.Fatalf("sauve mount exited while the mount was busy:\n%s", d.logText())
	case <-time.After(300 * time.Millisecond):
	}
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, orig[1<<20:1<<20+4096]) {
		t.Fatalf("read after a refused unmount: %v", err)
	}
	f.Close()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatalf("sauve mount did not exit within 15 s of SIGTERM:\n%s", d.logText())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("sauve mount exited %d after unmounting:\n%s", code, d.logText())
	}
	if _, _, _, ok := mountEntry(dir); ok {
		t.Fatal("still mounted after sauve mount exited")
	}
	if strings.Contains(d.logText(), "panic") || !strings.Contains(d.logText(), "unmounted "+dir) {
		t.Fatalf("log:\n%s", d.logText())
	}
}

// TestMountOne: naming a snapshot mounts it alone; an unmount from
// elsewhere ends sauve mount cleanly.
func TestMountOne(t *testing.T) {
	needTools(t, "mkfs.ext4", "umount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t)
	img := e.path("fs.img")
	sh(t, "truncate", "-s", "8M", img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	e.backup(img)
	b := e.backup(img)
	db := imageBase(b.Disk)
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	d := startMount(t, e, dir, b.ShortID)
	if got := dirNames(t, dir); len(got) != 1 || !strings.HasSuffix(got[0], "_"+b.ShortID) {
		t.Fatalf("one snapshot named: %q", got)
	}
	if got := dirNames(t, filepath.Join(dir, dirNames(t, dir)[0])); strings.Join(got, " ") != db+".img" {
		t.Fatalf("without --files: %q", got)
	}
	sh(t, "umount", dir)
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("sauve mount did not exit after an unmount from elsewhere")
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d:\n%s", code, d.logText())
	}
}

// TestMountErrors: a mount point that is not an empty folder, or a
// snapshot that does not exist, get one clear line and a failure.
func TestMountErrors(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t)
	img := e.path("d.img")
	writeFile(t, img, randomBytes(1<<20))
	snap := e.backup(img).ShortID
	full := e.path("full")
	writeTree(t, filepath.Join(full, "x"), nil)
	empty := e.path("empty")
	os.Mkdir(empty, 0o755)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{snap, full}, "is not empty"},
		{[]string{snap, e.path("none")}, "does not exist"},
		{[]string{snap, img}, "is not a folder"},
		{[]string{"deadbeef", empty}, `no snapshot "deadbeef"`},
		{[]string{"--host", "nobody", empty}, "no snapshot matches"},
		{[]string{"a", "b", "c"}, "expects [SNAPSHOT] DIR"},
	} {
		stderr := e.fail([]string{c.want}, append([]string{"mount"}, c.args...)...)
		if lines := strings.Count(strings.TrimSpace(stderr), "\n") + 1; lines > 2 || (lines == 2 && !strings.Contains(stderr, "--help")) {
			t.Errorf("sauve mount %q: want one line, got:\n%s", c.args, stderr)
		}
	}
	if _, _, _, ok := mountEntry(empty); ok {
		exec.Command("umount", "-l", empty).Run()
		t.Fatal("a failed sauve mount left a mount")
	}
}

// sameMetadata compares what lstat, readlink and listxattr say of every
// file under want with the same file under got; not exact: times to the
// second (a filesystem with small inodes keeps no more), and not the
// sizes and links of directories (another filesystem's). Blocks are not
// compared: the files view derives them from the size.
func sameMetadata(t *testing.T, want, got string, exact bool) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(want, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		if rel == "." && !exact {
			return nil // made by mkfs, not copied from the folder
		}
		q := filepath.Join(got, rel)
		var a, b syscall.Stat_t
		if err := syscall.Lstat(p, &a); err != nil {
			return err
		}
		if err := syscall.Lstat(q, &b); err != nil {
			t.Errorf("%s: %v", rel, err)
			return nil
		}
		n++
		loose := !exact && a.Mode&syscall.S_IFMT == syscall.S_IFDIR
		ta, tb := a.Mtim, b.Mtim
		if !exact {
			ta.Nsec, tb.Nsec = 0, 0
		}
		if a.Mode != b.Mode || a.Uid != b.Uid || a.Gid != b.Gid || ta != tb || (!loose && (a.Size != b.Size || a.Nlink != b.Nlink)) ||
			(exact && (a.Ctim != b.Ctim || a.Atim != b.Atim)) {
			t.Errorf("%s: mode %o/%o owner %d:%d/%d:%d size %d/%d links %d/%d mtime %v/%v ctime %v/%v atime %v/%v blocks %d/%d", rel, a.Mode, b.Mode, a.Uid, a.Gid, b.Uid, b.Gid,
				a.Size, b.Size, a.Nlink, b.Nlink, a.Mtim, b.Mtim, a.Ctim, b.Ctim, a.Atim, b.Atim, a.Blocks, b.Blocks)
		}
		if a.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			ta, _ := os.Readlink(p)
			if tb, err := os.Readlink(q); err != nil || ta != tb {
				t.Errorf("%s: symlink to %q, in the mount %q (%v)", rel, ta, tb, err)
			}
			return nil
		}
		if xa, xb := xattrs(t, p), xattrs(t, q); xa != xb {
			t.Errorf("%s: xattrs %q, in the mount %q", rel, xa, xb)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 10 {
		t.Fatalf("compared %d files", n)
	}
}

// xattrs lists the user.* attributes of p with their values.
func xattrs(t *testing.T, p string) string {
	buf := make([]byte, 4096)
	n, err := unix.Listxattr(p, buf)
	if err != nil {
		t.Errorf("listxattr %s: %v", p, err)
		return ""
	}
	var out []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if !strings.HasPrefix(name, "user.") {
			continue
		}
		v := make([]byte, 4096)
		k, err := unix.Getxattr(p, name, v)
		if err != nil {
			t.Errorf("getxattr %s %s: %v", p, name, err)
		}
		out = append(out, name+"="+string(v[:max(k, 0)]))
	}
	sort.Strings(out)
	return strings.Join(out, ",")
}

// imageBase is a disk's name as its image files are named after it.
func imageBase(disk string) string {
	return strings.TrimSuffix(strings.TrimSuffix(disk, ".raw"), ".img")
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMountUnprivileged: a user other than root mounts through
// fusermount3 and unmounts on SIGTERM; where /dev/fuse is closed to
// other users (some containers), the error says so.
func TestMountUnprivileged(t *testing.T) {
	needTools(t, "setpriv", "fusermount3")
	fi, err := os.Stat("/dev/fuse")
	if err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t)
	img := e.path("d.img")
	data := randomBytes(3 << 20)
	writeFile(t, img, data)
	snap := e.backup(img).ShortID
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	sh(t, "chmod", "-R", "a+rwX", e.dir)
	sh(t, "chmod", "a+rx", filepath.Dir(sauveBin), filepath.Dir(e.dir))
	os.Chown(dir, 65534, 65534)
	asNobody := func(c *exec.Cmd) *exec.Cmd {
		c.Args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sauveBin}, c.Args[1:]...)
		c.Path, _ = exec.LookPath("setpriv")
		return c
	}
	if fi.Mode().Perm()&0o006 != 0o006 {
		out, err := asNobody(e.cmd(nil, "mount", snap, dir)).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "FUSE is not available to this user") || strings.Count(string(out), "\n") != 1 {
			t.Fatalf("mount as nobody with /dev/fuse closed to it: %v\n%s", err, out)
		}
		return
	}
	t.Cleanup(func() {
		if _, _, _, ok := mountEntry(dir); ok {
			exec.Command("umount", "-l", dir).Run()
		}
	})
	d := startDaemon(t, "sauve mount as nobody", asNobody(e.cmd(nil, "mount", snap, dir)), e.path("mount.log"), syscall.SIGTERM, func() bool {
		_, _, _, ok := mountEntry(dir)
		return ok
	})
	names := dirNames(t, dir)
	if len(names) != 1 {
		t.Fatalf("mount: %q", names)
	}
	if _, err := os.ReadFile(filepath.Join(dir, names[0], "d.img")); err == nil {
		t.Fatal("root read a mount of another user without --allow-other")
	}
	out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cmp", img, filepath.Join(dir, names[0], "d.img")).CombinedOutput()
	if err != nil {
		t.Fatalf("cmp as nobody: %v\n%s", err, out)
	}
	d.stop(t, syscall.SIGTERM)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d:\n%s", code, d.logText())
	}
	if _, _, _, ok := mountEntry(dir); ok {
		t.Fatal("still mounted")
	}
}

// TestMountDamaged: a chunk that fails verification reads as an I/O
// error, with a warning naming the disk; the rest of the disk reads, and
// the mount goes on serving.
func TestMountDamaged(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	requireRoot(t)
	e := newEnv(t)
	src := e.path("disk.img")
	data := textBytes(11, 6<<20)
	writeFile(t, src, data)
	b := e.backup(src)
	packs := packFiles(t, e.repo)
	if len(packs) != 1 {
		t.Fatalf("%d packs", len(packs))
	}
	pack := mustRead(t, packs[0])
	pack[len(pack)/2] ^= 0x40
	os.Chmod(packs[0], 0o600)
	writeFile(t, packs[0], pack)
	var rep struct {
		Damaged []struct {
			Ranges []struct{ Offset, Length int64 }
		}
	}
	r := e.run("check", "--read-data", "--json")
	if json.Unmarshal([]byte(r.stdout), &rep) != nil || len(rep.Damaged) != 1 || len(rep.Damaged[0].Ranges) != 1 {
		t.Fatalf("check --json: %s", r.stdout)
	}
	bad := rep.Damaged[0].Ranges[0]

	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	d := startMount(t, e, dir, b.ShortID)
	img := filepath.Join(dir, dirNames(t, dir)[0], "disk.img")
	if err := exec.Command("cmp", src, img).Run(); err == nil {
		t.Fatal("a damaged disk read back whole")
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, bad.Offset); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of the damaged chunk at %d: %v, want EIO", bad.Offset, err)
	}
	for _, off := range []int64{0, bad.Offset + bad.Length, int64(len(data)) - 4096} {
		if off < 0 || off+4096 > int64(len(data)) || (off >= bad.Offset && off < bad.Offset+bad.Length) {
			continue
		}
		if n, err := f.ReadAt(buf, off); n != 4096 || !bytes.Equal(buf, data[off:off+4096]) {
			t.Fatalf("read at %d, outside the damage: %d bytes, %v", off, n, err)
		}
	}
	f.Close()
	waitFor(t, "a warning", func() bool {
		return strings.Contains(d.logText(), "warning: read disk disk.img of snapshot "+b.ShortID)
	})
	d.stop(t, syscall.SIGTERM)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d:\n%s", code, d.logText())
	}
}

// TestMountAllowOther: without --allow-other only the user who mounted
// reads the mount; with it, others read the images, and the files view
// keeps the filesystem's own permissions.
func TestMountAllowOther(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "setpriv")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t)
	files := e.path("files")
	extTree(t, files)
	raw := partitionedExt4(t, e, files)
	b := e.backup(raw)
	db := imageBase(b.Disk)
	sh(t, "chmod", "a+rx", e.dir, filepath.Dir(e.dir))
	asNobody := func(args ...string) error {
		return exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, args...)...).Run()
	}
	for _, allow := range []bool{false, true} {
		dir := e.path(fmt.Sprintf("mnt-%v", allow))
		os.Mkdir(dir, 0o755)
		args := []string{"--files", b.ShortID}
		if allow {
			args = append(args, "--allow-other")
		}
		d := startMount(t, e, dir, args...)
		snap := filepath.Join(dir, dirNames(t, dir)[0])
		img, view := filepath.Join(snap, db+".img"), filepath.Join(snap, db+"-part1")
		if err := asNobody("cmp", raw, img); (err == nil) != allow {
			t.Errorf("--allow-other %v: another user reading the disk image: %v", allow, err)
		}
		if allow {
			out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", filepath.Join(view, "etc/app/app.conf")).Output()
			if err != nil || string(out) != "key = value\n" {
				t.Errorf("another user reading a file of mode 0644: %q %v", out, err)
			}
			if err := asNobody("cat", filepath.Join(view, "home/ann/notes.txt")); err == nil {
				t.Error("another user read a file of mode 0640 owned by 1000:1001")
			}
		}
		d.stop(t, syscall.SIGTERM)
		if code := d.cmd.ProcessState.ExitCode(); code != 0 {
			t.Fatalf("exit %d:\n%s", code, d.logText())
		}
	}
}

// TestMountStale: a mount whose sauve was killed is named as such when
// mounting on it again.
func TestMountStale(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	requireRoot(t)
	e := newEnv(t)
	img := e.path("d.img")
	writeFile(t, img, randomBytes(1<<20))
	snap := e.backup(img).ShortID
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	d := startMount(t, e, dir, snap)
	d.stop(t, syscall.SIGKILL)
	defer exec.Command("umount", "-l", dir).Run()
	e.fail([]string{"whose server is gone", "fusermount3 -u " + dir}, "mount", snap, dir)
}

// sameTreeErr is sameTree for another goroutine than the test's: the
// files under dir have the checksums in want.
func sameTreeErr(want map[string]string, dir string) error {
	n := 0
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if fmt.Sprintf("%x", sha256.Sum256(b)) != want[rel] {
			return fmt.Errorf("%s differs", rel)
		}
		n++
		return nil
	})
	if err == nil && n != len(want) {
		err = fmt.Errorf("%d files, want %d", n, len(want))
	}
	return err
}

// TestMountFilesOtherFilesystems: --files presents a FAT filesystem's
// files; one without a reader (NTFS) is an I/O error, and sauve mount
// says why.
func TestMountFilesOtherFilesystems(t *testing.T) {
	needTools(t, "mkfs.fat", "mcopy", "mmd", "mkfs.ntfs", "mkfs.btrfs")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t)
	files := e.path("files")
	fatTree(t, files)
	fat := e.path("fat.img")
	sh(t, "truncate", "-s", "32M", fat)
	sh(t, "mkfs.fat", "-F", "16", fat)
	mtoolsAt(t, fat, 0, "mmd", "::/EFI", "::/EFI/BOOT", "::/EFI/debian", "::/Long Folder Name", "::/empty")
	for _, p := range []string{"EFI/BOOT/BOOTX64.EFI", "EFI/debian/grub.cfg", "Long Folder Name/ünïcødé file name.txt", "big.bin", "readonly.txt"} {
		mtoolsAt(t, fat, 0, "mcopy", "-m", filepath.Join(files, p), "::/"+p)
	}
	bf := e.backup(fat)
	ntfs := e.path("ntfs.img")
	sh(t, "truncate", "-s", "16M", ntfs)
	sh(t, "mkfs.ntfs", "-q", "-F", "-Q", ntfs)
	bn := e.backup(ntfs)
	// btrfs: a filesystem sauve knows by name but reads no files from.
	btrfs := e.path("btrfs.img")
	sh(t, "truncate", "-s", "128M", btrfs)
	sh(t, "mkfs.btrfs", "-q", "-f", btrfs)
	bb := e.backup(btrfs)
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	d := startMount(t, e, dir, "--files")
	snaps := dirNames(t, dir)
	if len(snaps) != 3 {
		t.Fatalf("folders: %q", snaps)
	}
	// Backed up within a second, the folders sort by disk name: find
	// each by its snapshot's ID.
	folder := func(id string) string {
		for _, s := range snaps {
			if strings.HasSuffix(s, "_"+id) {
				return filepath.Join(dir, s)
			}
		}
		t.Fatalf("no folder of snapshot %s in %q", id, snaps)
		return ""
	}
	sameTree(t, hashTree(t, files), hashTree(t, filepath.Join(folder(bf.ShortID), imageBase(bf.Disk)+"-files")))
	// A fresh NTFS volume: its system files are hidden, nothing else.
	if ents, err := os.ReadDir(filepath.Join(folder(bn.ShortID), imageBase(bn.Disk)+"-files")); err != nil || len(ents) != 0 {
		t.Fatalf("files of an empty NTFS filesystem: %v, %v", ents, err)
	}
	sh(t, "cmp", ntfs, filepath.Join(folder(bn.ShortID), imageBase(bn.Disk)+".img"))
	view := filepath.Join(folder(bb.ShortID), imageBase(bb.Disk)+"-files")
	if _, err := os.ReadDir(view); !errors.Is(err, syscall.EIO) {
		t.Fatalf("files of a btrfs filesystem: %v, want EIO", err)
	}
	waitFor(t, "the reason", func() bool {
		return strings.Contains(d.logText(), "filesystem btrfs not supported yet for file access")
	})
}

// TestMountKernelCache: what was read once is read again from the
// kernel's page cache, across opens: with every pack gone, a disk larger
// than sauve's own cache reads back whole.
func TestMountKernelCache(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	requireRoot(t)
	e := newEnv(t)
	img := e.path("d.img")
	randomFile(t, img, 80<<20) // more than mountCache
	snap := e.backup(img).ShortID
	dir := e.path("mnt")
	os.Mkdir(dir, 0o755)
	startMount(t, e, dir, snap)
	mimg := filepath.Join(dir, dirNames(t, dir)[0], "d.img")
	want := fileHash(t, img, -1)
	if got := fileHash(t, mimg, -1); got != want {
		t.Fatal("the image differs")
	}
	packs := packFiles(t, e.repo)
	for _, p := range packs {
		if err := os.Rename(p, p+".away"); err != nil {
			t.Fatal(err)
		}
		defer os.Rename(p+".away", p)
	}
	if got := fileHash(t, mimg, -1); got != want {
		t.Fatal("with the packs gone, the image did not read back from the kernel's cache")
	}
}
