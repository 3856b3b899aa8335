// Package vmdk reads and writes VMware hosted sparse extents, as specified
// in VMware's "Virtual Disk Format 1.1" (VMware Technical Note,
// "Virtual Disk Format 5.0"): monolithicSparse disks (one file: header,
// embedded descriptor, redundant and primary grain directories and tables,
// grains) and streamOptimized disks (deflate-compressed grains with
// markers, grain tables and directory written after the grains, a footer
// at the end), the format OVF packages carry.
//
// Writers take the disk in order and leave grains of zeros unallocated:
// the monolithicSparse writer preallocates grain tables as VMware and QEMU
// do (tables that stay empty are never written, so they are holes of the
// file); the streamOptimized writer needs only an io.Writer, so it can
// stream into an OVA archive while a digest is computed.
//
// The Updater (update.go) changes a monolithicSparse disk in place, at
// random offsets, for sauve migrate: new grains and grain tables go at
// the end of the file, and Sync keeps the disk valid through a crash.
//
// The reader handles both, with zeroed-grain entries and compressed
// grains. Descriptor files that point to separate extent files
// (monolithicFlat, twoGbMaxExtent*, ESXi's vmfs) are read by
// OpenDescriptor; delta disks with a parent, ESX sparse and SE sparse
// extents are refused with an error saying so.
//
// Written from the specification: no maintained Go library writes these.
package vmdk

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/klauspost/compress/zlib"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

const (
	format      = "vmdk"
	magic       = 0x564d444b // "KDMV"
	sector      = 512
	gdAtEnd     = ^uint64(0)
	flagNL      = 1 << 0
	flagRGD     = 1 << 1
	flagZeroGTE = 1 << 2
	flagComp    = 1 << 16
	flagMarkers = 1 << 17

	markerEOS    = 0
	markerGT     = 1
	markerGD     = 2
	markerFooter = 3

	// GrainSectors is the grain size of written images (64 KiB).
	GrainSectors = 128
	gtEntries    = 512
)

// Magic reports whether b starts with a sparse extent header.
func Magic(b []byte) bool { return len(b) >= 4 && vdio.LE.Uint32(b) == magic }

// IsDescriptor reports whether b starts like a text descriptor file.
func IsDescriptor(b []byte) bool {
	s := string(b[:min(len(b), 64)])
	return strings.HasPrefix(s, "# Disk DescriptorFile") || strings.HasPrefix(s, "#Disk DescriptorFile")
}

type header struct {
	version, flags          uint32
	capacity, grain         uint64
	descOff, descSize       uint64
	gtes                    uint32
	rgdOff, gdOff, overhead uint64
	compress                uint16
}

func parseHeader(b []byte) header {
	return header{
		version: vdio.LE.Uint32(b[4:]), flags: vdio.LE.Uint32(b[8:]),
		capacity: vdio.LE.Uint64(b[12:]), grain: vdio.LE.Uint64(b[20:]),
		descOff: vdio.LE.Uint64(b[28:]), descSize: vdio.LE.Uint64(b[36:]),
		gtes: vdio.LE.Uint32(b[44:]), rgdOff: vdio.LE.Uint64(b[48:]), gdOff: vdio.LE.Uint64(b[56:]),
		overhead: vdio.LE.Uint64(b[64:]), compress: vdio.LE.Uint16(b[77:]),
	}
}

func (h header) put(b []byte) {
	vdio.LE.PutUint32(b[0:], magic)
	vdio.LE.PutUint32(b[4:], h.version)
	vdio.LE.PutUint32(b[8:], h.flags)
	vdio.LE.PutUint64(b[12:], h.capacity)
	vdio.LE.PutUint64(b[20:], h.grain)
	vdio.LE.PutUint64(b[28:], h.descOff)
	vdio.LE.PutUint64(b[36:], h.descSize)
	vdio.LE.PutUint32(b[44:], h.gtes)
	vdio.LE.PutUint64(b[48:], h.rgdOff)
	vdio.LE.PutUint64(b[56:], h.gdOff)
	vdio.LE.PutUint64(b[64:], h.overhead)
	b[72] = 0 // uncleanShutdown
	b[73], b[74], b[75], b[76] = '\n', ' ', '\r', '\n'
	vdio.LE.PutUint16(b[77:], h.compress)
}

// Reader is an open sparse extent. It is safe for concurrent use.
type Reader struct {
	r        io.ReaderAt
	name     string
	fileSize int64
	h        header
	size     int64
	grain    int64 // bytes
	gd       []uint32
	zeroGTE  bool
	comp     bool
	markers  bool
	// CreateType is the descriptor's createType, if found.
	CreateType string

	mu    sync.Mutex
	cache map[uint32][]byte // grain tables by sector
}

