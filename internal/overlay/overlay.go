// Package overlay keeps the writes made to a read-only disk in a local
// copy-on-write file, so a backed-up disk served over NBD can be booted
// and written to while the repository stays untouched. Reads of blocks
// never written go to the base disk; a block's first write copies it
// (read, patch, write whole) into the file, where every later read and
// write of it goes.
//
// The file is the overlay's own format rather than qcow2: it must hold
// nothing but blocks at fixed places and one bitmap, and survive a crash
// with every flushed write, which is a few pages of code here and a
// qcow2 writer with refcounts and L2 tables otherwise. Its layout (see
// docs/FORMAT.md "NBD write overlays"): a 4 KiB header naming the disk it
// belongs to, then the bitmap of written blocks, then the blocks, each at
// dataOffset + index×blockSize in a sparse file, so the file only takes
// the space of what was written.
//
// Crash safety: Flush syncs the blocks written so far, then the pages of
// the bitmap that changed, then syncs again; a bit reaches the disk only
// after its block did. Writes not flushed may be lost, as on any disk
// with a cache. Bits are only ever set, so a torn bitmap page holds old
// or new bits, both true.
package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/extent"
)

// BlockSize is the unit of copy-on-write: a write into a block not yet
// in the overlay copies the rest of it from the base.
const BlockSize = 64 << 10

const (
	magic      = "SAUVEOVL"
	version    = 1
	headerSize = 4096
	pageSize   = 4096 // of the bitmap, the unit it is written in
	maxIdent   = 1024
	// maxSize bounds the disks an overlay serves: its bitmap, one bit per
	// 64 KiB block, is held in memory, 128 MiB for 64 TiB.
	maxSize = 64 << 40
)

// Base is the read-only disk under an overlay.
type Base interface {
	io.ReaderAt
	// Data returns the ranges of [off, off+n) that hold data.
	Data(off, n int64) ([]extent.Range, error)
}

// Overlay is a writable view of a base disk whose writes go to a file.
// Its methods are safe for concurrent use.
type Overlay struct {
	f     *os.File
	path  string
	base  Base
	size  int64
	nblk  int64
	bits  []atomic.Uint64 // block i written when bit i%64 of bits[i/64] is set
	locks [256]sync.Mutex // serialise the copy-on-write of a block, by index

	mu    sync.Mutex // guards dirty and Flush
	dirty map[int64]bool
}

// Open opens the overlay file at path for the disk identified by ident
// (a snapshot and disk name, say) of size bytes, creating it when it
// does not exist. A file made for another disk or size is refused, as
// is one another process holds.
func Open(path, ident string, size int64, base Base) (*Overlay, error) {
	if len(ident) > maxIdent {
		return nil, fmt.Errorf("overlay %s: identity of %d bytes exceeds %d", path, len(ident), maxIdent)
	}
	if size <= 0 || size > maxSize {
		return nil, fmt.Errorf("overlay %s: disk size %d outside 1 byte to 64 TiB", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open overlay: %w", err)
	}
	o, err := open(f, path, ident, size, base)
	if err != nil {
		f.Close()
		return nil, err
	}
	return o, nil
}

func open(f *os.File, path, ident string, size int64, base Base) (*Overlay, error) {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil, fmt.Errorf("overlay %s is in use by another process: %w", path, err)
	}
	nblk := (size + BlockSize - 1) / BlockSize
	o := &Overlay{f: f, path: path, base: base, size: size, nblk: nblk,
		bits: make([]atomic.Uint64, (nblk+63)/64), dirty: map[int64]bool{}}
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat overlay %s: %w", path, err)
	}
	if fi.Size() == 0 {
		return o, o.create(ident)
	}
	return o, o.load(ident, fi.Size())
}

func (o *Overlay) bitmapLen() int64 { return (o.nblk + 7) / 8 }

// dataOffset is where block 0 starts: after the bitmap, aligned to a
// block so that blocks can be punched out whole.
func (o *Overlay) dataOffset() int64 {
	end := headerSize + o.bitmapLen()
	return (end + BlockSize - 1) / BlockSize * BlockSize
}

func (o *Overlay) fileSize() int64 { return o.dataOffset() + o.nblk*BlockSize }

func (o *Overlay) header(ident string) []byte {
	h := make([]byte, headerSize)
	copy(h, magic)
	le := binary.LittleEndian
	le.PutUint32(h[8:], version)
	le.PutUint32(h[12:], BlockSize)
	le.PutUint64(h[16:], uint64(o.size))
	le.PutUint64(h[24:], headerSize)
	le.PutUint64(h[32:], uint64(o.bitmapLen()))
	le.PutUint64(h[40:], uint64(o.dataOffset()))
	le.PutUint16(h[48:], uint16(len(ident)))
	copy(h[50:], ident)
	le.PutUint32(h[headerSize-4:], crc32.Checksum(h[:headerSize-4], castagnoli))
	return h
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func (o *Overlay) create(ident string) error {
	if err := o.f.Truncate(o.fileSize()); err != nil {
		return fmt.Errorf("size overlay %s: %w", o.path, err)
	}
	if _, err := o.f.WriteAt(o.header(ident), 0); err != nil {
		return fmt.Errorf("write overlay %s's header: %w", o.path, err)
	}
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync overlay %s: %w", o.path, err)
	}
	return nil
}

