package ntfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
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

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fsread"
)

// needNTFS skips unless mkntfs and ntfs-3g (a FUSE mount: root) are here.
func needNTFS(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount images with ntfs-3g, which the reader is checked against")
	}
	for _, tool := range []string{"mkntfs", "ntfs-3g", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian package ntfs-3g)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
}

func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// mkImage makes an NTFS image of size bytes with mkntfs.
func mkImage(t testing.TB, size int64, args ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "ntfs.img")
	fh, err := os.Create(img)
	must(t, err)
	must(t, fh.Truncate(size))
	fh.Close()
	sh(t, "mkntfs", append(append([]string{"-F", "-Q", "-q"}, args...), img)...)
	return img
}

// mountImage mounts img with ntfs-3g at a new folder, runs fn, unmounts.
func mountImage(t testing.TB, img string, ro bool, fn func(dir string)) {
	t.Helper()
	dir := t.TempDir()
	if ro {
		sh(t, "ntfs-3g", "-o", "ro", img, dir)
	} else {
		sh(t, "ntfs-3g", "-o", "compression", img, dir)
	}
	defer sh(t, "umount", dir)
	fn(dir)
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// populate makes through ntfs-3g every kind of file the reader must read:
// nested folders, unicode and long names, a sparse file, a file in
// hundreds of fragments (an attribute list), symlinks, hard links, a
// FIFO, alternate data streams, a file deleted then re-created, an empty
// folder and a folder of 2000 names (INDX blocks).
func populate(t *testing.T, dir string, cluster, frags int) {
	r := rand.New(rand.NewPCG(1, 2))
	w := func(p string, data []byte) {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, p), data, 0o644))
	}
	w("empty", nil)
	w("one", []byte("1"))
	w("a/b/c/d/e/deep.txt", []byte("deep\n"))
	w("héllo wörld ✓ 日本語.txt", randBytes(r, 5000))
	w(strings.Repeat("n", 255), randBytes(r, 77))
	// A DOS 8.3 name beside the long one: a second index entry, not
	// listed.
	w("Long File Name.txt", []byte("long"))
	must(t, unix.Setxattr(filepath.Join(dir, "Long File Name.txt"), "system.ntfs_dos_name", []byte("LONGFI~1.TXT"), 0))
	w("big", randBytes(r, 3<<20+3))
	must(t, os.Mkdir(filepath.Join(dir, "emptydir"), 0o700))
	sp, err := os.Create(filepath.Join(dir, "sparse"))
	must(t, err)
	sp.WriteAt(randBytes(r, 100), 0)
	sp.WriteAt(randBytes(r, 70000), 8<<20)
	sp.WriteAt(randBytes(r, 5000), 100<<20)
	sp.Truncate(120 << 20)
	sp.Close()
	// Fragments: appends of a cluster to frag, each followed by a file
	// of a cluster, spread frag's clusters: more runs than its MFT
	// record holds, so an attribute list and extension records.
	fa, err := os.OpenFile(filepath.Join(dir, "frag"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	must(t, err)
	for i := range frags {
		_, err := fa.Write(randBytes(r, max(cluster, 4096)))
		must(t, err)
		must(t, fa.Sync())
		w(fmt.Sprintf("fill/%04d", i), randBytes(r, max(cluster, 4096)))
	}
	fa.Close()
	if cluster <= 4096 { // ntfs-3g compresses under clusters of 4 KiB at most
		compressed(t, r, filepath.Join(dir, "comp"))
	}
	must(t, os.Symlink("one", filepath.Join(dir, "link-short")))
	must(t, os.Symlink(strings.Repeat("long/", 40)+"target", filepath.Join(dir, "link-long")))
	must(t, os.Symlink("../../a", filepath.Join(dir, "a/b/up")))
	must(t, os.Symlink("a/b/c", filepath.Join(dir, "to-dir")))
	must(t, os.Link(filepath.Join(dir, "one"), filepath.Join(dir, "a/hard1")))
	must(t, os.Link(filepath.Join(dir, "one"), filepath.Join(dir, "a/b/hard2")))
	must(t, os.Link(filepath.Join(dir, "one"), filepath.Join(dir, "one-again")))
	must(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o640))
	must(t, unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(filepath.Join(dir, "blk"), unix.S_IFBLK|0o600, int(unix.Mkdev(259, 70000))))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "sock"), Net: "unix"})
	must(t, err)
	l.SetUnlinkOnClose(false)
	l.Close()
	must(t, unix.Setxattr(filepath.Join(dir, "big"), "user.comment", []byte("a comment"), 0))
	must(t, unix.Setxattr(filepath.Join(dir, "big"), "user.large", bytes.Repeat([]byte("v"), 3000), 0))
	must(t, unix.Setxattr(filepath.Join(dir, "a"), "user.dir", []byte("on a dir"), 0))
	must(t, os.Chtimes(filepath.Join(dir, "one"), time.Unix(1e9, 123456700), time.Unix(2e9, 987654300)))
	w("gone", randBytes(r, 50000))
	os.Remove(filepath.Join(dir, "gone"))
	w("gone", []byte("re-created"))
	// A full volume, then holes: the MFT grows into them as bigdir's
	// files are made, in fragments.
	var fillers []string
	for i := 0; ; i++ {
		p := filepath.Join(dir, fmt.Sprintf("filler%05d", i))
		if err := os.WriteFile(p, make([]byte, 64<<10), 0o644); err != nil {
			os.Remove(p)
			break
		}
		fillers = append(fillers, p)
	}
	for i := 0; i < len(fillers); i += 2 {
		must(t, os.Remove(fillers[i]))
	}
	for i := range 2000 {
		w(filepath.Join("bigdir", strings.Repeat("x", i%50)+hex.EncodeToString([]byte{byte(i >> 8), byte(i)})), []byte{byte(i)})
	}
	for i := 1; i < len(fillers); i += 2 {
		must(t, os.Remove(fillers[i]))
	}
}

