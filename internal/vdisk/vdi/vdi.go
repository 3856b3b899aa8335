// Package vdi reads and writes VirtualBox Disk Images (VDI, header version
// 1.1) as VirtualBox defines them (VirtualBox source, VDICore.h: "VDI
// header, version 1.1"): a text pre-header, the header, the block map of
// 32-bit entries (block index, 0xffffffff free, 0xfffffffe zero) and 1 MiB
// data blocks.
//
// The writer makes dynamic images (blocks of zeros stay free) or fixed
// ones (every block allocated, runs of zeros left as holes of the file),
// with the block map and the data 1 MiB aligned, as VirtualBox lays them
// out. The reader handles dynamic and fixed images; differencing images
// are refused.
//
// Written from VirtualBox's definition: no maintained Go library writes
// VDI.
package vdi

import (
	"crypto/rand"
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

const (
	format    = "vdi"
	signature = 0xbeda107f
	preHeader = "<<< Oracle VM VirtualBox Disk Image >>>\n"
	free      = 0xffffffff
	zero      = 0xfffffffe
	mib       = 1 << 20
	hdrSize   = 400

	typeNormal = 1
	typeFixed  = 2
	typeUndo   = 3
	typeDiff   = 4

	// MaxSize bounds what the writer makes: 16 TiB (its block map stays in
	// memory: 64 MiB at this size).
	MaxSize = 16 << 40
)

// Magic reports whether b (at least 72 bytes) holds a VDI signature.
func Magic(b []byte) bool { return len(b) >= 68 && vdio.LE.Uint32(b[64:]) == signature }

// Reader is an open VDI. It is safe for concurrent use.
type Reader struct {
	r        io.ReaderAt
	name     string
	fileSize int64
	size     int64
	block    int64
	extra    int64
	dataOff  int64
	bmap     []uint32
	fixed    bool
	bmapOff  int64
	alloc    uint32 // the header's count of allocated blocks
}

// Open reads a VDI's header and block map.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	h := make([]byte, 512)
	if err := vdio.ReadFull(r, size, h[:72+hdrSize], 0, name, format, "header"); err != nil {
		return nil, err
	}
	if !Magic(h) {
		return nil, vdio.Errorf(name, format, 64, "no VDI signature")
	}
	if ver := vdio.LE.Uint32(h[68:]); ver>>16 != 1 {
		return nil, vdio.Unsupported(name, format, 68, "header version %d.%d", ver>>16, ver&0xffff)
	}
	if hs := vdio.LE.Uint32(h[72:]); hs < hdrSize-16 || hs > 4096 {
		return nil, vdio.Errorf(name, format, 72, "header size %d out of range", hs)
	}
	v := &Reader{r: r, name: name, fileSize: size}
	switch t := vdio.LE.Uint32(h[76:]); t {
	case typeNormal:
	case typeFixed:
		v.fixed = true
	case typeUndo, typeDiff:
		return nil, vdio.Unsupported(name, format, 76, "differencing images (type %d) are not supported: clone the disk to a normal image first", t)
	default:
		return nil, vdio.Errorf(name, format, 76, "unknown image type %d", t)
	}
	bmapOff := int64(vdio.LE.Uint32(h[340:]))
	v.dataOff = int64(vdio.LE.Uint32(h[344:]))
	if ss := vdio.LE.Uint32(h[360:]); ss != 512 {
		return nil, vdio.Errorf(name, format, 360, "sector size %d is not 512", ss)
	}
	v.size = int64(vdio.LE.Uint64(h[368:]))
	v.block = int64(vdio.LE.Uint32(h[376:]))
	v.extra = int64(vdio.LE.Uint32(h[380:]))
	blocks := int64(vdio.LE.Uint32(h[384:]))
	if v.size < 0 || v.size > vdio.MaxVirtualSize {
		return nil, vdio.Errorf(name, format, 368, "disk size %d is absurd", uint64(v.size))
	}
	if v.block < 512 || v.block > 256*mib || v.block&(v.block-1) != 0 {
		return nil, vdio.Errorf(name, format, 376, "block size %d is not a power of two from 512 bytes to 256 MiB", v.block)
	}
	if v.extra < 0 || v.extra > 256*mib || v.extra%512 != 0 {
		return nil, vdio.Errorf(name, format, 380, "block extra data of %d bytes out of range", v.extra)
	}
	need := (v.size + v.block - 1) / v.block
	if blocks < need {
		return nil, vdio.Errorf(name, format, 384, "%d blocks for a disk that needs %d", blocks, need)
	}
	if bmapOff > size || need*4 > size || bmapOff > size-need*4 {
		return nil, vdio.Errorf(name, format, 340, "block map at %d (%d entries) lies past the end of the file (%d bytes)", bmapOff, need, size)
	}
	b := make([]byte, need*4)
	if err := vdio.ReadFull(r, size, b, bmapOff, name, format, "block map"); err != nil {
		return nil, err
	}
	v.bmap, v.bmapOff, v.alloc = make([]uint32, need), bmapOff, vdio.LE.Uint32(h[388:])
	for i := range v.bmap {
		e := vdio.LE.Uint32(b[4*i:])
		if e != free && e != zero {
			host := v.dataOff + int64(e)*(v.block+v.extra) + v.extra
			if host > size || v.block > size-host {
				return nil, vdio.Errorf(name, format, bmapOff+int64(4*i), "block %d stored as data block %d, past the end of the file (%d bytes)", i, e, size)
			}
		}
		v.bmap[i] = e
	}
	return v, nil
}

