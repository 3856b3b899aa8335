// Package vhdx reads and writes Microsoft VHDX disk images as specified in
// [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" (Microsoft Open
// Specifications): file type identifier, two headers and two region tables
// with CRC-32C checksums, the log, the metadata region (file parameters,
// virtual disk size, page 83 data, logical and physical sector size) and
// the block allocation table (BAT) with its interleaved sector bitmap
// entries.
//
// The writer makes dynamic disks with 512-byte logical and 4 KiB physical
// sectors and an empty log; blocks of zeros stay NOT_PRESENT and runs of
// zeros inside present blocks stay holes of the file. The reader handles
// fixed and dynamic disks. It refuses differencing disks and files whose
// log holds entries to replay (a file Hyper-V did not close cleanly),
// with an error saying so.
//
// Written from the specification: no maintained Go library writes VHDX.
package vhdx

import (
	"crypto/rand"
	"fmt"
	"hash/crc32"
	"io"
	"unicode/utf16"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

const (
	format = "vhdx"
	kib    = 1 << 10
	mib    = 1 << 20

	// MaxSize is the largest virtual disk the format allows: 64 TiB.
	MaxSize = 64 << 40

	stateNotPresent = 0
	stateUndefined  = 1
	stateZero       = 2
	stateUnmapped   = 3
	stateFull       = 6
	statePartial    = 7
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// GUIDs in their on-disk (mixed-endian) byte order.
func guid(s string) [16]byte {
	var g [16]byte
	var a [16]byte
	j := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '-' {
			continue
		}
		var v byte
		switch {
		case c >= '0' && c <= '9':
			v = c - '0'
		case c >= 'a' && c <= 'f':
			v = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			v = c - 'A' + 10
		}
		if j%2 == 0 {
			a[j/2] = v << 4
		} else {
			a[j/2] |= v
		}
		j++
	}
	g[0], g[1], g[2], g[3] = a[3], a[2], a[1], a[0]
	g[4], g[5] = a[5], a[4]
	g[6], g[7] = a[7], a[6]
	copy(g[8:], a[8:])
	return g
}

var (
	guidBAT        = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
	guidMetadata   = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
	guidFileParams = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	guidDiskSize   = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	guidPage83     = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
	guidLogical    = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	guidPhysical   = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
	guidParent     = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
)

// Magic reports whether b starts with the VHDX file type identifier.
func Magic(b []byte) bool { return len(b) >= 8 && string(b[:8]) == "vhdxfile" }

func crc(b []byte, at int) uint32 {
	var save [4]byte
	copy(save[:], b[at:at+4])
	clear(b[at : at+4])
	c := crc32.Checksum(b, castagnoli)
	copy(b[at:at+4], save[:])
	return c
}

// Reader is an open VHDX. It is safe for concurrent use.
type Reader struct {
	r        io.ReaderAt
	name     string
	fileSize int64
	size     int64
	block    int64
	ratio    int64
	bat      []uint64
	batOff   int64
	batLen   int64
	hdr      []byte // the current header
	hdrEnd   int64  // end of the log, metadata and BAT regions
}

// Open reads a VHDX's headers, region table, metadata and BAT.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	b := make([]byte, 64*kib)
	if err := vdio.ReadFull(r, size, b[:8], 0, name, format, "file type identifier"); err != nil {
		return nil, err
	}
	if !Magic(b) {
		return nil, vdio.Errorf(name, format, 0, "no file type identifier")
	}
	// The current header is the valid one with the higher sequence number.
	var hdr []byte
	var hdrOff int64
	var seq uint64
	for _, off := range []int64{64 * kib, 128 * kib} {
		h := make([]byte, 4*kib)
		if vdio.ReadFull(r, size, h, off, name, format, "header") != nil {
			continue
		}
		if string(h[:4]) != "head" || vdio.LE.Uint32(h[4:]) != crc(h, 4) {
			continue
		}
		if s := vdio.LE.Uint64(h[8:]); hdr == nil || s > seq {
			hdr, hdrOff, seq = h, off, s
		}
	}
	if hdr == nil {
		return nil, vdio.Errorf(name, format, 64*kib, "neither header is valid (bad signature or checksum)")
	}
	if v := vdio.LE.Uint16(hdr[66:]); v != 1 {
		return nil, vdio.Errorf(name, format, hdrOff+66, "unknown version %d", v)
	}
	if logGUID := hdr[48:64]; !extent.IsZero(logGUID) {
		logLen, logOff := int64(vdio.LE.Uint32(hdr[68:])), int64(vdio.LE.Uint64(hdr[72:]))
		if active, err := logActive(r, size, logOff, logLen, logGUID); err != nil {
			return nil, vdio.Wrap(name, format, logOff, err, "log")
		} else if active {
			return nil, vdio.Unsupported(name, format, hdrOff+48, "the log holds changes to replay (the file was not closed cleanly): open it once in Hyper-V, or run 'qemu-img check -r all' on it, first")
		}
	}
	// Region table.
	if err := vdio.ReadFull(r, size, b, 192*kib, name, format, "region table"); err != nil {
		return nil, err
	}
	if string(b[:4]) != "regi" || vdio.LE.Uint32(b[4:]) != crc(b, 4) {
		if err := vdio.ReadFull(r, size, b, 256*kib, name, format, "region table copy"); err != nil {
			return nil, err
		}
		if string(b[:4]) != "regi" || vdio.LE.Uint32(b[4:]) != crc(b, 4) {
			return nil, vdio.Errorf(name, format, 192*kib, "neither region table is valid (bad signature or checksum)")
		}
	}
	count := int(vdio.LE.Uint32(b[8:]))
	if count > 2047 {
		return nil, vdio.Errorf(name, format, 192*kib+8, "%d region table entries, at most 2047", count)
	}
	var batOff, batLen, metaOff, metaLen int64
	for i := 0; i < count; i++ {
		e := b[16+32*i:]
		var g [16]byte
		copy(g[:], e)
		off, ln, req := int64(vdio.LE.Uint64(e[16:])), int64(vdio.LE.Uint32(e[24:])), vdio.LE.Uint32(e[28:])&1
		switch g {
		case guidBAT:
			batOff, batLen = off, ln
		case guidMetadata:
			metaOff, metaLen = off, ln
		default:
			if req != 0 {
				return nil, vdio.Unsupported(name, format, 192*kib+16+32*int64(i), "unknown required region %x", g)
			}
		}
	}
	if batLen == 0 || metaLen == 0 {
		return nil, vdio.Errorf(name, format, 192*kib, "region table lacks the BAT or the metadata region")
	}
	if metaOff < 0 || metaOff > size || metaLen > size-metaOff || metaLen < 64*kib {
		return nil, vdio.Errorf(name, format, 192*kib, "metadata region at %d (%d bytes) out of the file (%d bytes)", metaOff, metaLen, size)
	}
	v := &Reader{r: r, name: name, fileSize: size}
	if err := v.readMetadata(metaOff, metaLen); err != nil {
		return nil, err
	}
	blocks := (v.size + v.block - 1) / v.block
	total := int64(0)
	if blocks > 0 {
		total = blocks + (blocks-1)/v.ratio
	}
	if total*8 > batLen || batOff < 0 || batOff > size || batLen > size-batOff {
		return nil, vdio.Errorf(name, format, batOff, "BAT of %d bytes at %d cannot hold %d entries or lies past the end of the file (%d bytes)", batLen, batOff, total, size)
	}
	raw := make([]byte, total*8)
	if err := vdio.ReadFull(r, size, raw, batOff, name, format, "BAT"); err != nil {
		return nil, err
	}
	v.bat, v.batOff, v.batLen, v.hdr = make([]uint64, blocks), batOff, batLen, hdr
	v.hdrEnd = max(batOff+batLen, metaOff+metaLen, int64(vdio.LE.Uint64(hdr[72:]))+int64(vdio.LE.Uint32(hdr[68:])))
	for i := int64(0); i < blocks; i++ {
		j := i + i/v.ratio
		e := vdio.LE.Uint64(raw[8*j:])
		state := e & 7
		switch state {
		case stateNotPresent, stateUndefined, stateZero, stateUnmapped:
			v.bat[i] = 0
		case stateFull:
			off := int64(e>>20) * mib
			// The last block needs only the disk's tail (QEMU's fixed
			// disks end there).
			if n := min(v.block, v.size-i*v.block); off < mib || off > size || n > size-off {
				return nil, vdio.Errorf(name, format, batOff+8*j, "BAT entry %d puts block %d at %d, past the end of the file (%d bytes)", j, i, off, size)
			}
			v.bat[i] = uint64(off)
		case statePartial:
			return nil, vdio.Unsupported(name, format, batOff+8*j, "partially present block (a differencing disk)")
		default:
			return nil, vdio.Errorf(name, format, batOff+8*j, "BAT entry %d has invalid state %d", j, state)
		}
	}
	return v, nil
}