// compressed makes folder dir, marked for compression, and files in it
// that ntfs-3g compresses (LZNT1): text, random bytes (units stored as
// they are), holes between compressed data, a file of many units.
func compressed(t *testing.T, r *rand.Rand, dir string) {
	must(t, os.Mkdir(dir, 0o755))
	var a [4]byte
	_, err := unix.Getxattr(dir, "system.ntfs_attrib_be", a[:])
	must(t, err)
	a[2] |= 0x08 // FILE_ATTRIBUTE_COMPRESSED
	must(t, unix.Setxattr(dir, "system.ntfs_attrib_be", a[:], 0))
	must(t, os.WriteFile(filepath.Join(dir, "text"), bytes.Repeat([]byte("hello world "), 20000), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "random"), randBytes(r, 100000), 0o644))
	var mixed []byte
	for i := range 3000 {
		mixed = fmt.Appendf(mixed, "line %d of a file in many units %x\n", i, randBytes(r, i%7))
	}
	must(t, os.WriteFile(filepath.Join(dir, "lines"), mixed, 0o644))
	fh, err := os.Create(filepath.Join(dir, "holes"))
	must(t, err)
	fh.Write(bytes.Repeat([]byte("a"), 70000))
	fh.WriteAt(append(randBytes(r, 5000), bytes.Repeat([]byte("z"), 60000)...), 500000)
	fh.Truncate(2 << 20)
	must(t, fh.Close())
}

// node is what is compared of a file.
type tnode struct {
	Mode, Nlink, UID, GID uint32
	Ino                   uint64
	Size                  int64
	Mtime, Atime, Ctime   int64
	Rdev                  [2]uint32
	Target, Hash          string
	Xattrs                map[string]string
}

