package snapfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fsread"
)

func TestFolderName(t *testing.T) {
	tm := time.Date(2026, 12, 3, 5, 30, 0, 0, time.FixedZone("CET", 3600))
	for _, c := range []struct {
		sn   Snapshot
		want string
	}{
		{Snapshot{ID: "1a2b3c4d", Time: tm, Host: "web1", Source: "vda"}, "2026-12-03T043000Z_web1_vda_1a2b3c4d"},
		{Snapshot{ID: "1a2b3c4d", Time: tm, Host: "my host", Source: "/dev/sda,nvme0n1"}, "2026-12-03T043000Z_my-host_dev-sda,nvme0n1_1a2b3c4d"},
		{Snapshot{ID: "1a2b3c4d", Time: tm, Host: "..", Source: "a:b/c"}, "2026-12-03T043000Z_a-b-c_1a2b3c4d"},
		{Snapshot{ID: "../..", Time: tm}, "2026-12-03T043000Z_snapshot"},
		{Snapshot{ID: "1a2b3c4d", Time: tm, Host: strings.Repeat("h", 300)}, "2026-12-03T043000Z_" + strings.Repeat("h", 64) + "_1a2b3c4d"},
	} {
		if got := FolderName(&c.sn); got != c.want {
			t.Errorf("FolderName(%+v) = %q, want %q", c.sn, got, c.want)
		}
	}
}

func TestSafeName(t *testing.T) {
	for in, want := range map[string]string{
		"vda": "vda", "disk.raw": "disk.raw", "": "d", ".": "d", "..": "d", "a/../b": "a-..-b", "../evil": "evil",
		"\x00\n": "d", "ünï": "n", ".hidden.": "hidden", "x:y": "x-y", "-x-": "x",
	} {
		if got := safeName(in, "d"); got != want {
			t.Errorf("safeName(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{"vda": "vda", "disk.raw": "disk", "big.IMG": "big", ".img": "img", "a.iso.img": "a.iso", "../x.img": "x"} {
		if got := diskBase(in); got != want {
			t.Errorf("diskBase(%q) = %q, want %q", in, got, want)
		}
	}
	seen := map[string]bool{}
	if a, b, c := uniqueName(seen, "x"), uniqueName(seen, "x"), uniqueName(seen, "x"); a != "x" || b != "x~2" || c != "x~3" {
		t.Errorf("uniqueName: %q %q %q", a, b, c)
	}
}

// fakeFS is a filesystem in memory, as a reader would present it.
type fakeFS struct {
	files map[string]*fakeFile
}

type fakeFile struct {
	st     fsread.Stat
	data   []byte
	target string
	xattrs []fsread.Xattr
}

func (f *fakeFS) get(p string) (*fakeFile, error) {
	if ff, ok := f.files[p]; ok {
		return ff, nil
	}
	return nil, fmt.Errorf("%s: %w", p, fsread.ErrNotExist)
}

func (f *fakeFS) Lstat(p string) (fsread.Stat, error) {
	ff, err := f.get(p)
	if err != nil {
		return fsread.Stat{}, err
	}
	return ff.st, nil
}

func (f *fakeFS) ReadDir(p string) ([]fsread.DirEntry, error) {
	if _, err := f.get(p); err != nil {
		return nil, err
	}
	var out []fsread.DirEntry
	for q, ff := range f.files {
		if q != "/" && path.Dir(q) == p {
			out = append(out, fsread.DirEntry{Name: path.Base(q), Stat: ff.st})
		}
	}
	if p == "/" {
		// What a damaged directory may hold: names no kernel accepts.
		out = append(out, fsread.DirEntry{Name: "..", Stat: f.files["/"].st}, fsread.DirEntry{Name: "a/b", Stat: f.files["/"].st})
	}
	return out, nil
}

func (f *fakeFS) Readlink(p string) (string, error) {
	ff, err := f.get(p)
	if err != nil {
		return "", err
	}
	return ff.target, nil
}

func (f *fakeFS) Open(p string) (fsread.File, error) {
	ff, err := f.get(p)
	if err != nil {
		return nil, err
	}
	if p == "/broken" {
		return brokenFile{}, nil
	}
	return memFile{bytes.NewReader(ff.data)}, nil
}

func (f *fakeFS) Xattrs(p string) ([]fsread.Xattr, error) {
	ff, err := f.get(p)
	if err != nil {
		return nil, err
	}
	return ff.xattrs, nil
}

type memFile struct{ *bytes.Reader }

func (m memFile) Data() ([]extent.Range, error) {
	return []extent.Range{{Start: 0, End: m.Size()}}, nil
}

type brokenFile struct{}

func (brokenFile) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("extent points outside the filesystem")
}
func (brokenFile) Size() int64                   { return 10 }
func (brokenFile) Data() ([]extent.Range, error) { return nil, nil }

// failingDisk fails reads from bad on, and counts its closes.
type failingDisk struct {
	r      io.ReaderAt
	bad    int64
	closes *atomic.Int32
}

func (d failingDisk) Close() error { d.closes.Add(1); return nil }

func (d failingDisk) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > d.bad {
		n := max(d.bad-off, 0)
		copy(p[:n], make([]byte, n))
		if n > 0 {
			d.r.ReadAt(p[:n], off)
		}
		return int(n), errors.New("chunk 3: checksum mismatch")
	}
	return d.r.ReadAt(p, off)
}

