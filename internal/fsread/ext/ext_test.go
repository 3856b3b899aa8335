package ext

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/fsread"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to loop-mount the images the kernel checks against")
	}
	for _, tool := range []string{"mke2fs", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// mountImage loop-mounts img at a new folder, runs fn, and unmounts.
func mountImage(t *testing.T, img string, opts string, fn func(dir string)) {
	t.Helper()
	dir := t.TempDir()
	sh(t, "mount", "-o", "loop,"+opts, img, dir)
	defer sh(t, "umount", dir)
	fn(dir)
}

func mkImage(t *testing.T, size int64, mkfs ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	sh(t, "mke2fs", append(append([]string{"-q", "-F"}, mkfs...), img)...)
	return img
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// aclXattr encodes an access ACL as setxattr(2) takes it: owner rw, user
// 1000 r, group r, mask r, other nothing.
func aclXattr() []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range [][3]uint32{{1, 6, 0xFFFFFFFF}, {2, 4, 1000}, {4, 4, 0xFFFFFFFF}, {0x10, 4, 0xFFFFFFFF}, {0x20, 0, 0xFFFFFFFF}} {
		b = binary.LittleEndian.AppendUint16(b, uint16(e[0]))
		b = binary.LittleEndian.AppendUint16(b, uint16(e[1]))
		b = binary.LittleEndian.AppendUint32(b, e[2])
	}
	return b
}

// populate makes, through the kernel, every kind of file the reader must
// read: nested folders, unicode and long names, sparse files (one reaching
// ext2/3's triple indirect blocks), fragmented files (deep extent trees),
// symlinks fast and slow, hard links, device files, a FIFO, a socket,
// xattrs in the inode and in a block, an ACL, owners, times, a big
// (htree) directory, and a file deleted then re-created.
func populate(t *testing.T, dir string, bigDir int) {
	r := rand.New(rand.NewPCG(1, 2))
	w := func(p string, data []byte) {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, p), data, 0o644))
	}
	w("empty", nil)
	w("one", []byte("1"))
	w("a/b/c/d/e/deep.txt", []byte("deep\n"))
	w("héllo wörld ✓.txt", randBytes(r, 5000))
	w(strings.Repeat("n", 255), randBytes(r, 77))
	w("big", randBytes(r, 3<<20+3))
	must(t, os.Mkdir(filepath.Join(dir, "emptydir"), 0o700))
	// Sparse: data at 0, 8 MiB and 100 MiB, hole to 120 MiB.
	sp, err := os.Create(filepath.Join(dir, "sparse"))
	must(t, err)
	sp.WriteAt(randBytes(r, 100), 0)
	sp.WriteAt(randBytes(r, 70000), 8<<20)
	sp.WriteAt(randBytes(r, 5000), 100<<20)
	sp.Truncate(120 << 20)
	sp.Close()
	// Fragmented: two files written in turns, each block synced, so
	// their blocks interleave (hundreds of extents: an extent tree of
	// depth 1 or more under ext4).
	fa, _ := os.Create(filepath.Join(dir, "frag-a"))
	fb, _ := os.Create(filepath.Join(dir, "frag-b"))
	for i := range 400 {
		fa.WriteAt(randBytes(r, 4096), int64(i)*4096)
		fa.Sync()
		fb.WriteAt(randBytes(r, 4096), int64(i)*4096)
		fb.Sync()
	}
	fa.Close()
	fb.Close()
	must(t, os.Symlink("one", filepath.Join(dir, "link-short")))
	must(t, os.Symlink(strings.Repeat("long/", 40)+"target", filepath.Join(dir, "link-long")))
	must(t, os.Symlink("/etc/passwd", filepath.Join(dir, "link-abs")))
	must(t, os.Symlink("../../a", filepath.Join(dir, "a/b/up")))
	must(t, os.Symlink("/a/b/c", filepath.Join(dir, "abs-dir")))
	must(t, os.Symlink("loop", filepath.Join(dir, "loop")))
	must(t, os.Link(filepath.Join(dir, "one"), filepath.Join(dir, "a/hard1")))
	must(t, os.Link(filepath.Join(dir, "one"), filepath.Join(dir, "a/b/hard2")))
	must(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o640))
	must(t, unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(filepath.Join(dir, "blk"), unix.S_IFBLK|0o600, int(unix.Mkdev(259, 70000))))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "sock"), Net: "unix"})
	must(t, err)
	l.SetUnlinkOnClose(false)
	l.Close()
	x := filepath.Join(dir, "big")
	must(t, unix.Setxattr(x, "user.comment", []byte("a comment"), 0))
	must(t, unix.Setxattr(x, "user.large", bytes.Repeat([]byte("v"), 700), 0))
	must(t, unix.Setxattr(x, "trusted.t", []byte{0, 1, 2}, 0))
	must(t, unix.Setxattr(filepath.Join(dir, "a"), "user.dir", []byte("on a dir"), 0))
	must(t, unix.Lsetxattr(filepath.Join(dir, "link-short"), "trusted.onlink", []byte("x"), 0))
	must(t, unix.Setxattr(filepath.Join(dir, "one"), "system.posix_acl_access", aclXattr(), 0))
	must(t, os.Lchown(filepath.Join(dir, "héllo wörld ✓.txt"), 1234, 567890))
	must(t, os.Lchown(filepath.Join(dir, "link-long"), 42, 43))
	must(t, os.Chmod(filepath.Join(dir, "empty"), 0o4751))
	must(t, os.Chtimes(filepath.Join(dir, "one"), time.Unix(1e9, 123456789), time.Unix(2e9, 987654321)))
	must(t, os.Chtimes(filepath.Join(dir, "empty"), time.Unix(4e9, 5), time.Unix(4.5e9, 7)))
	w("gone", randBytes(r, 50000))
	os.Remove(filepath.Join(dir, "gone"))
	w("gone", []byte("re-created"))
	for i := range bigDir {
		w(filepath.Join("bigdir", strings.Repeat("x", i%50)+hex.EncodeToString([]byte{byte(i >> 8), byte(i)})), []byte{byte(i)})
	}
}

