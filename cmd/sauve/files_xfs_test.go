package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// partitionedXFS writes a disk image with an MBR and an XFS partition
// (label "xfsdata") holding extTree's files and a few XFS-specific ones,
// made through the kernel; it returns the image and the hashes of the
// files as the kernel read them.
func partitionedXFS(t *testing.T, e *env) (string, map[string]string) {
	fsImg := e.path("xfs.img")
	sh(t, "truncate", "-s", "320M", fsImg)
	sh(t, "mkfs.xfs", "-q", "-f", "-L", "xfsdata", fsImg)
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", "-o", "loop", fsImg, mnt)
	mounted := true
	defer func() {
		if mounted {
			sh(t, "umount", mnt)
		}
	}()
	extTree(t, mnt)
	os.Symlink(strings.Repeat("far/", 150)+"away", filepath.Join(mnt, "home/ann/long-link"))
	for i := range 2000 {
		writeTree(t, filepath.Join(mnt, "many", fmt.Sprintf("%s%04d", strings.Repeat("f", i%40), i)), []byte{byte(i)})
	}
	want := hashTree(t, mnt)
	sh(t, "umount", mnt)
	mounted = false
	raw := e.path("disk.raw")
	sh(t, "truncate", "-s", "330M", raw)
	sh(t, "sh", "-c", "echo 'start=2048, type=83' | sfdisk -q --label dos "+raw)
	sh(t, "dd", "if="+fsImg, "of="+raw, "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
	return raw, want
}

// TestXFSLsGetFind: files come out of a snapshot of a partitioned disk
// with an XFS partition exactly as the kernel wrote them, fetching only
// the chunks they use.
func TestXFSLsGetFind(t *testing.T) {
	needTools(t, "mkfs.xfs", "sfdisk")
	requireRoot(t)
	e := newEnv(t, "--chunk-size", "64K")
	raw, want := partitionedXFS(t, e)
	snap := e.backup(raw).ShortID

	out := e.ok("ls", snap+":xfsdata/home/ann")
	for _, want := range []string{"-rw-r----- 1 1000 1001 30000 ", "notes.txt", "rel-link -> ../../etc/app/app.conf", "ünïcødé name.txt", "long-link -> far/far/"} {
		if !strings.Contains(out, want) {
			t.Fatalf("ls lacks %q:\n%s", want, out)
		}
	}
	var ls []lsOut
	e.okJSON(&ls, "ls", snap+":1/", "-R")
	seen := map[string]lsOut{}
	for _, l := range ls {
		seen[l.Path] = l
	}
	if l := seen["/home/ann/app.conf.link"]; l.Nlink != 2 || l.Size != 12 {
		t.Fatalf("hard link: %+v", l)
	}
	if l := seen["/home/ann/notes.txt"]; l.Mode != "0640" || l.UID != 1000 || !l.Mtime.Equal(time.Unix(1.6e9, 0)) {
		t.Fatalf("notes.txt: %+v", l)
	}
	if l := seen["/empty"]; l.Type != "dir" || l.Mode != "0750" {
		t.Fatalf("empty dir: %+v", l)
	}
	if n := strings.Count(e.ok("find", snap+":1", "--path", "/many/*"), "\n"); n != 2000 {
		t.Fatalf("find in a directory of 2000 files: %d", n)
	}
	if found := strings.Fields(e.ok("find", snap+":1", "*.conf")); len(found) != 2 || found[0] != snap+":1/etc/app/app.conf" {
		t.Fatalf("find *.conf: %q", found)
	}

	dest := e.path("out")
	os.Mkdir(dest, 0o755)
	e.ok("get", snap+":1/", dest)
	sameTree(t, want, hashTree(t, dest))
	var a, b syscall.Stat_t
	syscall.Stat(filepath.Join(dest, "etc/app/app.conf"), &a)
	syscall.Stat(filepath.Join(dest, "home/ann/app.conf.link"), &b)
	if a.Ino != b.Ino {
		t.Fatal("the hard link was extracted as a copy")
	}
	var sp syscall.Stat_t
	syscall.Stat(filepath.Join(dest, "sparse.img"), &sp)
	if sp.Size != 16<<20 || sp.Blocks*512 > 1<<20 {
		t.Fatalf("sparse file extracted with %d bytes allocated (size %d)", sp.Blocks*512, sp.Size)
	}
	if l, _ := os.Readlink(filepath.Join(dest, "home/ann/long-link")); l != strings.Repeat("far/", 150)+"away" {
		t.Fatalf("remote symlink target %q", l)
	}
	v := make([]byte, 64)
	if n, err := unix.Getxattr(filepath.Join(dest, "etc/app/app.conf"), "user.origin", v); err != nil || string(v[:n]) != "tested" {
		t.Fatalf("xattr: %q %v", v[:n], err)
	}
	var ns syscall.Stat_t
	syscall.Stat(filepath.Join(dest, "home/ann/notes.txt"), &ns)
	if ns.Uid != 1000 || ns.Gid != 1001 || ns.Mode&0o7777 != 0o640 || ns.Mtim.Sec != 1.6e9 {
		t.Fatalf("notes.txt metadata: %+v", ns)
	}

	// One file: only its chunks fetched.
	var g getOut
	e.okJSON(&g, "get", snap+":1/big.bin", e.path("big.copy"))
	if g.Files != 1 || g.Bytes != 8<<20 || g.BytesFetched < 8<<20 || g.BytesFetched > 8<<20+16*64<<10 {
		t.Fatalf("get of an 8 MiB file: %+v", g)
	}
	if got := e.ok("get", snap+":1/home/ann/notes.txt", "-"); got != string(textBytes(5, 30000)) {
		t.Fatal("get to stdout differs")
	}
}

// TestXFSLiveSnapshot: a backup of a mounted XFS (its log dirty) lists
// the files the log holds (replayed in memory); --no-replay warns and
// reads the metadata as it is on disk.
func TestXFSLiveSnapshot(t *testing.T) {
	needTools(t, "mkfs.xfs", "xfs_io")
	requireRoot(t)
	e := newEnv(t)
	img := e.path("fs.img")
	sh(t, "truncate", "-s", "320M", img)
	sh(t, "mkfs.xfs", "-q", "-f", img)
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", "-o", "loop", img, mnt)
	writeTree(t, filepath.Join(mnt, "settled/file.txt"), []byte("on disk\n"))
	sh(t, "umount", mnt)
	sh(t, "mount", "-o", "loop", img, mnt)
	writeTree(t, filepath.Join(mnt, "logged/file.txt"), []byte("in the log\n"))
	sh(t, "sync")
	// Shut down without writing the log's unmount record, as a
	// snapshot of a running machine sees it.
	sh(t, "xfs_io", "-x", "-c", "shutdown", mnt)
	sh(t, "umount", mnt)

	snap := e.backup(img).ShortID
	r := e.run("get", snap+"/logged/file.txt", "-")
	if r.stdout != "in the log\n" || strings.Contains(r.stderr, "stale") {
		t.Fatalf("get from a live XFS: stdout %q stderr %q", r.stdout, r.stderr)
	}
	r = e.run("ls", "--no-replay", snap+"/")
	if !strings.Contains(r.stderr, "XFS log not replayed: metadata may be stale") || strings.Contains(r.stdout, "logged") || !strings.Contains(r.stdout, "settled") {
		t.Fatalf("--no-replay: stdout %q stderr %q", r.stdout, r.stderr)
	}
}

// TestXFSDamaged: an XFS with an extent pointing outside it gets an
// error naming the file and what is wrong; the rest reads.
func TestXFSDamaged(t *testing.T) {
	needTools(t, "mkfs.xfs", "xfs_db")
	e := newEnv(t)
	img := e.path("fs.img")
	sh(t, "truncate", "-s", "320M", img)
	proto := e.path("proto")
	writeTree(t, e.path("src/keep"), []byte("kept\n"))
	writeTree(t, e.path("src/big"), randomBytes(100000))
	writeFile(t, proto, []byte("/dev/null\n0 0\nd--755 0 0\na d--755 0 0\nkeep ---644 0 0 "+e.path("src/keep")+
		"\nbig ---644 0 0 "+e.path("src/big")+"\n$\n$\n"))
	sh(t, "mkfs.xfs", "-q", "-f", "-p", proto, img)
	sh(t, "xfs_db", "-x", "-c", "path /a/big", "-c", "write u3.bmx[0].startblock 40000000", img)
	snap := e.backup(img).ShortID
	e.fail([]string{"/a/big", "outside the filesystem"}, "get", snap+"/a/big", "-")
	if got := e.ok("get", snap+"/a/keep", "-"); got != "kept\n" {
		t.Fatalf("an undamaged file: %q", got)
	}
}

// TestXFSMountFiles: sauve mount --files shows the files of an XFS
// partition as the kernel wrote them.
func TestXFSMountFiles(t *testing.T) {
	needTools(t, "mkfs.xfs", "sfdisk")
	requireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	e := newEnv(t, "--chunk-size", "64K")
	raw, want := partitionedXFS(t, e)
	b := e.backup(raw)
	dir := e.path("view")
	os.Mkdir(dir, 0o755)
	startMount(t, e, dir, "--files")
	snaps := dirNames(t, dir)
	if len(snaps) != 1 {
		t.Fatalf("folders: %q", snaps)
	}
	view := filepath.Join(dir, snaps[0], imageBase(b.Disk)+"-part1")
	sameTree(t, want, hashTree(t, view))
	if l, err := os.Readlink(filepath.Join(view, "home/ann/long-link")); err != nil || l != strings.Repeat("far/", 150)+"away" {
		t.Fatalf("remote symlink: %q %v", l, err)
	}
}