func (o *Overlay) load(ident string, fileSize int64) error {
	h := make([]byte, headerSize)
	if _, err := o.f.ReadAt(h, 0); err != nil {
		return fmt.Errorf("overlay %s: read its header: %w", o.path, err)
	}
	if string(h[:8]) != magic {
		return fmt.Errorf("overlay %s is not a sauve overlay (no %q at its start)", o.path, magic)
	}
	le := binary.LittleEndian
	if crc32.Checksum(h[:headerSize-4], castagnoli) != le.Uint32(h[headerSize-4:]) {
		return fmt.Errorf("overlay %s: its header is damaged (checksum mismatch)", o.path)
	}
	if v := le.Uint32(h[8:]); v != version {
		return fmt.Errorf("overlay %s: version %d, this sauve reads %d", o.path, v, version)
	}
	n := int(le.Uint16(h[48:]))
	switch {
	case n > maxIdent:
		return fmt.Errorf("overlay %s: identity of %d bytes in its header", o.path, n)
	case string(h[50:50+n]) != ident:
		return fmt.Errorf("overlay %s belongs to %s, not %s", o.path, h[50:50+n], ident)
	case int64(le.Uint64(h[16:])) != o.size:
		return fmt.Errorf("overlay %s is for a disk of %d bytes, not %d", o.path, le.Uint64(h[16:]), o.size)
	case !equalHeader(h, o.header(ident)):
		return fmt.Errorf("overlay %s: its layout is not this version's", o.path)
	case fileSize != o.fileSize():
		return fmt.Errorf("overlay %s is %d bytes, want %d: truncated or extended", o.path, fileSize, o.fileSize())
	}
	bm := make([]byte, o.bitmapLen())
	if _, err := o.f.ReadAt(bm, headerSize); err != nil {
		return fmt.Errorf("overlay %s: read its bitmap: %w", o.path, err)
	}
	for i, b := range bm {
		o.bits[i/8].Or(uint64(b) << (8 * (i % 8)))
	}
	if spare := o.nblk % 64; spare != 0 && o.bits[len(o.bits)-1].Load()>>spare != 0 {
		return fmt.Errorf("overlay %s: its bitmap marks blocks past the end of the disk", o.path)
	}
	return nil
}

func equalHeader(a, b []byte) bool { return string(a) == string(b) }

// Size is the disk's size.
func (o *Overlay) Size() int64 { return o.size }

func (o *Overlay) written(blk int64) bool {
	return o.bits[blk/64].Load()&(1<<(blk%64)) != 0
}

func (o *Overlay) mark(blk int64) {
	o.bits[blk/64].Or(1 << (blk % 64))
	o.mu.Lock()
	o.dirty[blk/8/pageSize] = true
	o.mu.Unlock()
}

func (o *Overlay) blockOffset(blk int64) int64 { return o.dataOffset() + blk*BlockSize }

// Written returns the bytes of the disk the overlay holds.
func (o *Overlay) Written() int64 {
	var n int64
	for i := range o.bits {
		n += int64(bits.OnesCount64(o.bits[i].Load()))
	}
	return n * BlockSize
}

func (o *Overlay) check(off, n int64) error {
	if off < 0 || n < 0 || off > o.size || n > o.size-off {
		return fmt.Errorf("overlay %s: range %d+%d outside the disk of %d bytes", o.path, off, n, o.size)
	}
	return nil
}

// ReadAt reads the disk as written: overlay blocks where written, the
// base elsewhere.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	if off >= o.size && n > 0 {
		return 0, io.EOF
	}
	short := false
	if n > o.size-off {
		n, short = o.size-off, true
	}
	for pos := off; pos < off+n; {
		blk := pos / BlockSize
		w := o.written(blk)
		end := pos
		for end < off+n && o.written(end/BlockSize) == w {
			end = min((end/BlockSize+1)*BlockSize, off+n)
		}
		buf := p[pos-off : end-off]
		var err error
		if w {
			_, err = o.f.ReadAt(buf, o.blockOffset(blk)+pos%BlockSize)
		} else {
			_, err = o.base.ReadAt(buf, pos)
		}
		if err != nil {
			return int(pos - off), fmt.Errorf("read %d+%d of the disk: %w", pos, len(buf), err)
		}
		pos = end
	}
	if short {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at off into the overlay.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if err := o.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), o.each(off, int64(len(p)), func(blk, from, to int64) error {
		return o.writeBlock(blk, from, to, p[blk*BlockSize+from-off:blk*BlockSize+to-off])
	})
}

