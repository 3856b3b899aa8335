package vmdk

import (
	"errors"
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"
	"io"
	"os"
	"path/filepath"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// The Updater changes a monolithicSparse extent in place, at random
// offsets, for a migration that rewrites a target pass after pass.
// Grains and missing grain tables are allocated at the end of the file
// and never freed, so a write never lands in space that tables still on
// disk give to something else. Sync writes in an order that keeps the
// image valid through a crash: data, then the grain tables and their
// redundant copies, then the grain directory entries of new tables, with
// an fsync between each. A crash between two Syncs loses the writes
// since the first; grains written but not yet in a table are unused
// space at the end of the file (VMDK keeps no refcounts: qemu-img check
// does not see them).
//
// Zero, on images with zeroed-grain entries (flag bit 2, qemu-img's
// zeroed_grain=on), sets a whole grain's entry to 1 and abandons its
// space; on others (the writer's version 1 images) it writes zeros into
// allocated grains.

// UpdateFile is the extent file an Updater changes.
type UpdateFile interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Stat() (os.FileInfo, error)
	Truncate(size int64) error
}

// maxCachedGT bounds the grain tables kept between Syncs.
const maxCachedGT = 2048

// Updater is a monolithicSparse extent open for random-access updates. It
// is not safe for concurrent use.
type Updater struct {
	f       UpdateFile
	name    string
	size    int64
	grain   int64
	gtes    int64
	gtBytes int64 // a grain table's size, in whole sectors
	zeroGTE bool
	gdOff   int64 // bytes
	rgdOff  int64 // bytes, 0 without a redundant directory
	gd, rgd []uint32
	first   int64 // sector of the first grain (the header's overhead)
	gdDirty map[int64]bool
	gt      map[int64][]uint32
	gtDirty map[int64]bool
	next    int64
	data    bool
	zeros   []byte
	buf     []byte
	closed  bool
}

// OpenUpdate opens the monolithicSparse extent in f for updates. It
// refuses streamOptimized (compressed) extents and other layouts.
func OpenUpdate(f UpdateFile, name string) (*Updater, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	fsize := fi.Size()
	r, err := Open(f, fsize, name)
	if err != nil {
		return nil, err
	}
	if r.comp || r.markers {
		return nil, vdio.Unsupported(name, format, 8, "streamOptimized (compressed) extents cannot be updated in place: convert with 'qemu-img convert -O vmdk'")
	}
	if r.CreateType != "monolithicSparse" {
		return nil, vdio.Unsupported(name, format, 0, "createType %q cannot be updated in place (only monolithicSparse)", r.CreateType)
	}
	u := &Updater{f: f, name: name, size: r.size, grain: r.grain, gtes: int64(r.h.gtes),
		zeroGTE: r.zeroGTE, gdOff: int64(r.h.gdOff) * sector, gd: r.gd,
		gdDirty: map[int64]bool{}, gt: map[int64][]uint32{}, gtDirty: map[int64]bool{},
		zeros: make([]byte, r.grain), buf: make([]byte, r.grain)}
	u.gtBytes = (u.gtes*4 + sector - 1) / sector * sector
	u.first = int64(min(r.h.overhead, uint64(fsize)))
	u.next = (fsize + sector - 1) / sector * sector
	if r.h.flags&flagRGD != 0 {
		u.rgdOff = int64(r.h.rgdOff) * sector
		n := int64(len(u.gd))
		if u.rgdOff <= 0 || n*4 > fsize || u.rgdOff > fsize-n*4 {
			return nil, vdio.Errorf(name, format, 48, "redundant grain directory at %d lies outside the file", u.rgdOff)
		}
		b := make([]byte, n*4)
		if err := vdio.ReadFull(f, fsize, b, u.rgdOff, name, format, "redundant grain directory"); err != nil {
			return nil, err
		}
		u.rgd = make([]uint32, n)
		for i := range u.rgd {
			u.rgd[i] = vdio.LE.Uint32(b[4*i:])
		}
	}
	for i := range u.gd {
		if err := u.checkTable(int64(i), fsize); err != nil {
			return nil, err
		}
	}
	for i := range u.rgd {
		if (u.rgd[i] == 0) != (u.gd[i] == 0) {
			if err := u.repairRedundant(int64(i)); err != nil {
				return nil, err
			}
		}
	}
	return u, nil
}