// logActive reports whether the log holds an entry of the header's log
// GUID, which would have to be replayed.
func logActive(r io.ReaderAt, size, off, n int64, logGUID []byte) (bool, error) {
	if off < 0 || n < 0 || off > size || n > size-off || n > 256*mib {
		return false, fmt.Errorf("log region at %d (%d bytes) out of the file", off, n)
	}
	var e [64]byte
	for pos := off; pos+4*kib <= off+n; pos += 4 * kib {
		if _, err := r.ReadAt(e[:], pos); err != nil {
			return false, err
		}
		if string(e[:4]) == "loge" && string(e[32:48]) == string(logGUID) {
			return true, nil
		}
	}
	return false, nil
}

func (v *Reader) readMetadata(off, n int64) error {
	t := make([]byte, 64*kib)
	if err := vdio.ReadFull(v.r, v.fileSize, t, off, v.name, format, "metadata table"); err != nil {
		return err
	}
	if string(t[:8]) != "metadata" {
		return vdio.Errorf(v.name, format, off, "no metadata table signature")
	}
	count := int(vdio.LE.Uint16(t[10:]))
	if count > 2047 {
		return vdio.Errorf(v.name, format, off+10, "%d metadata entries, at most 2047", count)
	}
	item := func(e []byte, want int64) ([]byte, error) {
		o, l := int64(vdio.LE.Uint32(e[16:])), int64(vdio.LE.Uint32(e[20:]))
		if l != want || o < 64*kib || o > n-l {
			return nil, vdio.Errorf(v.name, format, off, "metadata item at %d (%d bytes) out of the region", o, l)
		}
		b := make([]byte, l)
		if err := vdio.ReadFull(v.r, v.fileSize, b, off+o, v.name, format, "metadata item"); err != nil {
			return nil, err
		}
		return b, nil
	}
	var logical int64
	have := 0
	for i := 0; i < count; i++ {
		e := t[32+32*i : 64+32*i]
		var g [16]byte
		copy(g[:], e)
		flags := vdio.LE.Uint32(e[24:])
		switch g {
		case guidFileParams:
			b, err := item(e, 8)
			if err != nil {
				return err
			}
			v.block = int64(vdio.LE.Uint32(b))
			if vdio.LE.Uint32(b[4:])&2 != 0 {
				return vdio.Unsupported(v.name, format, off, "differencing disk (has a parent): merge or convert the chain first")
			}
			have |= 1
		case guidDiskSize:
			b, err := item(e, 8)
			if err != nil {
				return err
			}
			v.size = int64(vdio.LE.Uint64(b))
			have |= 2
		case guidLogical:
			b, err := item(e, 4)
			if err != nil {
				return err
			}
			logical = int64(vdio.LE.Uint32(b))
			have |= 4
		case guidPage83, guidPhysical:
		case guidParent:
			return vdio.Unsupported(v.name, format, off, "differencing disk (has parent locator): merge or convert the chain first")
		default:
			if flags&4 != 0 {
				return vdio.Unsupported(v.name, format, off+32+32*int64(i), "unknown required metadata item %x", g)
			}
		}
	}
	if have != 7 {
		return vdio.Errorf(v.name, format, off, "metadata lacks file parameters, virtual disk size or logical sector size")
	}
	if v.block < mib || v.block > 256*mib || v.block&(v.block-1) != 0 {
		return vdio.Errorf(v.name, format, off, "block size %d is not a power of two from 1 to 256 MiB", v.block)
	}
	if logical != 512 && logical != 4096 {
		return vdio.Errorf(v.name, format, off, "logical sector size %d is neither 512 nor 4096", logical)
	}
	if v.size < 0 || v.size > MaxSize || v.size%logical != 0 {
		return vdio.Errorf(v.name, format, off, "virtual disk size %d is absurd or not a multiple of the sector size", v.size)
	}
	v.ratio = (1 << 23) * logical / v.block
	return nil
}

