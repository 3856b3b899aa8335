// Package vhd reads and writes Microsoft Virtual Hard Disk images as
// specified in Microsoft's "Virtual Hard Disk Image Format Specification"
// (version 1.0, 2006): fixed disks (the raw disk followed by a 512-byte
// footer) and dynamic disks (footer copy, dynamic disk header, block
// allocation table, 2 MiB blocks each preceded by its sector bitmap,
// footer).
//
// Writers record the disk's exact size in the footer's current size and
// mark the file as made by "win " (Hyper-V), the creator for which QEMU
// and VirtualBox, like Hyper-V, take the size from the footer rather than
// from the CHS geometry (which cannot express most sizes). The geometry is
// still computed by the specification's algorithm. Blocks of zeros stay
// unallocated in a dynamic disk and holes in a fixed one.
//
// # Recognising a VHD
//
// A dynamic (or differencing) disk starts with a copy of its footer, which
// is what Probe looks for first. A fixed disk has its footer only in its
// last sector, and any raw disk may happen to end in a sector that looks
// like one (a VHD copied onto a larger disk, a file system block holding a
// VHD's tail): such a footer counts only when the file is exactly what the
// specification says a fixed disk is, the disk the footer describes (its
// current size) followed by the footer. A footer at the end that describes
// a dynamic disk counts only when its dynamic disk header is where it
// says, with its cookie and a valid checksum. Anything else is a raw disk
// that ends in a stray footer, and is read as raw (QEMU, which looks for
// the footer at offset 0 only, reads it as raw too).
//
// # Which size: the footer's or the geometry's
//
// The footer records the disk's size twice: as "current size" in bytes,
// and as a CHS geometry. They differ because the geometry cannot express
// most sizes: the specification's algorithm rounds down, and says that
// where the disk is attached as an ATA disk, the CHS values are what the
// controller reports, so "the size of the hard disk image in the virtual
// machine is smaller than that created by the user". That is Virtual PC
// (creator application "vpc "): its guests saw C*H*S sectors and never a
// byte past them. Old QEMU (creator "qemu") also sized its disks by the
// geometry (and recorded C*H*S*512 as the current size). For these two
// creators the reader takes the geometry's size, as QEMU does (a Virtual
// PC disk of 127 GiB is then 2 MiB smaller than its footer says). It
// matters: a guest's partition table, a GPT backup header, Windows' dynamic
// disk database and MD RAID superblocks are placed relative to the end of
// the disk the guest saw, and a disk grown by the rounding would move that
// end. The exception, as in QEMU, is the largest geometry (65535/16/255),
// which says only that the disk is at least that large: the current size
// is taken then.
//
// Every other creator (Hyper-V "win ", Disk2vhd "d2v ", QEMU's "qem2",
// XenServer "tap\0", XenConverter "CTXS", Azure "wa\0\0", Virtual Server
// "vs  ", VirtualBox "vbox" and unknown ones) gets the current size, which
// is what those hypervisors attach and what QEMU 10 does for all but "vpc "
// and "qemu": it is never smaller than the geometry's size, so no sector a
// guest could have written is dropped.
//
// The reader, like QEMU, reads an allocated block's data without
// consulting its sector bitmap (writers set every bit). Differencing
// disks are refused.
//
// Written from the specification: no maintained Go library writes VHD.
package vhd

