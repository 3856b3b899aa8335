// Package vdiotest helps test the VM disk format packages: an in-memory
// output file, a sparse in-memory input, disks with patterns that exercise
// allocation and zero detection, the encoding of fuzz inputs, a bounded
// walk of what a reader maps that checks it (for fuzzing), and a writer
// of seed corpora.
package vdiotest

import (
	"bytes"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fuzzimg"
)

// MemFile is an in-memory output file.
type MemFile struct{ B []byte }

// WriteAt implements io.WriterAt.
func (m *MemFile) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.B)) {
		m.B = append(m.B, make([]byte, end-int64(len(m.B)))...)
	}
	copy(m.B[off:], p)
	return len(p), nil
}

// Truncate sets the size.
func (m *MemFile) Truncate(n int64) error {
	if n < int64(len(m.B)) {
		m.B = m.B[:n]
	} else {
		m.B = append(m.B, make([]byte, n-int64(len(m.B)))...)
	}
	return nil
}

// Segments is a sparse file: pieces of data at offsets, zeros elsewhere.
type Segments struct {
	Size int64
	Segs map[int64][]byte
	offs []int64
}

// ReadAt implements io.ReaderAt.
func (s *Segments) ReadAt(p []byte, off int64) (int, error) {
	if s.offs == nil {
		for o := range s.Segs {
			s.offs = append(s.offs, o)
		}
		sort.Slice(s.offs, func(i, j int) bool { return s.offs[i] < s.offs[j] })
	}
	if off >= s.Size {
		return 0, io.EOF
	}
	n := len(p)
	var err error
	if rest := s.Size - off; int64(n) > rest {
		n, err = int(rest), io.EOF
	}
	clear(p[:n])
	for _, o := range s.offs {
		b := s.Segs[o]
		lo, hi := max(o, off), min(o+int64(len(b)), off+int64(n))
		if lo < hi {
			copy(p[lo-off:hi-off], b[lo-o:hi-o])
		}
	}
	return n, err
}

// Image is what the readers give.
type Image interface {
	io.ReaderAt
	Data(off, n int64) ([]extent.Range, error)
}

// Fuzz inputs that are image files are sparse files in the encoding of
// package fuzzimg (seeds hold only the bytes a reader reads, not the
// zeros of tables and padding, so they stay small, which keeps the
// fuzzer's minimizer fast), of at most FuzzMaxFile bytes, whose reads
// fail past FuzzReadBudget bytes: one execution stays cheap whatever
// sizes the input claims.
const (
	FuzzMaxFile    = 4 << 20
	FuzzReadBudget = 4 << 20
)

// FuzzFile decodes a fuzz input into the image file it describes.
func FuzzFile(in []byte) *fuzzimg.Image { return fuzzimg.Decode(in, FuzzMaxFile, FuzzReadBudget) }

// Opener opens an image file of size bytes in r: the disk and its size.
type Opener func(r io.ReaderAt, size int64) (Image, int64, error)

// Fuzz is the fuzz target of a reader of image files: it opens an input
// (FuzzFile) with open and reads part of it (Exercise), at placing what
// is read.
func Fuzz(f *testing.F, open Opener) {
	f.Fuzz(func(t *testing.T, in []byte, at uint64) {
		img := FuzzFile(in)
		d, size, err := open(img, img.Size())
		if err != nil {
			return
		}
		Exercise(t, d, size, at)
	})
}

// FuzzCorpus checks that every seed of the committed corpus of Fuzz,
// testdata/fuzz/FuzzOpen, opens (inputs the fuzzer found, named by a
// hash, are left out: they need not open); when SAUVE_WRITE_CORPUS is
// set, it first rewrites the seeds from the image files seeds returns.
func FuzzCorpus(t *testing.T, open Opener, seeds func() map[string][]byte) {
	if os.Getenv("SAUVE_WRITE_CORPUS") != "" {
		in := map[string][][]byte{}
		for name, img := range seeds() {
			in[name] = [][]byte{FuzzSeed(t, img, open)}
		}
		WriteCorpus(t, "FuzzOpen", in, "uint64(5000)")
	}
	for name, args := range Corpus(t, "FuzzOpen") {
		if found.MatchString(name) {
			continue
		}
		img := FuzzFile(args[0])
		if _, _, err := open(img, img.Size()); err != nil {
			t.Errorf("seed %s (%d bytes): %v", name, len(args[0]), err)
		}
	}
}

// found matches the names the fuzzer gives the inputs it adds.
var found = regexp.MustCompile(`^[0-9a-f]{16}$`)

