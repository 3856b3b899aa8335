// Package qcow2 reads and writes QEMU's qcow2 disk images, as specified
// in QEMU's docs/interop/qcow2.txt ("The QCOW2 Image Format").
//
// The writer makes version 3 images (compat=1.1) with 64 KiB clusters and
// 16-bit refcounts, in one sequential pass: data clusters are appended in
// virtual order, each L2 table after the data it maps, and the L1 table,
// refcount table and blocks and the header are written when the disk is
// complete, so memory holds one L2 table and the L1 table whatever the
// disk's size. Clusters of zeros are left unallocated.
//
// The Updater (update.go) changes a version 3 image in place, at random
// offsets, for sauve migrate: clusters and tables are allocated at the
// end of the file, refcounts kept, and Sync keeps the image valid
// through a crash (leaked clusters at worst).
//
// The reader handles versions 2 and 3: standard, zero, compressed
// (deflate and zstd) clusters, extended L2 entries (subclusters) and
// backing files (OpenWithBacking; the caller opens the backing file). It
// refuses, with an error saying so, external data files, encryption and
// images marked corrupt. It reads the active L1 table and
// ignores internal snapshots.
//
// No maintained Go library reads and writes qcow2 with the checks and the
// streaming layout sauve needs, so this is written from the specification.
package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

const (
	format = "qcow2"
	magic  = 0x514649fb // "QFI\xfb"

	flagCopied     = uint64(1) << 63
	flagCompressed = uint64(1) << 62
	flagZero       = uint64(1) // standard cluster reads as zeros (v3)
	offsetMask     = uint64(0x00fffffffffffe00)

	incDirty      = 1 << 0
	incCorrupt    = 1 << 1
	incDataFile   = 1 << 2
	incCompType   = 1 << 3
	incExtendedL2 = 1 << 4
	incKnown      = incDirty | incCorrupt | incDataFile | incCompType | incExtendedL2

	// ClusterBits of the images the writer makes.
	ClusterBits = 16
)

// Magic reports whether b starts like a qcow image (any version).
func Magic(b []byte) bool { return len(b) >= 4 && vdio.BE.Uint32(b) == magic }

// Reader is an open qcow2 image. It is safe for concurrent use.
type Reader struct {
	r          io.ReaderAt
	name       string
	fileSize   int64
	size       int64
	version    uint32
	clusterBit uint
	cluster    int64
	l2Entries  int64 // entries per L2 table
	entrySize  int64 // 8, or 16 with extended L2
	l1         []uint64
	zstd       bool
	backing    Backing
	// BackingFile is the backing file's name as the header records it.
	BackingFile string

	mu    sync.Mutex
	cache map[uint64][]byte // L2 tables by file offset
	dec   *zstd.Decoder
	// The last compressed cluster, as sequential reads take it in
	// pieces.
	lastDesc uint64
	lastData []byte
}

// maxCache bounds the memory of cached L2 tables.
const maxCache = 32 << 20

// Backing is the image an overlay's unallocated clusters come from.
type Backing interface {
	io.ReaderAt
	Data(off, n int64) ([]extent.Range, error)
	Size() int64
}

// BackingOpener opens an overlay's backing file, named as the overlay
// names it, with the format its header records ("" when it records none).
type BackingOpener func(file, format string) (Backing, error)

// Open reads the header and L1 table of the qcow2 image in r (size bytes,
// called name in errors). An image with a backing file is refused.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	return OpenWithBacking(r, size, name, nil)
}