var (
	mtime = time.Unix(1.6e9, 0)
	fake  = &fakeFS{files: map[string]*fakeFile{
		"/":          {st: fsread.Stat{Ino: 2, Mode: fsread.TypeDir | 0o755, Nlink: 3}},
		"/dir":       {st: fsread.Stat{Ino: 11, Mode: fsread.TypeDir | 0o750, Nlink: 2, UID: 1000, GID: 1001, Mtime: mtime}},
		"/dir/a.txt": {st: fsread.Stat{Ino: 12, Mode: fsread.TypeRegular | 0o640, Nlink: 2, UID: 1000, GID: 1001, Size: 5, Mtime: mtime}, data: []byte("hello"), xattrs: []fsread.Xattr{{Name: "user.origin", Value: []byte("tested")}, {Name: "user.empty"}}},
		"/dir/hard":  {st: fsread.Stat{Ino: 12, Mode: fsread.TypeRegular | 0o640, Nlink: 2, UID: 1000, GID: 1001, Size: 5, Mtime: mtime}, data: []byte("hello")},
		"/link":      {st: fsread.Stat{Ino: 13, Mode: fsread.TypeSymlink | 0o777, Nlink: 1, Size: 9}, target: "dir/a.txt"},
		"/dev-null":  {st: fsread.Stat{Ino: 14, Mode: fsread.TypeChar | 0o666, Nlink: 1, Major: 1, Minor: 3}},
		"/broken":    {st: fsread.Stat{Ino: 15, Mode: fsread.TypeRegular | 0o644, Nlink: 1, Size: 10}},
		"/big-inode": {st: fsread.Stat{Ino: 1 << 50, Mode: fsread.TypeRegular | 0o644, Nlink: 1}},
	}}
)

// testDisk is a 3 MiB disk of distinct bytes with two partitions.
func testDisk() []byte {
	b := make([]byte, 3<<20+123)
	for i := range b {
		b[i] = byte(i*7 + i>>12)
	}
	return b
}