// FuzzSeed returns the fuzz input of image file img: the bytes that open
// and a whole read of the disk (ReadAt and Data over all of it) read.
// The input must read back as img does.
func FuzzSeed(t testing.TB, img []byte, open Opener) []byte {
	t.Helper()
	read := func(r io.ReaderAt, size int64) ([]byte, []extent.Range) {
		d, n, err := open(r, size)
		if err != nil {
			t.Fatalf("seed: %v", err)
		}
		disk := make([]byte, n)
		if k, err := d.ReadAt(disk, 0); k != len(disk) || (err != nil && err != io.EOF) {
			t.Fatalf("seed: read %d of %d bytes: %v", k, n, err)
		}
		m, err := d.Data(0, n)
		if err != nil {
			t.Fatalf("seed: map: %v", err)
		}
		return disk, m
	}
	tr := &fuzzimg.Trace{R: bytes.NewReader(img)}
	disk, m := read(tr, int64(len(img)))
	in := fuzzimg.Encode(tr.Keep(img))
	f := fuzzimg.Decode(in, 1<<32-1, 1<<40)
	if disk2, m2 := read(f, f.Size()); !bytes.Equal(disk2, disk) || fmt.Sprint(m2) != fmt.Sprint(m) {
		t.Fatal("seed: the fuzz input does not read as the image it was made from")
	}
	return in
}

// Exercise reads part of what img (of size bytes) maps, within fixed
// bounds of work and memory whatever size it claims, and fails t where
// what a backup relies on breaks: a window's ranges are in order, not
// empty and inside it; bytes outside every range read as zeros; a read
// cut in two returns what one read does; a short read returns an error,
// io.EOF at the end of the disk. at (a fuzz argument) places one of the
// windows and the cut. Errors of a damaged image are ignored.
func Exercise(t testing.TB, img Image, size int64, at uint64) {
	t.Helper()
	const (
		window = 256 << 10        // mapped
		read   = int64(len(zero)) // of it read and checked
		cut    = 2 << 10          // read again in two pieces
	)
	if size <= 0 {
		return
	}
	var offs []int64
	for _, o := range []int64{0, int64(at % uint64(size)), size / 2, size - window} {
		offs = append(offs, max(o, 0)&^511)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	buf, piece := make([]byte, read), make([]byte, cut)
	next := int64(0)
	for _, off := range offs {
		off = max(off, next)
		if off >= size {
			break
		}
		n := min(window, size-off)
		next = off + n
		ranges, err := img.Data(off, n)
		if err != nil {
			continue
		}
		last := off
		for _, r := range ranges {
			if r.Start < last || r.End <= r.Start || r.End > off+n {
				t.Fatalf("map of window [%d, %d) returned %v: out of order or outside the window", off, off+n, ranges)
			}
			last = r.End
		}
		b := buf[:min(read, n)]
		if k, err := img.ReadAt(b, off); !readOK(t, k, err, len(b), off, size) {
			continue
		}
		end := off + int64(len(b))
		zeros := func(a, z int64) {
			if a >= z {
				return
			}
			if p := b[a-off : z-off]; !bytes.Equal(p, zero[:len(p)]) {
				i := a + int64(bytes.IndexFunc(p, func(r rune) bool { return r != 0 }))
				t.Fatalf("byte %d reads as %#x but lies outside the map %v", i, b[i-off], ranges)
			}
		}
		pos := off
		for _, r := range ranges {
			zeros(pos, min(r.Start, end))
			pos = max(pos, r.End)
		}
		zeros(pos, end)
		// The same bytes, read in two pieces cut at a place at picks.
		p := piece[:min(cut, len(b))]
		c := int(at>>9) % (len(p) + 1)
		if k, err := img.ReadAt(p[:c], off); !readOK(t, k, err, c, off, size) {
			continue
		}
		if k, err := img.ReadAt(p[c:], off+int64(c)); !readOK(t, k, err, len(p)-c, off+int64(c), size) {
			continue
		}
		if !bytes.Equal(p, b[:len(p)]) {
			t.Fatalf("%d bytes at %d read in pieces of %d and %d differ from one read", len(p), off, c, len(p)-c)
		}
	}
	// Reads at and across the end.
	p := piece[:100]
	if k, err := img.ReadAt(p, size); k != 0 || err != io.EOF {
		t.Fatalf("read at the end of the disk: %d bytes, %v", k, err)
	}
	if size >= 50 {
		if k, err := img.ReadAt(p, size-50); err == nil || (err == io.EOF && k != 50) {
			t.Fatalf("read across the end of the disk: %d bytes, %v", k, err)
		}
	}
}

// zero is as long as Exercise's reads, which are compared with it.
var zero [16 << 10]byte

// readOK reports whether a read of want bytes at off (of a disk of size
// bytes) returned them all, failing t if it broke io.ReaderAt's
// contract: fewer bytes need an error, io.EOF only at the end.
func readOK(t testing.TB, k int, err error, want int, off, size int64) bool {
	t.Helper()
	switch {
	case k < 0 || k > want:
		t.Fatalf("read of %d bytes at %d returned %d", want, off, k)
	case k < want && err == nil:
		t.Fatalf("read of %d bytes at %d returned %d and no error", want, off, k)
	case err == io.EOF && off+int64(want) < size:
		t.Fatalf("read of %d bytes at %d returned io.EOF inside a disk of %d bytes", want, off, size)
	}
	return k == want && (err == nil || err == io.EOF)
}

// SeedDisk returns a disk of size bytes for fuzz seeds: of each 4 KiB,
// about half are zeros and the others hold a short text in one sector,
// so that images of it have allocated, unallocated and compressed units
// in few bytes.
func SeedDisk(size int64, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, 4))
	b := make([]byte, size)
	for off := int64(0); off < size; off += 4096 {
		if r.IntN(2) == 0 {
			continue
		}
		at := off + int64(r.IntN(8))*512
		if at < size {
			copy(b[at:min(at+512, size)], fmt.Sprintf("sauve seed sector %d", at/512))
		}
	}
	return b
}