import (
	"crypto/rand"
	"fmt"
	"io"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

const (
	format       = "vhd"
	sector       = 512
	cookie       = "conectix"
	dynCookie    = "cxsparse"
	typeFixed    = 2
	typeDynamic  = 3
	typeDiff     = 4
	unallocated  = 0xffffffff
	defaultBlock = 2 << 20
	// MaxSize is the largest disk a VHD holds: 2040 GiB.
	MaxSize = 2040 << 30
)

var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// IsFooter reports whether b (512 bytes) starts with the footer cookie.
func IsFooter(b []byte) bool { return len(b) >= 8 && string(b[:8]) == cookie }

func checksum(b []byte, skipAt int) uint32 {
	var s uint32
	for i, c := range b {
		if i >= skipAt && i < skipAt+4 {
			continue
		}
		s += uint32(c)
	}
	return ^s
}

type footer struct {
	dataOffset  uint64
	currentSize uint64
	diskType    uint32
	creator     string // creator application
	c, h, s     int    // disk geometry
}

func parseFooter(b []byte, name string, off int64) (footer, error) {
	if !IsFooter(b) {
		return footer{}, vdio.Errorf(name, format, off, "no footer cookie")
	}
	if got, want := vdio.BE.Uint32(b[64:]), checksum(b[:sector], 64); got != want {
		return footer{}, vdio.Errorf(name, format, off+64, "footer checksum %#x, computed %#x", got, want)
	}
	return footer{
		dataOffset: vdio.BE.Uint64(b[16:]), currentSize: vdio.BE.Uint64(b[48:]), diskType: vdio.BE.Uint32(b[60:]),
		creator: string(b[28:32]), c: int(vdio.BE.Uint16(b[56:])), h: int(b[58]), s: int(b[59]),
	}, nil
}

// maxGeometry is the largest CHS geometry a footer holds: a disk at least
// that large.
const maxGeometry = 65535 * 16 * 255

// diskSize returns the size of the disk the footer describes: C*H*S
// sectors for the creators whose guests saw the geometry (Virtual PC, old
// QEMU), unless the geometry is the largest, else the current size. See
// the package documentation.
func (f footer) diskSize() uint64 {
	switch f.creator {
	case "vpc ", "qemu":
		if chs := uint64(f.c) * uint64(f.h) * uint64(f.s); chs != maxGeometry {
			return chs * sector
		}
	}
	return f.currentSize
}

// Probe reports whether the file in r (size bytes) is a VHD: it starts
// with a footer copy (a dynamic or differencing disk), or it ends in a
// footer that the file matches, a fixed disk of exactly the footer's
// current size plus the footer, or a dynamic disk whose header is found
// where the footer says (a dynamic disk whose first sector is damaged).
// A file that merely ends in a stray footer is not a VHD.
func Probe(r io.ReaderAt, size int64) bool {
	if size < sector {
		return false
	}
	var b [sector]byte
	if n, _ := r.ReadAt(b[:], 0); n == sector && IsFooter(b[:]) && vdio.BE.Uint32(b[60:]) != typeFixed {
		return true
	}
	if n, _ := r.ReadAt(b[:], size-sector); n != sector || !IsFooter(b[:]) {
		return false
	}
	switch vdio.BE.Uint32(b[60:]) {
	case typeFixed:
		cur := vdio.BE.Uint64(b[48:])
		return cur <= vdio.MaxVirtualSize && int64(cur) == size-sector
	case typeDynamic, typeDiff:
		f, err := parseFooter(b[:], "", 0)
		if err != nil || f.dataOffset > uint64(size-sector) || f.dataOffset < sector {
			return false
		}
		var h [1024]byte
		if n, _ := r.ReadAt(h[:], int64(f.dataOffset)); n != len(h) {
			return false
		}
		return string(h[:8]) == dynCookie && vdio.BE.Uint32(h[36:]) == checksum(h[:], 36)
	}
	return false
}

func makeFooter(size int64, diskType uint32, dataOffset uint64, uid []byte) []byte {
	b := make([]byte, sector)
	copy(b, cookie)
	vdio.BE.PutUint32(b[8:], 2)        // features: reserved bit
	vdio.BE.PutUint32(b[12:], 0x10000) // version 1.0
	vdio.BE.PutUint64(b[16:], dataOffset)
	vdio.BE.PutUint32(b[24:], uint32(time.Since(vhdEpoch)/time.Second))
	copy(b[28:], "win ")
	vdio.BE.PutUint32(b[32:], 0x000a0000) // creator version 10.0
	copy(b[36:], "Wi2k")
	vdio.BE.PutUint64(b[40:], uint64(size))
	vdio.BE.PutUint64(b[48:], uint64(size))
	c, h, s := vdio.CHS(size / sector)
	vdio.BE.PutUint16(b[56:], uint16(c))
	b[58], b[59] = byte(h), byte(s)
	vdio.BE.PutUint32(b[60:], diskType)
	copy(b[68:84], uid)
	vdio.BE.PutUint32(b[64:], checksum(b, 64))
	return b
}

// Reader is an open VHD. It is safe for concurrent use.
type Reader struct {
	r        io.ReaderAt
	name     string
	fileSize int64
	size     int64
	fixed    bool
	block    int64
	bitmap   int64 // bytes of sector bitmap before each block
	bat      []uint32
	batOff   int64
	creator  string
	chs      bool // size from the geometry
}

// Open reads a VHD's footer, and for a dynamic disk its header and block
// allocation table.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	if size < sector {
		return nil, vdio.Errorf(name, format, 0, "file of %d bytes is too small for a footer", size)
	}
	b := make([]byte, 1024)
	// A dynamic disk starts with a copy of the footer; a fixed one has it
	// only at the end (its first sector is the disk's, and may happen to
	// look like a footer).
	if err := vdio.ReadFull(r, size, b[:sector], 0, name, format, "footer copy"); err != nil {
		return nil, err
	}
	var f footer
	var err error
	if IsFooter(b) && vdio.BE.Uint32(b[60:]) != typeFixed {
		f, err = parseFooter(b, name, 0)
	} else {
		fo := size - sector
		if err := vdio.ReadFull(r, size, b[:sector], fo, name, format, "footer"); err != nil {
			return nil, err
		}
		f, err = parseFooter(b, name, fo)
	}
	if err != nil {
		return nil, err
	}
	v := &Reader{r: r, name: name, fileSize: size}
	if f.currentSize > vdio.MaxVirtualSize || f.currentSize%sector != 0 {
		return nil, vdio.Errorf(name, format, 48, "disk size %d is absurd or not a multiple of 512", f.currentSize)
	}
	v.size = int64(f.diskSize())
	v.creator, v.chs = f.creator, v.size != int64(f.currentSize)
	switch f.diskType {
	case typeFixed:
		v.fixed = true
		// A fixed disk is its data, then the footer: nothing more, nothing
		// less.
		if int64(f.currentSize) != size-sector {
			return nil, vdio.Errorf(name, format, size-sector+48, "fixed disk of %d bytes and its footer in a file of %d bytes, not %d (truncated, or not a VHD?)", f.currentSize, size, f.currentSize+sector)
		}
		if v.size > int64(f.currentSize) {
			return nil, vdio.Errorf(name, format, size-sector+56, "geometry %d/%d/%d holds %d bytes, more than the fixed disk's %d", f.c, f.h, f.s, v.size, f.currentSize)
		}
		return v, nil
	case typeDynamic:
	case typeDiff:
		return nil, vdio.Unsupported(name, format, 60, "differencing disks (with a parent) are not supported: merge or convert the chain first")
	default:
		return nil, vdio.Errorf(name, format, 60, "unknown disk type %d", f.diskType)
	}
	ho := int64(f.dataOffset)
	if f.dataOffset > uint64(size) {
		return nil, vdio.Errorf(name, format, 16, "dynamic header at %d lies past the end of the file", f.dataOffset)
	}
	if err := vdio.ReadFull(r, size, b, ho, name, format, "dynamic disk header"); err != nil {
		return nil, err
	}
	if string(b[:8]) != dynCookie {
		return nil, vdio.Errorf(name, format, ho, "no dynamic disk header cookie")
	}
	if got, want := vdio.BE.Uint32(b[36:]), checksum(b, 36); got != want {
		return nil, vdio.Errorf(name, format, ho+36, "dynamic header checksum %#x, computed %#x", got, want)
	}
	batOff := vdio.BE.Uint64(b[16:])
	entries := int64(vdio.BE.Uint32(b[28:]))
	v.block = int64(vdio.BE.Uint32(b[32:]))
	if v.block < sector || v.block > 256<<20 || v.block&(v.block-1) != 0 {
		return nil, vdio.Errorf(name, format, ho+32, "block size %d is not a power of two from 512 bytes to 256 MiB", v.block)
	}
	need := (v.size + v.block - 1) / v.block
	if entries < need {
		return nil, vdio.Errorf(name, format, ho+28, "%d table entries for a disk that needs %d", entries, need)
	}
	if batOff > uint64(size) || need*4 > size || int64(batOff) > size-need*4 {
		return nil, vdio.Errorf(name, format, ho+16, "block allocation table at %d (%d entries) lies past the end of the file (%d bytes)", batOff, need, size)
	}
	bat := make([]byte, need*4)
	if err := vdio.ReadFull(r, size, bat, int64(batOff), name, format, "block allocation table"); err != nil {
		return nil, err
	}
	v.bat, v.batOff = make([]uint32, need), int64(batOff)
	for i := range v.bat {
		v.bat[i] = vdio.BE.Uint32(bat[4*i:])
	}
	v.bitmap = ((v.block/sector+7)/8 + sector - 1) / sector * sector
	return v, nil
}

