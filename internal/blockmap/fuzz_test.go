package blockmap

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fuzzimg"
)

// Fuzz inputs are sparse disk images in the encoding of package fuzzimg
// (seeds hold only the bytes the parser reads, a few hundred to a few
// thousand), and a uint16 that picks the windows the map is read in.
// One execution stays cheap whatever the image claims: the disk is at
// most fuzzMaxDisk bytes, its reads fail past fuzzReadBudget bytes, and
// the map is read in at most fuzzWindows windows.
const (
	fuzzMaxDisk    = 1 << 30
	fuzzReadBudget = 4 << 20
	fuzzWindows    = 32
)

func fuzzDisk(in []byte) *fuzzimg.Image { return fuzzimg.Decode(in, fuzzMaxDisk, fuzzReadBudget) }

// windows returns the windows a fuzz target reads a map of size bytes in,
// in increasing order: at most fuzzWindows+1, spread evenly from the
// start to the end (a small filesystem is read whole, a large one
// sampled over its whole length), of a size w picks from 512 bytes to 1 MiB, often not a multiple of the
// block size, so ranges are clipped at varied places.
func windows(size int64, w uint16) []extent.Range {
	win := (int64(w)%2048 + 1) * 512
	stride := max(win, (size+fuzzWindows-1)/fuzzWindows)
	var out []extent.Range
	for off := int64(0); off < size; off += stride {
		out = append(out, extent.Range{Start: off, End: min(off+win, size)})
	}
	if k := len(out); k > 0 && out[k-1].End < size {
		out = append(out, extent.Range{Start: max(size-win, out[k-1].End), End: size})
	}
	return out
}

// walk reads m in the windows ws, in order, and returns the ranges
// found, adjacent ones merged; ok is false when m fails (an I/O error:
// the read budget ran out). Every window's ranges must be in order, not
// empty and inside the window, and the same when the window is read
// again in two halves: a map does not depend on how the disk is cut
// into windows (calls that go back are slower, never wrong).
func walk(t testing.TB, m extent.Map, ws []extent.Range) (all []extent.Range, ok bool) {
	t.Helper()
	data := func(w extent.Range) ([]extent.Range, bool) {
		rs, err := m.Data(w.Start, w.Len())
		if err != nil {
			return nil, false
		}
		last := w.Start
		for _, r := range rs {
			if r.Start < last || r.End <= r.Start || r.End > w.End {
				t.Fatalf("range %v out of order or outside the window [%d, %d): %v", r, w.Start, w.End, rs)
			}
			last = r.End
		}
		return rs, true
	}
	for _, w := range ws {
		rs, ok := data(w)
		if !ok {
			return nil, false
		}
		if h := w.Start + w.Len()/2; h > w.Start {
			a, ok1 := data(extent.Range{Start: w.Start, End: h})
			b, ok2 := data(extent.Range{Start: h, End: w.End})
			if ok1 && ok2 && !slices.Equal(merge(nil, rs), merge(merge(nil, a), b)) {
				t.Fatalf("window [%d, %d) maps as %v, its halves as %v and %v", w.Start, w.End, rs, a, b)
			}
		}
		all = merge(all, rs)
	}
	return all, true
}

// merge appends rs to all, merging adjacent ranges.
func merge(all, rs []extent.Range) []extent.Range {
	for _, r := range rs {
		if k := len(all); k > 0 && all[k-1].End == r.Start {
			all[k-1].End = r.End
		} else {
			all = append(all, r)
		}
	}
	return all
}

// mapFunc is a Map made of a function.
type mapFunc func(off, n int64) []extent.Range

func (f mapFunc) Data(off, n int64) ([]extent.Range, error) { return f(off, n), nil }

