// Package vdisk turns disks into the files hypervisors use and back:
// raw images, qcow2, VMDK, VHD, VHDX, VDI and OVA. It detects a format
// from a file's headers, opens any supported image as a virtual disk (an
// io.ReaderAt plus a blockmap.Map of its allocated ranges, so unallocated
// regions read as zeros and cost nothing), and writes any format from a
// disk that arrives in order, leaving zeros unallocated.
//
// Each format lives in its own package, whose documentation cites the
// specification it follows: qcow2, vmdk, vhd, vhdx, vdi and ova.
package vdisk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/sauve-backup/sauve/internal/blockmap"
	"github.com/sauve-backup/sauve/internal/vdisk/ova"
	"github.com/sauve-backup/sauve/internal/vdisk/qcow2"
	"github.com/sauve-backup/sauve/internal/vdisk/vdi"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vhd"
	"github.com/sauve-backup/sauve/internal/vdisk/vhdx"
	"github.com/sauve-backup/sauve/internal/vdisk/vmdk"
)

// Formats sauve writes, by name.
const (
	Raw   = "raw"
	QCOW2 = "qcow2"
	VMDK  = "vmdk"
	VHD   = "vhd"
	VHDX  = "vhdx"
	VDI   = "vdi"
	OVA   = "ova"
)

// Formats lists the output formats.
var Formats = []string{Raw, QCOW2, VMDK, VHD, VHDX, VDI, OVA}

// Subformats lists each format's variants; the first is the default.
var Subformats = map[string][]string{
	VMDK: {"monolithicSparse", "streamOptimized"},
	VHD:  {"dynamic", "fixed"},
	VDI:  {"dynamic", "fixed"},
}

// QemuName returns the name QEMU gives a format (-f / format=).
func QemuName(f string) string {
	if f == VHD {
		return "vpc"
	}
	return f
}

// FromExtension guesses a format from a file name.
func FromExtension(name string) string {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".img", ".raw", ".dd", ".bin":
		return Raw
	case ".qcow2", ".qcow":
		return QCOW2
	case ".vmdk":
		return VMDK
	case ".vhd", ".vpc":
		return VHD
	case ".vhdx":
		return VHDX
	case ".vdi":
		return VDI
	case ".ova":
		return OVA
	}
	return ""
}

// ParseFormat checks a format name (QEMU's "vpc" is accepted for vhd) and
// a subformat, and returns them normalised.
func ParseFormat(f, sub string) (string, string, error) {
	f = strings.ToLower(f)
	if f == "vpc" {
		f = VHD
	}
	known := false
	for _, k := range Formats {
		known = known || k == f
	}
	if !known {
		return "", "", fmt.Errorf("unknown format %q (choose %s)", f, strings.Join(Formats, ", "))
	}
	subs := Subformats[f]
	if sub == "" {
		if len(subs) > 0 {
			sub = subs[0]
		}
		return f, sub, nil
	}
	for _, s := range subs {
		if strings.EqualFold(s, sub) {
			return f, s, nil
		}
	}
	if len(subs) == 0 {
		return "", "", fmt.Errorf("format %s has no subformats (got %q)", f, sub)
	}
	return "", "", fmt.Errorf("unknown %s subformat %q (choose %s)", f, sub, strings.Join(subs, ", "))
}

// Image is a virtual disk read from an image file.
type Image struct {
	// Format is the detected format (Raw when none was recognised).
	Format string
	// Detail says more, e.g. "fixed", "streamOptimized", "version 2".
	Detail string
	// Size is the virtual size.
	Size int64
	// ReaderAt reads the virtual disk; unallocated regions read as zeros.
	io.ReaderAt
	// Map tells which ranges are allocated (nil: all of them).
	blockmap.Map
	closer io.Closer // backing files and extents opened
}

// Close closes the files the image opened besides the one given to Open
// (backing files, the extents of a VMDK descriptor).
func (img *Image) Close() error {
	if img.closer == nil {
		return nil
	}
	return img.closer.Close()
}

