// Package fuzzimg is the input encoding of the fuzz targets that parse
// disks and disk image files (partition tables, filesystems, VM disk
// formats): a sparse file described in a few bytes. It exists for the
// tests only.
//
// Two costs make a fuzz target slow, and this encoding bounds both:
//
//   - Go's fuzzer minimizes every input that finds new code, trying
//     candidates in a number quadratic in the input's length (up to a
//     minute per input by default): a seed must hold only the bytes a
//     parser looks at, a few hundred, not the megabytes of an image.
//     Seeds are made from real images by keeping only what a parser read
//     (Trace), then encoding the bytes that are not zero.
//   - One execution must stay cheap whatever sizes the input claims: the
//     file's size is capped, and reads beyond a budget fail (a parser
//     must handle an I/O error anyway).
//
// Even so, minimizing an input of a thousand bytes can take the minute
// Go allows, in which the worker fuzzes nothing: packages whose fuzz
// targets take these inputs run Main as their TestMain, which lowers
// that limit to MinimizeTime unless -test.fuzzminimizetime is given.
//
// An input is
//
//	u32 little-endian: the file's size in bytes, modulo the caller's
//	    maximum plus one
//	then segments:
//	    u32 little-endian: byte offset
//	    u16 little-endian: n; with the top bit clear, n bytes follow,
//	        placed at the offset; with it set, one byte follows, repeated
//	        n&0x7FFF times from the offset
//
// Bytes in no segment read as zeros; where segments overlap, the later
// one wins.
package fuzzimg

import (
	"encoding/binary"
	"errors"
	"flag"
	"io"
	"os"
	"sort"
	"testing"
	"time"
)

// MinimizeTime is how long Go's fuzzer minimizes an input, under Main,
// unless -test.fuzzminimizetime says otherwise (Go's default is 60s).
const MinimizeTime = time.Second

// Main runs the tests of m with -test.fuzzminimizetime set to
// MinimizeTime unless it is given. Call it from TestMain.
func Main(m *testing.M) {
	flag.Parse()
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == "test.fuzzminimizetime" })
	if !given {
		if err := flag.Set("test.fuzzminimizetime", MinimizeTime.String()); err != nil {
			panic(err)
		}
	}
	os.Exit(m.Run())
}

// ErrBudget is the error of a read beyond the image's read budget.
var ErrBudget = errors.New("fuzzimg: read budget exhausted")

// Image is a decoded input: a sparse file.
type Image struct {
	size   int64
	segs   []segment
	sorted bool // segs in order and apart: reads search them
	budget int64
}

type segment struct {
	off, n int64
	data   []byte // nil: n copies of fill
	fill   byte
}

// Decode decodes an input into a file of at most maxSize bytes whose
// reads may return budget bytes in all; a read past that fails with
// ErrBudget. Any input decodes.
func Decode(in []byte, maxSize, budget int64) *Image {
	img := &Image{budget: budget}
	if len(in) < 4 {
		return img
	}
	img.size = int64(binary.LittleEndian.Uint32(in)) % (maxSize + 1)
	in = in[4:]
	for len(in) >= 6 {
		off := int64(binary.LittleEndian.Uint32(in))
		n := binary.LittleEndian.Uint16(in[4:])
		in = in[6:]
		if n&0x8000 != 0 {
			if len(in) == 0 {
				break
			}
			img.segs = append(img.segs, segment{off: off, n: int64(n & 0x7FFF), fill: in[0]})
			in = in[1:]
			continue
		}
		k := min(int(n), len(in))
		img.segs = append(img.segs, segment{off: off, n: int64(k), data: in[:k]})
		in = in[k:]
	}
	img.sorted = true
	for i := 1; i < len(img.segs) && img.sorted; i++ {
		img.sorted = img.segs[i-1].off+img.segs[i-1].n <= img.segs[i].off
	}
	return img
}

// Size returns the file's size.
func (m *Image) Size() int64 { return m.size }

// ReadAt implements io.ReaderAt.
func (m *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("fuzzimg: negative offset")
	}
	if off >= m.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), m.size-off))
	if int64(n) > m.budget {
		m.budget = 0
		return 0, ErrBudget
	}
	m.budget -= int64(n)
	clear(p[:n])
	end := off + int64(n)
	segs := m.segs
	if m.sorted {
		segs = segs[sort.Search(len(segs), func(i int) bool { return segs[i].off+segs[i].n > off }):]
	}
	for _, s := range segs {
		if m.sorted && s.off >= end {
			break
		}
		a, z := max(off, s.off), min(end, s.off+s.n)
		if a >= z {
			continue
		}
		if s.data == nil {
			dst := p[a-off : z-off]
			for i := range dst {
				dst[i] = s.fill
			}
		} else {
			copy(p[a-off:z-off], s.data[a-s.off:z-s.off])
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

const (
	maxSeg  = 0x7FFF
	minGap  = 8 // zeros that end a literal segment: a new header costs 6 bytes
	minFill = 8 // repeats of a byte worth a fill segment (7 bytes)
)

// Encode returns the input that decodes (with a maximum size of at least
// len(b)) to b: its bytes that are not zero, in segments.
func Encode(b []byte) []byte {
	if int64(len(b)) > 1<<32-1 {
		panic("fuzzimg: file too large to encode")
	}
	out := binary.LittleEndian.AppendUint32(nil, uint32(len(b)))
	run := func(i int) int { // repeats of b[i] from i, up to minFill
		j := i
		for j < len(b) && j-i < minFill && b[j] == b[i] {
			j++
		}
		return j - i
	}
	for i := 0; i < len(b); {
		if b[i] == 0 {
			i++
			continue
		}
		if run(i) == minFill {
			j := i
			for j < len(b) && j-i < maxSeg && b[j] == b[i] {
				j++
			}
			out = binary.LittleEndian.AppendUint32(out, uint32(i))
			out = binary.LittleEndian.AppendUint16(out, uint16(j-i)|0x8000)
			out = append(out, b[i])
			i = j
			continue
		}
		j := i
		for j < len(b) && j-i < maxSeg {
			if b[j] == 0 {
				z := j
				for z < len(b) && b[z] == 0 && z-j < minGap {
					z++
				}
				if z-j == minGap || z == len(b) {
					break
				}
				j = z
				continue
			}
			if run(j) == minFill {
				break
			}
			j++
		}
		j = min(j, i+maxSeg)
		out = binary.LittleEndian.AppendUint32(out, uint32(i))
		out = binary.LittleEndian.AppendUint16(out, uint16(j-i))
		out = append(out, b[i:j]...)
		i = j
	}
	return out
}

// Trace is an io.ReaderAt that records which bytes of R are read.
type Trace struct {
	R     io.ReaderAt
	reads [][2]int64
}

// ReadAt implements io.ReaderAt.
func (t *Trace) ReadAt(p []byte, off int64) (int, error) {
	n, err := t.R.ReadAt(p, off)
	if n > 0 {
		t.reads = append(t.reads, [2]int64{off, off + int64(n)})
	}
	return n, err
}

// Keep returns a copy of b, the file R reads, with the bytes never read
// through t set to zero.
func (t *Trace) Keep(b []byte) []byte {
	out := make([]byte, len(b))
	for _, r := range t.reads {
		a, z := max(r[0], 0), min(r[1], int64(len(b)))
		if a < z {
			copy(out[a:z], b[a:z])
		}
	}
	return out
}