// node is what is compared of a file.
type node struct {
	Mode, Nlink, UID, GID uint32
	Size                  int64
	Mtime, Atime          int64
	Rdev                  [2]uint32
	Target, Hash          string
	Xattrs                map[string]string
}

func hashOf(t *testing.T, r io.Reader) string {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// kernelTree walks the mounted filesystem at dir.
func kernelTree(t *testing.T, dir string) map[string]node {
	out := map[string]node{}
	must(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, dir), "/")
		var st unix.Stat_t
		must(t, unix.Lstat(p, &st))
		n := node{Mode: st.Mode, Nlink: uint32(st.Nlink), UID: st.Uid, GID: st.Gid, Size: st.Size,
			Mtime: st.Mtim.Nano(), Atime: st.Atim.Nano(), Xattrs: map[string]string{}}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			n.Target, _ = os.Readlink(p)
		case unix.S_IFREG:
			f, err := os.Open(p)
			must(t, err)
			n.Hash = hashOf(t, f)
			f.Close()
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Rdev = [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}
			n.Size = 0
		case unix.S_IFIFO, unix.S_IFSOCK:
			n.Size = 0
		}
		buf := make([]byte, 1<<16)
		k, _ := unix.Llistxattr(p, buf)
		for _, name := range strings.Split(string(buf[:k]), "\x00") {
			if name == "" {
				continue
			}
			v := make([]byte, 1<<16)
			m, err := unix.Lgetxattr(p, name, v)
			must(t, err)
			n.Xattrs[name] = hex.EncodeToString(v[:m])
		}
		out[rel] = n
		return nil
	}))
	return out
}

