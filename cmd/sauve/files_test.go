package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type lsOut struct {
	Path   string `json:"path"`
	Type   string `json:"type"`
	Mode   string `json:"mode"`
	Nlink  uint32 `json:"nlink"`
	UID    uint32 `json:"uid"`
	Size   int64  `json:"size"`
	Target string `json:"target"`
	Mtime  time.Time
}

type getOut struct {
	Files        int            `json:"files"`
	Bytes        int64          `json:"bytes"`
	BytesFetched int64          `json:"bytes_fetched"`
	NotRestored  map[string]int `json:"not_restored"`
}

// writeTree writes data at path, making its folders.
func writeTree(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, data)
}

// extTree makes the files the file-level restore tests back up.
func extTree(t *testing.T, dir string) {
	writeTree(t, filepath.Join(dir, "etc/app/app.conf"), []byte("key = value\n"))
	writeTree(t, filepath.Join(dir, "etc/app/other.conf"), []byte("other\n"))
	writeTree(t, filepath.Join(dir, "home/ann/notes.txt"), textBytes(5, 30000))
	writeTree(t, filepath.Join(dir, "home/ann/ünïcødé name.txt"), []byte("unicode\n"))
	writeTree(t, filepath.Join(dir, "big.bin"), randomBytes(8<<20))
	sp := filepath.Join(dir, "sparse.img")
	writeFile(t, sp, nil)
	writeAt(t, sp, 0, []byte("head"))
	writeAt(t, sp, 12<<20, []byte("tail"))
	os.Truncate(sp, 16<<20)
	if err := os.Link(filepath.Join(dir, "etc/app/app.conf"), filepath.Join(dir, "home/ann/app.conf.link")); err != nil {
		t.Fatal(err)
	}
	os.Symlink("../../etc/app/app.conf", filepath.Join(dir, "home/ann/rel-link"))
	os.Symlink("/etc/passwd", filepath.Join(dir, "home/ann/abs-link"))
	os.Mkdir(filepath.Join(dir, "empty"), 0o750)
	os.Chmod(filepath.Join(dir, "home/ann/notes.txt"), 0o640)
	os.Lchown(filepath.Join(dir, "home/ann/notes.txt"), 1000, 1001)
	os.Chtimes(filepath.Join(dir, "home/ann/notes.txt"), time.Unix(1.5e9, 0), time.Unix(1.6e9, 0))
	if err := unix.Setxattr(filepath.Join(dir, "etc/app/app.conf"), "user.origin", []byte("tested"), 0); err != nil {
		t.Fatal(err)
	}
}

// partitionedExt4 writes a disk image with an MBR and an ext4 partition
// (label "data") holding files' tree.
func partitionedExt4(t *testing.T, e *env, files string) string {
	raw := e.path("disk.raw")
	sh(t, "truncate", "-s", "80M", raw)
	sh(t, "sh", "-c", "echo 'start=2048, type=83' | sfdisk -q --label dos "+raw)
	sh(t, "mkfs.ext4", "-q", "-F", "-L", "data", "-E", "offset=1048576", "-d", files, raw, "78M")
	return raw
}

