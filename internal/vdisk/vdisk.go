// Package vdisk turns disks into the files hypervisors use and back:
// raw images, qcow2, VMDK, VHD, VHDX, VDI and OVA. It detects a format
// from a file's headers, opens any supported image as a virtual disk (an
// io.ReaderAt plus a extent.Map of its allocated ranges, so unallocated
// regions read as zeros and cost nothing), and writes any format from a
// disk that arrives in order, leaving zeros unallocated.
//
// Each format lives in its own package, whose documentation cites the
// specification it follows: qcow2, vmdk, vhd, vhdx, vdi and ova.
//
// # Detection never guesses
//
// A format is recognised by its signature, never by the file's name, and
// only by signatures that no raw disk holds by chance: magics at fixed
// offsets that are long or backed by fields with fixed values. A file
// that matches none is a raw disk: a disk with an MBR or GPT, a bare file
// system, a LUKS volume, an ISO image. Read, as the disk they hold:
//
//   - qcow2 ("QFI\xfb" at 0; version 1 is refused by the qcow2 reader),
//     VMDK ("KDMV" at 0, or a text descriptor), VHDX ("vhdxfile" at 0), VDI
//     (its pre-header signature at 64);
//   - VHD: a footer copy at 0 (dynamic), or a footer in the last sector
//     that the file matches (a fixed disk of exactly the footer's size plus
//     the footer; see package vhd): a raw disk that merely ends in a stray
//     footer stays raw;
//   - OVA: a tar archive (ustar magic at 257, valid header checksum) whose
//     first member is an .ovf descriptor; its one disk is read in place.
//
// Refused, with an error naming the format and what to do (convert or
// extract it first, or --source-format raw to keep the bytes as they
// are), because reading their bytes as a disk would store the container
// instead of the disk it holds:
//
//   - Parallels: "WithoutFreeSpace" or "WithouFreSpacExt" at 0 and version
//     2 (little-endian) at 16;
//   - Bochs: "Bochs Virtual HD Image\0" at 0;
//   - cloop: the shell-script header "#!/bin/sh\n#Vx.y Format\n" naming
//     cloop in its first 128 bytes;
//   - QED: "QED\0" at 0, a cluster size that is a power of two from 4 KiB
//     to 64 MiB and a table size of 1 to 16;
//   - DMG: a UDIF trailer in the last 512 bytes ("koly", version 4, header
//     size 512);
//   - User Mode Linux COW: "OOOM" and version 1 to 3 (big-endian);
//   - VMware ESX sparse extents: "COWD" and version 1;
//   - compressed streams: gzip (1f 8b, method 8, no reserved flags), bzip2
//     ("BZh", a level, then a block or end-of-stream magic), xz
//     ("\xfd7zXZ\0" and valid stream flags), zstd (28 b5 2f fd, reserved
//     bit clear), lz4 (04 22 4d 18, version 1); zip ("PK\3\4" and a
//     version to extract up to 6.3) and 7z archives;
//   - file system images of imaging tools: ntfsclone ("\0ntfsclone-image")
//     and partclone ("partclone-image\0");
//   - tar archives that are not OVAs.
//
// # Files an image refers to
//
// A qcow2 image names its backing file, a VMDK descriptor its extents. An
// image is data, possibly crafted, so these must lie in the folder of the
// image opened or below it, every symlink followed (a qcow2 image may name
// any absolute path, /etc/shadow included): the same rule for both, the
// one the VMDK descriptor's names already followed. The folder is the
// unit a user hands over, a VM's directory; chains kept elsewhere
// (OpenStack's _base, Proxmox linked clones in a sibling folder) need
// OpenOptions.AllowOutside. A disk inside an OVA refers only to members
// of the archive.
package vdisk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/sauve-backup/sauve/internal/extent"
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
	extent.Map
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

// clipped is a map limited to the first n bytes (a fixed VHD's data
// without its footer); a nil map means all data.
type clipped struct {
	m extent.Map
	n int64
}

func (c clipped) Data(off, n int64) ([]extent.Range, error) {
	n = min(n, c.n-off)
	if n <= 0 {
		return nil, nil
	}
	if c.m == nil {
		return []extent.Range{{Start: off, End: off + n}}, nil
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

// PieceReader is a disk that hands out its bytes where it holds them (a
// snapshot's disk reader and its cache): fn gets [off, off+n) in order,
// in pieces, data nil for zeros, each valid during the call only. Copy
// writes the pieces as they are, saving a copy of every byte.
type PieceReader interface {
	ReadEach(off, n int64, fn func(off, n int64, data []byte) error) error
}

// Copy reads the disk r of size bytes, only the ranges m says hold data
// (all when m is nil), and writes them to w in order.
//
// Reading and writing take turns in one goroutine, on one buffer: data
// read by one CPU and written out by another crosses between their
// caches, and measured on the reference disk that cost more than the
// overlap of reading and writing gained (see docs/BENCHMARKS.md). A
// PieceReader is read without that buffer.
func Copy(ctx context.Context, w Writer, r io.ReaderAt, m extent.Map, size int64, prog *Progress) error {
	if m == nil {
		m = extent.Full{}
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
			if pr, ok := r.(PieceReader); ok {
				if err := copyPieces(w, pr, rg, prog); err != nil {
					return err
				}
				continue
			}
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

// copyPieces writes range rg of pr to w as pr hands it out; zeros are
// left unwritten (an image's unwritten ranges read as zeros).
func copyPieces(w Writer, pr PieceReader, rg extent.Range, prog *Progress) error {
	var werr error
	err := pr.ReadEach(rg.Start, rg.Len(), func(off, n int64, data []byte) error {
		if data == nil {
			return nil
		}
		prog.Read.Add(n)
		if _, werr = w.WriteAt(data, off); werr != nil {
			return werr
		}
		return nil
	})
	switch {
	case werr != nil:
		return werr
	case err != nil:
		return fmt.Errorf("read at offset %d: %w", rg.Start, err)
	}
	return nil
}