// Size returns the disk's size.
func (v *Reader) Size() int64 { return v.size }

// Fixed reports a fixed disk.
func (v *Reader) Fixed() bool { return v.fixed }

// SizedByGeometry reports a disk whose size was taken from its CHS
// geometry rather than from its footer's current size (Virtual PC, old
// QEMU), and names its creator application.
func (v *Reader) SizedByGeometry() (string, bool) { return v.creator, v.chs }

// lookup returns the file offset of off's data (or -1) and the bytes to
// the end of its block.
func (v *Reader) lookup(off int64) (int64, int64) {
	if v.fixed {
		return off, v.size - off
	}
	bi := off / v.block
	rest := (bi+1)*v.block - off
	e := v.bat[bi]
	if e == unallocated {
		return -1, rest
	}
	return int64(e)*sector + v.bitmap + off%v.block, rest
}

// ReadAt reads the virtual disk.
func (v *Reader) ReadAt(p []byte, off int64) (int, error) {
	return vdio.ReadMapped(v.r, v.fileSize, v.size, v.lookup, v.name, format, p, off)
}

// Data implements extent.Map. For a fixed disk, every byte is data;
// callers combine it with the file's holes.
func (v *Reader) Data(off, n int64) ([]extent.Range, error) {
	return vdio.DataMapped(v.size, v.lookup, off, n)
}