// TestExtLsGetFind: files come out of a snapshot of a partitioned disk
// with an ext4 partition exactly as they went in, fetching only the
// chunks they use.
func TestExtLsGetFind(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk")
	requireRoot(t)
	e := newEnv(t, "--chunk-size", "64K")
	files := e.path("files")
	extTree(t, files)
	raw := partitionedExt4(t, e, files)
	snap := e.backup(raw).ShortID

	// No PART on a partitioned disk: the partitions.
	if out := e.ok("ls", snap); !strings.Contains(out, "data") || !strings.Contains(out, "ext4") {
		t.Fatalf("ls of a partitioned disk should list its partitions:\n%s", out)
	}
	out := e.ok("ls", snap+":1/home/ann")
	for _, want := range []string{"-rw-r----- 1 1000 1001 30000 ", "notes.txt", "rel-link -> ../../etc/app/app.conf", "ünïcødé name.txt"} {
		if !strings.Contains(out, want) {
			t.Fatalf("ls lacks %q:\n%s", want, out)
		}
	}
	var ls []lsOut
	e.okJSON(&ls, "ls", snap+":data/", "-R")
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

	// find prints what get takes.
	found := strings.Fields(e.ok("find", snap+":1", "*.conf"))
	if len(found) != 2 || found[0] != snap+":1/etc/app/app.conf" {
		t.Fatalf("find *.conf: %q", found)
	}
	if got := strings.Split(strings.TrimSpace(e.ok("find", snap+":1", "--path", "/home/*/*.txt")), "\n"); len(got) != 2 {
		t.Fatalf("find --path: %q", got)
	}

	// The whole tree.
	dest := e.path("out")
	os.Mkdir(dest, 0o755)
	e.ok("get", snap+":1/", dest)
	sameTree(t, hashTree(t, files), hashTree(t, dest))
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
	if l, _ := os.Readlink(filepath.Join(dest, "home/ann/abs-link")); l != "/etc/passwd" {
		t.Fatalf("symlink target %q", l)
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
	// Nothing is overwritten: a second get into the same folder fails
	// file by file and leaves the files as they were.
	e.fail([]string{"could not be extracted"}, "get", snap+":1/etc", dest)
	// A symlink already in DEST where a folder is to be made is not
	// written through.
	outside, trap := e.path("outside"), e.path("trap")
	os.Mkdir(outside, 0o755)
	os.Mkdir(trap, 0o755)
	os.Symlink(outside, filepath.Join(trap, "app"))
	e.fail([]string{"could not be extracted"}, "get", snap+":1/etc/app", trap)
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Fatalf("get wrote through a symlink in DEST: %v", ents)
	}

	// As an unprivileged user: the files come out, and what could not
	// be restored (owners, trusted.* attributes) is summed up.
	{
		sh(t, "chmod", "-R", "a+rwX", e.dir)
		sh(t, "chmod", "a+rx", filepath.Dir(sauveBin), filepath.Dir(e.dir))
		c := e.cmd(nil, "get", snap+":1/home", e.path("as-nobody"))
		c.Args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sauveBin}, c.Args[1:]...)
		c.Path, _ = exec.LookPath("setpriv")
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("get as nobody: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "not restored: owners (not root)") {
			t.Fatalf("get as nobody should say owners were not restored:\n%s", out)
		}
		sameFile(t, filepath.Join(files, "home/ann/notes.txt"), e.path("as-nobody/ann/notes.txt"))
	}

	// One file, to stdout and to a new name; only its chunks fetched.
	if got := e.ok("get", snap+":1/home/ann/notes.txt", "-"); got != string(textBytes(5, 30000)) {
		t.Fatal("get to stdout differs")
	}
	var g getOut
	e.okJSON(&g, "get", snap+":1/big.bin", e.path("big.copy"))
	sameFile(t, filepath.Join(files, "big.bin"), e.path("big.copy"))
	// The file's 8 MiB, and a few chunks of metadata (superblock, group
	// descriptors, inode table, directory, extent blocks).
	if g.Files != 1 || g.Bytes != 8<<20 || g.BytesFetched < 8<<20 || g.BytesFetched > 8<<20+16*64<<10 {
		t.Fatalf("get of an 8 MiB file: %+v", g)
	}
}