// Size returns the virtual size.
func (v *Reader) Size() int64 { return v.size }

func (v *Reader) lookup(off int64) (int64, int64) {
	bi := off / v.block
	rest := (bi+1)*v.block - off
	e := v.bmap[bi]
	if e == free || e == zero {
		return -1, rest
	}
	return v.dataOff + int64(e)*(v.block+v.extra) + v.extra + off%v.block, rest
}

// ReadAt reads the virtual disk.
func (v *Reader) ReadAt(p []byte, off int64) (int, error) {
	return vdio.ReadMapped(v.r, v.fileSize, v.size, v.lookup, v.name, format, p, off)
}

// Data implements extent.Map.
func (v *Reader) Data(off, n int64) ([]extent.Range, error) {
	return vdio.DataMapped(v.size, v.lookup, off, n)
}

// Writer writes a VDI from a disk that arrives in order.
type Writer struct {
	f        vdio.File
	size     int64
	fixed    bool
	block    int64
	bmap     []uint32
	bmapOff  int64
	dataOff  int64
	nextIdx  uint32
	out      *vdio.Appender
	units    *vdio.Units
	finished bool
}

// NewWriter starts a VDI of size bytes (a multiple of 512) in f, dynamic
// or fixed.
func NewWriter(f vdio.File, size int64, fixed bool) (*Writer, error) {
	return newWriter(f, size, fixed, mib)
}

// newWriter takes the block size and alignment too (tests make small
// images).
func newWriter(f vdio.File, size int64, fixed bool, block int64) (*Writer, error) {
	if size < 0 || size > MaxSize || size%512 != 0 {
		return nil, fmt.Errorf("vdi: disk size %d must be a multiple of 512 up to 16 TiB", size)
	}
	w := &Writer{f: f, size: size, fixed: fixed, block: block}
	n := (size + block - 1) / block
	w.bmap = make([]uint32, n)
	for i := range w.bmap {
		w.bmap[i] = free
		if fixed {
			w.bmap[i] = uint32(i)
		}
	}
	// Map and data 1 MiB aligned as VirtualBox lays them out (the block
	// size, for the small blocks of tests).
	align := min(block, mib)
	w.bmapOff = max(512, align)
	w.dataOff = w.bmapOff + max(align, (n*4+align-1)/align*align)
	w.out = vdio.NewAppender(f, vdio.AppendBuffer)
	w.units = vdio.NewUnits(block, size, w.out, w.alloc)
	return w, nil
}

func (w *Writer) alloc(i int64) (int64, error) {
	if w.fixed {
		return w.dataOff + i*w.block, nil
	}
	w.bmap[i] = w.nextIdx
	w.nextIdx++
	return w.dataOff + int64(w.bmap[i])*w.block, nil
}

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *Writer) DataBytes() int64 { return w.units.Data }

// Close writes the header and block map.
func (w *Writer) Close() error {
	if w.finished {
		return nil
	}
	w.finished = true
	allocated := w.nextIdx
	if w.fixed {
		allocated = uint32(len(w.bmap))
	}
	h := make([]byte, 512)
	copy(h, preHeader)
	vdio.LE.PutUint32(h[64:], signature)
	vdio.LE.PutUint32(h[68:], 0x00010001)
	vdio.LE.PutUint32(h[72:], hdrSize)
	typ := uint32(typeNormal)
	if w.fixed {
		typ = typeFixed
	}
	vdio.LE.PutUint32(h[76:], typ)
	copy(h[84:], "written by sauve")
	vdio.LE.PutUint32(h[340:], uint32(w.bmapOff))
	vdio.LE.PutUint32(h[344:], uint32(w.dataOff))
	// Legacy geometry left zero (VirtualBox computes it); sector size.
	vdio.LE.PutUint32(h[360:], 512)
	vdio.LE.PutUint64(h[368:], uint64(w.size))
	vdio.LE.PutUint32(h[376:], uint32(w.block))
	vdio.LE.PutUint32(h[380:], 0)
	vdio.LE.PutUint32(h[384:], uint32(len(w.bmap)))
	vdio.LE.PutUint32(h[388:], allocated)
	rand.Read(h[392:408]) // image UUID
	rand.Read(h[408:424]) // modification UUID
	h[392+7] = h[392+7]&0x0f | 0x40
	h[392+8] = h[392+8]&0x3f | 0x80
	// The logical (BIOS) geometry at 456 is left zero: VirtualBox and
	// QEMU compute one.
	bm := make([]byte, int64(len(w.bmap))*4)
	for i, e := range w.bmap {
		vdio.LE.PutUint32(bm[4*i:], e)
	}
	if err := w.out.WriteAt(bm, w.bmapOff); err != nil {
		return err
	}
	if err := w.out.WriteAt(h, 0); err != nil {
		return err
	}
	if err := w.out.Flush(); err != nil {
		return err
	}
	end := w.dataOff + int64(allocated)*w.block
	return w.f.Truncate(end)
}