// repairRedundant makes redundant grain directory entry i agree with
// the primary (what readers use) at the next Sync: they differ after a
// crash between the two writes of a new table's entries.
func (u *Updater) repairRedundant(i int64) error {
	u.gdDirty[i] = true
	if u.gd[i] == 0 {
		u.rgd[i] = 0
		return nil
	}
	t, err := u.table(i, false)
	if err != nil {
		return err
	}
	off, err := u.alloc(u.gtBytes)
	if err != nil {
		return err
	}
	u.rgd[i] = uint32(off / sector)
	u.gt[i], u.gtDirty[i] = t, true
	return nil
}

// checkTable refuses a grain directory entry whose tables lie outside the
// file, or a table with entries outside it.
func (u *Updater) checkTable(i, fsize int64) error {
	for _, d := range [][]uint32{u.gd, u.rgd} {
		if d != nil && int64(d[i])*sector > fsize-u.gtBytes {
			return vdio.Errorf(u.name, format, u.gdOff+4*i, "grain table %d lies outside the file", i)
		}
	}
	if u.gd[i] == 0 {
		return nil
	}
	t, err := u.readTable(int64(u.gd[i])*sector, fsize)
	if err != nil {
		return err
	}
	for j, e := range t {
		if e == 1 && !u.zeroGTE || e > 1 && (int64(e)*sector > fsize-u.grain || int64(e) < u.first) {
			return vdio.Unsupported(u.name, format, int64(u.gd[i])*sector+4*int64(j), "grain table %d entry %d (sector %d) is outside the grains of the file", i, j, e)
		}
	}
	return nil
}

func (u *Updater) readTable(off, fsize int64) ([]uint32, error) {
	b := make([]byte, u.gtes*4)
	if err := vdio.ReadFull(u.f, fsize, b, off, u.name, format, "grain table"); err != nil {
		return nil, err
	}
	t := make([]uint32, u.gtes)
	for i := range t {
		t[i] = vdio.LE.Uint32(b[4*i:])
	}
	return t, nil
}

// CreateUpdate makes an empty monolithicSparse disk of size bytes (a
// multiple of 512) in f, a new file named name, and opens it for updates.
func CreateUpdate(f UpdateFile, size int64, name string) (*Updater, error) {
	w, err := NewSparseWriter(f, size, Options{FileName: filepath.Base(name)})
	if err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("create %s: sync: %w", name, err)
	}
	return OpenUpdate(f, name)
}

// Size returns the virtual size.
func (u *Updater) Size() int64 { return u.size }

// table returns grain table i, reading it, or, with create, allocating
// it (and its redundant copy) at the end of the file; nil if none.
func (u *Updater) table(i int64, create bool) ([]uint32, error) {
	if t, ok := u.gt[i]; ok {
		return t, nil
	}
	if u.gd[i] == 0 {
		if !create {
			return nil, nil
		}
		for _, d := range [][]uint32{u.gd, u.rgd} {
			if d != nil {
				off, err := u.alloc(u.gtBytes)
				if err != nil {
					return nil, err
				}
				d[i] = uint32(off / sector)
			}
		}
		u.gdDirty[i] = true
		t := make([]uint32, u.gtes)
		u.gt[i], u.gtDirty[i] = t, true
		return t, nil
	}
	fi, err := u.f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", u.name, err)
	}
	t, err := u.readTable(int64(u.gd[i])*sector, max(fi.Size(), u.next))
	if err != nil {
		return nil, err
	}
	u.gt[i] = t
	return t, nil
}

// alloc takes n bytes (whole sectors) at the end of the file.
func (u *Updater) alloc(n int64) (int64, error) {
	off := u.next
	if (off+n)/sector > 0xffffffff {
		return 0, fmt.Errorf("%s: the sparse extent would exceed 2 TiB", u.name)
	}
	u.next += n
	return off, nil
}

func (u *Updater) bounds(off, n int64) error {
	if u.closed {
		return errors.New("vmdk: updater is closed")
	}
	if off < 0 || n < 0 || off > u.size-n {
		return fmt.Errorf("%s: %d bytes at %d lie outside the virtual size %d", u.name, n, off, u.size)
	}
	return nil
}

// entry returns the grain table entry of grain gi.
func (u *Updater) entry(gi int64) (uint32, error) {
	t, err := u.table(gi/u.gtes, false)
	if t == nil || err != nil {
		return 0, err
	}
	return t[gi%u.gtes], nil
}

func (u *Updater) setEntry(gi int64, e uint32) error {
	t, err := u.table(gi/u.gtes, true)
	if err != nil {
		return err
	}
	t[gi%u.gtes] = e
	u.gtDirty[gi/u.gtes] = true
	return nil
}