// TestExtLiveSnapshot: a backup of a mounted ext4 (its journal needs
// recovery) lists the files the journal holds; --no-replay warns.
func TestExtLiveSnapshot(t *testing.T) {
	needTools(t, "mkfs.ext4")
	requireRoot(t)
	e := newEnv(t)
	// On a loaded machine writeback may put the file in its home blocks
	// before the copy: then there is nothing to replay, and the scenario
	// is tried again.
	var snap string
	for try := 1; ; try++ {
		snap = liveExtSnapshot(t, e, try)
		r := e.run("ls", "--no-replay", snap+"/")
		if !strings.Contains(r.stderr, "stale") {
			t.Fatalf("--no-replay does not warn of stale metadata: stdout %q stderr %q", r.stdout, r.stderr)
		}
		if !strings.Contains(r.stdout, "journaled") {
			break
		}
		if try == 3 {
			t.Fatalf("three times the copy held the new folder in its home blocks: --no-replay: %q", r.stdout)
		}
		t.Logf("try %d: writeback was early; again", try)
	}
	if out := e.ok("ls", snap+"/journaled"); !strings.Contains(out, "file.txt") {
		t.Fatalf("the journal was not replayed:\n%s", out)
	}
	if got := e.ok("get", snap+"/journaled/file.txt", "-"); got != "only in the journal\n" {
		t.Fatalf("get: %q", got)
	}
}

// liveExtSnapshot backs up a copy of an ext4 image taken while it is
// mounted, after a file was written and its metadata committed to the
// journal, and returns the snapshot's short ID.
func liveExtSnapshot(t *testing.T, e *env, try int) string {
	t.Helper()
	img := e.path(fmt.Sprintf("fs%d.img", try))
	f, _ := os.Create(img)
	f.Truncate(64 << 20)
	f.Close()
	sh(t, "mkfs.ext4", "-q", "-F", img)
	mnt := e.path(fmt.Sprintf("mnt%d", try))
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", "-o", "loop,commit=1", img, mnt)
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	// fsync: the data is written in place and the metadata committed to
	// the journal (without it, delayed allocation leaves the file empty
	// on disk, as a crash would).
	writeTree(t, filepath.Join(mnt, "journaled/file.txt"), []byte("only in the journal\n"))
	if fh, err := os.OpenFile(filepath.Join(mnt, "journaled/file.txt"), os.O_RDWR, 0); err == nil {
		fh.Sync()
		fh.Close()
	}
	// jbd2 commits within a second; the home blocks wait for writeback.
	time.Sleep(3 * time.Second)
	live := e.path(fmt.Sprintf("live%d.img", try))
	sh(t, "cp", "--sparse=always", img, live)
	sh(t, "umount", mnt)
	mounted = false
	return e.backup(live).ShortID
}

func TestExtOtherFilesystem(t *testing.T) {
	needTools(t, "mkfs.btrfs")
	e := newEnv(t)
	img := e.path("btrfs.img")
	f, _ := os.Create(img)
	f.Truncate(128 << 20)
	f.Close()
	sh(t, "mkfs.btrfs", "-q", "-f", img)
	snap := e.backup(img).ShortID
	e.fail([]string{"not supported yet for file access"}, "ls", snap+"/")
}

// TestExtDamaged: a damaged filesystem (a directory linked into itself,
// an extent pointing outside the filesystem) gets an error naming the
// file and what is wrong.
func TestExtDamaged(t *testing.T) {
	needTools(t, "mkfs.ext4", "debugfs")
	e := newEnv(t)
	tree := e.path("tree")
	writeTree(t, filepath.Join(tree, "a/b/keep"), []byte("kept\n"))
	writeTree(t, filepath.Join(tree, "a/file"), []byte("hi\n"))
	img := e.path("fs.img")
	sh(t, "truncate", "-s", "8M", img)
	sh(t, "mkfs.ext4", "-q", "-F", "-d", tree, img)
	sh(t, "debugfs", "-w", "-R", "ln /a /a/b/loop", img)
	sh(t, "debugfs", "-w", "-R", "sif /a/file block[5] 0x7fffffff", img)
	snap := e.backup(img).ShortID
	e.fail([]string{"/a/b/loop", "directory loop"}, "find", snap+"/", "*")
	e.fail([]string{"/a/file", "outside the filesystem"}, "get", snap+"/a/file", "-")
	if got := e.ok("get", snap+"/a/b/keep", "-"); got != "kept\n" {
		t.Fatalf("an undamaged file: %q", got)
	}
}
