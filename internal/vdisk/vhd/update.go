package vhd

import (
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// Updater writes a fixed or dynamic VHD in place, at random offsets (a
// migration's passes). A fixed disk is written where its data lies. A
// dynamic disk's write into an unallocated block appends the block (its
// sector bitmap, all ones, then its data, the rest of which reads as
// zeros from the file's new holes) where the trailing footer was; the
// footer moves past it.
//
// Crash consistency: Sync writes the moved footer, syncs (blocks and
// footer durable), then writes the changed table entries and syncs
// again. A crash at any point leaves the old table, or a table whose
// entries each name a durable block; blocks appended but not yet in the
// table are unreferenced space. Writes into allocated blocks are in
// place, like a raw disk's. OpenUpdate repairs a missing trailing footer
// (a crash before the first sync) by writing it after everything the
// table references and everything in the file.
//
// Zeroing a range leaves the blocks it covers allocated and writes
// zeros there: freeing a block in the table would strand its space (a
// block is appended, never reused), and a later write would append
// another.
type Updater struct {
	f      vdio.RWFile
	name   string
	size   int64
	fixed  bool
	block  int64
	bmLen  int64 // bytes of a block's sector bitmap
	bat    []uint32
	batOff int64
	end    int64 // where the trailing footer goes
	eof    int64 // bytes of the file that may hold anything: past it, holes
	footer []byte
	dirty  map[int64]bool // table entries changed since the last Sync
	moved  bool           // the trailing footer must be written at end
}

// OpenUpdate opens the VHD in f (named name in errors) for updating.
func OpenUpdate(f vdio.RWFile, name string) (*Updater, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	fsize := fi.Size()
	r, err := Open(f, fsize, name)
	if err != nil {
		return nil, err
	}
	if _, chs := r.SizedByGeometry(); chs {
		return nil, vdio.Unsupported(name, format, 56, "a disk sized by its CHS geometry (creator %q) is not updated in place: convert it first", r.creator)
	}
	u := &Updater{f: f, name: name, size: r.size, fixed: r.fixed, block: r.block, bmLen: r.bitmap,
		bat: r.bat, batOff: r.batOff, eof: fsize, dirty: map[int64]bool{}}
	if u.fixed {
		return u, nil
	}
	u.footer = make([]byte, sector)
	if err := vdio.ReadFull(f, fsize, u.footer, 0, name, format, "footer copy"); err != nil {
		return nil, err
	}
	if u.size%sector != 0 {
		return nil, vdio.Unsupported(name, format, 48, "disk size %d is not a multiple of 512", u.size)
	}
	if err := u.findEnd(fsize); err != nil {
		return nil, err
	}
	return u, nil
}

// findEnd checks that every allocated block lies after the table and
// inside the file, and places the trailing footer after them all.
func (u *Updater) findEnd(fsize int64) error {
	batEnd := u.batOff + (int64(len(u.bat))*4+sector-1)/sector*sector
	used := max(batEnd, 3*sector)
	for i, e := range u.bat {
		if e == unallocated {
			continue
		}
		bm := int64(e) * sector
		blockEnd := bm + u.bmLen + u.block
		if bm < 3*sector || bm < batEnd && blockEnd > u.batOff || blockEnd > fsize {
			return vdio.Errorf(u.name, format, u.batOff+int64(4*i), "block %d at %d lies outside the file (%d bytes) or over its headers: a damaged image is not updated", i, bm, fsize)
		}
		used = max(used, bm+u.bmLen+u.block)
	}
	var last [sector]byte
	if fsize-sector >= used {
		if n, _ := u.f.ReadAt(last[:], fsize-sector); n == sector && IsFooter(last[:]) {
			u.end = fsize - sector
			return nil
		}
	}
	// No footer at the end: a crash before a Sync. Put it past
	// everything.
	u.end = max(used, (fsize+sector-1)/sector*sector)
	u.moved = true
	if err := u.Sync(); err != nil {
		return fmt.Errorf("%s: write the missing trailing footer: %w", u.name, err)
	}
	return nil
}

// CreateUpdate makes an empty VHD of size bytes (rounded up to 512) in
// f, a new empty file, fixed or dynamic with 2 MiB blocks, and opens it
// for updating.
func CreateUpdate(f vdio.RWFile, name string, size int64, fixed bool) (*Updater, error) {
	return createUpdate(f, name, size, fixed, defaultBlock)
}

func createUpdate(f vdio.RWFile, name string, size int64, fixed bool, block int64) (*Updater, error) {
	size = (size + sector - 1) / sector * sector
	w, err := newWriter(f, size, fixed, block)
	if err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", name, err)
	}
	return OpenUpdate(f, name)
}

