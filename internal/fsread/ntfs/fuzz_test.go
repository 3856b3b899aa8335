package ntfs

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

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

// TestSeedImages makes the seeds of FuzzOpen: small filesystems made
// with mkntfs, filled through ntfs-3g, of which it keeps the bytes the
// reader reads. With SAUVE_WRITE_SEEDS=1 it writes them to
// testdata/fuzz/FuzzOpen. (FuzzOpen does not make them itself: every
// fuzzing worker would run the mounts again.)
func TestSeedImages(t *testing.T) {
	needNTFS(t)
	seeds := seedImages(t)
	if os.Getenv("SAUVE_WRITE_SEEDS") == "" {
		return
	}
	for i, s := range seeds {
		b := []byte("go test fuzz v1\n[]byte(" + strconv.Quote(string(s)) + ")\n")
		must(t, os.WriteFile(filepath.Join("testdata/fuzz/FuzzOpen", fmt.Sprint("seed", i)), b, 0o644))
	}
}

func seedImages(f *testing.T) [][]byte {
	var out [][]byte
	for i, args := range [][]string{{"-c", "4096", "-L", "seed"}, {"-c", "512"}} {
		img := mkImage(f, 40<<20, args...)
		mountImage(f, img, false, func(dir string) {
			if i == 0 {
				// A compressed file, and one in more runs than its
				// record holds (an attribute list).
				os.Mkdir(filepath.Join(dir, "c"), 0o755)
				unix.Setxattr(filepath.Join(dir, "c"), "system.ntfs_attrib_be", []byte{0, 0, 0x08, 0x10}, 0)
				os.WriteFile(filepath.Join(dir, "c/z"), bytes.Repeat([]byte("compress me "), 2000), 0o644)
				fa, _ := os.OpenFile(filepath.Join(dir, "frag"), os.O_CREATE|os.O_WRONLY, 0o644)
				for k := range 1200 {
					fa.Write(bytes.Repeat([]byte{byte(k)}, 4096))
					fa.Sync()
					os.WriteFile(filepath.Join(dir, fmt.Sprint("f", k)), bytes.Repeat([]byte{1}, 4096), 0o644)
				}
				fa.Close()
				for k := range 1200 {
					os.Remove(filepath.Join(dir, fmt.Sprint("f", k)))
				}
			}
			os.MkdirAll(filepath.Join(dir, "d/e"), 0o755)
			os.WriteFile(filepath.Join(dir, "small"), []byte("hello"), 0o644)
			os.WriteFile(filepath.Join(dir, "d/e/big"), bytes.Repeat([]byte("0123456789"), 300), 0o644)
			os.Symlink("small", filepath.Join(dir, "link"))
			os.Link(filepath.Join(dir, "small"), filepath.Join(dir, "d/hard"))
			unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644)
			unix.Setxattr(filepath.Join(dir, "small"), "user.s", []byte("stream"), 0)
			sp, _ := os.Create(filepath.Join(dir, "sparse"))
			sp.WriteAt([]byte("x"), 1<<20)
			sp.Close()
			for i := range 12 { // long names: an INDX block, few records
				os.WriteFile(filepath.Join(dir, "d", strings.Repeat("n", 200)+string(rune('A'+i))), nil, 0o644)
			}
		})
		b, _ := os.ReadFile(img)
		tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
		fs, err := Open(tr, int64(len(b)), Options{})
		if err != nil {
			f.Fatalf("seed %v: %v", args, err)
		}
		explore(fs)
		if i == 0 {
			ref, err := fs.resolve("/frag")
			if err != nil {
				f.Fatal(err)
			}
			if rec, _ := fs.record(refNum(ref)); rec == nil || rec.find(atAttrList, "") == nil {
				f.Fatalf("the seed's /frag has no attribute list: %d runs", len(rec.all(atData, "")[0].runs))
			}
		}
		out = append(out, fuzzimg.Encode(tr.Keep(b)))
	}
	return out
}

// FuzzOpen opens an image, walks it and reads every file. Its seeds are
// in testdata (see TestSeedImages).
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		img := fuzzimg.Decode(in, fuzzMaxImage, fuzzBudget)
		fs, err := Open(img, img.Size(), Options{})
		if err != nil {
			return
		}
		explore(fs)
	})
}

// fuzzFS is a filesystem of zeros around the byte-level parsers.
func fuzzFS() *FS {
	zeros := fuzzimg.Decode([]byte{0, 0, 0, 1}, fuzzMaxImage, fuzzBudget) // 16 MiB of zeros
	f := &FS{r: zeros, size: zeros.Size(), sectSize: 512, cs: 4096, clusters: zeros.Size() / 4096, recSize: 1024, idxSize: 4096,
		warn: func(string) {}, recs: map[uint64]*record{}}
	f.mft = &stream{f: f, size: 1 << 20, init: 1 << 20, runs: []run{{0, 16, 256}}, cached: -1}
	return f
}

// FuzzRecord parses one MFT record of any content and reads it as a
// file: attributes, runlists, streams, index, reparse point.
func FuzzRecord(f *testing.F) {
	f.Add(bytes.Repeat([]byte("FILE0\x00\x03\x00"), 128))
	if _, err := exec.LookPath("mkntfs"); err == nil {
		// The system files' records of a new filesystem, as on disk.
		b, _ := os.ReadFile(mkImage(f, 2<<20))
		for n := range 12 {
			f.Add(b[4<<12+n<<10 : 4<<12+(n+1)<<10])
		}
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) < 1024 {
			return
		}
		fs := fuzzFS()
		rec, err := fs.parseRecord(20, raw[:1024])
		if err != nil {
			return
		}
		if n, err := fs.node(rec); err == nil {
			_ = n
		}
		if s, err := fs.dataStream(rec, ""); err == nil {
			s.Data()
			s.ReadAt(make([]byte, 70000), 0)
		}
		fs.xattrs(rec)
		fs.readDir(rec, func(string, uint64) error { return nil })
	})
}

// FuzzLZNT1 decompresses any compression unit.
func FuzzLZNT1(f *testing.F) {
	f.Add([]byte("\x0b\xb0\x00abc\x00\x00\x00\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, src []byte) {
		lznt1(make([]byte, 65536), src)
	})
}

// FuzzRuns decodes any runlist.
func FuzzRuns(f *testing.F) {
	f.Add([]byte("\x11\x05\x10\x01\x04\x21\x10\x00\x01\x00"), int64(0), int64(40))
	f.Fuzz(func(t *testing.T, b []byte, low, high int64) {
		// Within what parseAttr lets through.
		low, high = low&(1<<40-1), high&(1<<40-1)
		if high < low-1 {
			return
		}
		decodeRuns(b, low, high, 1<<20)
	})
}