// Disk returns a disk of size bytes: random and text data, runs of zeros
// inside allocation units and units that are all zeros.
func Disk(size int64, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, 2))
	b := make([]byte, size)
	for off := int64(0); off < size; {
		n := min(size-off, int64(r.IntN(40000)+1))
		switch r.IntN(4) {
		case 0:
			for i := range b[off : off+n] {
				b[off+int64(i)] = byte(r.Uint32())
			}
		case 1:
			for i := range b[off : off+n] {
				b[off+int64(i)] = "sauve disk "[i%11]
			}
		default: // zeros
		}
		off += n
	}
	return b
}

// WriteCorpus writes seeds as files of the Go fuzzing corpus format under
// testdata/fuzz/<target>/ when SAUVE_WRITE_CORPUS is set (to refresh the
// committed corpus); otherwise it does nothing. Each seed's []byte
// arguments are followed by the literal arguments in more (e.g.
// "uint16(8)").
func WriteCorpus(t *testing.T, target string, seeds map[string][][]byte, more ...string) {
	if os.Getenv("SAUVE_WRITE_CORPUS") == "" {
		return
	}
	dir := filepath.Join("testdata", "fuzz", target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, args := range seeds {
		var b bytes.Buffer
		b.WriteString("go test fuzz v1\n")
		for _, a := range args {
			b.WriteString("[]byte(" + strconv.Quote(string(a)) + ")\n")
		}
		for _, m := range more {
			b.WriteString(m + "\n")
		}
		if err := os.WriteFile(filepath.Join(dir, name), b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// Corpus returns the []byte arguments of each file of the committed
// corpus testdata/fuzz/<target>/, by file name.
func Corpus(t testing.TB, target string) map[string][][]byte {
	t.Helper()
	dir := filepath.Join("testdata", "fuzz", target)
	files, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][][]byte{}
	for _, f := range files {
		raw, err := os.ReadFile(filepath.Join(dir, f.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(raw), "\n")
		if lines[0] != "go test fuzz v1" {
			t.Fatalf("%s: not a fuzz corpus file", f.Name())
		}
		for _, l := range lines[1:] {
			if q, ok := strings.CutPrefix(l, "[]byte("); ok {
				b, err := strconv.Unquote(strings.TrimSuffix(q, ")"))
				if err != nil {
					t.Fatalf("%s: %v", f.Name(), err)
				}
				out[f.Name()] = append(out[f.Name()], []byte(b))
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("no seeds in %s", dir)
	}
	return out
}

// Writer is what the format writers implement.
type Writer interface {
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

// Write writes disk through w in pieces of varying length, in order, as
// the pipelines do, and closes it.
func Write(t testing.TB, w Writer, disk []byte, seed uint64) {
	t.Helper()
	r := mrand.New(mrand.NewPCG(seed, 3))
	for off := 0; off < len(disk); {
		n := min(len(disk)-off, r.IntN(300000)+1)
		if _, err := w.WriteAt(disk[off:off+n], int64(off)); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
		off += n
	}
	if err := w.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

// Check reads img back and compares it with disk; every non-zero byte
// must lie in a mapped range.
func Check(t testing.TB, img Image, disk []byte) {
	t.Helper()
	got := make([]byte, len(disk))
	if n, err := img.ReadAt(got, 0); n != len(got) || (err != nil && err != io.EOF) {
		t.Fatalf("read back: %d bytes, %v", n, err)
	}
	if !bytes.Equal(got, disk) {
		for i := range got {
			if got[i] != disk[i] {
				t.Fatalf("read back differs from byte %d", i)
			}
		}
	}
	ranges, err := img.Data(0, int64(len(disk)))
	if err != nil {
		t.Fatalf("map: %v", err)
	}
	pos := int64(0)
	for _, r := range ranges {
		if r.Start < pos || r.End <= r.Start {
			t.Fatalf("map ranges out of order: %v", ranges)
		}
		if i := bytes.IndexFunc(disk[pos:r.Start], func(c rune) bool { return c != 0 }); i >= 0 {
			t.Fatalf("non-zero byte at %d outside the map", pos+int64(i))
		}
		pos = r.End
	}
	if i := bytes.IndexFunc(disk[pos:], func(c rune) bool { return c != 0 }); i >= 0 {
		t.Fatalf("non-zero byte at %d outside the map", pos+int64(i))
	}
}