// readerTree walks the filesystem through the reader.
func readerTree(t *testing.T, f *FS) map[string]node {
	out := map[string]node{}
	var walk func(p string, st fsread.Stat)
	walk = func(p string, st fsread.Stat) {
		n := node{Mode: st.Mode, Nlink: st.Nlink, UID: st.UID, GID: st.GID, Size: st.Size,
			Mtime: st.Mtime.UnixNano(), Atime: st.Atime.UnixNano(), Rdev: [2]uint32{st.Major, st.Minor}, Xattrs: map[string]string{}}
		xs, err := f.Xattrs(p)
		must(t, err)
		for _, x := range xs {
			n.Xattrs[x.Name] = hex.EncodeToString(x.Value)
		}
		switch st.Type() {
		case fsread.TypeSymlink:
			n.Target, err = f.Readlink(p)
			must(t, err)
		case fsread.TypeRegular:
			fl, err := f.Open(p)
			must(t, err)
			n.Hash = hashOf(t, io.NewSectionReader(fl, 0, fl.Size()))
		case fsread.TypeDir:
			ents, err := f.ReadDir(p)
			must(t, err)
			for _, e := range ents {
				walk(path.Join(p, e.Name), e.Stat)
			}
		}
		out[p] = n
	}
	st, err := f.Lstat("/")
	must(t, err)
	walk("/", st)
	return out
}