// Open reads the header, descriptor and grain directory of a sparse
// extent.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	var b [sector]byte
	r.ReadAt(b[:min(size, sector)], 0)
	if IsDescriptor(b[:]) {
		return nil, descriptorError(r, size, name)
	}
	if err := vdio.ReadFull(r, size, b[:], 0, name, format, "header"); err != nil {
		return nil, err
	}
	if vdio.LE.Uint32(b[:]) != magic {
		return nil, vdio.Errorf(name, format, 0, "no sparse extent magic")
	}
	h := parseHeader(b[:])
	if h.version < 1 || h.version > 3 {
		return nil, vdio.Errorf(name, format, 4, "unknown version %d", h.version)
	}
	v := &Reader{r: r, name: name, fileSize: size, cache: map[uint32][]byte{}}
	if h.gdOff == gdAtEnd {
		// streamOptimized: the real header is the footer before the
		// end-of-stream marker.
		fo := size - 2*sector
		if fo < sector {
			return nil, vdio.Errorf(name, format, 56, "grain directory at end, but no footer")
		}
		if err := vdio.ReadFull(r, size, b[:], fo, name, format, "footer"); err != nil {
			return nil, err
		}
		if vdio.LE.Uint32(b[:]) != magic {
			return nil, vdio.Errorf(name, format, fo, "footer has no sparse extent magic (file truncated?)")
		}
		h = parseHeader(b[:])
		if h.gdOff == gdAtEnd {
			return nil, vdio.Errorf(name, format, fo+56, "footer does not locate the grain directory")
		}
	}
	v.h = h
	// VMware and QEMU write 128-sector grains; a compressed grain is
	// inflated into a buffer of this size, so it is bounded (1 MiB).
	if h.grain < 1 || h.grain > 2048 || h.grain&(h.grain-1) != 0 {
		return nil, vdio.Errorf(name, format, 20, "grain size %d sectors is not a power of two up to 2048", h.grain)
	}
	if h.gtes < 1 || h.gtes > 4096 {
		return nil, vdio.Errorf(name, format, 44, "%d entries per grain table out of range", h.gtes)
	}
	if h.capacity > vdio.MaxVirtualSize/sector {
		return nil, vdio.Errorf(name, format, 12, "capacity of %d sectors is absurd", h.capacity)
	}
	v.size = int64(h.capacity) * sector
	v.grain = int64(h.grain) * sector
	v.zeroGTE = h.flags&flagZeroGTE != 0
	v.comp = h.flags&flagComp != 0
	v.markers = h.flags&flagMarkers != 0
	if v.comp && h.compress != 1 {
		return nil, vdio.Unsupported(name, format, 77, "compression algorithm %d", h.compress)
	}
	if err := v.readDescriptor(); err != nil {
		return nil, err
	}
	perGT := int64(h.gtes) * v.grain
	n := (v.size + perGT - 1) / perGT
	gdOff := int64(h.gdOff) * sector
	if h.gdOff > uint64(size) || n*4 > size || gdOff > size-n*4 {
		return nil, vdio.Errorf(name, format, 56, "grain directory at %d (%d entries) lies past the end of the file (%d bytes)", gdOff, n, size)
	}
	gd := make([]byte, n*4)
	if err := vdio.ReadFull(r, size, gd, gdOff, name, format, "grain directory"); err != nil {
		return nil, err
	}
	v.gd = make([]uint32, n)
	for i := range v.gd {
		v.gd[i] = vdio.LE.Uint32(gd[4*i:])
	}
	return v, nil
}

func (v *Reader) readDescriptor() error {
	if v.h.descOff == 0 || v.h.descSize == 0 {
		return nil
	}
	if v.h.descSize > 2048 || v.h.descOff > uint64(v.fileSize) {
		return vdio.Errorf(v.name, format, 28, "embedded descriptor of %d sectors at sector %d out of bounds", v.h.descSize, v.h.descOff)
	}
	d := make([]byte, v.h.descSize*sector)
	if err := vdio.ReadFull(v.r, v.fileSize, d, int64(v.h.descOff)*sector, v.name, format, "embedded descriptor"); err != nil {
		return err
	}
	if i := bytes.IndexByte(d, 0); i >= 0 {
		d = d[:i]
	}
	for _, line := range strings.Split(string(d), "\n") {
		k, val, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		k, val = strings.TrimSpace(k), strings.Trim(strings.TrimSpace(val), `"`)
		switch k {
		case "createType":
			v.CreateType = val
		case "parentCID":
			if val != "" && !strings.EqualFold(val, "ffffffff") {
				return vdio.Unsupported(v.name, format, int64(v.h.descOff)*sector, "delta disk with a parent (parentCID=%s): convert the whole chain with 'qemu-img convert' first", val)
			}
		}
	}
	return nil
}

func descriptorError(r io.ReaderAt, size int64, name string) error {
	b := make([]byte, min(size, 4096))
	n, _ := r.ReadAt(b, 0)
	ct := "?"
	for _, line := range strings.Split(string(b[:n]), "\n") {
		if k, val, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "createType" {
			ct = strings.Trim(strings.TrimSpace(val), `"`)
		}
	}
	return vdio.Unsupported(name, format, 0, "descriptor file (createType %s) with separate extent files: open it with OpenDescriptor", ct)
}

// Size returns the virtual size.
func (v *Reader) Size() int64 { return v.size }