// Detect names the format of the image in r (size bytes) from its headers,
// or returns Raw.
func Detect(r io.ReaderAt, size int64) string {
	b := make([]byte, 512)
	n, _ := r.ReadAt(b[:min(int64(len(b)), size)], 0)
	b = b[:n]
	switch {
	case qcow2.Magic(b):
		return QCOW2
	case vmdk.Magic(b), vmdk.IsDescriptor(b):
		return VMDK
	case vhdx.Magic(b):
		return VHDX
	case vdi.Magic(b):
		return VDI
	case vhd.IsFooter(b):
		return VHD
	}
	if size >= 1024 {
		// A fixed VHD: the raw disk, then the footer.
		var f [512]byte
		if _, err := r.ReadAt(f[:], size-512); err == nil && vhd.IsFooter(f[:]) {
			return VHD
		}
	}
	return Raw
}

// Open opens the image in r (size bytes, called name in errors) as a
// virtual disk, whatever its format. host, if not nil, maps the file's own
// data (its holes), and is used where virtual and file offsets coincide.
// name is also the path that the files an image refers to (a qcow2
// backing file, VMDK extents) are found from; Close closes those.
func Open(r io.ReaderAt, size int64, name string, host blockmap.Map) (*Image, error) {
	c := &chain{seen: map[[2]uint64]bool{}}
	if fi, err := os.Stat(name); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			c.seen[[2]uint64{uint64(st.Dev), st.Ino}] = true
		}
	}
	img, err := c.open(r, size, name, host)
	if err != nil {
		c.Close()
		return nil, err
	}
	img.closer = c
	return img, nil
}

// maxChain bounds a chain of backing files.
const maxChain = 32

// chain tracks the files opened for one image: backing files (loops and
// depth are refused) and VMDK extents.
type chain struct {
	seen    map[[2]uint64]bool
	depth   int
	closers []io.Closer
}

func (c *chain) Close() error {
	var first error
	for _, x := range c.closers {
		if err := x.Close(); err != nil && first == nil {
			first = err
		}
	}
	c.closers = nil
	return first
}

// backing opens the backing file of the qcow2 overlay at path.
func (c *chain) backing(path string) qcow2.BackingOpener {
	return func(file, format string) (qcow2.Backing, error) {
		if strings.Contains(file, "://") || strings.HasPrefix(file, "json:") {
			return nil, fmt.Errorf("backing file %q is not a local file: %w", file, vdio.ErrUnsupported)
		}
		if !filepath.IsAbs(file) {
			file = filepath.Join(filepath.Dir(path), file)
		}
		if c.depth++; c.depth > maxChain {
			return nil, fmt.Errorf("chain of more than %d backing files", maxChain)
		}
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		c.closers = append(c.closers, f)
		fi, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("backing file %s is not a regular file", file)
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			k := [2]uint64{uint64(st.Dev), st.Ino}
			if c.seen[k] {
				return nil, fmt.Errorf("backing file %s appears twice in the chain: it loops", file)
			}
			c.seen[k] = true
		}
		var host blockmap.Map
		if m := blockmap.NewSparse(f, fi.Size()); m != nil {
			host = m
		}
		var img *Image
		if format == "raw" {
			img = &Image{Format: Raw, Size: fi.Size(), ReaderAt: f, Map: host}
		} else {
			if img, err = c.open(f, fi.Size(), file, host); err != nil {
				return nil, err
			}
			if format != "" && QemuName(img.Format) != format {
				return nil, fmt.Errorf("backing file %s is %s, the overlay says %s", file, img.Format, format)
			}
		}
		if img.Map == nil {
			img.Map = blockmap.Full{}
		}
		return backingImage{img}, nil
	}
}

// backingImage gives an Image the Size method qcow2.Backing asks for.
type backingImage struct{ *Image }

func (b backingImage) Size() int64 { return b.Image.Size }