func compareTrees(t *testing.T, want, got map[string]node) {
	t.Helper()
	var paths []string
	for p := range want {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	bad := 0
	for _, p := range paths {
		g, ok := got[p]
		w := want[p]
		switch {
		case !ok:
			t.Errorf("%s: missing from the reader's view", p)
			bad++
		case w.Mode&unix.S_IFMT == unix.S_IFDIR && (w.Atime != g.Atime):
			// Directory atimes move as the kernel walks; compare the rest.
			w.Atime = g.Atime
			fallthrough
		default:
			if w.Mode&unix.S_IFMT != unix.S_IFDIR {
				w.Atime, g.Atime = 0, 0 // reading content moves atimes too
			}
			if a, b := nodeString(w), nodeString(g); a != b {
				t.Errorf("%s:\nkernel %s\nreader %s", p, a, b)
				bad++
			}
		}
		if bad > 10 {
			t.Fatal("too many differences")
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: only in the reader's view", p)
		}
	}
}

func nodeString(n node) string {
	var keys []string
	for k := range n.Xattrs {
		keys = append(keys, k+"="+n.Xattrs[k])
	}
	sort.Strings(keys)
	n.Xattrs = nil
	return strings.Join([]string{
		"mode=" + octal(n.Mode), "nlink=" + itoa(int64(n.Nlink)), "uid=" + itoa(int64(n.UID)), "gid=" + itoa(int64(n.GID)),
		"size=" + itoa(n.Size), "mtime=" + itoa(n.Mtime), "atime=" + itoa(n.Atime),
		"rdev=" + itoa(int64(n.Rdev[0])) + ":" + itoa(int64(n.Rdev[1])), "target=" + n.Target, "hash=" + n.Hash,
		"xattrs=" + strings.Join(keys, ","),
	}, " ")
}

func octal(v uint32) string { return strconv.FormatInt(int64(v), 8) }
func itoa(v int64) string   { return strconv.FormatInt(v, 10) }

func openImage(t *testing.T, img string, opts Options) *FS {
	t.Helper()
	fh, err := os.Open(img)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	fi, _ := fh.Stat()
	f, err := Open(fh, fi.Size(), opts)
	must(t, err)
	return f
}

// TestExtAgainstKernel: for ext2, ext3 and ext4 in several geometries,
// the reader sees the tree the kernel made exactly as the kernel does.
func TestExtAgainstKernel(t *testing.T) {
	requireRoot(t)
	for _, c := range []struct {
		name string
		mkfs []string
	}{
		{"ext2-1k", []string{"-t", "ext2", "-b", "1024", "-I", "128"}},
		{"ext3-4k", []string{"-t", "ext3", "-b", "4096"}},
		{"ext4", []string{"-t", "ext4"}},
		{"ext4-1k-metabg", []string{"-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"}},
		{"ext4-inline", []string{"-t", "ext4", "-O", "inline_data", "-I", "512"}},
		{"ext4-nocsum-32bit", []string{"-t", "ext4", "-O", "^metadata_csum,^64bit,^flex_bg"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := mkImage(t, 160<<20, c.mkfs...)
			bigDir := 3000
			if strings.HasPrefix(c.name, "ext2") {
				bigDir = 600
			}
			mountImage(t, img, "rw", func(dir string) { populate(t, dir, bigDir) })
			var want map[string]node
			mountImage(t, img, "ro,noatime", func(dir string) { want = kernelTree(t, dir) })
			f := openImage(t, img, Options{})
			got := readerTree(t, f)
			compareTrees(t, want, got)
			// Symlinks in the directories of a path are followed, an
			// absolute one from this filesystem's root.
			for _, p := range []string{"/a/b/up/b/c/d/e/deep.txt", "/abs-dir/d/e/deep.txt"} {
				if st, err := f.Lstat(p); err != nil || st.Size != 5 {
					t.Errorf("%s: %v %+v", p, err, st)
				}
			}
			if _, err := f.Lstat("/loop/x"); err == nil || !strings.Contains(err.Error(), "too many levels") {
				t.Errorf("a symlink loop: %v", err)
			}
			// The fragmented file has a deep extent tree, or, under
			// ext2/3, double indirect blocks.
			in, err := f.lookup("/frag-a")
			must(t, err)
			if in.flags&flagExtents != 0 {
				if d := le16(in.iblock(), 6); d == 0 {
					t.Errorf("frag-a's extent tree has depth 0 (%d extents): the test reads no index node", le16(in.iblock(), 2))
				}
			} else if le32(in.iblock(), 52) == 0 && f.sb.bs == 1024 {
				t.Error("frag-a uses no double indirect block")
			}
		})
	}
}

// TestExtJournalReplay: an image copied while mounted, after writes that
// the journal holds but the home blocks may not, reads with the new files
// (the journal replayed in memory), as the kernel sees it after its own
// recovery; the image is not written.
func TestExtJournalReplay(t *testing.T) {
	requireRoot(t)
	// Writeback may reach the home blocks early on a loaded machine
	// (memory pressure): then the copy holds nothing to replay, and the
	// scenario is tried again.
	var live string
	for try := 1; ; try++ {
		var ok bool
		live, ok = liveCopy(t)
		if ok {
			break
		}
		if try == 3 {
			t.Fatal("three times the file written last was in the home blocks already: the journal held nothing to replay")
		}
		t.Logf("try %d: writeback was early; again", try)
	}
	if out, _ := exec.Command("e2fsck", "-n", live).CombinedOutput(); !strings.Contains(string(out), "recovery") {
		t.Fatalf("the live copy should need journal recovery; e2fsck -n says:\n%s", out)
	}
	before := hashFile(t, live)
	f := openImage(t, live, Options{})
	if f.Replayed() == 0 {
		t.Fatal("nothing replayed from a journal that needs recovery")
	}
	got := readerTree(t, f)
	if hashFile(t, live) != before {
		t.Fatal("the reader wrote the image")
	}
	kernel := filepath.Join(t.TempDir(), "kernel.img")
	sh(t, "cp", "--sparse=always", live, kernel)
	var want map[string]node
	mountImage(t, kernel, "rw,noatime", func(dir string) { want = kernelTree(t, dir) })
	if _, ok := want["/after-sync"]; !ok {
		t.Fatal("the kernel does not see the file written last")
	}
	compareTrees(t, want, got)
}

// liveCopy copies an ext4 image while it is mounted, after writes that
// jbd2 committed (commit=1) but writeback has not yet put in their home
// blocks (30 s); ok says whether the copy shows that (the last file
// missing without a replay, and --no-replay warning of it).
func liveCopy(t *testing.T) (live string, ok bool) {
	img := mkImage(t, 64<<20, "-t", "ext4")
	live = filepath.Join(t.TempDir(), "live.img")
	dir := t.TempDir()
	sh(t, "mount", "-o", "loop,commit=1", img, dir)
	populate(t, dir, 200)
	must(t, os.WriteFile(filepath.Join(dir, "after-sync"), []byte("new"), 0o600))
	must(t, os.Remove(filepath.Join(dir, "big")))
	time.Sleep(3 * time.Second)
	sh(t, "cp", "--sparse=always", img, live)
	sh(t, "umount", dir)
	var warned []string
	stale := openImage(t, live, Options{NoReplay: true, Warn: func(s string) { warned = append(warned, s) }})
	if len(warned) == 0 || stale.Replayed() != 0 {
		t.Fatalf("--no-replay should warn of stale metadata: %v", warned)
	}
	_, err := stale.Lstat("/after-sync")
	return live, err != nil
}

func hashFile(t *testing.T, p string) string {
	fh, err := os.Open(p)
	must(t, err)
	defer fh.Close()
	return hashOf(t, fh)
}

// TestExtRefuses: unknown incompatible features and external journals
// needing recovery get a clear error.
func TestExtRefuses(t *testing.T) {
	if _, err := exec.LookPath("mke2fs"); err != nil {
		t.Skip("needs mke2fs")
	}
	img := mkImage(t, 8<<20, "-t", "ext4")
	b, err := os.ReadFile(img)
	must(t, err)
	binary.LittleEndian.PutUint32(b[1024+96:], binary.LittleEndian.Uint32(b[1024+96:])|0x80000000)
	// Keep the superblock checksum right, so the feature is what fails.
	binary.LittleEndian.PutUint32(b[1024+1020:], crc32c(^uint32(0), b[1024:2044]))
	_, err = Open(bytes.NewReader(b), int64(len(b)), Options{})
	if err == nil || !strings.Contains(err.Error(), "unknown incompatible features") {
		t.Fatalf("unknown feature: %v", err)
	}
	_, err = Open(bytes.NewReader(b[:4096]), 4096, Options{})
	if err == nil {
		t.Fatal("a truncated image opened")
	}
	_, err = Open(bytes.NewReader(make([]byte, 8192)), 8192, Options{})
	if err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("zeros: %v", err)
	}
}