// Compressed reports a streamOptimized (compressed) extent.
func (v *Reader) Compressed() bool { return v.comp }

func (v *Reader) gt(i int64) ([]byte, error) {
	s := v.gd[i]
	if s == 0 {
		return nil, nil
	}
	v.mu.Lock()
	t, ok := v.cache[s]
	v.mu.Unlock()
	if ok {
		return t, nil
	}
	t = make([]byte, int64(v.h.gtes)*4)
	if err := vdio.ReadFull(v.r, v.fileSize, t, int64(s)*sector, v.name, format, fmt.Sprintf("grain table %d", i)); err != nil {
		return nil, err
	}
	v.mu.Lock()
	if int64(len(v.cache)+1)*int64(v.h.gtes)*4 > 16<<20 {
		clear(v.cache)
	}
	v.cache[s] = t
	v.mu.Unlock()
	return t, nil
}

// lookup returns the grain table entry for the grain holding off, and how
// many bytes from off to the end of that grain (or of an empty table's
// range).
func (v *Reader) lookup(off int64) (gte uint32, n int64, err error) {
	gi := off / v.grain
	ti := gi / int64(v.h.gtes)
	t, err := v.gt(ti)
	if err != nil {
		return 0, 0, err
	}
	if t == nil {
		return 0, (ti+1)*int64(v.h.gtes)*v.grain - off, nil
	}
	return vdio.LE.Uint32(t[(gi%int64(v.h.gtes))*4:]), (gi+1)*v.grain - off, nil
}

func (v *Reader) isData(gte uint32) bool { return gte > 1 || (gte == 1 && !v.zeroGTE) }

// ReadAt reads the virtual disk.
func (v *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset", v.name)
	}
	if off >= v.size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := v.size - off; int64(len(p)) > rest {
		p = p[:rest]
	}
	done := 0
	for len(p) > 0 {
		gte, n, err := v.lookup(off)
		if err != nil {
			return done, err
		}
		n = min(n, int64(len(p)))
		switch {
		case !v.isData(gte):
			clear(p[:n])
		case v.comp:
			g, err := v.grainData(gte, off)
			if err != nil {
				return done, err
			}
			copy(p[:n], g[off%v.grain:])
		default:
			host := int64(gte)*sector + off%v.grain
			// Extend over grains that follow in the file.
			for n < int64(len(p)) {
				g2, n2, err := v.lookup(off + n)
				if err != nil || !v.isData(g2) || int64(g2)*sector != host+n {
					break
				}
				n = min(n+n2, int64(len(p)))
			}
			if err := vdio.ReadFull(v.r, v.fileSize, p[:n], host, v.name, format, fmt.Sprintf("grain for virtual offset %d", off)); err != nil {
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

// grainData reads and inflates a compressed grain.
func (v *Reader) grainData(gte uint32, voff int64) ([]byte, error) {
	pos := int64(gte) * sector
	var data []byte
	if v.markers {
		var m [12]byte
		if err := vdio.ReadFull(v.r, v.fileSize, m[:], pos, v.name, format, "grain marker"); err != nil {
			return nil, err
		}
		lba := int64(vdio.LE.Uint64(m[:]))
		sz := int64(vdio.LE.Uint32(m[8:]))
		if lba != voff/v.grain*(v.grain/sector) {
			return nil, vdio.Errorf(v.name, format, pos, "grain marker says sector %d, grain table says %d", lba, voff/v.grain*(v.grain/sector))
		}
		if sz == 0 || sz > 2*v.grain+4096 {
			return nil, vdio.Errorf(v.name, format, pos+8, "compressed grain of %d bytes out of range", sz)
		}
		data = make([]byte, sz)
		if err := vdio.ReadFull(v.r, v.fileSize, data, pos+12, v.name, format, "compressed grain"); err != nil {
			return nil, err
		}
	} else {
		n := min(2*v.grain+4096, v.fileSize-pos)
		if n <= 0 {
			return nil, vdio.Errorf(v.name, format, pos, "compressed grain lies past the end of the file")
		}
		data = make([]byte, n)
		if err := vdio.ReadFull(v.r, v.fileSize, data, pos, v.name, format, "compressed grain"); err != nil {
			return nil, err
		}
	}
	zr, err := zlib.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, vdio.Wrap(v.name, format, pos, err, "inflate grain for virtual offset %d", voff)
	}
	out := make([]byte, v.grain)
	// The last grain of a disk may be shorter.
	got, err := io.ReadFull(zr, out)
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		err = nil
	}
	if err != nil {
		return nil, vdio.Wrap(v.name, format, pos, err, "inflate grain for virtual offset %d", voff)
	}
	clear(out[got:])
	return out, nil
}

// Data implements extent.Map.
func (v *Reader) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := min(off+n, v.size)
	for off < end {
		gte, k, err := v.lookup(off)
		if err != nil {
			return nil, err
		}
		k = min(k, end-off)
		if v.isData(gte) {
			out = vdio.AddRange(out, off, off+k)
		}
		off += k
	}
	return out, nil
}