// WriteAt writes p at virtual offset off.
func (u *Updater) WriteAt(p []byte, off int64) (int, error) {
	if err := u.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		gi, within := (off+int64(done))/u.grain, (off+int64(done))%u.grain
		k := min(int64(len(p)-done), u.grain-within)
		if err := u.writeGrain(gi, within, p[done:done+int(k)]); err != nil {
			return done, err
		}
		done += int(k)
	}
	return done, nil
}

func (u *Updater) writeGrain(gi, within int64, p []byte) error {
	e, err := u.entry(gi)
	if err != nil {
		return err
	}
	if e > 1 {
		if _, err := u.f.WriteAt(p, int64(e)*sector+within); err != nil {
			return fmt.Errorf("%s: write grain at %d: %w", u.name, int64(e)*sector, err)
		}
		u.data = true
		return nil
	}
	if extent.IsZero(p) {
		return nil
	}
	host, err := u.alloc(u.grain)
	if err != nil {
		return err
	}
	copy(u.buf, u.zeros)
	copy(u.buf[within:], p)
	if _, err := u.f.WriteAt(u.buf, host); err != nil {
		return fmt.Errorf("%s: write grain at %d: %w", u.name, host, err)
	}
	u.data = true
	return u.setEntry(gi, uint32(host/sector))
}

// Zero makes [off, off+n) read as zeros.
func (u *Updater) Zero(off, n int64) error {
	if err := u.bounds(off, n); err != nil {
		return err
	}
	for n > 0 {
		gi, within := off/u.grain, off%u.grain
		k := min(n, u.grain-within)
		e, err := u.entry(gi)
		if err != nil {
			return err
		}
		whole := within == 0 && (k == u.grain || off+k == u.size)
		switch {
		case e <= 1:
			// Reads as zeros already.
		case whole && u.zeroGTE:
			if err := u.setEntry(gi, 1); err != nil {
				return err
			}
		default:
			if _, err := u.f.WriteAt(u.zeros[:k], int64(e)*sector+within); err != nil {
				return fmt.Errorf("%s: zero at %d: %w", u.name, int64(e)*sector+within, err)
			}
			u.data = true
		}
		off, n = off+k, n-k
	}
	return nil
}

func (u *Updater) sync(what string) error {
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("%s: sync %s: %w", u.name, what, err)
	}
	return nil
}

// Sync makes every write and zeroing so far durable, leaving a valid
// image on disk.
func (u *Updater) Sync() error {
	if u.closed {
		return errors.New("vmdk: updater is closed")
	}
	if !u.data && len(u.gtDirty)+len(u.gdDirty) == 0 {
		return nil
	}
	fi, err := u.f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", u.name, err)
	}
	if fi.Size() < u.next {
		// New grain tables lie inside the file.
		if err := u.f.Truncate(u.next); err != nil {
			return fmt.Errorf("%s: extend: %w", u.name, err)
		}
	}
	if err := u.sync("data"); err != nil {
		return err
	}
	b := make([]byte, u.gtBytes)
	for i := range u.gtDirty {
		for j, e := range u.gt[i] {
			vdio.LE.PutUint32(b[4*j:], e)
		}
		for _, d := range [][]uint32{u.gd, u.rgd} {
			if d == nil {
				continue
			}
			if _, err := u.f.WriteAt(b, int64(d[i])*sector); err != nil {
				return fmt.Errorf("%s: write grain table %d: %w", u.name, i, err)
			}
		}
	}
	if err := u.sync("grain tables"); err != nil {
		return err
	}
	clear(u.gtDirty)
	if len(u.gdDirty) > 0 {
		var e [4]byte
		for i := range u.gdDirty {
			for k, d := range [][]uint32{u.gd, u.rgd} {
				if d == nil {
					continue
				}
				vdio.LE.PutUint32(e[:], d[i])
				if _, err := u.f.WriteAt(e[:], []int64{u.gdOff, u.rgdOff}[k]+4*i); err != nil {
					return fmt.Errorf("%s: write grain directory entry %d: %w", u.name, i, err)
				}
			}
		}
		if err := u.sync("grain directory"); err != nil {
			return err
		}
		clear(u.gdDirty)
	}
	u.data = false
	if len(u.gt) > maxCachedGT {
		clear(u.gt)
	}
	return nil
}

// Close syncs the image; the caller closes the file.
func (u *Updater) Close() error {
	if u.closed {
		return nil
	}
	err := u.Sync()
	u.closed = true
	return err
}
