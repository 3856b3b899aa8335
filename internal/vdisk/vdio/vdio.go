// Package vdio holds what the VM disk format packages share: the error
// that names file, format and offset, zero detection, the ordered-write
// machinery that turns a disk arriving in order into allocation units of a
// format (leaving units and runs of zeros unwritten, so they stay holes or
// unallocated), a write-combining appender, and bounds on what a header
// may ask a reader to allocate.
package vdio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/extent"
	"golang.org/x/sys/unix"
)

// FormatError reports bad or unsupported input: which file, which
// format, where.
type FormatError struct {
	File   string
	Format string
	Offset int64
	Msg    string
	Err    error // wrapped cause, may be nil
}

func (e *FormatError) Error() string {
	s := fmt.Sprintf("%s: %s: %s (at offset %d)", e.File, e.Format, e.Msg, e.Offset)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *FormatError) Unwrap() error { return e.Err }

// ErrUnsupported marks valid input that sauve does not handle (backing
// files, encryption, differencing disks).
var ErrUnsupported = errors.New("not supported")

// Errorf returns a FormatError.
func Errorf(file, format string, off int64, msg string, a ...any) error {
	return &FormatError{File: file, Format: format, Offset: off, Msg: fmt.Sprintf(msg, a...)}
}

// Unsupported returns a FormatError wrapping ErrUnsupported.
func Unsupported(file, format string, off int64, msg string, a ...any) error {
	return &FormatError{File: file, Format: format, Offset: off, Msg: fmt.Sprintf(msg, a...), Err: ErrUnsupported}
}

// Wrap returns a FormatError around an I/O error.
func Wrap(file, format string, off int64, err error, msg string, a ...any) error {
	var fe *FormatError
	if errors.As(err, &fe) {
		return err
	}
	return &FormatError{File: file, Format: format, Offset: off, Msg: fmt.Sprintf(msg, a...), Err: err}
}

// MaxVirtualSize bounds the virtual size any reader accepts: 1 PiB, far
// beyond any disk a hypervisor attaches, far below overflow.
const MaxVirtualSize = 1 << 50

// ReadFull reads len(p) bytes at off, naming what was read on failure; a
// read past the end of the file is an error, never a short buffer.
func ReadFull(r io.ReaderAt, size int64, p []byte, off int64, file, format, what string) error {
	if off < 0 || off > size || int64(len(p)) > size-off {
		return Errorf(file, format, off, "%s (%d bytes) lies past the end of the file (%d bytes)", what, len(p), size)
	}
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return Wrap(file, format, off, err, "read %s", what)
}

// ZeroGrain is the granularity of zero detection inside allocated units:
// runs of zeros this long, aligned, are not written, so they stay holes of
// the output file (file systems allocate in blocks of this size).
const ZeroGrain = 4096

// Checksum helpers for big-endian formats.
var (
	LE = binary.LittleEndian
	BE = binary.BigEndian
)

// File is what writers write to: a new, empty file.
type File interface {
	io.WriterAt
	Truncate(size int64) error
}

// Appender combines writes that follow each other into large ones.
// Writes that do not continue the pending run flush it first, so a skipped
// range of the file stays a hole.
type Appender struct {
	w   io.WriterAt
	buf []byte
	off int64 // file offset of buf[0]
	// Written counts bytes handed to the file.
	Written int64
}

// AppendBuffer is the size of an Appender's buffer, and IOSize that of
// the reads that feed it. Data is copied twice on its way through
// (page cache to buffer, buffer to page cache), and both copies must hit
// the CPU caches: with 4 MiB buffers converting the reference disk took
// three times the system time it takes with 512 KiB (measured with
// sauve convert and dd; see docs/BENCHMARKS.md).
const (
	AppendBuffer = 512 << 10
	IOSize       = 512 << 10
)

// NewAppender returns an Appender with a buffer of n bytes.
func NewAppender(w io.WriterAt, n int) *Appender {
	return &Appender{w: w, buf: make([]byte, 0, n)}
}