// TestWalk: walk passes a sound map and catches broken ones.
func TestWalk(t *testing.T) {
	ws := windows(10<<20, 700)
	sound := mapFunc(func(off, n int64) []extent.Range { // every other MiB
		var out []extent.Range
		for m := off >> 20; m<<20 < off+n; m++ {
			if m%2 == 0 {
				out = append(out, extent.Range{Start: max(m<<20, off), End: min((m+1)<<20, off+n)})
			}
		}
		return out
	})
	if rs, ok := walk(t, sound, ws); !ok || len(rs) == 0 {
		t.Fatalf("sound map: %v %v", rs, ok)
	}
	for _, c := range []struct {
		name, want string
		m          mapFunc
	}{
		{"past the window", "outside the window", func(off, n int64) []extent.Range { return []extent.Range{{Start: off, End: off + n + 512}} }},
		{"empty range", "outside the window", func(off, n int64) []extent.Range { return []extent.Range{{Start: off + 1, End: off + 1}} }},
		{"out of order", "out of order", func(off, n int64) []extent.Range {
			return []extent.Range{{Start: off + 2, End: off + 3}, {Start: off, End: off + 1}}
		}},
		{"depends on the windows", "its halves", func(off, n int64) []extent.Range { return []extent.Range{{Start: off, End: off + 1}} }},
	} {
		r := &recorder{TB: t}
		func() {
			defer func() {
				if v := recover(); v != nil && v != errStop {
					panic(v)
				}
			}()
			walk(r, c.m, ws)
		}()
		if !strings.Contains(r.msg, c.want) {
			t.Errorf("%s: walk said %q, want %q", c.name, r.msg, c.want)
		}
	}
}

// recorder is a testing.TB whose Fatalf records its message and stops.
type recorder struct {
	testing.TB
	msg string
}

var errStop = errors.New("stop")

func (r *recorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(errStop)
}

// exercise probes an image with p and reads its map as a backup would
// (walk): it must not panic, the filesystem must fit its region, and the
// map must keep walk's rules.
func exercise(t *testing.T, p probe, in []byte, w uint16) {
	img := fuzzDisk(in)
	fs, err := p(img, img.Size(), func(string) {})
	if err != nil || fs == nil {
		return
	}
	if fs.Size < 0 || fs.Size > img.Size() {
		t.Fatalf("filesystem of %d bytes in %d", fs.Size, img.Size())
	}
	if fs.m != nil {
		walk(t, fs.m, windows(fs.Size, w))
	}
}

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

func fuzzProbe(f *testing.F, p probe) {
	f.Fuzz(func(t *testing.T, in []byte, w uint16) { exercise(t, p, in, w) })
}

func FuzzExt(f *testing.F)  { fuzzProbe(f, probeExt) }
func FuzzXFS(f *testing.F)  { fuzzProbe(f, probeXFSTrees) }
func FuzzNTFS(f *testing.F) { fuzzProbe(f, probeNTFS) }
func FuzzFAT(f *testing.F)  { fuzzProbe(f, probeFAT) }
func FuzzSwap(f *testing.F) { fuzzProbe(f, probeSwap) }

// FuzzLayout reads a whole disk: partition tables, then filesystems. On
// top of walk's checks, the bytes it maps must add up to what its Tally
// counts as read, inside partitions and outside, and asking the windows
// again must give the same answers.
func FuzzLayout(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte, w uint16) {
		img := fuzzDisk(in)
		l, err := NewLayout(img, img.Size(), LayoutOptions{})
		if err != nil {
			return
		}
		tl := NewTally(l)
		ws := windows(img.Size(), w)
		// Read each window once, for the counts.
		var mapped int64
		var first [][]extent.Range
		for _, w := range ws {
			rs, err := tl.Data(w.Start, w.Len())
			if err != nil {
				return
			}
			first = append(first, rs)
			for _, r := range rs {
				mapped += r.Len()
			}
		}
		counted := tl.Outside()
		for i, p := range l.Parts {
			s := tl.Part(i)
			if s.Read < 0 || s.Skipped < 0 || s.Used < 0 {
				t.Fatalf("%s: read %d, skipped %d, used %d", l.Label(p), s.Read, s.Skipped, s.Used)
			}
			counted += s.Read
		}
		if mapped != counted {
			t.Fatalf("%d bytes mapped, %d counted as read", mapped, counted)
		}
		// Backwards now: the layout answers as it did.
		for i := len(ws) - 1; i >= 0; i-- {
			rs, err := l.Data(ws[i].Start, ws[i].Len())
			if err != nil {
				return
			}
			if !slices.Equal(rs, first[i]) {
				t.Fatalf("window %v maps as %v, then as %v", ws[i], first[i], rs)
			}
		}
		walk(t, l, ws)
	})
}

// probeXFSTrees is probeXFS with the log taken as clean, so the fuzzer
// reaches the free-space trees (a seed cannot hold a whole log).
func probeXFSTrees(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	xfsAssumeCleanLog = true
	defer func() { xfsAssumeCleanLog = false }()
	return probeXFS(r, size, warn)
}

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpora from freshly made filesystems")

// seedWindows is the walk parameter of the seeds: windows of 256 KiB.
const seedWindows = 511