// OpenWithBacking is Open for images that may have a backing file, which
// open opens: the clusters the overlay does not allocate are read from it.
func OpenWithBacking(r io.ReaderAt, size int64, name string, open BackingOpener) (*Reader, error) {
	var h [112]byte
	if size < 72 {
		return nil, vdio.Errorf(name, format, 0, "file of %d bytes is too small for a header", size)
	}
	if err := vdio.ReadFull(r, size, h[:72], 0, name, format, "header"); err != nil {
		return nil, err
	}
	if vdio.BE.Uint32(h[0:]) != magic {
		return nil, vdio.Errorf(name, format, 0, "no qcow2 magic")
	}
	q := &Reader{r: r, name: name, fileSize: size, cache: map[uint64][]byte{}}
	q.version = vdio.BE.Uint32(h[4:])
	if q.version != 2 && q.version != 3 {
		if q.version == 1 {
			return nil, vdio.Unsupported(name, format, 4, "qcow version 1 images are not supported: convert with 'qemu-img convert -O qcow2'")
		}
		return nil, vdio.Errorf(name, format, 4, "unknown version %d", q.version)
	}
	backingOff, backingLen := vdio.BE.Uint64(h[8:]), vdio.BE.Uint32(h[16:])
	q.clusterBit = uint(vdio.BE.Uint32(h[20:]))
	if q.clusterBit < 9 || q.clusterBit > 21 {
		return nil, vdio.Errorf(name, format, 20, "cluster_bits %d out of range 9..21", q.clusterBit)
	}
	q.cluster = 1 << q.clusterBit
	q.size = int64(vdio.BE.Uint64(h[24:]))
	if q.size < 0 || q.size > vdio.MaxVirtualSize {
		return nil, vdio.Errorf(name, format, 24, "virtual size %d is absurd", uint64(q.size))
	}
	if m := vdio.BE.Uint32(h[32:]); m != 0 {
		return nil, vdio.Unsupported(name, format, 32, "encrypted images (method %d) are not supported", m)
	}
	l1Size := int64(vdio.BE.Uint32(h[36:]))
	l1Off := int64(vdio.BE.Uint64(h[40:]))
	q.entrySize = 8
	hdrLen := int64(72)
	if q.version == 3 {
		if err := vdio.ReadFull(r, size, h[72:104], 72, name, format, "version 3 header"); err != nil {
			return nil, err
		}
		inc := vdio.BE.Uint64(h[72:])
		if inc&^incKnown != 0 {
			return nil, vdio.Unsupported(name, format, 72, "unknown incompatible features %#x", inc&^incKnown)
		}
		if inc&incCorrupt != 0 {
			return nil, vdio.Errorf(name, format, 72, "image is marked corrupt: repair it with 'qemu-img check -r all' first")
		}
		if inc&incDataFile != 0 {
			return nil, vdio.Unsupported(name, format, 72, "images with an external data file are not supported")
		}
		if inc&incExtendedL2 != 0 {
			q.entrySize = 16
			if q.clusterBit < 14 {
				return nil, vdio.Errorf(name, format, 20, "extended L2 entries need clusters of at least 16 KiB, not %d", q.cluster)
			}
		}
		if ro := vdio.BE.Uint32(h[96:]); ro > 6 {
			return nil, vdio.Errorf(name, format, 96, "refcount_order %d out of range", ro)
		}
		hdrLen = int64(vdio.BE.Uint32(h[100:]))
		if hdrLen < 104 || hdrLen > q.cluster {
			return nil, vdio.Errorf(name, format, 100, "header_length %d out of range", hdrLen)
		}
		if inc&incCompType != 0 {
			if hdrLen < 105 {
				return nil, vdio.Errorf(name, format, 100, "compression type flagged but header_length is %d", hdrLen)
			}
			if err := vdio.ReadFull(r, size, h[104:105], 104, name, format, "compression type"); err != nil {
				return nil, err
			}
			switch h[104] {
			case 0:
			case 1:
				q.zstd = true
			default:
				return nil, vdio.Unsupported(name, format, 104, "compression type %d", h[104])
			}
		}
	}
	if backingOff != 0 || backingLen != 0 {
		if backingLen == 0 || backingLen > 1023 {
			return nil, vdio.Errorf(name, format, 16, "backing file name of %d bytes (1 to 1023)", backingLen)
		}
		b := make([]byte, backingLen)
		if err := vdio.ReadFull(r, size, b, int64(backingOff), name, format, "backing file name"); err != nil {
			return nil, err
		}
		q.BackingFile = string(b)
		if open == nil {
			return nil, vdio.Unsupported(name, format, 8, "image has a backing file %q: flatten it first ('qemu-img convert -O qcow2 %s flat.qcow2')", q.BackingFile, name)
		}
		bf, err := q.backingFormat(hdrLen)
		if err != nil {
			return nil, err
		}
		if q.backing, err = open(q.BackingFile, bf); err != nil {
			return nil, vdio.Wrap(name, format, int64(backingOff), err, "backing file %q", q.BackingFile)
		}
	}
	q.l2Entries = q.cluster / q.entrySize
	per := q.cluster * q.l2Entries
	need := (q.size + per - 1) / per
	if l1Size < need {
		return nil, vdio.Errorf(name, format, 36, "L1 table of %d entries is too small for a virtual size of %d (needs %d)", l1Size, q.size, need)
	}
	if l1Off%q.cluster != 0 {
		return nil, vdio.Errorf(name, format, 40, "L1 table offset %d is not cluster-aligned", l1Off)
	}
	b := make([]byte, 0)
	if need > 0 {
		if l1Off < 0 || need*8 > size || l1Off > size-need*8 {
			return nil, vdio.Errorf(name, format, 40, "L1 table at %d (%d entries) lies past the end of the file (%d bytes)", l1Off, need, size)
		}
		b = make([]byte, need*8)
		if err := vdio.ReadFull(r, size, b, l1Off, name, format, "L1 table"); err != nil {
			return nil, err
		}
	}
	q.l1 = make([]uint64, need)
	for i := range q.l1 {
		e := vdio.BE.Uint64(b[8*i:])
		if e&offsetMask != 0 && (e&offsetMask)%uint64(q.cluster) != 0 {
			return nil, vdio.Errorf(name, format, l1Off+int64(8*i), "L1 entry %d points to unaligned offset %d", i, e&offsetMask)
		}
		q.l1[i] = e & offsetMask
	}
	return q, nil
}

