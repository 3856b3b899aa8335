package vdiotest

import (
	"github.com/sauve-backup/sauve/internal/extent"
	"io"
	"os"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// sparseFile is an in-memory vdio.RWFile whose zeros past its stored
// bytes take no memory: an updater may extend it by blocks of hundreds
// of MiB of zeros, and only non-zero data is kept.
type sparseFile struct {
	b    []byte
	size int64
}

func (s *sparseFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= s.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), s.size-off))
	clear(p[:n])
	if off < int64(len(s.b)) {
		copy(p[:n], s.b[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *sparseFile) WriteAt(p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	s.size = max(s.size, end)
	if extent.IsZero(p) {
		if off < int64(len(s.b)) {
			clear(s.b[off:min(end, int64(len(s.b)))])
		}
		return len(p), nil
	}
	if end > int64(len(s.b)) {
		s.b = append(s.b, make([]byte, end-int64(len(s.b)))...)
	}
	copy(s.b[off:], p)
	return len(p), nil
}

func (s *sparseFile) Truncate(n int64) error {
	s.size = n
	if n < int64(len(s.b)) {
		s.b = s.b[:n]
	}
	return nil
}

func (s *sparseFile) Sync() error                { return nil }
func (s *sparseFile) Stat() (os.FileInfo, error) { return sparseInfo{s.size}, nil }

type sparseInfo struct{ size int64 }

func (i sparseInfo) Name() string       { return "fuzz" }
func (i sparseInfo) Size() int64        { return i.size }
func (i sparseInfo) Mode() os.FileMode  { return 0o600 }
func (i sparseInfo) ModTime() time.Time { return time.Time{} }
func (i sparseInfo) IsDir() bool        { return false }
func (i sparseInfo) Sys() any           { return nil }

// FuzzInPlace is the fuzz target of an in-place updater: it opens an input
// of the reader's corpus (FuzzFile) for updating and writes, zeroes and
// syncs a few ranges placed by at. Damaged images may be refused; none
// may panic, hang or allocate without bound.
func FuzzInPlace(f *testing.F, open func(rw vdio.RWFile) (InPlaceUpdater, int64, error)) {
	// The reader's committed seeds are this target's.
	for _, args := range Corpus(f, "FuzzOpen") {
		f.Add(args[0], uint64(0x0102030405))
	}
	f.Fuzz(func(t *testing.T, in []byte, at uint64) {
		img := FuzzFile(in)
		rw := &sparseFile{b: make([]byte, img.Size()), size: img.Size()}
		if n, err := img.ReadAt(rw.b, 0); n != len(rw.b) && err != nil && err != io.EOF {
			return
		}
		u, size, err := open(rw)
		if err != nil || size <= 0 {
			return
		}
		p := []byte("fuzzed data")
		for i := range uint64(3) {
			off := int64((at>>(8*i))%uint64(size)) / 512 * 512
			n := min(int64(len(p)), size-off)
			u.WriteAt(p[:n], off)
			u.Zero(off, min(4096, size-off))
			u.WriteAt(p[:n], off)
		}
		u.Sync()
		u.Close()
	})
}
