package fat

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/fsread"
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

// explore reads everything a user could ask of f, within bounds, with
// what only FAT has: its label, lookups in another case, and Readlink
// of files that cannot be symlinks.
func explore(f *FS) {
	f.Label()
	fsreadtest.Explore(exploreFAT{f})
}

type exploreFAT struct{ *FS }

func (e exploreFAT) Lstat(p string) (fsread.Stat, error) {
	e.FS.Lstat(strings.ToUpper(p))
	e.FS.Readlink(p)
	return e.FS.Lstat(p)
}

// seedImages makes small filesystems of each FAT type with mkfs.fat and
// mtools, and keeps of each the bytes the reader reads.
func seedImages(f *testing.F) [][]byte {
	for _, tool := range []string{"mkfs.fat", "mcopy", "mmd"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil
		}
	}
	var out [][]byte
	for _, c := range []struct {
		size int64
		mkfs []string
	}{
		{1440 << 10, []string{"-F", "12", "-n", "SEED12"}},
		{5 << 20, []string{"-F", "16", "-s", "1"}},
		{34 << 20, []string{"-F", "32", "-s", "1", "-n", "SEED32"}},
	} {
		img := mkfs(f, c.size, c.mkfs...)
		mtools(f, img, "mmd", "::/dir", "::/dir/Sub dir")
		put(f, img, "/small", []byte("hello"))
		put(f, img, "/dir/Sub dir/big file.bin", bytes.Repeat([]byte("0123456789"), 300))
		for i := range 20 {
			put(f, img, fmt.Sprintf("/dir/long name %d.txt", i), []byte{byte(i)})
		}
		b, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
		fs, err := Open(tr, int64(len(b)), Options{})
		if err != nil {
			f.Fatalf("seed %v: %v", c.mkfs, err)
		}
		explore(fs)
		out = append(out, fuzzimg.Encode(tr.Keep(b)))
	}
	return out
}

func FuzzOpen(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		img := fuzzimg.Decode(in, fuzzMaxImage, fuzzBudget)
		Probe(img)
		fs, err := Open(img, img.Size(), Options{})
		if err != nil {
			return
		}
		explore(fs)
	})
}

// FuzzDirents parses one directory of any content (long names, short
// names, times) over a filesystem of zeros.
func FuzzDirents(f *testing.F) {
	f.Add([]byte("\x41a\x00b\x00c\x00\x00\x00\xff\xff\x0f\x00\x5d\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00\xff\xff\xff\xff" +
		"ABC        \x20\x18\x00\x00\x00\x21\x00\x21\x00\x00\x00\x00\x00\x21\x00\x03\x00\x05\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		// The root directory of a FAT16 holds b; the FAT is zeros.
		size := 4096 + int64(len(b))
		fs := &FS{r: bytes.NewReader(append(make([]byte, 4096), b...)), size: size, warn: func(string) {}, bits: 16,
			bps: 512, clusterSize: 512, clusters: 1000, fatStart: 512, fatBytes: 2048, rootStart: 4096,
			rootBytes: int64(len(b)) &^ 31, dataStart: size,
			pages: map[int64][]byte{}, dirs: map[uint32]map[string]int{}, ents: map[uint32][]entry{}}
		es, err := fs.readDir(rootDirCluster)
		if err != nil {
			return
		}
		for i := range es {
			fs.stat(&es[i])
			fs.lookup(rootDirCluster, es[i].name)
		}
	})
}
