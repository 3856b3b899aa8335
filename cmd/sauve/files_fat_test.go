package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fatTree makes the files the FAT file-level restore test backs up: an
// EFI system partition's layout, long and unicode names, a big file, a
// read-only file, an empty folder.
func fatTree(t *testing.T, dir string) {
	writeTree(t, filepath.Join(dir, "EFI/BOOT/BOOTX64.EFI"), randomBytes(300<<10))
	writeTree(t, filepath.Join(dir, "EFI/debian/grub.cfg"), []byte("search.fs_uuid 1234 root\n"))
	writeTree(t, filepath.Join(dir, "Long Folder Name/ünïcødé file name.txt"), textBytes(7, 20000))
	writeTree(t, filepath.Join(dir, "big.bin"), randomBytes(6<<20))
	writeTree(t, filepath.Join(dir, "readonly.txt"), []byte("read only\n"))
	os.Mkdir(filepath.Join(dir, "empty"), 0o755)
	when := time.Date(2024, 5, 6, 7, 8, 10, 0, time.UTC)
	if err := os.Chtimes(filepath.Join(dir, "readonly.txt"), when, when); err != nil {
		t.Fatal(err)
	}
}

// mtoolsAt runs an mtools command on the FAT filesystem at byte offset
// off of image img, in UTC (FAT stores local times).
func mtoolsAt(t *testing.T, img string, off int64, cmd string, args ...string) {
	t.Helper()
	c := exec.Command(cmd, append([]string{"-i", img + "@@" + strconv.FormatInt(off, 10)}, args...)...)
	c.Env = append(os.Environ(), "TZ=UTC", "MTOOLS_SKIP_CHECK=1")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", cmd, args, err, out)
	}
}

// TestFATLsGet: files come out of a snapshot of a GPT disk with a FAT32
// EFI system partition (made by mkfs.fat, filled by mtools) as they went
// in.
func TestFATLsGet(t *testing.T) {
	for _, tool := range []string{"mkfs.fat", "mcopy", "mmd", "mattrib", "sfdisk"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	e := newEnv(t, "--chunk-size", "64K")
	files := e.path("files")
	fatTree(t, files)
	raw := e.path("disk.raw")
	sh(t, "truncate", "-s", "80M", raw)
	sh(t, "sh", "-c", "printf 'label: gpt\\nstart=2048, size=143360, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\\n' | sfdisk -q "+raw)
	const off = 2048 * 512
	sh(t, "mkfs.fat", "-F", "32", "-s", "1", "-n", "EFISYS", "--offset", "2048", raw, "71680")
	mtoolsAt(t, raw, off, "mmd", "::/EFI", "::/EFI/BOOT", "::/EFI/debian", "::/Long Folder Name", "::/empty")
	for _, p := range []string{"EFI/BOOT/BOOTX64.EFI", "EFI/debian/grub.cfg", "Long Folder Name/ünïcødé file name.txt", "big.bin", "readonly.txt"} {
		mtoolsAt(t, raw, off, "mcopy", "-m", filepath.Join(files, p), "::/"+p)
	}
	mtoolsAt(t, raw, off, "mattrib", "+r", "::/readonly.txt")
	snap := e.backup(raw).ShortID

	if out := e.ok("ls", snap); !strings.Contains(out, "fat32") || !strings.Contains(out, "EFISYS") {
		t.Fatalf("ls of the disk should list its FAT32 partition:\n%s", out)
	}
	out := e.ok("ls", snap+":1/EFI/BOOT")
	if !strings.Contains(out, "-rw-r--r-- 1 0 0 307200 ") || !strings.Contains(out, "BOOTX64.EFI") {
		t.Fatalf("ls of a FAT32 folder:\n%s", out)
	}
	// The partition is named by its label too.
	var ls []lsOut
	e.okJSON(&ls, "ls", snap+":EFISYS/", "-R")
	seen := map[string]lsOut{}
	for _, l := range ls {
		seen[l.Path] = l
	}
	if l := seen["/readonly.txt"]; l.Mode != "0444" || l.Size != 10 || !l.Mtime.Equal(time.Date(2024, 5, 6, 7, 8, 10, 0, time.UTC)) {
		t.Fatalf("readonly.txt: %+v", l)
	}
	if l := seen["/Long Folder Name/ünïcødé file name.txt"]; l.Type != "file" || l.Size != 20000 {
		t.Fatalf("unicode long name: %+v (listing %v)", l, seen)
	}
	if l := seen["/empty"]; l.Type != "dir" || l.Mode != "0755" {
		t.Fatalf("empty dir: %+v", l)
	}
	// Names are found without regard to case, as on a mounted FAT.
	if got := e.ok("get", snap+":1/efi/debian/GRUB.CFG", "-"); got != "search.fs_uuid 1234 root\n" {
		t.Fatalf("get by another case: %q", got)
	}
	if found := strings.Split(strings.TrimSpace(e.ok("find", snap+":1", "*.txt")), "\n"); len(found) != 2 || found[0] != snap+":1/Long Folder Name/ünïcødé file name.txt" {
		t.Fatalf("find *.txt: %q", found)
	}

	dest := e.path("out")
	os.Mkdir(dest, 0o755)
	e.ok("get", snap+":1/", dest)
	sameTree(t, hashTree(t, files), hashTree(t, dest))
	if fi, err := os.Stat(filepath.Join(dest, "empty")); err != nil || !fi.IsDir() {
		t.Fatalf("empty folder: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(dest, "readonly.txt")); err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("read-only file extracted as %v (%v)", fi.Mode(), err)
	}

	// One file: only its chunks (and a few of FAT and directories) are
	// fetched.
	var g getOut
	e.okJSON(&g, "get", snap+":1/big.bin", e.path("big.copy"))
	sameFile(t, filepath.Join(files, "big.bin"), e.path("big.copy"))
	if g.Files != 1 || g.Bytes != 6<<20 || g.BytesFetched < 6<<20 || g.BytesFetched > 6<<20+16*64<<10 {
		t.Fatalf("get of a 6 MiB file: %+v", g)
	}
}
