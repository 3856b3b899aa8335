package xfs

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/fsread/fsreadtest"
	"github.com/sauve-backup/sauve/internal/fuzzimg"
)

func TestMain(m *testing.M) { fuzzimg.Main(m) }

// Fuzz inputs describe images of at most fuzzMaxImage bytes, of which a
// reader may read fuzzBudget.
const (
	fuzzMaxImage = 64 << 20
	fuzzBudget   = 16 << 20
)

// explore reads everything a user could ask of f, within bounds.
func explore(f *FS) { fsreadtest.Explore(f) }

// protoImage makes a small XFS image (below mkfs.xfs's 300 MB minimum,
// allowed to fstests) holding the tree a prototype file describes, with
// no mount and no root: a short-form and a leaf directory, files of one
// and of several blocks, a local and a remote symlink, and attributes
// short-form and remote set by xfs_db. It returns the image and the
// files' contents by path.
func protoImage(t testing.TB, size int64, nfiles, big int, mkfs ...string) (string, map[string][]byte) {
	t.Helper()
	for _, tool := range []string{"mkfs.xfs", "xfs_db"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	dir := t.TempDir()
	files := map[string][]byte{
		"/small":         []byte("hello\n"),
		"/d/e/big":       bytes.Repeat([]byte("0123456789"), big/10),
		"/héllo_wörld_✓": []byte("unicode"),
	}
	for i := range nfiles {
		files[fmt.Sprintf("/many/%s%03d", strings.Repeat("n", i%30), i)] = []byte{byte(i)}
	}
	var proto strings.Builder
	proto.WriteString("/dev/null\n0 0\nd--755 0 0\n")
	var emit func(prefix string, depth int)
	emit = func(prefix string, depth int) {
		subdirs := map[string]bool{}
		for p, data := range files {
			if !strings.HasPrefix(p, prefix) {
				continue
			}
			rest := strings.TrimPrefix(p, prefix)
			if i := strings.IndexByte(rest, '/'); i >= 0 {
				subdirs[rest[:i]] = true
				continue
			}
			src := filepath.Join(dir, fmt.Sprintf("src%d", len(subdirs)*100000+proto.Len()))
			must(t, os.WriteFile(src, data, 0o644))
			fmt.Fprintf(&proto, "%s%s ---644 1000 100 %s\n", strings.Repeat(" ", depth), rest, src)
		}
		for d := range subdirs {
			fmt.Fprintf(&proto, "%s%s d--750 0 0\n", strings.Repeat(" ", depth), d)
			emit(prefix+d+"/", depth+1)
		}
		proto.WriteString(strings.Repeat(" ", depth) + "$\n")
	}
	// Symlinks at the root, then the files.
	proto.WriteString("fast l--777 0 0 small\n")
	if slices.Contains(mkfs, "crc=0") {
		// mkfs.xfs 6.1 writes a v5 remote symlink without its block
		// header (xfs_db then reports a CRC error), so only v4 gets one.
		fmt.Fprintf(&proto, "slow l--777 0 0 %s\n", strings.Repeat("x/", 300))
	}
	emit("/", 0)
	pf := filepath.Join(dir, "proto")
	must(t, os.WriteFile(pf, []byte(proto.String()), 0o644))
	img := filepath.Join(dir, "fs.img")
	must(t, os.WriteFile(img, nil, 0o644))
	must(t, os.Truncate(img, size))
	cmd := exec.Command("mkfs.xfs", append(append([]string{"-q", "-f", "-p", pf}, mkfs...), img)...)
	cmd.Env = append(os.Environ(), "TEST_DIR=/tmp", "TEST_DEV=none", "QA_CHECK_FS=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs %v: %v\n%s", mkfs, err, out)
	}
	sh(t, "xfs_db", "-x", "-c", "path /small", "-c", "attr_set -u -v 20 short", "-c", "attr_set -r -v 3000 remote", img)
	return img, files
}

// dirtyImage makes a small filesystem whose log needs recovery: written
// while mounted, then shut down. It needs root; "" without.
func dirtyImage(t testing.TB) string {
	if os.Geteuid() != 0 {
		return ""
	}
	img, _ := protoImage(t, 16<<20, 0, 100, "-b", "size=1024")
	dir := t.TempDir()
	sh(t, "mount", "-o", "loop", img, dir)
	os.MkdirAll(filepath.Join(dir, "logged/sub"), 0o755)
	for i := range 30 {
		os.WriteFile(filepath.Join(dir, "logged", fmt.Sprintf("file-%02d", i)), []byte{byte(i)}, 0o644)
	}
	os.Symlink(strings.Repeat("s", 500), filepath.Join(dir, "logged/link"))
	os.RemoveAll(filepath.Join(dir, "d"))
	sh(t, "sync")
	sh(t, "xfs_io", "-x", "-c", "shutdown", dir)
	sh(t, "umount", dir)
	return img
}

// seedImages makes small filesystems, v5 and v4, one with a log to
// replay, and keeps of each the bytes the reader reads.
func seedImages(f *testing.F) [][]byte {
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		return nil
	}
	var out [][]byte
	for _, mk := range [][]string{{"-b", "size=1024"}, {"-b", "size=1024", "-m", "crc=0"}, {"dirty"}} {
		var img string
		if mk[0] == "dirty" {
			if img = dirtyImage(f); img == "" {
				continue
			}
		} else {
			img, _ = protoImage(f, 16<<20, 40, 3000, mk...)
		}
		b, err := os.ReadFile(img)
		must(f, err)
		tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
		fs, err := Open(tr, int64(len(b)), Options{})
		if err != nil {
			f.Fatalf("seed %v: %v", mk, err)
		}
		explore(fs)
		out = append(out, fuzzimg.Encode(tr.Keep(b)))
	}
	return out
}

