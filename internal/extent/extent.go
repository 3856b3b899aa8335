// Package extent holds the small types that say which byte ranges of a
// disk hold data (Range, Map, Full, the holes of a sparse file) and the
// helper that reads those ranges. It is a leaf: the block maps of
// filesystems (blockmap), the VM disk formats (vdisk) and the pipelines
// share these types without importing each other.
package extent

import (
	"bytes"
	"errors"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Range is the byte range [Start, End).
type Range struct {
	Start, End int64
}

// Len returns the range's length.
func (r Range) Len() int64 { return r.End - r.Start }

// Map reports which parts of a disk hold data. Bytes outside every range it
// returns read back as zeros on restore.
type Map interface {
	// Data returns the ranges within [off, off+n) that hold data, in
	// increasing order, clipped to the window. Calls come with increasing
	// off, which implementations may rely on for speed.
	Data(off, n int64) ([]Range, error)
}

// Full is the map of a disk that is all data.
type Full struct{}

// Data implements Map.
func (Full) Data(off, n int64) ([]Range, error) { return []Range{{off, off + n}}, nil }

// Sparse maps the data of a sparse file with SEEK_DATA and SEEK_HOLE, so
// holes are never read.
type Sparse struct {
	f    *os.File
	size int64
	// cur is the first data extent at or after from (none when dead);
	// extents are found lazily, one pair of lseek calls per extent, so
	// memory does not grow with their number. An offset before from
	// seeks again: a window asked out of order is slower, never wrong.
	cur  Range
	from int64
	have bool
	dead bool
}

// NewSparse returns the map of f, whose size is size. It returns nil when
// the file system cannot report holes.
func NewSparse(f *os.File, size int64) *Sparse {
	if _, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA); err != nil && !errors.Is(err, syscall.ENXIO) {
		return nil
	}
	return &Sparse{f: f, size: size}
}

// next finds the first data extent that ends after off.
func (s *Sparse) next(off int64) error {
	if off >= s.from && (s.dead || s.have && s.cur.End > off) {
		return nil
	}
	s.from, s.have, s.dead = off, false, false
	fd := int(s.f.Fd())
	start, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err != nil {
		if errors.Is(err, syscall.ENXIO) {
			s.dead = true
			return nil
		}
		return err
	}
	end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
	if err != nil {
		return err
	}
	if end > s.size {
		end = s.size
	}
	s.cur, s.have = Range{start, end}, true
	return nil
}

// Data implements Map.
func (s *Sparse) Data(off, n int64) ([]Range, error) {
	var out []Range
	end := off + n
	for pos := off; pos < end; {
		if err := s.next(pos); err != nil {
			return nil, err
		}
		if !s.have || s.cur.Start >= end {
			break
		}
		r := Range{max(s.cur.Start, pos), min(s.cur.End, end)}
		out = append(out, r)
		pos = r.End
	}
	return out, nil
}

// Union returns the ranges in a or b (each in increasing order, not
// overlapping), merged: in increasing order, touching and overlapping
// ranges joined. It returns a itself when b is empty.
func Union(a, b []Range) []Range {
	if len(b) == 0 {
		return a
	}
	out := make([]Range, 0, len(a)+len(b))
	for len(a) > 0 || len(b) > 0 {
		var r Range
		if len(b) == 0 || (len(a) > 0 && a[0].Start <= b[0].Start) {
			r, a = a[0], a[1:]
		} else {
			r, b = b[0], b[1:]
		}
		if k := len(out) - 1; k >= 0 && r.Start <= out[k].End {
			out[k].End = max(out[k].End, r.End)
			continue
		}
		out = append(out, r)
	}
	return out
}

// zeroPage is what IsZero compares with: bytes.Equal runs at memory
// speed, a loop over the bytes at a fraction of it.
var zeroPage [64 << 10]byte

// IsZero reports whether b holds only zeros: a range that needs no data.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// ReadRanges fills buf (the window starting at off) from r: bytes in ranges
// are read, the rest zeroed. It returns how many bytes were read.
func ReadRanges(r io.ReaderAt, buf []byte, off int64, ranges []Range) (int64, error) {
	var read int64
	pos := off
	for _, rg := range ranges {
		clear(buf[pos-off : rg.Start-off])
		n, err := r.ReadAt(buf[rg.Start-off:rg.End-off], rg.Start)
		read += int64(n)
		if err != nil && !(errors.Is(err, io.EOF) && int64(n) == rg.Len()) {
			return read, err
		}
		pos = rg.End
	}
	clear(buf[pos-off:])
	return read, nil
}