// Writer writes a fixed or dynamic VHD from a disk that arrives in order.
type Writer struct {
	f         vdio.File
	size      int64
	fixed     bool
	block     int64
	bat       []uint32
	batOff    int64
	next      int64
	out       *vdio.Appender
	units     *vdio.Units
	uid       []byte
	bitmap    []byte
	gap       int64 // room for a bitmap before a block's data
	allocated bool
	finished  bool
}

// NewWriter starts a VHD of size bytes (a multiple of 512) in f: fixed,
// or dynamic with 2 MiB blocks.
func NewWriter(f vdio.File, size int64, fixed bool) (*Writer, error) {
	return newWriter(f, size, fixed, defaultBlock)
}

// newWriter takes the block size too (tests make small images).
func newWriter(f vdio.File, size int64, fixed bool, block int64) (*Writer, error) {
	if size < 0 || size > MaxSize || size%sector != 0 {
		return nil, fmt.Errorf("vhd: disk size %d must be a multiple of 512 up to 2040 GiB (larger disks: use vhdx)", size)
	}
	w := &Writer{f: f, size: size, fixed: fixed, block: block, uid: make([]byte, 16)}
	rand.Read(w.uid)
	w.out = vdio.NewAppender(f, vdio.AppendBuffer)
	if fixed {
		w.units = vdio.NewUnits(1<<20, size, w.out, func(i int64) (int64, error) { return i << 20, nil })
		return w, nil
	}
	n := (size + w.block - 1) / w.block
	w.bat = make([]uint32, n)
	for i := range w.bat {
		w.bat[i] = unallocated
	}
	w.batOff = 3 * sector
	batBytes := (n*4 + sector - 1) / sector * sector
	// Each block is its 512-byte bitmap, then data that starts 4 KiB
	// aligned, so runs of zeros left unwritten are whole file-system
	// blocks (holes).
	w.bitmap = make([]byte, ((block/sector+7)/8+sector-1)/sector*sector)
	w.gap = (int64(len(w.bitmap)) + 4095) / 4096 * 4096
	w.next = (w.batOff + batBytes + int64(len(w.bitmap)) + 4095) / 4096 * 4096
	for i := range w.bitmap {
		w.bitmap[i] = 0xff
	}
	w.units = vdio.NewUnits(w.block, size, w.out, w.alloc)
	return w, nil
}