func (c *chain) open(r io.ReaderAt, size int64, name string, host blockmap.Map) (*Image, error) {
	f := Detect(r, size)
	img := &Image{Format: f}
	switch f {
	case Raw:
		img.Size, img.ReaderAt, img.Map = size, r, host
	case QCOW2:
		q, err := qcow2.OpenWithBacking(r, size, name, c.backing(name))
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = q.Size(), q, q, fmt.Sprintf("version %d", q.Version())
		if q.BackingFile != "" {
			img.Detail += ", backing file " + q.BackingFile
		}
	case VMDK:
		head := make([]byte, min(size, 512))
		r.ReadAt(head, 0)
		if vmdk.IsDescriptor(head) {
			d, err := vmdk.OpenDescriptor(r, size, name, extentOpener(name))
			if err != nil {
				return nil, err
			}
			c.closers = append(c.closers, d)
			img.Size, img.ReaderAt, img.Map, img.Detail = d.Size(), d, d, d.CreateType
			break
		}
		v, err := vmdk.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = v.Size(), v, v, v.CreateType
	case VHD:
		v, err := vhd.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = v.Size(), v, v, "dynamic"
		if v.Fixed() {
			img.Detail = "fixed"
			img.Map = clipped{host, v.Size()}
		}
	case VHDX:
		v, err := vhdx.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map = v.Size(), v, v
	case VDI:
		v, err := vdi.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map = v.Size(), v, v
	}
	return img, nil
}

// extentOpener opens the extent files a VMDK descriptor at path names,
// from the descriptor's directory.
func extentOpener(path string) vmdk.Opener {
	dir := filepath.Dir(path)
	return func(name string) (io.ReaderAt, int64, io.Closer, error) {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			return nil, 0, nil, err
		}
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() {
			f.Close()
			if err == nil {
				err = fmt.Errorf("%s is not a regular file", name)
			}
			return nil, 0, nil, err
		}
		return f, fi.Size(), f, nil
	}
}

// clipped is a map limited to the first n bytes (a fixed VHD's data
// without its footer); a nil map means all data.
type clipped struct {
	m blockmap.Map
	n int64
}

func (c clipped) Data(off, n int64) ([]blockmap.Range, error) {
	n = min(n, c.n-off)
	if n <= 0 {
		return nil, nil
	}
	if c.m == nil {
		return []blockmap.Range{{Start: off, End: off + n}}, nil
	}
	return c.m.Data(off, n)
}

// Writer writes a disk image from a disk that arrives in order.
type Writer interface {
	// WriteAt writes p at virtual offset off. Offsets increase from
	// call to call; what is never written reads as zeros.
	WriteAt(p []byte, off int64) (int, error)
	// DataBytes is how many bytes of non-zero data were written.
	DataBytes() int64
	// Close completes the image.
	Close() error
}

// Options say what to write.
type Options struct {
	Format    string
	Subformat string
	// Size is the virtual size; formats other than raw round it up to a
	// multiple of 512.
	Size int64
	// FileName is the output's base name (VMDK descriptors name it).
	FileName string
	// OVA describes the virtual machine of an OVA.
	OVA ova.Options
}

// RoundSize returns the virtual size a format records for a disk of size
// bytes: a whole number of 512-byte sectors, except for raw.
func RoundSize(format string, size int64) int64 {
	if format == Raw {
		return size
	}
	return (size + 511) / 512 * 512
}

// MaxSize returns the largest virtual size a format holds.
func MaxSize(format, sub string) int64 {
	switch format {
	case QCOW2:
		return qcow2.MaxSize
	case VMDK, OVA:
		return vmdk.MaxSize
	case VHD:
		return vhd.MaxSize
	case VHDX:
		return vhdx.MaxSize
	case VDI:
		return vdi.MaxSize
	}
	return 1 << 62
}