// Size returns the virtual size.
func (u *Updater) Size() int64 { return u.size }

// Fixed says whether the image is fixed (preallocated), not dynamic.
func (u *Updater) Fixed() bool { return u.fixed }

func (u *Updater) check(off, n int64) error {
	if off < 0 || n < 0 || off > u.size || n > u.size-off {
		return fmt.Errorf("%s: %d bytes at %d lie outside the disk (%d bytes)", u.name, n, off, u.size)
	}
	return nil
}

// WriteAt writes p at virtual offset off.
func (u *Updater) WriteAt(p []byte, off int64) (int, error) {
	if err := u.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if u.fixed {
		return u.f.WriteAt(p, off)
	}
	done := 0
	for done < len(p) {
		v := off + int64(done)
		bi, in := v/u.block, v%u.block
		n := int(min(int64(len(p)-done), u.block-in))
		piece := p[done : done+n]
		if u.bat[bi] == unallocated && extent.IsZero(piece) {
			done += n
			continue
		}
		host, err := u.host(bi, true)
		if err != nil {
			return done, err
		}
		if _, err := u.f.WriteAt(piece, host+in); err != nil {
			return done, fmt.Errorf("%s: write block %d: %w", u.name, bi, err)
		}
		done += n
	}
	return done, nil
}

// host returns the file offset of block bi's data, appending the block
// when alloc is set (else -1 for an unallocated block).
func (u *Updater) host(bi int64, alloc bool) (int64, error) {
	if e := u.bat[bi]; e != unallocated {
		return int64(e)*sector + u.bmLen, nil
	}
	if !alloc {
		return -1, nil
	}
	// Data 4 KiB aligned, as the writer lays it out, so that what is
	// never written stays whole file-system holes.
	data := (u.end + u.bmLen + 4095) / 4096 * 4096
	bm := data - u.bmLen
	if bm/sector >= unallocated {
		return 0, fmt.Errorf("%s: the file would exceed the table's 2 TiB reach", u.name)
	}
	bitmap := make([]byte, u.bmLen)
	for i := range bitmap {
		bitmap[i] = 0xff
	}
	if _, err := u.f.WriteAt(bitmap, bm); err != nil {
		return 0, fmt.Errorf("%s: write block %d's bitmap: %w", u.name, bi, err)
	}
	// What the file held there before (space a crash left unreferenced)
	// is cleared; past the old end it is holes already.
	if data < u.eof {
		if err := vdio.WriteZeros(u.f, data, min(u.block, u.eof-data)); err != nil {
			return 0, fmt.Errorf("%s: clear block %d: %w", u.name, bi, err)
		}
	}
	u.bat[bi] = uint32(bm / sector)
	u.dirty[bi] = true
	u.end, u.moved = data+u.block, true
	return data, nil
}

// Zero makes [off, off+n) read as zeros.
func (u *Updater) Zero(off, n int64) error {
	if err := u.check(off, n); err != nil {
		return err
	}
	if u.fixed {
		return vdio.WriteZeros(u.f, off, n)
	}
	for n > 0 {
		bi, in := off/u.block, off%u.block
		k := min(n, u.block-in)
		host, _ := u.host(bi, false)
		if host >= 0 {
			if err := vdio.WriteZeros(u.f, host+in, k); err != nil {
				return fmt.Errorf("%s: zero block %d: %w", u.name, bi, err)
			}
		}
		off, n = off+k, n-k
	}
	return nil
}

// Sync makes the writes durable: data and the moved footer, then the
// table.
func (u *Updater) Sync() error {
	if u.moved {
		if _, err := u.f.WriteAt(u.footer, u.end); err != nil {
			return fmt.Errorf("%s: write footer: %w", u.name, err)
		}
		if err := u.f.Truncate(u.end + sector); err != nil {
			return fmt.Errorf("%s: truncate after the footer: %w", u.name, err)
		}
		u.eof = u.end + sector
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", u.name, err)
	}
	u.moved = false
	if len(u.dirty) == 0 {
		return nil
	}
	var e [4]byte
	for bi := range u.dirty {
		vdio.BE.PutUint32(e[:], u.bat[bi])
		if _, err := u.f.WriteAt(e[:], u.batOff+4*bi); err != nil {
			return fmt.Errorf("%s: write block table: %w", u.name, err)
		}
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", u.name, err)
	}
	clear(u.dirty)
	return nil
}

// Close syncs; the caller closes the file.
func (u *Updater) Close() error { return u.Sync() }