// WriteAt queues p for offset off.
func (a *Appender) WriteAt(p []byte, off int64) error {
	if len(a.buf) > 0 && off != a.off+int64(len(a.buf)) {
		if err := a.Flush(); err != nil {
			return err
		}
	}
	for len(p) > 0 {
		if len(a.buf) == 0 {
			a.off = off
			if len(p) >= cap(a.buf) {
				// Large writes go straight through.
				if _, err := a.w.WriteAt(p, off); err != nil {
					return err
				}
				a.writeback(off, int64(len(p)))
				a.Written += int64(len(p))
				return nil
			}
		}
		n := min(len(p), cap(a.buf)-len(a.buf))
		a.buf = append(a.buf, p[:n]...)
		p, off = p[n:], off+int64(n)
		if len(a.buf) == cap(a.buf) {
			if err := a.Flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeback starts writing what was just written to the disk, without
// waiting: the image is synced before it is put in place, and that sync
// then finds little left to write instead of all of it.
func (a *Appender) writeback(off, n int64) {
	if f, ok := a.w.(interface{ Fd() uintptr }); ok {
		_ = unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
	}
}

// Flush writes the pending run.
func (a *Appender) Flush() error {
	if len(a.buf) == 0 {
		return nil
	}
	_, err := a.w.WriteAt(a.buf, a.off)
	a.writeback(a.off, int64(len(a.buf)))
	a.Written += int64(len(a.buf))
	a.buf = a.buf[:0]
	return err
}

// Units turns ordered writes of a virtual disk into writes of allocation
// units (clusters, grains, blocks): a unit is allocated, by Alloc, when
// its first non-zero data arrives; aligned runs of ZeroGrain zeros inside
// it are not written (they read as zeros from a new file's holes).
type Units struct {
	Unit    int64 // unit size, a power of two
	Virtual int64 // virtual size
	// Alloc returns the file offset of unit i, allocating it. Units are
	// allocated in increasing order.
	Alloc func(i int64) (int64, error)
	Out   *Appender

	// Grain is the granularity of zero detection (ZeroGrain unless the
	// unit is smaller).
	Grain int64

	next    int64 // lowest offset the next write may start at
	cur     int64 // unit of curHost, or -1
	curHost int64
	// Data counts the bytes of non-zero data written.
	Data int64
}

// NewUnits returns Units for a disk of size bytes.
func NewUnits(unit, size int64, out *Appender, alloc func(int64) (int64, error)) *Units {
	return &Units{Unit: unit, Virtual: size, Alloc: alloc, Out: out, cur: -1, Grain: min(unit, ZeroGrain)}
}

// ErrOrder is returned for writes that go backwards.
var ErrOrder = errors.New("writes must come in increasing offset order")

// WriteAt writes p at virtual offset off. Offsets must increase from
// call to call; ranges never written read as zeros.
func (u *Units) WriteAt(p []byte, off int64) (int, error) {
	if off < u.next {
		return 0, fmt.Errorf("write at %d after %d: %w", off, u.next, ErrOrder)
	}
	if off+int64(len(p)) > u.Virtual {
		return 0, fmt.Errorf("write of %d bytes at %d past the virtual size %d", len(p), off, u.Virtual)
	}
	u.next = off + int64(len(p))
	// Runs of p that land next to each other in the file are written
	// with one call: p[ps:pe] goes to file offset ph.
	ps, pe, ph := 0, 0, int64(-1)
	flush := func() error {
		if pe > ps {
			if err := u.Out.WriteAt(p[ps:pe], ph); err != nil {
				return err
			}
		}
		return nil
	}
	for i := 0; i < len(p); {
		v := off + int64(i)
		// The next run: up to the end of the grain of zero detection.
		end := min(int((v/u.Grain+1)*u.Grain-off), len(p))
		if !extent.IsZero(p[i:end]) {
			// Extend over following non-zero grains of the same unit.
			unitEnd := min(int((v/u.Unit+1)*u.Unit-off), len(p))
			for end < unitEnd {
				e := min(end+int(u.Grain), unitEnd)
				if extent.IsZero(p[end:e]) {
					break
				}
				end = e
			}
			ui := v / u.Unit
			if ui != u.cur {
				h, err := u.Alloc(ui)
				if err != nil {
					return 0, err
				}
				u.cur, u.curHost = ui, h
			}
			host := u.curHost + v - ui*u.Unit
			if pe == i && ph+int64(pe-ps) == host {
				pe = end
			} else {
				if err := flush(); err != nil {
					return 0, err
				}
				ps, pe, ph = i, end, host
			}
			u.Data += int64(end - i)
		}
		i = end
	}
	if err := flush(); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Ranges is a extent.Map over a sorted list of ranges.
type Ranges []extent.Range

// Data implements extent.Map.
func (rs Ranges) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := off + n
	// binary search the first range ending after off
	lo, hi := 0, len(rs)
	for lo < hi {
		m := (lo + hi) / 2
		if rs[m].End <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	for _, r := range rs[lo:] {
		if r.Start >= end {
			break
		}
		out = append(out, extent.Range{Start: max(r.Start, off), End: min(r.End, end)})
	}
	return out, nil
}

// AddRange appends [start, end) to rs, merging it with the last range
// when they touch. Ranges must come in order.
func AddRange(rs []extent.Range, start, end int64) []extent.Range {
	if start >= end {
		return rs
	}
	if n := len(rs); n > 0 && rs[n-1].End == start {
		rs[n-1].End = end
		return rs
	}
	return append(rs, extent.Range{Start: start, End: end})
}

// CHS returns the cylinder/head/sector geometry of a disk of the given
// number of 512-byte sectors, by the algorithm of the VHD specification
// (appendix "CHS calculation"), which VMDK and VDI writers reuse.
func CHS(sectors int64) (c, h, s int) {
	total := sectors
	if total > 65535*16*255 {
		total = 65535 * 16 * 255
	}
	var cth int64
	if total >= 65535*16*63 {
		s, h = 255, 16
		cth = total / int64(s)
	} else {
		s = 17
		cth = total / int64(s)
		h = int((cth + 1023) / 1024)
		if h < 4 {
			h = 4
		}
		if cth >= int64(h)*1024 || h > 16 {
			s, h = 31, 16
			cth = total / int64(s)
		}
		if cth >= int64(h)*1024 {
			s, h = 63, 16
			cth = total / int64(s)
		}
	}
	c = int(cth / int64(h))
	return c, h, s
}

// Lookup maps a virtual offset to where its bytes are in the image file
// (host < 0: unallocated, reads as zeros) and says for how many bytes from
// off the mapping runs on.
type Lookup func(off int64) (host, n int64)

// ReadMapped implements io.ReaderAt for formats that map the virtual disk
// onto the file block by block: unallocated blocks read as zeros, and
// blocks that follow each other in the file are read with one call.
// size is the virtual size, fileSize the image file's.
func ReadMapped(r io.ReaderAt, fileSize, size int64, lookup Lookup, file, format string, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset", file)
	}
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := size - off; int64(len(p)) > rest {
		p = p[:rest]
	}
	done := 0
	for len(p) > 0 {
		host, n := lookup(off)
		n = min(n, int64(len(p)))
		if host < 0 {
			clear(p[:n])
		} else {
			for n < int64(len(p)) {
				h2, n2 := lookup(off + n)
				if h2 != host+n {
					break
				}
				n = min(n+n2, int64(len(p)))
			}
			if err := ReadFull(r, fileSize, p[:n], host, file, format, fmt.Sprintf("block for virtual offset %d", off)); err != nil {
				return done, err
			}
		}
		p, off, done = p[n:], off+n, done+int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// DataMapped implements extent.Map over a Lookup: the allocated ranges
// of [off, off+n).
func DataMapped(size int64, lookup Lookup, off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := min(off+n, size)
	for off < end {
		host, k := lookup(off)
		k = min(k, end-off)
		if host >= 0 {
			out = AddRange(out, off, off+k)
		}
		off += k
	}
	return out, nil
}