// Create starts an image in f, a new empty file.
func Create(f vdio.File, o Options) (Writer, error) {
	size := RoundSize(o.Format, o.Size)
	if m := MaxSize(o.Format, o.Subformat); size > m {
		return nil, fmt.Errorf("a %s image holds at most %d bytes, the disk has %d", o.Format, m, size)
	}
	switch o.Format {
	case Raw:
		return newRaw(f, size), nil
	case QCOW2:
		return qcow2.NewWriter(f, size)
	case VMDK:
		if o.Subformat == "streamOptimized" {
			return newStreamFile(f, size, o.FileName)
		}
		return vmdk.NewSparseWriter(f, size, vmdk.Options{FileName: o.FileName})
	case VHD:
		return vhd.NewWriter(f, size, o.Subformat == "fixed")
	case VHDX:
		return vhdx.NewWriter(f, size)
	case VDI:
		return vdi.NewWriter(f, size, o.Subformat == "fixed")
	case OVA:
		return ova.NewWriter(f, size, o.OVA)
	}
	return nil, fmt.Errorf("unknown format %q", o.Format)
}

// raw writes a sparse raw image.
type raw struct {
	f     vdio.File
	size  int64
	out   *vdio.Appender
	units *vdio.Units
}

func newRaw(f vdio.File, size int64) *raw {
	w := &raw{f: f, size: size, out: vdio.NewAppender(f, vdio.AppendBuffer)}
	w.units = vdio.NewUnits(1<<20, size, w.out, func(i int64) (int64, error) { return i << 20, nil })
	return w
}

func (w *raw) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }
func (w *raw) DataBytes() int64                         { return w.units.Data }
func (w *raw) Close() error {
	if err := w.out.Flush(); err != nil {
		return err
	}
	return w.f.Truncate(w.size)
}

// streamFile writes a streamOptimized VMDK into a file.
type streamFile struct {
	*vmdk.StreamWriter
	f  vdio.File
	ow *offsetWriter
}

type offsetWriter struct {
	w   io.WriterAt
	off int64
}

func (o *offsetWriter) Write(p []byte) (int, error) {
	n, err := o.w.WriteAt(p, o.off)
	o.off += int64(n)
	return n, err
}

func newStreamFile(f vdio.File, size int64, name string) (*streamFile, error) {
	ow := &offsetWriter{w: f}
	s, err := vmdk.NewStreamWriter(ow, size, vmdk.Options{FileName: name})
	if err != nil {
		return nil, err
	}
	return &streamFile{StreamWriter: s, f: f, ow: ow}, nil
}

func (s *streamFile) Close() error {
	if err := s.StreamWriter.Close(); err != nil {
		return err
	}
	return s.f.Truncate(s.ow.off)
}

// Progress is read while Copy runs.
type Progress struct {
	Done atomic.Int64 // virtual bytes processed
	Read atomic.Int64 // bytes read from the source
}

// Copy reads the disk r of size bytes, only the ranges m says hold data
// (all when m is nil), and writes them to w in order.
//
// Reading and writing take turns in one goroutine, on one buffer: data
// read by one CPU and written out by another crosses between their
// caches, and measured on the reference disk that cost more than the
// overlap of reading and writing gained (see docs/BENCHMARKS.md).
func Copy(ctx context.Context, w Writer, r io.ReaderAt, m blockmap.Map, size int64, prog *Progress) error {
	if m == nil {
		m = blockmap.Full{}
	}
	if prog == nil {
		prog = new(Progress)
	}
	window := int64(vdio.IOSize)
	buf := make([]byte, window)
	for off := int64(0); off < size; off += window {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(window, size-off)
		ranges, err := m.Data(off, n)
		if err != nil {
			return fmt.Errorf("map at offset %d: %w", off, err)
		}
		for _, rg := range ranges {
			b := buf[rg.Start-off : rg.End-off]
			k, err := r.ReadAt(b, rg.Start)
			prog.Read.Add(int64(k))
			if k < len(b) {
				if err == nil || errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("read at offset %d: %w", rg.Start, err)
			}
			if _, err := w.WriteAt(b, rg.Start); err != nil {
				return err
			}
		}
		prog.Done.Add(n)
	}
	return nil
}