func (w *Writer) alloc(i int64) (int64, error) {
	bm := w.next - int64(len(w.bitmap))
	if bm/sector > 0xfffffffe {
		return 0, fmt.Errorf("vhd: file would exceed the table's 2 TiB reach")
	}
	w.bat[i] = uint32(bm / sector)
	w.allocated = true
	if err := w.out.WriteAt(w.bitmap, bm); err != nil {
		return 0, err
	}
	host := w.next
	// The next block's bitmap ends where its 4 KiB-aligned data starts.
	w.next += w.block + w.gap
	return host, nil
}

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *Writer) DataBytes() int64 { return w.units.Data }

// Close writes the tables and footers.
func (w *Writer) Close() error {
	if w.finished {
		return nil
	}
	w.finished = true
	if w.fixed {
		if err := w.out.WriteAt(makeFooter(w.size, typeFixed, ^uint64(0), w.uid), w.size); err != nil {
			return err
		}
		if err := w.out.Flush(); err != nil {
			return err
		}
		return w.f.Truncate(w.size + sector)
	}
	ft := makeFooter(w.size, typeDynamic, sector, w.uid)
	// The footer follows the last block, or the table when no block was
	// allocated.
	end := w.next - int64(len(w.bitmap))
	if w.allocated {
		end = w.next - w.gap
	}
	dh := make([]byte, 1024)
	copy(dh, dynCookie)
	vdio.BE.PutUint64(dh[8:], ^uint64(0))
	vdio.BE.PutUint64(dh[16:], uint64(w.batOff))
	vdio.BE.PutUint32(dh[24:], 0x10000)
	vdio.BE.PutUint32(dh[28:], uint32(len(w.bat)))
	vdio.BE.PutUint32(dh[32:], uint32(w.block))
	vdio.BE.PutUint32(dh[36:], checksum(dh, 36))
	bat := make([]byte, (int64(len(w.bat))*4+sector-1)/sector*sector)
	for i := range bat {
		bat[i] = 0xff
	}
	for i, e := range w.bat {
		vdio.BE.PutUint32(bat[4*i:], e)
	}
	if err := w.out.WriteAt(ft, end); err != nil {
		return err
	}
	head := make([]byte, 0, 3*sector+len(bat))
	head = append(head, ft...)
	head = append(head, dh...)
	head = append(head, bat...)
	if err := w.out.WriteAt(head, 0); err != nil {
		return err
	}
	if err := w.out.Flush(); err != nil {
		return err
	}
	return w.f.Truncate(end + sector)
}
