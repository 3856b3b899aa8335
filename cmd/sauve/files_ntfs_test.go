package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// partitionedNTFS writes a disk image with an MBR and an NTFS partition
// (label "win") at 1 MiB, filled through ntfs-3g with extTree's files
// and an alternate data stream; files gets the tree as ntfs-3g shows it.
func partitionedNTFS(t *testing.T, e *env, files string) string {
	part := e.path("part.ntfs")
	sh(t, "truncate", "-s", "79M", part)
	sh(t, "mkntfs", "-q", "-Q", "-F", "-L", "win", part)
	withMount(t, "ntfs", part, true, func(dir string) {
		extTree(t, dir)
		if err := unix.Setxattr(filepath.Join(dir, "big.bin"), "user.Zone.Identifier", []byte("[ZoneTransfer]\r\nZoneId=3\r\n"), 0); err != nil {
			t.Fatal(err)
		}
	})
	withMount(t, "ntfs", part, false, func(dir string) { sh(t, "cp", "-a", dir+"/.", files) })
	raw := e.path("disk.raw")
	sh(t, "truncate", "-s", "80M", raw)
	sh(t, "sh", "-c", "echo 'start=2048, type=7' | sfdisk -q --label dos "+raw)
	sh(t, "dd", "if="+part, "of="+raw, "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
	return raw
}

// TestNTFSLsGetFind: files come out of a snapshot of a partitioned disk
// with an NTFS partition as ntfs-3g shows them, fetching only the chunks
// they use.
func TestNTFSLsGetFind(t *testing.T) {
	needTools(t, "mkntfs", "ntfs-3g", "sfdisk")
	requireRoot(t)
	e := newEnv(t, "--chunk-size", "64K")
	files := e.path("files")
	os.Mkdir(files, 0o755)
	raw := partitionedNTFS(t, e, files)
	snap := e.backup(raw).ShortID

	if out := e.ok("ls", snap); !strings.Contains(out, "win") || !strings.Contains(out, "ntfs") {
		t.Fatalf("ls of a partitioned disk should list its NTFS partition:\n%s", out)
	}
	out := e.ok("ls", snap+":1/home/ann")
	for _, want := range []string{"-rwxrwxrwx 1 0 0 30000 ", "notes.txt", "rel-link -> ../../etc/app/app.conf", "ünïcødé name.txt"} {
		if !strings.Contains(out, want) {
			t.Fatalf("ls lacks %q:\n%s", want, out)
		}
	}
	if out := e.ok("ls", snap+":win/"); strings.Contains(out, "$MFT") || strings.Contains(out, "$Extend") {
		t.Fatalf("ls shows the system files:\n%s", out)
	}
	var ls []lsOut
	e.okJSON(&ls, "ls", snap+":win/", "-R")
	seen := map[string]lsOut{}
	for _, l := range ls {
		seen[l.Path] = l
	}
	if l := seen["/home/ann/app.conf.link"]; l.Nlink != 2 || l.Size != 12 {
		t.Fatalf("hard link: %+v", l)
	}
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(files, "home/ann/notes.txt"), &st))
	if l := seen["/home/ann/notes.txt"]; l.Mode != "0777" || l.UID != 0 || l.Mtime.UnixNano() != st.Mtim.Nano() {
		t.Fatalf("notes.txt: %+v, ntfs-3g shows mtime %d", l, st.Mtim.Nano())
	}
	if l := seen["/empty"]; l.Type != "dir" {
		t.Fatalf("empty dir: %+v", l)
	}

	found := strings.Fields(e.ok("find", snap+":1", "*.conf"))
	if len(found) != 2 || found[0] != snap+":1/etc/app/app.conf" {
		t.Fatalf("find *.conf: %q", found)
	}

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
	if n, err := unix.Getxattr(filepath.Join(dest, "big.bin"), "user.Zone.Identifier", v); err != nil || string(v[:n]) != "[ZoneTransfer]\r\nZoneId=3\r\n" {
		t.Fatalf("alternate data stream as an xattr: %q %v", v[:n], err)
	}

	var g getOut
	e.okJSON(&g, "get", snap+":1/big.bin", e.path("big.copy"))
	sameFile(t, filepath.Join(files, "big.bin"), e.path("big.copy"))
	// The file's 8 MiB, and a few chunks of metadata (boot sector, MFT
	// records, indexes).
	if g.Files != 1 || g.Bytes != 8<<20 || g.BytesFetched < 8<<20 || g.BytesFetched > 8<<20+16*64<<10 {
		t.Fatalf("get of an 8 MiB file: %+v", g)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