// Size returns the virtual size.
func (v *Reader) Size() int64 { return v.size }

func (v *Reader) lookup(off int64) (int64, int64) {
	bi := off / v.block
	rest := (bi+1)*v.block - off
	if v.bat[bi] == 0 {
		return -1, rest
	}
	return int64(v.bat[bi]) + off%v.block, rest
}

// ReadAt reads the virtual disk.
func (v *Reader) ReadAt(p []byte, off int64) (int, error) {
	return vdio.ReadMapped(v.r, v.fileSize, v.size, v.lookup, v.name, format, p, off)
}

// Data implements extent.Map.
func (v *Reader) Data(off, n int64) ([]extent.Range, error) {
	return vdio.DataMapped(v.size, v.lookup, off, n)
}

// Writer writes a dynamic VHDX from a disk that arrives in order.
type Writer struct {
	f        vdio.File
	size     int64
	block    int64
	ratio    int64
	bat      []uint64
	batOff   int64
	batLen   int64
	next     int64
	out      *vdio.Appender
	units    *vdio.Units
	finished bool
}

// BlockSize returns the block size the writer uses for a disk: larger
// blocks for larger disks keep the BAT small, as Hyper-V and QEMU do.
func BlockSize(size int64) int64 {
	switch {
	case size > 100<<30:
		return 32 * mib
	case size > 1<<30:
		return 16 * mib
	}
	return 8 * mib
}