// each calls fn for the blocks [off, off+n) touches, with the part of
// each block touched, the block's copy-on-write lock held.
func (o *Overlay) each(off, n int64, fn func(blk, from, to int64) error) error {
	for pos := off; pos < off+n; {
		blk := pos / BlockSize
		from, to := pos%BlockSize, min(BlockSize, off+n-blk*BlockSize)
		l := &o.locks[blk%int64(len(o.locks))]
		l.Lock()
		err := fn(blk, from, to)
		l.Unlock()
		if err != nil {
			return err
		}
		pos = blk*BlockSize + to
	}
	return nil
}

// blockLen is the length of block blk: the last may be short.
func (o *Overlay) blockLen(blk int64) int64 { return min(BlockSize, o.size-blk*BlockSize) }

func (o *Overlay) writeBlock(blk, from, to int64, p []byte) error {
	if o.written(blk) || (from == 0 && to >= o.blockLen(blk)) {
		if _, err := o.f.WriteAt(p, o.blockOffset(blk)+from); err != nil {
			return fmt.Errorf("write block %d to overlay %s: %w", blk, o.path, err)
		}
		o.mark(blk)
		return nil
	}
	// First write of part of the block: copy the rest from the base.
	whole := make([]byte, o.blockLen(blk))
	if _, err := o.base.ReadAt(whole, blk*BlockSize); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("copy block %d from the base disk: %w", blk, err)
	}
	copy(whole[from:], p)
	if _, err := o.f.WriteAt(whole, o.blockOffset(blk)); err != nil {
		return fmt.Errorf("write block %d to overlay %s: %w", blk, o.path, err)
	}
	o.mark(blk)
	return nil
}

// Zero makes [off, off+n) read as zeros: whole blocks are punched out
// of the file (they take no space), parts of blocks written with zeros.
func (o *Overlay) Zero(off, n int64) error {
	if err := o.check(off, n); err != nil {
		return err
	}
	return o.each(off, n, func(blk, from, to int64) error {
		if from == 0 && to >= o.blockLen(blk) {
			err := unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, o.blockOffset(blk), BlockSize)
			if err == nil {
				o.mark(blk)
				return nil
			}
		}
		return o.writeBlock(blk, from, to, make([]byte, to-from))
	})
}

// Data returns the ranges of [off, off+n) that may hold data: the base's
// and the blocks written.
func (o *Overlay) Data(off, n int64) ([]extent.Range, error) {
	if err := o.check(off, n); err != nil {
		return nil, err
	}
	base, err := o.base.Data(off, n)
	if err != nil {
		return nil, err
	}
	var own []extent.Range
	for blk := off / BlockSize; blk*BlockSize < off+n; blk++ {
		if !o.written(blk) {
			continue
		}
		r := extent.Range{Start: max(off, blk*BlockSize), End: min(off+n, (blk+1)*BlockSize)}
		if k := len(own); k > 0 && own[k-1].End == r.Start {
			own[k-1].End = r.End
		} else {
			own = append(own, r)
		}
	}
	return extent.Union(base, own), nil
}

// Flush makes every write that returned before it durable.
func (o *Overlay) Flush() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	// The pages are copied before the blocks are synced: a bit set after
	// the copy has its block synced by a later Flush, with its page.
	pages := make(map[int64][]byte, len(o.dirty))
	for pg := range o.dirty {
		pages[pg] = o.page(pg)
	}
	clear(o.dirty)
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync overlay %s: %w", o.path, err)
	}
	if len(pages) == 0 {
		return nil
	}
	for pg, b := range pages {
		if _, err := o.f.WriteAt(b, headerSize+pg*pageSize); err != nil {
			return fmt.Errorf("write overlay %s's bitmap: %w", o.path, err)
		}
	}
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync overlay %s's bitmap: %w", o.path, err)
	}
	return nil
}

// page returns bitmap page pg as stored.
func (o *Overlay) page(pg int64) []byte {
	start := pg * pageSize
	b := make([]byte, min(pageSize, o.bitmapLen()-start))
	for i := range b {
		byteIdx := start + int64(i)
		b[i] = byte(o.bits[byteIdx/8].Load() >> (8 * (byteIdx % 8)))
	}
	return b
}

// Close flushes the overlay and closes its file.
func (o *Overlay) Close() error {
	err := o.Flush()
	if cerr := o.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close overlay %s: %w", o.path, cerr)
	}
	return err
}

// Path is the overlay file's name.
func (o *Overlay) Path() string { return o.path }
