package ext

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
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

// seedImages makes small filesystems with mke2fs -d (and a journal that
// needs recovery, written by debugfs) and keeps of each the bytes the
// reader reads.
func seedImages(f *testing.F) [][]byte {
	if _, err := exec.LookPath("mke2fs"); err != nil {
		return nil
	}
	dir := f.TempDir()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "d/e"), 0o755)
	os.WriteFile(filepath.Join(tree, "small"), []byte("hello"), 0o644)
	os.WriteFile(filepath.Join(tree, "d/e/big"), bytes.Repeat([]byte("0123456789"), 3000), 0o644)
	os.Symlink("small", filepath.Join(tree, "fast"))
	os.Symlink(strings.Repeat("x/", 50), filepath.Join(tree, "slow"))
	for i := range 60 {
		os.WriteFile(filepath.Join(tree, "d", strings.Repeat("n", 40)+string(rune('A'+i))), nil, 0o644)
	}
	var out [][]byte
	for i, mk := range [][]string{
		{"-t", "ext2", "-b", "1024"},
		{"-t", "ext3", "-b", "1024"},
		{"-t", "ext4", "-b", "1024"},
		{"-t", "ext4", "-b", "1024", "-O", "inline_data"},
		{"-t", "ext4", "-b", "1024", "-j"},
	} {
		img := filepath.Join(dir, "img"+string(rune('0'+i)))
		os.WriteFile(img, nil, 0o644)
		os.Truncate(img, 2<<20)
		args := append(append([]string{"-q", "-F", "-d", tree}, mk...), img)
		if out, err := exec.Command("mke2fs", args...).CombinedOutput(); err != nil {
			f.Fatalf("mke2fs: %v\n%s", err, out)
		}
		if i == 4 {
			os.WriteFile(filepath.Join(dir, "blk"), bytes.Repeat([]byte{7}, 1024), 0o644)
			os.WriteFile(filepath.Join(dir, "script"), []byte("jo -c -v 3\njw -b 1500 "+filepath.Join(dir, "blk")+"\njw -r 1501\njc\n"), 0o644)
			exec.Command("debugfs", "-w", "-f", filepath.Join(dir, "script"), img).Run()
		}
		b, _ := os.ReadFile(img)
		tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
		fs, err := Open(tr, int64(len(b)), Options{})
		if err != nil {
			f.Fatalf("seed %v: %v", mk, err)
		}
		if i == 4 && fs.Replayed() == 0 {
			f.Fatal("the journal seed replays nothing")
		}
		explore(fs)
		out = append(out, fuzzimg.Encode(tr.Keep(b)))
	}
	return out
}

func FuzzExtImage(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		img := fuzzimg.Decode(in, fuzzMaxImage, fuzzBudget)
		fs, err := Open(img, img.Size(), Options{})
		if err != nil {
			return
		}
		explore(fs)
	})
}

// fuzzFS is a filesystem around the byte-level parsers.
func fuzzFS(bs int64, incompat uint32) *FS {
	zeros := fuzzimg.Decode([]byte{0, 0, 0, 1}, fuzzMaxImage, fuzzBudget) // 16 MiB of zeros
	return &FS{r: zeros, size: zeros.Size(), sb: super{bs: bs, blocks: 1 << 14, incompat: incompat, inodes: 1 << 14, ipg: 8192, bpg: 8192, isize: 256, descSize: 32}}
}

func FuzzExtDirents(f *testing.F) {
	f.Add([]byte("\x02\x00\x00\x00\x0c\x00\x01\x02.\x00\x00\x00\x0b\x00\x00\x00\xf4\x03\x04\x01abcd"), true)
	f.Fuzz(func(t *testing.T, b []byte, filetype bool) {
		var inc uint32
		if filetype {
			inc = incompatFiletype
		}
		fuzzFS(1024, inc).dirents(1, b, func(string, uint64) error { return nil })
	})
}

func FuzzExtXattrs(f *testing.F) {
	f.Add([]byte("\x07\x01\x20\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00comment\x00\x00\x00\x00\x00hello"), 0)
	f.Fuzz(func(t *testing.T, b []byte, base int) {
		base = base & 0xFF
		if base > len(b) {
			base = len(b)
		}
		fuzzFS(1024, 0).xattrEntries(1, b, 0, base)
		aclToXattr(b)
	})
}

func FuzzExtJournalBlocks(f *testing.F) {
	f.Add(bytes.Repeat([]byte("\xc0\x3b\x39\x98\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x0b\xb8\x00\x00\x00\x0a"), 8), uint32(jbdCsumV3|jbd64Bit))
	f.Fuzz(func(t *testing.T, b []byte, incompat uint32) {
		if len(b) < 16 {
			return
		}
		for _, size := range []int{8, 10, 12, 14, 16} {
			parseTags(b, size, incompat&jbd64Bit != 0)
		}
		parseRevoke(b, incompat&jbd64Bit != 0)
		if len(b) >= 20 {
			commitOK(b, incompat, 0, 0, incompat)
		}
	})
}

// FuzzExtInode parses one inode of any content: its block map, extent
// tree, symlink, inline data and attributes, over a filesystem of zeros.
func FuzzExtInode(f *testing.F) {
	raw := make([]byte, 256)
	copy(raw[40:], []byte{0x0A, 0xF3, 1, 0, 4, 0, 0, 0})
	f.Add(raw)
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) < 256 {
			return
		}
		fs := fuzzFS(1024, incompatFiletype|incompatInlineData|incompatExtents)
		zeros := fuzzimg.Decode([]byte{0, 0, 0, 1}, fuzzMaxImage, fuzzBudget) // 16 MiB of zeros
		fs.r, fs.size = zeros, zeros.Size()
		in := &inode{ino: 12, raw: raw[:256], mode: le16(raw, 0), size: int64(le32(raw, 4)), flags: le32(raw, 32),
			fileACL: uint64(le32(raw, 104)), extra: int(le16(raw, 128)) & 0x7C, blocks: uint64(le32(raw, 28))}
		if fl, err := fs.open(in); err == nil {
			fl.Data()
			fl.ReadAt(make([]byte, 4096), 0)
		}
		fs.readlink(in)
		fs.xattrs(in)
		fs.readDir(in, func(string, uint64) error { return nil })
	})
}