// backingFormat returns the backing file's format from the header
// extensions that follow the header in the first cluster.
func (q *Reader) backingFormat(hdrLen int64) (string, error) {
	if q.version < 3 {
		hdrLen = 72
	}
	end := min(q.cluster, q.fileSize)
	for off := hdrLen; off+8 <= end; {
		var h [8]byte
		if err := vdio.ReadFull(q.r, q.fileSize, h[:], off, q.name, format, "header extension"); err != nil {
			return "", err
		}
		typ, n := vdio.BE.Uint32(h[:]), int64(vdio.BE.Uint32(h[4:]))
		if typ == 0 {
			break
		}
		if n > end-off-8 {
			return "", vdio.Errorf(q.name, format, off, "header extension of %d bytes runs past the first cluster", n)
		}
		if typ == 0xe2792aca {
			b := make([]byte, n)
			if err := vdio.ReadFull(q.r, q.fileSize, b, off+8, q.name, format, "backing format"); err != nil {
				return "", err
			}
			return string(b), nil
		}
		off += 8 + (n+7)/8*8
	}
	return "", nil
}

// Size returns the virtual size.
func (q *Reader) Size() int64 { return q.size }

// Version returns the qcow2 version (2 or 3).
func (q *Reader) Version() int { return int(q.version) }

// l2 returns the L2 table for L1 index i, nil if unallocated.
func (q *Reader) l2(i int64) ([]byte, error) {
	off := q.l1[i]
	if off == 0 {
		return nil, nil
	}
	q.mu.Lock()
	t, ok := q.cache[off]
	q.mu.Unlock()
	if ok {
		return t, nil
	}
	t = make([]byte, q.cluster)
	if err := vdio.ReadFull(q.r, q.fileSize, t, int64(off), q.name, format, fmt.Sprintf("L2 table %d", i)); err != nil {
		return nil, err
	}
	q.mu.Lock()
	if int64(len(q.cache)+1)*q.cluster > maxCache {
		clear(q.cache)
	}
	q.cache[off] = t
	q.mu.Unlock()
	return t, nil
}