// NewWriter starts a dynamic VHDX of size bytes (a multiple of 512) in f.
func NewWriter(f vdio.File, size int64) (*Writer, error) {
	if size < 0 || size > MaxSize || size%512 != 0 {
		return nil, fmt.Errorf("vhdx: virtual size %d must be a multiple of 512 up to 64 TiB", size)
	}
	w := &Writer{f: f, size: size, block: BlockSize(size)}
	w.ratio = (1 << 23) * 512 / w.block
	blocks := (size + w.block - 1) / w.block
	total := int64(0)
	if blocks > 0 {
		total = blocks + (blocks-1)/w.ratio
	}
	w.bat = make([]uint64, total)
	w.batOff = 3 * mib
	w.batLen = max(mib, (total*8+mib-1)/mib*mib)
	w.next = w.batOff + w.batLen
	w.out = vdio.NewAppender(f, vdio.AppendBuffer)
	w.units = vdio.NewUnits(w.block, size, w.out, w.alloc)
	return w, nil
}

func (w *Writer) alloc(i int64) (int64, error) {
	host := w.next
	w.next += w.block
	w.bat[i+i/w.ratio] = stateFull | uint64(host/mib)<<20
	return host, nil
}

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *Writer) DataBytes() int64 { return w.units.Data }

func randGUID() []byte {
	g := make([]byte, 16)
	rand.Read(g)
	g[7] = g[7]&0x0f | 0x40 // version 4 (Data3 is little-endian)
	g[8] = g[8]&0x3f | 0x80
	return g
}