// FuzzOpen opens any image and reads everything in it.
func FuzzOpen(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		img := fuzzimg.Decode(in, fuzzMaxImage, fuzzBudget)
		// Most inputs have a bad CRC somewhere: every other one is
		// read as if its CRCs were right, to reach the parsers.
		fs, err := Open(img, img.Size(), Options{skipCRC: len(in)%2 == 0})
		if err != nil {
			return
		}
		explore(fs)
	})
}

// fuzzFS is a v5 filesystem of zeros around the byte-level parsers.
func fuzzFS(v5 bool) *FS {
	zeros := fuzzimg.Decode([]byte{0, 0, 0, 1}, fuzzMaxImage, fuzzBudget) // 16 MiB of zeros
	return &FS{r: zeros, size: zeros.Size(), skipCRC: true, sb: super{v5: v5, bs: 1024, blocklog: 10,
		dblocks: 1 << 14, agblocks: 1 << 13, agcount: 2, agblklog: 13, inopblog: 1, isize: 512, sectsize: 512, ftype: true, rootino: 64}}
}

// FuzzInode parses one inode of any content: its forks, directory,
// symlink and attributes, over a filesystem of zeros.
func FuzzInode(f *testing.F) {
	raw := make([]byte, 512)
	copy(raw, "IN\x41\xed\x03\x01")
	raw[82] = 20
	f.Add(raw, false)
	f.Fuzz(func(t *testing.T, raw []byte, v5 bool) {
		if len(raw) < 512 {
			return
		}
		fs := fuzzFS(v5)
		in, err := fs.parseInode(64, raw[:512])
		if err != nil {
			return
		}
		in.stat()
		if fl, err := fs.open(in); err == nil {
			fl.Data()
			fl.ReadAt(make([]byte, 4096), 0)
		}
		fs.readlink(in)
		fs.xattrs(in)
		fs.readDir(in, func(string, uint64) error { return nil })
	})
}

// FuzzBlocks parses directory data blocks, attribute leaves and ACLs.
func FuzzBlocks(f *testing.F) {
	f.Add([]byte("XD2D\x00\x10\x00\x10"), false)
	f.Fuzz(func(t *testing.T, b []byte, v5 bool) {
		if len(b) < 96 {
			return
		}
		fs := fuzzFS(v5)
		noop := func(string, uint64) error { return nil }
		fs.dataBlock(64, 0, b, noop)
		add := func(byte, []byte, []byte) error { return nil }
		shortAttrs(b, add)
		in := &inode{ino: 64}
		fs.leafBlock(in, nil, b, 12, add)
		aclToXattr(b)
	})
}

// TestWriteSeeds rewrites the committed seeds of FuzzOpen (so that it
// has seeds without mkfs.xfs) when XFS_WRITE_SEEDS is set.
func TestWriteSeeds(t *testing.T) {
	if os.Getenv("XFS_WRITE_SEEDS") == "" {
		t.Skip("set XFS_WRITE_SEEDS=1 to rewrite testdata/fuzz/FuzzOpen")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	must(t, os.MkdirAll(dir, 0o755))
	for i, mk := range [][]string{{"-b", "size=1024"}, {"-b", "size=1024", "-m", "crc=0"}, {"dirty"}} {
		var img string
		if mk[0] == "dirty" {
			if img = dirtyImage(t); img == "" {
				t.Fatal("the seed of a dirty log needs root")
			}
		} else {
			img, _ = protoImage(t, 16<<20, 40, 3000, mk...)
		}
		b, err := os.ReadFile(img)
		must(t, err)
		tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
		fs, err := Open(tr, int64(len(b)), Options{})
		must(t, err)
		if mk[0] == "dirty" && fs.Replayed() == 0 {
			t.Fatal("the dirty seed replays nothing")
		}
		explore(fs)
		seed := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", fuzzimg.Encode(tr.Keep(b)))
		must(t, os.WriteFile(filepath.Join(dir, fmt.Sprintf("proto-%d", i)), []byte(seed), 0o644))
	}
}

// FuzzLogItems replays a transaction of any items over a filesystem of
// zeros: each region is a 16-bit length and its bytes.
func FuzzLogItems(f *testing.F) {
	item := func(regions ...[]byte) []byte {
		var out []byte
		for _, r := range regions {
			out = append(out, byte(len(r)), byte(len(r)>>8))
			out = append(out, r...)
		}
		return out
	}
	buf := make([]byte, 24)
	copy(buf, []byte{0x3c, 0x12, 2, 0, 0, 0, 8, 0, 16, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0})
	ino := make([]byte, 56)
	copy(ino, []byte{0x3b, 0x12, 3, 0, 5, 0, 0, 0, 0, 0, 16})
	ino[40], ino[48] = 64, 16
	core := make([]byte, 176)
	copy(core, []byte{0x4e, 0x49, 0xa4, 0x81, 3, 2})
	f.Add(item([]byte("NART\x00\x00\x00\x00"), buf, make([]byte, 128), ino, core, make([]byte, 16)))
	f.Fuzz(func(t *testing.T, in []byte) {
		fs := fuzzFS(len(in)%2 == 0)
		tr := &logTrans{}
		for len(in) >= 2 {
			n := min(int(in[0])|int(in[1])<<8, len(in)-2)
			if tr.add(in[2:2+n], n%7 == 3) != nil {
				return
			}
			in = in[2+n:]
		}
		o := &overlay{base: fs.r, m: map[int64][]byte{}}
		fs.apply(o, []*logTrans{tr})
	})
}