// kind of a piece of virtual disk
const (
	kUnalloc = iota
	kZero
	kData
	kCompressed
)

// mapping describes the run of the disk at a virtual offset within one
// cluster (or subcluster).
type mapping struct {
	kind int
	host int64 // data: file offset of the first byte; compressed: descriptor
	n    int64 // bytes from the offset to the end of the run
	desc uint64
}

// lookup maps virtual offset off (< size).
func (q *Reader) lookup(off int64) (mapping, error) {
	ci := off >> q.clusterBit
	l1i, l2i := ci/q.l2Entries, ci%q.l2Entries
	inCluster := off & (q.cluster - 1)
	clusterRest := q.cluster - inCluster
	t, err := q.l2(l1i)
	if err != nil {
		return mapping{}, err
	}
	if t == nil {
		// The whole L2 range is unallocated.
		rest := (l1i+1)*q.l2Entries*q.cluster - off
		return mapping{kind: kUnalloc, n: rest}, nil
	}
	e := vdio.BE.Uint64(t[l2i*q.entrySize:])
	entryOff := int64(q.l1[l1i]) + l2i*q.entrySize
	if e&flagCompressed != 0 {
		if q.entrySize == 16 && vdio.BE.Uint64(t[l2i*q.entrySize+8:]) != 0 {
			return mapping{}, vdio.Errorf(q.name, format, entryOff, "compressed cluster with a non-zero subcluster bitmap")
		}
		return mapping{kind: kCompressed, desc: e &^ (flagCompressed | flagCopied), n: clusterRest}, nil
	}
	host := int64(e & offsetMask)
	if host != 0 && host%q.cluster != 0 {
		return mapping{}, vdio.Errorf(q.name, format, entryOff, "L2 entry points to unaligned offset %d", host)
	}
	if q.entrySize == 16 {
		bm := vdio.BE.Uint64(t[l2i*q.entrySize+8:])
		alloc, zero := uint32(bm), uint32(bm>>32)
		if alloc&zero != 0 {
			return mapping{}, vdio.Errorf(q.name, format, entryOff+8, "subcluster both allocated and zero")
		}
		sub := q.cluster / 32
		si := inCluster / sub
		subRest := sub - inCluster%sub
		bit := uint32(1) << si
		switch {
		case alloc&bit != 0:
			if host == 0 {
				return mapping{}, vdio.Errorf(q.name, format, entryOff, "allocated subcluster in a cluster without an offset")
			}
			return mapping{kind: kData, host: host + inCluster, n: subRest}, nil
		case zero&bit != 0:
			return mapping{kind: kZero, n: subRest}, nil
		}
		return mapping{kind: kUnalloc, n: subRest}, nil
	}
	if e&flagZero != 0 && q.version == 3 {
		return mapping{kind: kZero, n: clusterRest}, nil
	}
	if host == 0 {
		return mapping{kind: kUnalloc, n: clusterRest}, nil
	}
	return mapping{kind: kData, host: host + inCluster, n: clusterRest}, nil
}