// Close writes the BAT, metadata, region tables and headers.
func (w *Writer) Close() error {
	if w.finished {
		return nil
	}
	w.finished = true
	head := make([]byte, 3*mib)
	// File type identifier.
	copy(head, "vhdxfile")
	for i, c := range utf16.Encode([]rune("sauve")) {
		vdio.LE.PutUint16(head[8+2*i:], c)
	}
	// Headers.
	fw, dw := randGUID(), randGUID()
	for k, off := range []int{64 * kib, 128 * kib} {
		h := head[off : off+4*kib]
		copy(h, "head")
		vdio.LE.PutUint64(h[8:], uint64(k))
		copy(h[16:], fw)
		copy(h[32:], dw)
		vdio.LE.PutUint16(h[64:], 0)
		vdio.LE.PutUint16(h[66:], 1)
		vdio.LE.PutUint32(h[68:], mib)
		vdio.LE.PutUint64(h[72:], mib)
		vdio.LE.PutUint32(h[4:], crc(h, 4))
	}
	// Region tables.
	for _, off := range []int{192 * kib, 256 * kib} {
		t := head[off : off+64*kib]
		copy(t, "regi")
		vdio.LE.PutUint32(t[8:], 2)
		copy(t[16:], guidBAT[:])
		vdio.LE.PutUint64(t[32:], uint64(w.batOff))
		vdio.LE.PutUint32(t[40:], uint32(w.batLen))
		vdio.LE.PutUint32(t[44:], 1)
		copy(t[48:], guidMetadata[:])
		vdio.LE.PutUint64(t[64:], 2*mib)
		vdio.LE.PutUint32(t[72:], mib)
		vdio.LE.PutUint32(t[76:], 1)
		vdio.LE.PutUint32(t[4:], crc(t, 4))
	}
	// Metadata region at 2 MiB: table, then items from 64 KiB.
	m := head[2*mib : 3*mib]
	copy(m, "metadata")
	type it struct {
		g     [16]byte
		data  []byte
		flags uint32
	}
	fp := make([]byte, 8)
	vdio.LE.PutUint32(fp, uint32(w.block))
	ds := make([]byte, 8)
	vdio.LE.PutUint64(ds, uint64(w.size))
	ls, ps := make([]byte, 4), make([]byte, 4)
	vdio.LE.PutUint32(ls, 512)
	vdio.LE.PutUint32(ps, 4096)
	items := []it{
		{guidFileParams, fp, 4},
		{guidDiskSize, ds, 6},
		{guidPage83, randGUID(), 6},
		{guidLogical, ls, 6},
		{guidPhysical, ps, 6},
	}
	vdio.LE.PutUint16(m[10:], uint16(len(items)))
	pos := 64 * kib
	for i, x := range items {
		e := m[32+32*i:]
		copy(e, x.g[:])
		vdio.LE.PutUint32(e[16:], uint32(pos))
		vdio.LE.PutUint32(e[20:], uint32(len(x.data)))
		vdio.LE.PutUint32(e[24:], x.flags)
		copy(m[pos:], x.data)
		pos += 8 * ((len(x.data) + 7) / 8)
	}
	bat := make([]byte, len(w.bat)*8)
	for i, e := range w.bat {
		vdio.LE.PutUint64(bat[8*i:], e)
	}
	if err := w.out.WriteAt(bat, w.batOff); err != nil {
		return err
	}
	// The head is written in pieces so that the empty log stays a hole.
	for _, r := range [][2]int{{0, 320 * kib}, {2 * mib, 2*mib + pos}} {
		if err := w.out.WriteAt(head[r[0]:r[1]], int64(r[0])); err != nil {
			return err
		}
	}
	if err := w.out.Flush(); err != nil {
		return err
	}
	return w.f.Truncate(w.next)
}
