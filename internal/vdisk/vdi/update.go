package vdi

import (
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// Updater writes a VDI in place, at random offsets (a migration's
// passes). A write into a free block appends a data block at the index
// the header's allocated count gives, as VirtualBox and QEMU do.
//
// Crash consistency: Sync extends the file over the new blocks and
// syncs (data durable), writes the changed block map entries and syncs,
// then writes the header's allocated count and syncs. A crash before the
// count is durable leaves entries naming blocks at or past the old count
// (which qemu-img check calls corrupt): OpenUpdate sets them free again,
// the state before the interrupted batch, whose blocks were free.
//
// Zeroing never frees a block: a data block is found by its index, new
// blocks take the index of the allocated count, and a block freed in
// the middle would be reused by VirtualBox or QEMU over a live one. An
// allocated block zeroed is written with zeros; a free block, or one
// marked zero, reads as zeros already.
type Updater struct {
	f       vdio.RWFile
	name    string
	size    int64
	block   int64
	extra   int64
	fixed   bool
	bmap    []uint32
	bmapOff int64
	dataOff int64
	alloc   uint32 // allocated blocks
	synced  uint32 // allocated blocks the header says
	eof     int64
	dirty   map[int64]bool
}

// OpenUpdate opens the VDI in f (named name in errors) for updating.
func OpenUpdate(f vdio.RWFile, name string) (*Updater, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	r, err := Open(f, fi.Size(), name)
	if err != nil {
		return nil, err
	}
	if r.size%512 != 0 {
		return nil, vdio.Unsupported(name, format, 368, "disk size %d is not a multiple of 512", r.size)
	}
	u := &Updater{f: f, name: name, size: r.size, block: r.block, extra: r.extra, fixed: r.fixed,
		bmap: r.bmap, bmapOff: r.bmapOff, dataOff: r.dataOff, alloc: r.alloc, synced: r.alloc,
		eof: fi.Size(), dirty: map[int64]bool{}}
	if err := u.repair(); err != nil {
		return nil, err
	}
	return u, nil
}

// repair checks that the allocated blocks are exactly the data blocks
// below the header's count, each used once, freeing the entries a crash
// left past the count.
func (u *Updater) repair() error {
	if int64(u.alloc) > int64(len(u.bmap)) {
		return vdio.Errorf(u.name, format, 388, "%d blocks allocated of %d: a damaged image is not updated", u.alloc, len(u.bmap))
	}
	used := make([]bool, u.alloc)
	n := uint32(0)
	for i, e := range u.bmap {
		if e == free || e == zero {
			continue
		}
		if e >= u.alloc {
			u.bmap[i] = free
			u.dirty[int64(i)] = true
			continue
		}
		if used[e] {
			return vdio.Errorf(u.name, format, u.bmapOff+int64(4*i), "data block %d used twice: a damaged image is not updated", e)
		}
		used[e] = true
		n++
	}
	if n != u.alloc {
		return vdio.Errorf(u.name, format, 388, "the header counts %d allocated blocks, the block map %d: a damaged image is not updated", u.alloc, n)
	}
	if len(u.dirty) > 0 {
		return u.Sync()
	}
	return nil
}

// CreateUpdate makes an empty VDI of size bytes (rounded up to 512),
// fixed or dynamic, in f, a new empty file, and opens it for updating.
func CreateUpdate(f vdio.RWFile, name string, size int64, fixed bool) (*Updater, error) {
	return createUpdate(f, name, size, fixed, mib)
}

func createUpdate(f vdio.RWFile, name string, size int64, fixed bool, block int64) (*Updater, error) {
	w, err := newWriter(f, (size+511)/512*512, fixed, block)
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

func (u *Updater) slot(idx uint32) int64 { return u.dataOff + int64(idx)*(u.block+u.extra) }

// host returns the file offset of block bi's data, allocating it when
// alloc is set (else -1 for a free block).
func (u *Updater) host(bi int64, alloc bool) (int64, error) {
	if e := u.bmap[bi]; e != free && e != zero {
		return u.slot(e) + u.extra, nil
	}
	if !alloc {
		return -1, nil
	}
	if u.alloc >= zero {
		return 0, fmt.Errorf("%s: no block index left", u.name)
	}
	s := u.slot(u.alloc)
	// What the file held there (a crash's leftovers) is cleared; past
	// the end it is holes already.
	if s < u.eof {
		if err := vdio.WriteZeros(u.f, s, min(u.block+u.extra, u.eof-s)); err != nil {
			return 0, fmt.Errorf("%s: clear block %d: %w", u.name, bi, err)
		}
	}
	u.bmap[bi] = u.alloc
	u.alloc++
	u.dirty[bi] = true
	return s + u.extra, nil
}

// WriteAt writes p at virtual offset off.
func (u *Updater) WriteAt(p []byte, off int64) (int, error) {
	if err := u.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		v := off + int64(done)
		bi, in := v/u.block, v%u.block
		n := int(min(int64(len(p)-done), u.block-in))
		piece := p[done : done+n]
		if e := u.bmap[bi]; (e == free || e == zero) && extent.IsZero(piece) {
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
		u.eof = max(u.eof, host+in+int64(n))
		done += n
	}
	return done, nil
}

// Zero makes [off, off+n) read as zeros.
func (u *Updater) Zero(off, n int64) error {
	if err := u.check(off, n); err != nil {
		return err
	}
	for n > 0 {
		bi, in := off/u.block, off%u.block
		k := min(n, u.block-in)
		if host, _ := u.host(bi, false); host >= 0 {
			if err := vdio.WriteZeros(u.f, host+in, k); err != nil {
				return fmt.Errorf("%s: zero block %d: %w", u.name, bi, err)
			}
		}
		off, n = off+k, n-k
	}
	return nil
}

// Sync makes the writes durable: data, then the block map, then the
// header's count.
func (u *Updater) Sync() error {
	if end := u.slot(u.alloc); end > u.eof {
		if err := u.f.Truncate(end); err != nil {
			return fmt.Errorf("%s: extend over the new blocks: %w", u.name, err)
		}
		u.eof = end
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", u.name, err)
	}
	if len(u.dirty) == 0 && u.alloc == u.synced {
		return nil
	}
	var e [4]byte
	for bi := range u.dirty {
		vdio.LE.PutUint32(e[:], u.bmap[bi])
		if _, err := u.f.WriteAt(e[:], u.bmapOff+4*bi); err != nil {
			return fmt.Errorf("%s: write block map: %w", u.name, err)
		}
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", u.name, err)
	}
	clear(u.dirty)
	if u.alloc != u.synced {
		vdio.LE.PutUint32(e[:], u.alloc)
		if _, err := u.f.WriteAt(e[:], 388); err != nil {
			return fmt.Errorf("%s: write header: %w", u.name, err)
		}
		if err := u.f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", u.name, err)
		}
		u.synced = u.alloc
	}
	return nil
}

// Close syncs; the caller closes the file.
func (u *Updater) Close() error { return u.Sync() }
