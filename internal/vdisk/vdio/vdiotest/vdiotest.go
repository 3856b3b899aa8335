// Package vdiotest helps test the VM disk format packages: an in-memory
// output file, a sparse in-memory input, disks with patterns that exercise
// allocation and zero detection, a bounded walk of everything a reader
// maps (for fuzzing), and a writer of seed corpora.
package vdiotest

import (
	"bytes"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"

	"github.com/sauve-backup/sauve/internal/blockmap"
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
	Data(off, n int64) ([]blockmap.Range, error)
}

// Exercise walks what img maps and reads it, within fixed bounds of work
// and memory, ignoring errors: a fuzz target calls it to find panics,
// hangs and huge allocations.
func Exercise(img Image, size int64) {
	const window = 64 << 20
	buf := make([]byte, 64<<10)
	budget := int64(8 << 20)
	windows := []int64{}
	for off := int64(0); off < size && len(windows) < 16; off += window {
		windows = append(windows, off)
	}
	if size > window {
		windows = append(windows, (size-1)/window*window)
	}
	for _, off := range windows {
		ranges, err := img.Data(off, min(window, size-off))
		if err != nil {
			continue
		}
		for _, r := range ranges {
			if r.Start < off || r.End > off+window || r.Start >= r.End {
				panic(fmt.Sprintf("map returned %v for window %d", r, off))
			}
			for o := r.Start; o < r.End && budget > 0; {
				n := min(int64(len(buf)), r.End-o)
				img.ReadAt(buf[:n], o)
				o += n
				budget -= n
			}
		}
	}
	for _, o := range []int64{0, size / 2, size - 1, size - 100} {
		if o >= 0 {
			img.ReadAt(buf[:100], o)
		}
	}
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
