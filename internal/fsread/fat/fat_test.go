package fat

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/sauve-backup/sauve/internal/fsread"
)

func needTools(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"mkfs.fat", "mcopy", "mmd", "mdel", "mdir", "mattrib"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian packages dosfstools, mtools)", tool)
		}
	}
}

// mtools runs an mtools command on image img. Times are written and read
// in UTC, as the reader reads them.
func mtools(t testing.TB, img, cmd string, args ...string) string {
	t.Helper()
	c := exec.Command(cmd, append([]string{"-i", img}, args...)...)
	c.Env = append(os.Environ(), "TZ=UTC", "MTOOLS_SKIP_CHECK=1")
	out, err := c.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", cmd, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func must(t testing.TB, err error) {
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

func mkfs(t testing.TB, size int64, args ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fat.img")
	must(t, os.WriteFile(img, nil, 0o644))
	must(t, os.Truncate(img, size))
	if out, err := exec.Command("mkfs.fat", append(args, img)...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.fat %v: %v\n%s", args, err, out)
	}
	return img
}

// put copies data into img at path p (a path of the image, "::/...").
func put(t testing.TB, img, p string, data []byte) {
	t.Helper()
	src := filepath.Join(t.TempDir(), "src")
	must(t, os.WriteFile(src, data, 0o644))
	mtools(t, img, "mcopy", "-o", src, "::"+p)
}

// bigDirFiles is how many files the full directory holds.
const bigDirFiles = 300

// populate fills img, through mtools, with what the reader must read:
// nested folders, short names in lowercase (NT's flags), long and
// unicode names (with surrogate pairs), an empty folder, a folder
// spanning clusters, a fragmented file, a read-only file, and files
// deleted (one re-created).
func populate(t *testing.T, img string) {
	r := rand.New(rand.NewPCG(1, 2))
	mtools(t, img, "mmd", "::/a", "::/a/b", "::/a/b/c", "::/emptydir", "::/bigdir", "::/Sub")
	put(t, img, "/a/b/c/deep.txt", []byte("deep\n"))
	put(t, img, "/one", []byte("1"))
	put(t, img, "/empty", nil)
	put(t, img, "/UPPER.TXT", []byte("upper"))
	put(t, img, "/lower.txt", []byte("lower"))
	put(t, img, "/MixedCase.Txt", []byte("mixed"))
	put(t, img, "/héllo wörld ✓.txt", randBytes(r, 5000))
	put(t, img, "/日本語のファイル名.txt", randBytes(r, 100))
	put(t, img, "/"+strings.Repeat("n", 200)+".long", randBytes(r, 77))
	put(t, img, "/Sub/inner file.bin", randBytes(r, 3000))
	put(t, img, "/readonly.txt", []byte("do not write"))
	mtools(t, img, "mattrib", "+r", "::/readonly.txt")
	put(t, img, "/gone", randBytes(r, 50000))
	put(t, img, "/deleted.txt", []byte("deleted"))
	mtools(t, img, "mdel", "::/gone", "::/deleted.txt")
	put(t, img, "/gone", []byte("re-created"))
	// One mcopy for the lot: mtools makes them one by one all the same.
	src := t.TempDir()
	var names []string
	for i := range bigDirFiles {
		n := filepath.Join(src, fmt.Sprintf("a rather long file name number %03d.data", i))
		must(t, os.WriteFile(n, []byte{byte(i)}, 0o644))
		names = append(names, n)
	}
	mtools(t, img, "mcopy", append(names, "::/bigdir/")...)
	// Fragmentation: small files, every other one deleted, then a big
	// file that the freed clusters take first.
	for i := range 12 {
		put(t, img, fmt.Sprintf("/fill%02d", i), randBytes(r, 9000))
	}
	for i := 0; i < 12; i += 2 {
		mtools(t, img, "mdel", fmt.Sprintf("::/fill%02d", i))
	}
	forgetNextFree(t, img)
	put(t, img, "/a/fragmented.bin", randBytes(r, 200000))
}

// forgetNextFree clears FAT32's hint of the next free cluster (as a
// repair tool or another system does) so that mtools allocates from the
// start again, into the holes deleted files left.
func forgetNextFree(t *testing.T, img string) {
	b, err := os.ReadFile(img)
	must(t, err)
	if binary.LittleEndian.Uint16(b[22:]) != 0 { // not FAT32
		return
	}
	info := int64(binary.LittleEndian.Uint16(b[48:])) * int64(binary.LittleEndian.Uint16(b[11:]))
	fh, err := os.OpenFile(img, os.O_WRONLY, 0)
	must(t, err)
	defer fh.Close()
	_, err = fh.WriteAt([]byte{0xFF, 0xFF, 0xFF, 0xFF}, info+492)
	must(t, err)
}

// node is what is compared of a file.
type node struct {
	Dir   bool
	Size  int64
	Mtime int64
	Hash  string
	RO    bool
}

func hashOf(t testing.TB, r io.Reader) string {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// mtoolsTree is the tree as mtools sees it: the paths mdir lists, the
// files as mcopy extracts them (with their times), the read-only bits
// mattrib shows.
func mtoolsTree(t *testing.T, img string) map[string]node {
	out := map[string]node{"/": {Dir: true}}
	for _, l := range strings.Split(strings.TrimSpace(mtools(t, img, "mdir", "-/", "-b", "-a", "::")), "\n") {
		p := strings.TrimPrefix(l, "::")
		dir := strings.HasSuffix(p, "/")
		out[strings.TrimSuffix(p, "/")] = node{Dir: dir}
	}
	for _, l := range strings.Split(mtools(t, img, "mattrib", "-/", "::*"), "\n") {
		if i := strings.Index(l, "::/"); i >= 0 && strings.Contains(l[:i], "R") {
			p := l[i+2:]
			n := out[p]
			n.RO = true
			out[p] = n
		}
	}
	dest := t.TempDir()
	mtools(t, img, "mcopy", "-s", "-m", "-n", "::/*", dest)
	must(t, filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		must(t, err)
		rel := strings.TrimPrefix(p, dest)
		if rel == "" {
			return nil
		}
		n, ok := out[rel]
		if !ok {
			t.Errorf("mcopy extracted %s, which mdir does not list", rel)
		}
		n.Mtime = fi.ModTime().UnixNano()
		if !fi.IsDir() {
			n.Size = fi.Size()
			fh, err := os.Open(p)
			must(t, err)
			n.Hash = hashOf(t, fh)
			fh.Close()
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
		n := node{Dir: st.IsDir(), RO: st.Mode&0o222 == 0, Mtime: st.Mtime.UnixNano()}
		if p == "/" {
			n.Mtime = 0
		}
		if xs, err := f.Xattrs(p); err != nil || len(xs) != 0 {
			t.Errorf("%s: xattrs %v %v", p, xs, err)
		}
		switch st.Type() {
		case fsread.TypeRegular:
			n.Size = st.Size
			if st.Mode&0o777 != 0o644 && st.Mode&0o777 != 0o444 {
				t.Errorf("%s: mode %o", p, st.Mode)
			}
			fl, err := f.Open(p)
			must(t, err)
			if fl.Size() != st.Size {
				t.Errorf("%s: Open says %d bytes, Lstat %d", p, fl.Size(), st.Size)
			}
			n.Hash = hashOf(t, io.NewSectionReader(fl, 0, fl.Size()))
		case fsread.TypeDir:
			n.RO = false // Linux shows directories writable whatever their attribute
			if st.Mode&0o7777 != 0o755 || st.Nlink != 2 {
				t.Errorf("%s: mode %o nlink %d", p, st.Mode, st.Nlink)
			}
			ents, err := f.ReadDir(p)
			must(t, err)
			for _, e := range ents {
				walk(path.Join(p, e.Name), e.Stat)
			}
		default:
			t.Errorf("%s: mode %o", p, st.Mode)
		}
		if st.UID != 0 || st.GID != 0 {
			t.Errorf("%s: owner %d:%d", p, st.UID, st.GID)
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
		if !ok {
			t.Errorf("%s: missing from the reader's view", p)
			bad++
		} else if g != want[p] {
			t.Errorf("%s:\nmtools %+v\nreader %+v", p, want[p], g)
			bad++
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

func openImage(t testing.TB, img string) *FS {
	t.Helper()
	b, err := os.ReadFile(img)
	must(t, err)
	f, err := Open(bytes.NewReader(b), int64(len(b)), Options{Warn: func(s string) { t.Logf("warning: %s", s) }})
	must(t, err)
	return f
}

// fatTypes are the geometries the tests make, one or more per FAT type.
var fatTypes = []struct {
	name string
	bits int
	size int64
	mkfs []string
}{
	{"fat12", 12, 8 << 20, []string{"-F", "12", "-n", "TWELVE"}},
	{"fat12-1k-clusters", 12, 3 << 20, []string{"-F", "12", "-s", "2"}},
	{"fat16", 16, 40 << 20, []string{"-F", "16", "-n", "SIXTEEN"}},
	{"fat16-2k-sectors", 16, 64 << 20, []string{"-F", "16", "-S", "2048", "-s", "1"}},
	{"fat32", 32, 40 << 20, []string{"-F", "32", "-n", "THIRTYTWO"}},
	{"fat32-4k-clusters", 32, 300 << 20, []string{"-F", "32", "-s", "8"}},
}

// TestFATAgainstMtools: for FAT12, 16 and 32 in several geometries, the
// reader sees the tree mtools made as mtools does: the same names, the
// same content, times and read-only bits.
func TestFATAgainstMtools(t *testing.T) {
	needTools(t)
	for _, c := range fatTypes {
		t.Run(c.name, func(t *testing.T) {
			img := mkfs(t, c.size, c.mkfs...)
			populate(t, img)
			f := openImage(t, img)
			if f.Bits() != c.bits {
				t.Fatalf("read as FAT%d", f.Bits())
			}
			want := mtoolsTree(t, img)
			compareTrees(t, want, readerTree(t, f))
			for _, p := range []string{"/gone", "/readonly.txt", "/日本語のファイル名.txt", "/bigdir/a rather long file name number 299.data"} {
				if _, ok := want[p]; !ok {
					t.Errorf("mtools does not show %s: the test checks nothing", p)
				}
			}
			if _, ok := want["/deleted.txt"]; ok {
				t.Error("mtools shows the deleted file")
			}
			checkLayout(t, f)
			checkLookup(t, f)
			if i := slices(c.mkfs, "-n"); i >= 0 && f.Label() != c.mkfs[i+1] {
				t.Errorf("label %q, want %q", f.Label(), c.mkfs[i+1])
			}
		})
	}
}

func slices(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// checkLayout makes sure the tree tests what it should: a fragmented
// file, a directory of several clusters.
func checkLayout(t *testing.T, f *FS) {
	e, err := f.resolve("/a/fragmented.bin")
	must(t, err)
	fl, err := f.open(&e)
	must(t, err)
	if len(fl.rs) < 3 {
		t.Errorf("fragmented.bin is in %d runs: the test reads no fragmented chain", len(fl.rs))
	}
	if r, _ := fl.Data(); len(r) != 1 || r[0].Start != 0 || r[0].End != fl.Size() {
		t.Errorf("Data: %v", r)
	}
	d, err := f.resolve("/bigdir")
	must(t, err)
	rs, err := f.chain(d.cluster, 1<<20)
	must(t, err)
	if n := rs[len(rs)-1].off/f.clusterSize + int64(rs[len(rs)-1].n); n < 2 {
		t.Errorf("bigdir spans %d clusters", n)
	}
}

// checkLookup: names are found without regard to ASCII case, and by
// their short alias; inode numbers are stable and distinct.
func checkLookup(t *testing.T, f *FS) {
	for _, c := range []struct{ p, same string }{
		{"/A/B/C/DEEP.TXT", "/a/b/c/deep.txt"},
		{"/mixedcase.txt", "/MixedCase.Txt"},
		{"/HÉLLO WÖRLD ✓.TXT", ""}, // Linux folds ASCII only
		{"/sub/../SUB/Inner File.BIN", "/Sub/inner file.bin"},
	} {
		st, err := f.Lstat(c.p)
		if c.same == "" {
			if !errors.Is(err, fsread.ErrNotExist) {
				t.Errorf("%s: %v, want ErrNotExist", c.p, err)
			}
			continue
		}
		want, err2 := f.Lstat(c.same)
		if err != nil || err2 != nil || st != want {
			t.Errorf("%s: %+v %v, want %+v %v", c.p, st, err, want, err2)
		}
	}
	es, err := f.readDir(rootDirCluster)
	must(t, err)
	seen := map[uint64]string{}
	for _, e := range es {
		if e.name != e.short {
			if st, err := f.Lstat("/" + e.short); err != nil || st.Ino != f.stat(&e).Ino {
				t.Errorf("short alias %s of %s: %v", e.short, e.name, err)
			}
		}
		ino := f.stat(&e).Ino
		if seen[ino] != "" {
			t.Errorf("%s and %s share inode %d", e.name, seen[ino], ino)
		}
		seen[ino] = e.name
	}
	if _, err := f.Lstat("/nope/x"); !errors.Is(err, fsread.ErrNotExist) || !strings.Contains(err.Error(), "/nope/x") {
		t.Errorf("missing path: %v", err)
	}
	if _, err := f.ReadDir("/one"); err == nil || !strings.Contains(err.Error(), "/one") {
		t.Errorf("ReadDir of a file: %v", err)
	}
	if _, err := f.Open("/a"); err == nil {
		t.Error("Open of a directory succeeded")
	}
	if _, err := f.Readlink("/one"); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("Readlink: %v", err)
	}
	st, err := f.Lstat("/readonly.txt")
	if err != nil || st.Mode != fsread.TypeRegular|0o444 {
		t.Errorf("read-only file: %o %v", st.Mode, err)
	}
	if st, _ := f.Lstat("/one"); st.Mtime.Before(time.Now().Add(-time.Hour)) || st.Mtime.After(time.Now().Add(time.Minute)) {
		t.Errorf("mtime of a file just written: %v", st.Mtime)
	}
}

// within fails the test if fn takes more than a few seconds: a damaged
// image must not hang the reader.
func within(t *testing.T, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: hangs", what)
		return nil
	}
}

// damage is an image made by mtools and the reader's view of it, to
// damage byte by byte.
type damage struct {
	b []byte
	f *FS
}

func damaged(t *testing.T, mkfsArgs ...string) damage {
	needTools(t)
	img := mkfs(t, 40<<20, mkfsArgs...)
	mtools(t, img, "mmd", "::/dir", "::/dir/sub")
	put(t, img, "/dir/big", bytes.Repeat([]byte("0123456789"), 5000))
	put(t, img, "/dir/small", []byte("small"))
	for i := range 100 {
		put(t, img, fmt.Sprintf("/dir/sub/file with a long name %d", i), nil)
	}
	b, err := os.ReadFile(img)
	must(t, err)
	f, err := Open(bytes.NewReader(b), int64(len(b)), Options{})
	must(t, err)
	return damage{b: b, f: f}
}

// setFAT writes FAT entry c of the first FAT (the one read).
func (d damage) setFAT(c, v uint32) []byte {
	b := append([]byte(nil), d.b...)
	switch d.f.bits {
	case 16:
		binary.LittleEndian.PutUint16(b[d.f.fatStart+int64(c)*2:], uint16(v))
	case 32:
		binary.LittleEndian.PutUint32(b[d.f.fatStart+int64(c)*4:], v)
	}
	return b
}

// clustersOf lists the clusters of the file or directory at p.
func (d damage) clustersOf(t *testing.T, p string) []uint32 {
	e, err := d.f.resolve(p)
	must(t, err)
	rs, err := d.f.chain(e.cluster, 1<<20)
	must(t, err)
	var cs []uint32
	for _, r := range rs {
		for i := range r.n {
			cs = append(cs, r.first+i)
		}
	}
	if len(cs) < 4 {
		t.Fatalf("%s has %d clusters: too few to damage", p, len(cs))
	}
	return cs
}

func reopen(t *testing.T, b []byte) *FS {
	f, err := Open(bytes.NewReader(b), int64(len(b)), Options{})
	must(t, err)
	return f
}

// TestFATDamagedChains: chains that loop, leave the data area, end
// early or reach free clusters, and directories that loop, give an
// error naming the file, never a hang.
func TestFATDamagedChains(t *testing.T) {
	for _, args := range [][]string{{"-F", "16"}, {"-F", "32"}} {
		t.Run("fat"+args[1], func(t *testing.T) {
			d := damaged(t, args...)
			big, sub := d.clustersOf(t, "/dir/big"), d.clustersOf(t, "/dir/sub")
			readBig := func(f *FS) error {
				fl, err := f.Open("/dir/big")
				if err != nil {
					return err
				}
				_, err = io.Copy(io.Discard, io.NewSectionReader(fl, 0, fl.Size()))
				return err
			}
			listSub := func(f *FS) error { _, err := f.ReadDir("/dir/sub"); return err }
			for _, c := range []struct {
				what string
				b    []byte
				try  func(*FS) error
				want string
			}{
				{"a chain looping to its start", d.setFAT(big[3], big[0]), readBig, "loops"},
				{"a chain looping on itself", d.setFAT(big[0], big[0]), readBig, "loops"},
				{"a chain past the data area", d.setFAT(big[1], d.f.clusters+10), readBig, "outside the data area"},
				{"a chain to cluster 1", d.setFAT(big[1], 1), readBig, "outside the data area"},
				{"a chain shorter than the file", d.setFAT(big[1], 0x0FFFFFFF), readBig, "less than the file's"},
				{"a chain reaching a free cluster", d.setFAT(big[1], 0), readBig, "free cluster"},
				{"a chain reaching a bad cluster", d.setFAT(big[1], 0x0FFFFFF7), readBig, "bad"},
				{"a directory chain looping", d.setFAT(sub[len(sub)-1], sub[0]), listSub, "loops"},
				{"a directory chain on itself", d.setFAT(sub[1], sub[1]), listSub, "loops"},
				{"a directory chain past the end", d.setFAT(sub[0], d.f.clusters+2), listSub, "outside the data area"},
			} {
				f := reopen(t, c.b)
				err := within(t, c.what, func() error { return c.try(f) })
				if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "/dir/") {
					t.Errorf("%s: %v (want an error naming the path and saying %q)", c.what, err, c.want)
				}
			}
		})
	}
}

// TestFATDirectoryLoop: a directory entry pointing at its own directory
// or at the root shows the same inode (walkers stop there) or is refused.
func TestFATDirectoryLoop(t *testing.T) {
	d := damaged(t, "-F", "16")
	sub := d.clustersOf(t, "/dir/sub")[0]
	e, err := d.f.resolve("/dir/sub/file with a long name 0")
	must(t, err)
	b := append([]byte(nil), d.b...)
	b[e.pos+11] = attrDir
	binary.LittleEndian.PutUint16(b[e.pos+26:], uint16(sub))
	f := reopen(t, b)
	loop := "/dir/sub/file with a long name 0"
	st, err := f.Lstat(loop)
	must(t, err)
	parent, err := f.Lstat("/dir/sub")
	must(t, err)
	if st.Ino != parent.Ino || !st.IsDir() {
		t.Fatalf("a directory entry back to its directory: inode %d, its directory's %d", st.Ino, parent.Ino)
	}
	// Deep paths through the loop resolve in bounded time.
	deep := "/dir/sub" + strings.Repeat("/file with a long name 0", 200)
	if _, err := f.Lstat(deep); err != nil {
		t.Fatalf("a path through the loop: %v", err)
	}
	binary.LittleEndian.PutUint16(b[e.pos+26:], 0)
	f = reopen(t, b)
	if _, err := f.ReadDir(loop); err == nil || !strings.Contains(err.Error(), "cluster 0") {
		t.Errorf("a directory entry pointing at the root: %v", err)
	}
}

// TestFATBadBootSector: every damaged BPB field is refused with an
// error saying which; NTFS and exFAT boot sectors are not probed as FAT.
func TestFATBadBootSector(t *testing.T) {
	d := damaged(t, "-F", "32")
	set := func(off int, v ...byte) []byte {
		b := append([]byte(nil), d.b...)
		copy(b[off:], v)
		return b
	}
	for _, c := range []struct {
		what string
		b    []byte
		want string
	}{
		{"no signature", set(510, 0, 0), "signature"},
		{"NTFS", set(3, []byte("NTFS    ")...), "NTFS"},
		{"exFAT", set(3, []byte("EXFAT   ")...), "exFAT"},
		{"1000-byte sectors", set(11, 0xE8, 0x03), "bytes per sector"},
		{"8 KiB sectors", set(11, 0x00, 0x20), "bytes per sector"},
		{"3 sectors per cluster", set(13, 3), "sectors per cluster"},
		{"0 sectors per cluster", set(13, 0), "sectors per cluster"},
		{"no reserved sector", set(14, 0, 0), "reserved"},
		{"no FAT", set(16, 0), "no FAT"},
		{"media byte", set(21, 0x12), "media"},
		{"root entries on FAT32", set(17, 0x00, 0x02), "root directory entries"},
		{"root cluster 0", set(44, 0, 0, 0, 0), "root directory cluster"},
		{"root cluster past the end", set(44, 0xFF, 0xFF, 0xFF, 0x0F), "root directory cluster"},
		{"FAT32 version", set(42, 1), "version"},
		{"active FAT 3 of 2", set(40, 0x83), "active FAT"},
		{"larger than the partition", d.b[:20<<20], "larger than its partition"},
		{"data area past the end", set(36, 0xFF, 0xFF, 0xFF, 0), "data area"},
		{"zeros", make([]byte, 1<<20), "signature"},
		{"too short", d.b[:100], "boot sector"},
	} {
		_, err := Open(bytes.NewReader(c.b), int64(len(c.b)), Options{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v (want %q)", c.what, err, c.want)
		}
		if Probe(bytes.NewReader(c.b)) && c.what != "larger than the partition" {
			t.Errorf("%s: probed as FAT", c.what)
		}
	}
	if !Probe(bytes.NewReader(d.b)) {
		t.Error("a FAT32 boot sector is not probed as FAT")
	}
	// The cluster count decides FAT12 or 16: a FAT16 layout with too
	// many clusters for FAT16 is damaged.
	d16 := damaged(t, "-F", "16")
	b := append([]byte(nil), d16.b...)
	b[13] = 1 // 1 sector per cluster: 80000 clusters
	if _, err := Open(bytes.NewReader(b), int64(len(b)), Options{}); err == nil || !strings.Contains(err.Error(), "too many for FAT16") {
		t.Errorf("FAT16 with too many clusters: %v", err)
	}
}

// TestFATLongNameChecksum: a long name whose checksum does not match its
// short entry (a tool unaware of long names renamed the file) gives way
// to the short name, as in Linux.
func TestFATLongNameChecksum(t *testing.T) {
	d := damaged(t, "-F", "16")
	e, err := d.f.resolve("/dir/sub/file with a long name 7")
	must(t, err)
	b := append([]byte(nil), d.b...)
	b[e.pos+13-32] ^= 0xFF // the checksum of the slot before the short entry
	f := reopen(t, b)
	ents, err := f.ReadDir("/dir/sub")
	must(t, err)
	found := false
	for _, x := range ents {
		if x.Name == "file with a long name 7" {
			t.Error("a long name with a wrong checksum was used")
		}
		found = found || x.Name == e.short
	}
	if !found || !strings.Contains(e.short, "~") {
		t.Errorf("the short name %q is not listed", e.short)
	}
	// A long name with a slash cannot name a file: the short name too.
	b = append([]byte(nil), d.b...)
	binary.LittleEndian.PutUint16(b[e.pos-32+1:], '/')
	ents, err = reopen(t, b).ReadDir("/dir/sub")
	must(t, err)
	found = false
	for _, x := range ents {
		if strings.Contains(x.Name, "/") {
			t.Errorf("a name with a slash is listed: %q", x.Name)
		}
		found = found || x.Name == e.short
	}
	if !found {
		t.Errorf("the short name %q is not listed instead of a long name with a slash", e.short)
	}
}

// TestFATSurrogates: long names are UTF-16, characters beyond the BMP
// as surrogate pairs (mtools writes none: the test writes them over a
// name mtools made, with the same number of units).
func TestFATSurrogates(t *testing.T) {
	d := damaged(t, "-F", "16")
	placeholder := "/dir/surrogate placeholder.txt"
	img := filepath.Join(t.TempDir(), "img")
	must(t, os.WriteFile(img, d.b, 0o644))
	put(t, img, placeholder, []byte("surrogates"))
	b, err := os.ReadFile(img)
	must(t, err)
	f := reopen(t, b)
	e, err := f.resolve(placeholder)
	must(t, err)
	name := "😀 smile 𝄞 emoji name.txt"
	u := utf16.Encode([]rune(name))
	if len(u) != 26 || utf16.RuneLen('😀') != 2 {
		t.Fatalf("%d units", len(u))
	}
	for slot := range 2 { // slot 1 (the name's start) is just before the short entry
		d := b[e.pos-32*int64(slot+1):]
		if d[11] != attrLFN || int(d[0]&0x1F) != slot+1 {
			t.Fatalf("slot %d: %x", slot+1, d[:32])
		}
		for i, off := range [13]int{1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30} {
			binary.LittleEndian.PutUint16(d[off:], u[slot*13+i])
		}
	}
	f = reopen(t, b)
	fl, err := f.Open("/dir/" + name)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if _, err := fl.ReadAt(got, 0); err != nil || string(got) != "surrogates" {
		t.Fatalf("%q %v", got, err)
	}
	// A lone surrogate reads as U+FFFD, as Go decodes UTF-16.
	binary.LittleEndian.PutUint16(b[e.pos-32+3:], 'x') // the low half of 😀
	ents, err := reopen(t, b).ReadDir("/dir")
	must(t, err)
	found := false
	for _, x := range ents {
		found = found || strings.HasPrefix(x.Name, "\uFFFDx smile")
	}
	if !found {
		t.Errorf("a lone surrogate: %v", ents)
	}
}

// TestFATProbe: the boot sectors of other filesystems made by their own
// tools are not taken for FAT.
func TestFATProbe(t *testing.T) {
	for _, c := range []struct {
		tool string
		args []string
	}{
		{"mkfs.ntfs", []string{"-q", "-F", "-f"}},
		{"mkfs.exfat", nil},
		{"mke2fs", []string{"-q", "-F", "-t", "ext4"}},
	} {
		if _, err := exec.LookPath(c.tool); err != nil {
			t.Logf("%s is not installed: not probed", c.tool)
			continue
		}
		img := filepath.Join(t.TempDir(), "img")
		must(t, os.WriteFile(img, nil, 0o644))
		must(t, os.Truncate(img, 16<<20))
		if out, err := exec.Command(c.tool, append(c.args, img)...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", c.tool, err, out)
		}
		b, err := os.ReadFile(img)
		must(t, err)
		if Probe(bytes.NewReader(b)) {
			t.Errorf("a %s image is probed as FAT", c.tool)
		}
		if _, err := Open(bytes.NewReader(b), int64(len(b)), Options{}); err == nil {
			t.Errorf("a %s image opens as FAT", c.tool)
		}
	}
}

// TestFATTimes: FAT dates and times, and the creation time's hundredths,
// read as UTC; out-of-range fields clamped as Linux does.
func TestFATTimes(t *testing.T) {
	date := uint16(2024-1980)<<9 | 5<<5 | 6
	tm := uint16(7)<<11 | 8<<5 | 5 // 07:08:10
	for _, c := range []struct {
		date, tm uint16
		cs       byte
		want     time.Time
	}{
		{date, tm, 0, time.Date(2024, 5, 6, 7, 8, 10, 0, time.UTC)},
		{date, tm, 150, time.Date(2024, 5, 6, 7, 8, 11, 500e6, time.UTC)},
		{date, tm, 199, time.Date(2024, 5, 6, 7, 8, 11, 990e6, time.UTC)},
		{date, tm, 200, time.Date(2024, 5, 6, 7, 8, 10, 0, time.UTC)},
		{0, 0, 0, time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)},
	} {
		if got := fatTime(c.date, c.tm, c.cs); !got.Equal(c.want) {
			t.Errorf("fatTime(%#x, %#x, %d) = %v, want %v", c.date, c.tm, c.cs, got, c.want)
		}
	}
	var e entry
	binary.LittleEndian.PutUint16(e.raw[24:], date)
	binary.LittleEndian.PutUint16(e.raw[22:], tm)
	binary.LittleEndian.PutUint16(e.raw[16:], date)
	binary.LittleEndian.PutUint16(e.raw[14:], tm-1)
	e.raw[13] = 123
	binary.LittleEndian.PutUint16(e.raw[18:], date+1)
	if e.mtime() != time.Date(2024, 5, 6, 7, 8, 10, 0, time.UTC) || e.ctime() != time.Date(2024, 5, 6, 7, 8, 9, 230e6, time.UTC) ||
		e.atime() != time.Date(2024, 5, 7, 0, 0, 0, 0, time.UTC) {
		t.Errorf("mtime %v ctime %v atime %v", e.mtime(), e.ctime(), e.atime())
	}
}