// ReadAt reads the virtual disk.
func (q *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset", q.name)
	}
	want := len(p)
	if off >= q.size {
		return 0, io.EOF
	}
	if rest := q.size - off; int64(len(p)) > rest {
		p = p[:rest]
	}
	done := 0
	for len(p) > 0 {
		e, err := q.lookup(off)
		if err != nil {
			return done, err
		}
		n := min(e.n, int64(len(p)))
		switch e.kind {
		case kUnalloc:
			if err := q.readBacking(p[:n], off); err != nil {
				return done, err
			}
		case kZero:
			clear(p[:n])
		case kData:
			// Extend the read over clusters that follow in the file.
			for n < int64(len(p)) {
				e2, err := q.lookup(off + n)
				if err != nil || e2.kind != kData || e2.host != e.host+n {
					break
				}
				n = min(n+e2.n, int64(len(p)))
			}
			if err := vdio.ReadFull(q.r, q.fileSize, p[:n], e.host, q.name, format, fmt.Sprintf("data for virtual offset %d", off)); err != nil {
				return done, err
			}
		case kCompressed:
			c, err := q.decompress(e.desc, off)
			if err != nil {
				return done, err
			}
			in := off & (q.cluster - 1)
			copy(p[:n], c[in:])
		}
		p, off, done = p[n:], off+n, done+int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// readBacking reads what the overlay does not allocate: the backing
// file's data, zeros past its end or without one.
func (q *Reader) readBacking(p []byte, off int64) error {
	clear(p)
	if q.backing == nil || off >= q.backing.Size() {
		return nil
	}
	n := min(int64(len(p)), q.backing.Size()-off)
	if k, err := q.backing.ReadAt(p[:n], off); int64(k) < n {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%s: backing file %s at offset %d: %w", q.name, q.BackingFile, off, err)
	}
	return nil
}

// decompress returns the cluster described by a compressed L2 entry.
func (q *Reader) decompress(desc uint64, voff int64) ([]byte, error) {
	q.mu.Lock()
	if q.lastData != nil && q.lastDesc == desc {
		d := q.lastData
		q.mu.Unlock()
		return d, nil
	}
	q.mu.Unlock()
	x := 62 - (q.clusterBit - 8)
	host := int64(desc & (uint64(1)<<x - 1))
	sectors := int64(desc>>x) + 1
	n := sectors*512 - host%512
	if host+n > q.fileSize {
		// The last compressed cluster may end before its last sector.
		n = q.fileSize - host
	}
	if host <= 0 || n <= 0 || n > 2*q.cluster+512 {
		return nil, vdio.Errorf(q.name, format, host, "compressed cluster for virtual offset %d out of bounds", voff)
	}
	in := make([]byte, n)
	if err := vdio.ReadFull(q.r, q.fileSize, in, host, q.name, format, "compressed cluster"); err != nil {
		return nil, err
	}
	out := make([]byte, q.cluster)
	var got int
	var err error
	if q.zstd {
		// A stream decoder: the sectors read hold the frame and then
		// whatever follows it, which DecodeAll would take for a frame.
		q.mu.Lock()
		if q.dec == nil {
			q.dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(4*q.cluster)))
		}
		if err == nil {
			err = q.dec.Reset(bytes.NewReader(in))
		}
		if err == nil {
			got, err = io.ReadFull(q.dec, out)
			if err == io.ErrUnexpectedEOF || err == io.EOF {
				err = fmt.Errorf("%d bytes, less than a cluster", got)
			}
		}
		q.mu.Unlock()
	} else {
		fr := flate.NewReader(bytes.NewReader(in))
		got, err = io.ReadFull(fr, out)
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			err = fmt.Errorf("%d bytes, less than a cluster", got)
		}
	}
	if err == nil && got != len(out) {
		err = fmt.Errorf("%d bytes, not a cluster", got)
	}
	if err != nil {
		return nil, vdio.Wrap(q.name, format, host, err, "decompress cluster for virtual offset %d", voff)
	}
	q.mu.Lock()
	q.lastDesc, q.lastData = desc, out
	q.mu.Unlock()
	return out, nil
}

// Data implements extent.Map: the ranges that hold data (allocated or
// compressed clusters); unallocated and zero clusters are left out.
func (q *Reader) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := min(off+n, q.size)
	for off < end {
		e, err := q.lookup(off)
		if err != nil {
			return nil, err
		}
		k := min(e.n, end-off)
		switch {
		case e.kind == kData || e.kind == kCompressed:
			out = vdio.AddRange(out, off, off+k)
		case e.kind == kUnalloc && q.backing != nil && off < q.backing.Size():
			rs, err := q.backing.Data(off, min(k, q.backing.Size()-off))
			if err != nil {
				return nil, err
			}
			for _, r := range rs {
				out = vdio.AddRange(out, r.Start, r.End)
			}
		}
		off += k
	}
	return out, nil
}