// mountTest mounts snaps on a temporary folder; needs root (FUSE).
func mountTest(t *testing.T, snaps []Snapshot, opts Options) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	if err := CheckMountPoint(dir); err != nil {
		t.Fatal(err)
	}
	srv, err := Mount(dir, New(snaps, opts), MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Unmount(srv, dir); err != nil {
			t.Errorf("unmount: %v", err)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir
}

func TestTree(t *testing.T) {
	data := testDisk()
	var opens, closes, fsOpens atomic.Int32
	var warnings []string
	var wmu sync.Mutex
	tm := time.Date(2026, 12, 3, 5, 30, 0, 0, time.UTC)
	snaps := []Snapshot{{
		ID: "1a2b3c4d", Time: tm, Host: "web1", Source: "vda",
		Disks: []Disk{{
			Name: "vda", Size: int64(len(data)), What: "disk vda of snapshot 1a2b3c4d",
			Open: func() (io.ReaderAt, error) {
				opens.Add(1)
				return failingDisk{bytes.NewReader(data), 3 << 20, &closes}, nil
			},
			Partitions: []Partition{
				{Number: 1, Start: 4096, Size: 1 << 20, Files: true},
				{Number: 2, Start: 1<<20 + 4096, Size: 2<<20 - 4096},
				{Number: 3, Start: 2 << 20, Size: 2 << 20},        // past the end: left out
				{Number: 4, Start: 0, Size: 1024, Extended: true}, // left out
			},
		}, {
			Name: "../evil", Size: 0, What: "disk evil",
			Open: func() (io.ReaderAt, error) { return nil, errors.New("no such pack") },
		}},
	}, {
		ID: "5e6f7a8b", Time: tm.Add(time.Hour), Host: "web1", Source: "vda",
		Disks: []Disk{{
			Name: "vda", Size: 4 << 20, What: "disk vda of snapshot 5e6f7a8b",
			Open:       func() (io.ReaderAt, error) { return nil, errors.New("no such pack") },
			Partitions: []Partition{{Number: 0, Start: 0, Size: 4 << 20, Files: true}},
		}},
	}}
	dir := mountTest(t, snaps, Options{
		OpenFS: func(r *io.SectionReader, p Partition, what string) (FileSystem, error) {
			fsOpens.Add(1)
			if r.Size() != p.Size {
				t.Errorf("the filesystem reader got %d bytes, partition %d has %d", r.Size(), p.Number, p.Size)
			}
			return fake, nil
		},
		Warn: func(f string, a ...any) {
			wmu.Lock()
			warnings = append(warnings, fmt.Sprintf(f, a...))
			wmu.Unlock()
		},
		UID: 123, GID: 456,
	})

	top := readDirNames(t, dir)
	if want := []string{"2026-12-03T053000Z_web1_vda_1a2b3c4d", "2026-12-03T063000Z_web1_vda_5e6f7a8b"}; !equal(top, want) {
		t.Fatalf("top folder: %q, want %q", top, want)
	}
	s1 := filepath.Join(dir, top[0])
	if got, want := readDirNames(t, s1), []string{"evil.img", "vda-part1", "vda-part1.img", "vda-part2.img", "vda.img"}; !equal(got, want) {
		t.Fatalf("snapshot folder: %q, want %q", got, want)
	}
	if opens.Load() != 0 || fsOpens.Load() != 0 {
		t.Fatalf("listing opened %d disks and %d filesystems: nothing is read before it is needed", opens.Load(), fsOpens.Load())
	}
	// Attributes: sizes, owner, read-only modes, the snapshot's time.
	for name, size := range map[string]int64{"vda.img": int64(len(data)), "vda-part1.img": 1 << 20, "vda-part2.img": 2<<20 - 4096, "evil.img": 0} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(s1, name), &st); err != nil {
			t.Fatal(err)
		}
		if st.Size != size || st.Mode != syscall.S_IFREG|0o444 || st.Uid != 123 || st.Gid != 456 || st.Mtim.Sec != tm.Unix() {
			t.Errorf("%s: size %d mode %o owner %d:%d mtime %d; want size %d", name, st.Size, st.Mode, st.Uid, st.Gid, st.Mtim.Sec, size)
		}
	}
	// While a file is open, every reader of the disk shares one reader.
	hold, err := os.Open(filepath.Join(s1, "vda.img"))
	if err != nil {
		t.Fatal(err)
	}
	if opens.Load() != 1 {
		t.Fatalf("opening an image opened the disk %d times", opens.Load())
	}
	// Reads: whole, at partition offsets, at and past the end.
	if got, err := os.ReadFile(filepath.Join(s1, "vda-part1.img")); err != nil || !bytes.Equal(got, data[4096:4096+1<<20]) {
		t.Fatalf("partition 1: %d bytes, %v", len(got), err)
	}
	f, err := os.Open(filepath.Join(s1, "vda-part2.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 100)
	if n, err := f.ReadAt(buf, 2<<20-4096-40); n != 40 || err != io.EOF || !bytes.Equal(buf[:40], data[3<<20-40:3<<20]) {
		t.Fatalf("read across the end of partition 2: %d %v", n, err)
	}
	if n, err := f.ReadAt(buf, 2<<20); n != 0 || err != io.EOF {
		t.Fatalf("read past the end of partition 2: %d %v", n, err)
	}
	if _, err := os.OpenFile(filepath.Join(s1, "vda.img"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("open for writing: %v, want EROFS", err)
	}
	// A read the disk fails is EIO, and reported.
	if _, err := os.ReadFile(filepath.Join(s1, "vda.img")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading a disk whose last chunk fails: %v, want EIO", err)
	}
	// Not a short read: the kernel would shrink the file.
	if fi, err := os.Stat(filepath.Join(s1, "vda.img")); err != nil || fi.Size() != int64(len(data)) {
		t.Fatalf("after a failed read, the disk image is %d bytes (%v), want %d", fi.Size(), err, len(data))
	}
	g, err := os.Open(filepath.Join(s1, "vda.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if n, err := g.ReadAt(buf, 3<<20-100); n != 100 || !bytes.Equal(buf[:n], data[3<<20-100:3<<20]) {
		t.Fatalf("read before the failing chunk: %d %v", n, err)
	}
	if _, err := os.ReadFile(filepath.Join(dir, top[1], "vda.img")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading a disk that does not open: %v, want EIO", err)
	}
	if opens.Load() != 1 || closes.Load() != 0 {
		t.Fatalf("the disk was opened %d times and closed %d while a file was open, want once and never", opens.Load(), closes.Load())
	}
	// Concurrent readers of one image.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := os.Open(filepath.Join(s1, "vda-part1.img"))
			if err != nil {
				t.Error(err)
				return
			}
			defer g.Close()
			b := make([]byte, 64<<10)
			for off := int64(i * 4096); off < 1<<20; off += int64(len(b)) * 3 {
				n, _ := g.ReadAt(b, off)
				if !bytes.Equal(b[:n], data[4096+off:4096+off+int64(n)]) {
					t.Errorf("concurrent read at %d differs", off)
					return
				}
			}
		}()
	}
	wg.Wait()

	// Once nothing is open, the reader is closed (the kernel releases
	// files after close returns).
	hold.Close()
	f.Close()
	g.Close()
	deadline := time.Now().Add(10 * time.Second)
	for closes.Load() != opens.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if closes.Load() != opens.Load() {
		t.Fatalf("with no file open, the disk was opened %d times and closed %d", opens.Load(), closes.Load())
	}

	testFilesView(t, filepath.Join(s1, "vda-part1"))
	if fsOpens.Load() != 1 {
		t.Fatalf("the filesystem was opened %d times, want once", fsOpens.Load())
	}
	// An open filesystem holds its disk's reader.
	if opens.Load() != 2 || closes.Load() != 1 {
		t.Fatalf("after the files view: %d opens, %d closes of the disk, want 2 and 1", opens.Load(), closes.Load())
	}
	// A filesystem whose disk does not open: EIO, reported.
	if _, err := os.ReadDir(filepath.Join(dir, top[1], "vda-files")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("files of a disk that does not open: %v, want EIO", err)
	}
	wmu.Lock()
	all := strings.Join(warnings, "\n")
	wmu.Unlock()
	for _, w := range []string{"read disk vda of snapshot 1a2b3c4d at 3145728: chunk 3: checksum mismatch", "open disk vda of snapshot 5e6f7a8b: no such pack", "/broken at 0: extent points outside"} {
		if !strings.Contains(all, w) {
			t.Errorf("warnings lack %q:\n%s", w, all)
		}
	}
}

func testFilesView(t *testing.T, v string) {
	t.Helper()
	if got, want := readDirNames(t, v), []string{"big-inode", "broken", "dev-null", "dir", "link"}; !equal(got, want) {
		t.Fatalf("files view: %q, want %q (invalid names left out)", got, want)
	}
	var st, st2 syscall.Stat_t
	if err := syscall.Lstat(filepath.Join(v, "dir/a.txt"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != syscall.S_IFREG|0o640 || st.Uid != 1000 || st.Gid != 1001 || st.Size != 5 || st.Nlink != 2 || st.Mtim.Sec != 1.6e9 {
		t.Fatalf("a.txt: %+v", st)
	}
	if err := syscall.Lstat(filepath.Join(v, "dir/hard"), &st2); err != nil || st2.Ino != st.Ino {
		t.Fatalf("a hard link is a different inode (%d, %d): %v", st.Ino, st2.Ino, err)
	}
	if b, err := os.ReadFile(filepath.Join(v, "dir/a.txt")); err != nil || string(b) != "hello" {
		t.Fatalf("a.txt: %q %v", b, err)
	}
	if l, err := os.Readlink(filepath.Join(v, "link")); err != nil || l != "dir/a.txt" {
		t.Fatalf("readlink: %q %v", l, err)
	}
	if b, err := os.ReadFile(filepath.Join(v, "link")); err != nil || string(b) != "hello" {
		t.Fatalf("through the symlink: %q %v", b, err)
	}
	if err := syscall.Lstat(filepath.Join(v, "dev-null"), &st); err != nil || st.Mode != syscall.S_IFCHR|0o666 || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
		t.Fatalf("device: %+v %v", st, err)
	}
	if err := syscall.Lstat(filepath.Join(v, "big-inode"), &st); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(v, "dir/none")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a missing file: %v", err)
	}
	if _, err := os.ReadFile(filepath.Join(v, "broken")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("a damaged file: %v, want EIO", err)
	}
	// Extended attributes, with the sizes getxattr(2) callers probe.
	p := filepath.Join(v, "dir/a.txt")
	if n, err := unix.Getxattr(p, "user.origin", nil); err != nil || n != 6 {
		t.Fatalf("getxattr size: %d %v", n, err)
	}
	b := make([]byte, 64)
	if n, err := unix.Getxattr(p, "user.origin", b); err != nil || string(b[:n]) != "tested" {
		t.Fatalf("getxattr: %q %v", b[:n], err)
	}
	if _, err := unix.Getxattr(p, "user.origin", b[:3]); err != unix.ERANGE {
		t.Fatalf("getxattr with a small buffer: %v, want ERANGE", err)
	}
	if _, err := unix.Getxattr(p, "user.none", b); err != unix.ENODATA {
		t.Fatalf("getxattr of a missing attribute: %v, want ENODATA", err)
	}
	n, err := unix.Listxattr(p, b)
	if err != nil || string(b[:n]) != "user.origin\x00user.empty\x00" {
		t.Fatalf("listxattr: %q %v", b[:n], err)
	}
	if err := os.WriteFile(filepath.Join(v, "dir/new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("creating a file: %v, want EROFS", err)
	}
}

func readDirNames(t *testing.T, dir string) []string {
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

func equal(a, b []string) bool { return strings.Join(a, "\n") == strings.Join(b, "\n") }

func TestCheckMountPoint(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	os.Mkdir(full, 0o755)
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "file"), nil, 0o644)
	for _, c := range []struct{ dir, want string }{
		{filepath.Join(dir, "none"), "does not exist"},
		{full, "is not empty"},
		{filepath.Join(dir, "file"), "is not a folder"},
		{dir + "/empty-after", "does not exist"},
	} {
		err := CheckMountPoint(c.dir)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("CheckMountPoint(%s) = %v, want %q", c.dir, err, c.want)
		}
	}
	empty := filepath.Join(dir, "empty")
	os.Mkdir(empty, 0o755)
	if err := CheckMountPoint(empty); err != nil {
		t.Errorf("an empty folder: %v", err)
	}
	if err := checkDevice(filepath.Join(dir, "fuse")); err == nil || !strings.Contains(err.Error(), "FUSE is not available: "+dir+"/fuse is missing (load the module") {
		t.Errorf("no FUSE device: %v", err)
	}
}

// TestUnmountBusy: a mount with a file open in it stays mounted and
// served; once closed, it unmounts.
func TestUnmountBusy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount FUSE")
	}
	dir := t.TempDir()
	srv, err := Mount(dir, New([]Snapshot{{ID: "1a2b3c4d", Disks: []Disk{{Name: "d", Size: 10, Open: func() (io.ReaderAt, error) {
		return bytes.NewReader([]byte("0123456789")), nil
	}}}}}, Options{}), MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", "-l", dir).Run()
		}
	}()
	f, err := os.Open(filepath.Join(dir, "0001-01-01T000000Z_1a2b3c4d", "d.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := Unmount(srv, dir); !errors.Is(err, ErrBusy) {
		t.Fatalf("unmount with a file open: %v, want ErrBusy", err)
	}
	b := make([]byte, 4)
	if n, err := f.ReadAt(b, 6); n != 4 || string(b) != "6789" {
		t.Fatalf("read after a refused unmount: %q %v", b[:n], err)
	}
	f.Close()
	if err := Unmount(srv, dir); err != nil {
		t.Fatalf("unmount: %v", err)
	}
	mounted = false
	if err := CheckMountPoint(dir); err != nil {
		t.Fatalf("after unmount: %v", err)
	}
}