// The filesystems the seeds are made from: small, as mkfs allows.
var fsSeeds = []struct {
	fuzz, name string
	size       int64
	mk         []string
	want       string
}{
	{"FuzzExt", "ext4", 2 << 20, []string{"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64"}, "ext4"},
	{"FuzzExt", "ext4-uninit", 8 << 20, []string{"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64", "-O", "^metadata_csum,uninit_bg,^flex_bg"}, "ext4"},
	{"FuzzExt", "ext4-64bit", 4 << 20, []string{"mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "64", "-O", "64bit,meta_bg,^resize_inode"}, "ext4"},
	{"FuzzExt", "ext2", 2 << 20, []string{"mkfs.ext2", "-q", "-F", "-N", "64"}, "ext2"},
	{"FuzzXFS", "xfs", 32 << 20, []string{"mkfs.xfs", "-q", "-f"}, "xfs"},
	{"FuzzXFS", "xfs-v4", 32 << 20, []string{"mkfs.xfs", "-q", "-f", "-m", "crc=0"}, "xfs"},
	{"FuzzNTFS", "ntfs", 4 << 20, []string{"mkntfs", "-q", "-Q", "-F"}, "ntfs"},
	{"FuzzFAT", "fat12", 2 << 20, []string{"mkfs.fat", "-F", "12"}, "fat12"},
	{"FuzzFAT", "fat16", 16 << 20, []string{"mkfs.fat", "-F", "16"}, "fat16"},
	{"FuzzFAT", "fat32", 40 << 20, []string{"mkfs.fat", "-F", "32"}, "fat32"},
	{"FuzzSwap", "swap", 1 << 20, []string{"mkswap"}, "swap"},
}

var seedProbes = map[string]probe{"FuzzExt": probeExt, "FuzzXFS": probeXFSTrees, "FuzzNTFS": probeNTFS, "FuzzFAT": probeFAT, "FuzzSwap": probeSwap}

// mkfsImage makes a filesystem of size bytes with mk and returns its
// bytes.
func mkfsImage(t *testing.T, name string, size int64, mk []string) []byte {
	t.Helper()
	need(t, mk[0])
	img := image(t, name, size)
	c := exec.Command(mk[0], append(mk[1:], img)...)
	// mkfs.xfs makes filesystems under 300 MiB only for xfstests.
	c.Env = append(os.Environ(), "TEST_DIR=/tmp", "TEST_DEV=/dev/null", "QA_CHECK_FS=1")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(mk, " "), err, out)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fullMap reads a map whole, in 256 KiB windows.
func fullMap(t *testing.T, m extent.Map, size int64) []extent.Range {
	t.Helper()
	var ws []extent.Range
	for off := int64(0); off < size; off += 256 << 10 {
		ws = append(ws, extent.Range{Start: off, End: min(off+256<<10, size)})
	}
	rs, ok := walk(t, m, ws)
	if !ok {
		t.Fatal("map failed")
	}
	return rs
}

// traceSeed runs read (which reads a disk whole, as a backup does, and
// returns its map) on b, keeps only the bytes it read, and checks that
// what is left maps as b does.
func traceSeed(t *testing.T, b []byte, read func(r io.ReaderAt, size int64) []extent.Range) []byte {
	t.Helper()
	tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
	want := read(tr, int64(len(b)))
	enc := fuzzimg.Encode(tr.Keep(b))
	img := fuzzimg.Decode(enc, fuzzMaxDisk, 1<<40)
	if got := read(img, img.Size()); !slices.Equal(got, want) {
		t.Fatalf("the seed maps as %v, the image it was made from as %v", got, want)
	}
	return enc
}

func writeSeed(t *testing.T, path string, in []byte, w uint16) {
	t.Helper()
	os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\nuint16(%d)\n", in, w), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestFuzzSeeds checks that every committed seed parses as the filesystem
// it was made from, and with -update-seeds makes them again.
func TestFuzzSeeds(t *testing.T) {
	for _, s := range fsSeeds {
		path := filepath.Join("testdata", "fuzz", s.fuzz, s.name)
		p := seedProbes[s.fuzz]
		if *updateSeeds {
			b := mkfsImage(t, s.name, s.size, s.mk)
			enc := traceSeed(t, b, func(r io.ReaderAt, size int64) []extent.Range {
				fs, err := p(r, size, func(string) {})
				if err != nil || fs == nil || fs.m == nil {
					t.Fatalf("%s made by %s is not mapped: %+v %v", s.name, s.mk[0], fs, err)
				}
				return fullMap(t, fs.m, fs.Size)
			})
			writeSeed(t, path, enc, seedWindows)
		}
		in, w := readSeed(t, path)
		t.Logf("seed %s: %d bytes", path, len(in))
		img := fuzzDisk(in)
		fs, err := p(img, img.Size(), func(string) {})
		if err != nil || fs == nil || fs.Type != s.want || fs.m == nil {
			t.Fatalf("seed %s: %+v %v", path, fs, err)
		}
		exercise(t, p, in, w)
	}
	for _, s := range layoutSeeds {
		path := filepath.Join("testdata", "fuzz", "FuzzLayout", s.name)
		if *updateSeeds {
			enc := traceSeed(t, s.make(t), func(r io.ReaderAt, size int64) []extent.Range {
				l, err := NewLayout(r, size, LayoutOptions{})
				if err != nil {
					t.Fatal(err)
				}
				return fullMap(t, l, size)
			})
			writeSeed(t, path, enc, seedWindows)
		}
		in, _ := readSeed(t, path)
		t.Logf("seed %s: %d bytes", path, len(in))
		img := fuzzDisk(in)
		l, err := NewLayout(img, img.Size(), LayoutOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range l.Parts {
			if p.FS != nil && p.Full == "" {
				got = append(got, p.FS.Type)
			}
		}
		if strings.Join(got, " ") != s.want {
			t.Errorf("seed %s: mapped filesystems %v, want %s (warnings %v)", path, got, s.want, l.Warnings)
		}
	}
}

// Whole disks for FuzzLayout: partition tables made by sfdisk, with
// filesystems in some partitions.
var layoutSeeds = []struct {
	name string
	make func(t *testing.T) []byte
	want string // filesystems mapped
}{
	{"gpt", func(t *testing.T) []byte {
		return partitioned(t, 8<<20, "label: gpt\nstart=2048, size=4096\nstart=6144, size=4096\nstart=10240, size=2048, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n",
			[]string{"mkfs.ext2", "-q", "-F", "-N", "64"}, []string{"mkfs.fat", "-F", "12"}, []string{"mkswap"})
	}, "ext2 fat12 swap"},
	{"mbr", func(t *testing.T) []byte {
		return partitioned(t, 8<<20, "label: dos\nstart=2048, size=4096, type=83\nstart=6144, type=5\nstart=8192, size=4096, type=6\n",
			[]string{"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64"}, []string{"mkfs.fat", "-F", "12"})
	}, "ext4 fat12"},
}

// partitioned makes a disk of size bytes partitioned by sfdisk with
// script, and makes in partition i the filesystem mk[i] (none if nil).
func partitioned(t *testing.T, size int64, script string, mk ...[]string) []byte {
	t.Helper()
	need(t, "sfdisk")
	p := image(t, "disk", size)
	c := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", p)
	c.Stdin = strings.NewReader(script)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	disk, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	parts := partitionsOf(t, disk)
	for i, m := range mk {
		if m == nil {
			continue
		}
		if i >= len(parts) {
			t.Fatalf("no partition %d", i+1)
		}
		copy(disk[parts[i].Start:parts[i].End], mkfsImage(t, fmt.Sprint("fs", i), parts[i].Len(), m))
	}
	return disk
}

// partitionsOf returns the data partitions of a disk (extended ones left
// out), in table order.
func partitionsOf(t *testing.T, disk []byte) []extent.Range {
	t.Helper()
	l, err := NewLayout(bytes.NewReader(disk), int64(len(disk)), LayoutOptions{})
	if err != nil || l.Table == nil {
		t.Fatalf("no partition table: %v", err)
	}
	var out []extent.Range
	for _, p := range l.Table.Partitions {
		if !p.Container {
			out = append(out, extent.Range{Start: p.Start, End: p.End()})
		}
	}
	return out
}

// readSeed reads a "go test fuzz v1" file of a []byte and a uint16.
func readSeed(t *testing.T, path string) ([]byte, uint16) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("seed %s: %v (make it with go test -run TestFuzzSeeds -update-seeds)", path, err)
	}
	lines := strings.Split(string(raw), "\n")
	if len(lines) < 3 || lines[0] != "go test fuzz v1" || !strings.HasPrefix(lines[1], "[]byte(") || !strings.HasPrefix(lines[2], "uint16(") {
		t.Fatalf("%s: not a fuzz corpus file of a []byte and a uint16", path)
	}
	b, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	w, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(lines[2], "uint16("), ")"), 10, 16)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return []byte(b), uint16(w)
}