// TestExtChecksums: under metadata_csum, a damaged inode, directory block
// or extent node is reported as failing its checksum.
func TestExtChecksums(t *testing.T) {
	if _, err := exec.LookPath("mke2fs"); err != nil {
		t.Skip("needs mke2fs")
	}
	tree := t.TempDir()
	os.WriteFile(filepath.Join(tree, "file"), []byte("x"), 0o644)
	img := mkImage(t, 8<<20, "-t", "ext4", "-d", tree)
	b, err := os.ReadFile(img)
	must(t, err)
	f, err := Open(bytes.NewReader(b), int64(len(b)), Options{})
	must(t, err)
	root, err := f.inode(rootIno)
	must(t, err)
	fl, err := f.open(root)
	must(t, err)
	dirBlock := int64(fl.rs[0].pblk) * f.sb.bs
	file, err := f.lookup("/file")
	must(t, err)
	g, idx := (file.ino-1)/f.sb.ipg, (file.ino-1)%f.sb.ipg
	table, err := f.inodeTable(g)
	must(t, err)
	inodeAt := int64(table)*f.sb.bs + int64(idx)*int64(f.sb.isize)
	for _, c := range []struct {
		what string
		off  int64
		try  func(*FS) error
	}{
		{"directory block", dirBlock + 30, func(f *FS) error { _, err := f.ReadDir("/"); return err }},
		{"inode", inodeAt + 8, func(f *FS) error { _, err := f.Lstat("/file"); return err }},
	} {
		bad := append([]byte(nil), b...)
		bad[c.off] ^= 0x55
		f, err := Open(bytes.NewReader(bad), int64(len(bad)), Options{})
		must(t, err)
		if err := c.try(f); err == nil || !strings.Contains(err.Error(), "checksum") {
			t.Errorf("a damaged %s: %v", c.what, err)
		}
	}
}