func hashOf(t testing.TB, r io.Reader) string {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// mountedTree walks the filesystem mounted at dir.
func mountedTree(t *testing.T, dir string) map[string]tnode {
	out := map[string]tnode{}
	must(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, dir), "/")
		var st unix.Stat_t
		must(t, unix.Lstat(p, &st))
		n := tnode{Mode: st.Mode, Nlink: uint32(st.Nlink), UID: st.Uid, GID: st.Gid, Size: st.Size, Ino: st.Ino,
			Mtime: st.Mtim.Nano(), Atime: st.Atim.Nano(), Ctime: st.Ctim.Nano(), Xattrs: map[string]string{}}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Rdev = [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}
		case unix.S_IFLNK:
			n.Target, _ = os.Readlink(p)
		case unix.S_IFREG:
			f, err := os.Open(p)
			must(t, err)
			n.Hash = hashOf(t, f)
			f.Close()
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
			n.Xattrs[name] = shortHash(v[:m])
		}
		out[rel] = n
		return nil
	}))
	return out
}

// readerTree walks the filesystem through the reader.
func readerTree(t *testing.T, f *FS) map[string]tnode {
	out := map[string]tnode{}
	var walk func(p string, st fsread.Stat)
	walk = func(p string, st fsread.Stat) {
		n := tnode{Mode: st.Mode, Nlink: st.Nlink, UID: st.UID, GID: st.GID, Size: st.Size, Ino: st.Ino,
			Mtime: st.Mtime.UnixNano(), Atime: st.Atime.UnixNano(), Ctime: st.Ctime.UnixNano(), Rdev: [2]uint32{st.Major, st.Minor}, Xattrs: map[string]string{}}
		if ls, err := f.Lstat(p); err != nil || ls != st {
			t.Errorf("%s: Lstat %+v, %v; ReadDir gave %+v", p, ls, err, st)
		}
		xs, err := f.Xattrs(p)
		must(t, err)
		for _, x := range xs {
			n.Xattrs[x.Name] = shortHash(x.Value)
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

func compareTrees(t *testing.T, want, got map[string]tnode) {
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
		if !ok {
			t.Errorf("%s: missing from the reader's view", p)
			bad++
		} else {
			if w.Mode&unix.S_IFMT != unix.S_IFREG {
				w.Atime, g.Atime = 0, 0 // walking and reading move atimes
			}
			if a, b := nodeString(w), nodeString(g); a != b {
				t.Errorf("%s:\nntfs-3g %s\nreader  %s", p, a, b)
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

func nodeString(n tnode) string {
	var keys []string
	for k := range n.Xattrs {
		keys = append(keys, k+"="+n.Xattrs[k])
	}
	sort.Strings(keys)
	return strings.Join([]string{
		"ino=" + strconv.FormatUint(n.Ino, 10),
		"mode=" + strconv.FormatInt(int64(n.Mode), 8), "nlink=" + itoa(int64(n.Nlink)), "uid=" + itoa(int64(n.UID)), "gid=" + itoa(int64(n.GID)),
		"size=" + itoa(n.Size), "mtime=" + itoa(n.Mtime), "atime=" + itoa(n.Atime), "ctime=" + itoa(n.Ctime),
		"rdev=" + itoa(int64(n.Rdev[0])) + ":" + itoa(int64(n.Rdev[1])), "target=" + n.Target, "hash=" + n.Hash, "xattrs=" + strings.Join(keys, ","),
	}, " ")
}

func shortHash(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:6])
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

func openImage(t testing.TB, img string) *FS {
	t.Helper()
	fh, err := os.Open(img)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	fi, _ := fh.Stat()
	f, err := Open(fh, fi.Size(), Options{Warn: func(s string) { t.Log("warning:", s) }})
	must(t, err)
	return f
}

// TestAgainstNTFS3G compares the reader's view of a filesystem with what
// ntfs-3g shows of it: names, inode numbers, modes, link counts, sizes,
// times, symlink targets, content and streams.
func TestAgainstNTFS3G(t *testing.T) {
	needNTFS(t)
	for _, tc := range []struct {
		name    string
		size    int64
		cluster int
		frags   int // appends to /frag
		args    []string
	}{
		{"4k-clusters", 48 << 20, 4096, 800, []string{"-L", "Données"}},
		{"512-clusters", 40 << 20, 512, 800, []string{"-c", "512", "-L", "small"}},
		{"64k-clusters", 400 << 20, 65536, 800, []string{"-c", "65536"}},
		// Over 64 KiB, sectors per cluster are coded as a negative
		// power of two.
		{"128k-clusters", 300 << 20, 128 << 10, 100, []string{"-c", "131072"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := mkImage(t, tc.size, tc.args...)
			var want map[string]tnode
			mountImage(t, img, false, func(dir string) { populate(t, dir, tc.cluster, tc.frags) })
			// A second mount sees what the first wrote, as the reader
			// will, and, read-only, leaves atimes alone.
			mountImage(t, img, true, func(dir string) { want = mountedTree(t, dir) })
			f := openImage(t, img)
			got := readerTree(t, f)
			compareTrees(t, want, got)
			if l := tc.args[len(tc.args)-1]; tc.args[0] == "-L" && f.Label() != l {
				t.Errorf("label %q, want %q", f.Label(), l)
			}
			checkFragmented(t, f, "/frag", tc.cluster >= 4096 && tc.frags >= 800) // ntfs-3g keeps frag in few runs under small clusters
			if len(f.mft.runs) < 4 {
				t.Errorf("$MFT in %d runs: the test meant to fragment it", len(f.mft.runs))
			}
			st, err := f.Lstat("/one")
			must(t, err)
			if st.Nlink != 4 {
				t.Errorf("/one has %d links, want 4", st.Nlink)
			}
			for _, p := range []string{"/$MFT", "/$Extend"} {
				if _, ok := got[p]; ok {
					t.Errorf("%s is listed", p)
				}
			}
			checkHoles(t, f, "/sparse", 75000, 2<<20)
			if tc.cluster <= 4096 {
				checkCompressed(t, f, "/comp/text")
				checkHoles(t, f, "/comp/holes", 135000, 400<<10)
			}
			if got["/fifo"].Mode&unix.S_IFMT != unix.S_IFIFO || got["/link-short"].Target != "one" {
				t.Errorf("fifo %o, symlink %q", got["/fifo"].Mode, got["/link-short"].Target)
			}
		})
	}
}

// checkHoles asserts that the data ranges of p hold between min and max
// bytes, and that what lies outside them reads as zeros.
func checkHoles(t *testing.T, f *FS, p string, minData, maxData int64) {
	t.Helper()
	fl, err := f.Open(p)
	must(t, err)
	rs, err := fl.Data()
	must(t, err)
	var n, last int64
	buf := make([]byte, 1<<20)
	for _, r := range append(rs, extent.Range{Start: fl.Size(), End: fl.Size()}) {
		n += r.Len()
		for off := last; off < r.Start; off += int64(len(buf)) {
			k, _ := fl.ReadAt(buf[:min(int64(len(buf)), r.Start-off)], off)
			if !bytes.Equal(buf[:k], make([]byte, k)) {
				t.Errorf("%s: the hole at %d does not read as zeros", p, off)
			}
		}
		last = r.End
	}
	if n < minData || n > maxData {
		t.Errorf("%s: %d bytes of data in %v, want %d to %d", p, n, rs, minData, maxData)
	}
}

// checkCompressed asserts that p is compressed, so that comparing it
// with ntfs-3g tested LZNT1.
func checkCompressed(t *testing.T, f *FS, p string) {
	t.Helper()
	fl, err := f.Open(p)
	must(t, err)
	if fl.(*stream).unit == 0 {
		t.Errorf("%s is not compressed", p)
	}
}

// checkFragmented asserts that p needed an attribute list and that its
// data ranges are what a reader of them gets.
func checkFragmented(t *testing.T, f *FS, p string, wantList bool) {
	t.Helper()
	ref, err := f.resolve(p)
	num := refNum(ref)
	must(t, err)
	rec, err := f.record(num)
	must(t, err)
	if wantList && rec.find(atAttrList, "") == nil {
		t.Errorf("%s: %d runs but no attribute list", p, len(rec.all(atData, "")[0].runs))
	}
	fl, err := f.Open(p)
	must(t, err)
	rs, err := fl.Data()
	must(t, err)
	if len(rs) != 1 || rs[0].Start != 0 || rs[0].End != fl.Size() {
		t.Errorf("%s: data ranges %v, want all of its %d bytes", p, rs, fl.Size())
	}
}

var _ = errors.New
