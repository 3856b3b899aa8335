package vhdx

import (
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// Updater writes a fixed or dynamic VHDX in place, at random offsets (a
// migration's passes). A write into a block that is not present appends
// the block, 1 MiB aligned, at the end of the file; the rest of it reads
// as zeros from the file's new holes.
//
// Metadata without the log: the only metadata an update changes is BAT
// entries, 8 bytes each, aligned, so an entry never straddles a sector
// and a sector's write leaves each entry old or new. Sync extends the
// file over the new blocks and syncs (data durable), then writes the
// changed entries and syncs: after a crash each entry is NOT_PRESENT as
// before or FULL naming a durable block, and the log stays empty (its
// GUID zero), so nothing needs replaying. Opening updates both headers in
// turn, as the specification orders for a file opened for writing: a new
// file write GUID and data write GUID, the sequence number raised, each
// header synced before the other is written.
//
// Zeroing leaves present blocks present and writes zeros there: a block
// made NOT_PRESENT would strand its space. A block in state ZERO or
// UNMAPPED with its space in the file is made
// present there by its first write, its space cleared first.
type Updater struct {
	f      vdio.RWFile
	name   string
	size   int64
	block  int64
	ratio  int64
	bat    []uint64 // file offset of each block's data, 0 when not present
	batOff int64
	end    int64 // where the next block goes
	eof    int64
	dirty  map[int64]bool
	// reserved is the file offset of blocks in state ZERO or UNMAPPED
	// that have space in the file: a write makes
	// them present there.
	reserved map[int64]int64
}

// OpenUpdate opens the VHDX in f (named name in errors) for updating.
func OpenUpdate(f vdio.RWFile, name string) (*Updater, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	r, err := Open(f, fi.Size(), name)
	if err != nil {
		return nil, err
	}
	u := &Updater{f: f, name: name, size: r.size, block: r.block, ratio: r.ratio, bat: r.bat,
		batOff: r.batOff, eof: fi.Size(), dirty: map[int64]bool{}}
	u.end = max(r.hdrEnd, fi.Size())
	for i, off := range u.bat {
		if off == 0 {
			continue
		}
		if int64(off) < r.batOff+r.batLen && int64(off)+u.block > r.batOff {
			return nil, vdio.Errorf(name, format, u.batOff+8*(int64(i)+int64(i)/u.ratio), "block %d at %d lies over the BAT: a damaged image is not updated", i, off)
		}
		u.end = max(u.end, int64(off)+u.block)
	}
	if err := u.readReserved(r); err != nil {
		return nil, err
	}
	u.end = (u.end + mib - 1) / mib * mib
	if err := u.newHeaders(r.hdr); err != nil {
		return nil, err
	}
	return u, nil
}

// readReserved finds the blocks that read as zeros but have their
// space in the file.
func (u *Updater) readReserved(r *Reader) error {
	blocks := int64(len(u.bat))
	if blocks == 0 {
		return nil
	}
	raw := make([]byte, 8*(blocks+(blocks-1)/u.ratio))
	if err := vdio.ReadFull(u.f, u.eof, raw, u.batOff, u.name, format, "BAT"); err != nil {
		return err
	}
	u.reserved = map[int64]int64{}
	for i := range blocks {
		j := i + i/u.ratio
		e := vdio.LE.Uint64(raw[8*j:])
		off := int64(e>>20) * mib
		if s := e & 7; (s != stateZero && s != stateUnmapped) || off == 0 {
			continue
		}
		if off < mib || off > u.eof || u.block > u.eof-off || off < r.batOff+r.batLen && off+u.block > r.batOff {
			return vdio.Errorf(u.name, format, u.batOff+8*j, "BAT entry %d puts block %d at %d, outside the file (%d bytes) or over the BAT: a damaged image is not updated", j, i, off, u.eof)
		}
		u.reserved[i] = off
		u.end = max(u.end, off+u.block)
	}
	return nil
}

// newHeaders writes the header twice, each time over the older copy,
// with new write GUIDs and the next sequence number.
func (u *Updater) newHeaders(cur []byte) error {
	h := append([]byte(nil), cur...)
	copy(h[16:], randGUID())
	copy(h[32:], randGUID())
	seq := vdio.LE.Uint64(h[8:])
	// The current header is the one with the higher sequence number: the
	// other is overwritten first.
	other := func(seq uint64) int64 {
		var b [16]byte
		for _, off := range []int64{64 * kib, 128 * kib} {
			if n, _ := u.f.ReadAt(b[:], off); n == len(b) && vdio.LE.Uint64(b[8:]) == seq && string(b[:4]) == "head" {
				if off == 64*kib {
					return 128 * kib
				}
				return 64 * kib
			}
		}
		return 64 * kib
	}
	at := other(seq)
	for range 2 {
		seq++
		vdio.LE.PutUint64(h[8:], seq)
		vdio.LE.PutUint32(h[4:], crc(h, 4))
		if _, err := u.f.WriteAt(h, at); err != nil {
			return fmt.Errorf("%s: write header: %w", u.name, err)
		}
		if err := u.f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", u.name, err)
		}
		at = 192*kib - at
	}
	return nil
}

// CreateUpdate makes an empty dynamic VHDX of size bytes (rounded up to
// 512) in f, a new empty file, and opens it for updating.
func CreateUpdate(f vdio.RWFile, name string, size int64) (*Updater, error) {
	w, err := NewWriter(f, (size+511)/512*512)
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

func (u *Updater) check(off, n int64) error {
	if off < 0 || n < 0 || off > u.size || n > u.size-off {
		return fmt.Errorf("%s: %d bytes at %d lie outside the disk (%d bytes)", u.name, n, off, u.size)
	}
	return nil
}

// host returns the file offset of block bi's data, appending it when
// alloc is set (else -1 for a block not present).
func (u *Updater) host(bi int64, alloc bool) (int64, error) {
	if off := u.bat[bi]; off != 0 {
		return int64(off), nil
	}
	if !alloc {
		return -1, nil
	}
	if at, ok := u.reserved[bi]; ok {
		// Its space holds anything: zeros first.
		if err := vdio.WriteZeros(u.f, at, u.block); err != nil {
			return 0, fmt.Errorf("%s: clear block %d: %w", u.name, bi, err)
		}
		delete(u.reserved, bi)
		u.bat[bi] = uint64(at)
		u.dirty[bi] = true
		return at, nil
	}
	at := u.end
	if at/mib >= 1<<44 {
		return 0, fmt.Errorf("%s: the file would exceed the BAT's reach", u.name)
	}
	if at < u.eof {
		if err := vdio.WriteZeros(u.f, at, min(u.block, u.eof-at)); err != nil {
			return 0, fmt.Errorf("%s: clear block %d: %w", u.name, bi, err)
		}
	}
	u.bat[bi] = uint64(at)
	u.dirty[bi] = true
	u.end = at + u.block
	return at, nil
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
		if u.bat[bi] == 0 && extent.IsZero(piece) {
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

// Sync makes the writes durable: data, then the BAT.
func (u *Updater) Sync() error {
	if u.end > u.eof {
		if err := u.f.Truncate(u.end); err != nil {
			return fmt.Errorf("%s: extend over the new blocks: %w", u.name, err)
		}
		u.eof = u.end
	}
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", u.name, err)
	}
	if len(u.dirty) == 0 {
		return nil
	}
	var e [8]byte
	for bi := range u.dirty {
		vdio.LE.PutUint64(e[:], stateFull|u.bat[bi]/mib<<20)
		if _, err := u.f.WriteAt(e[:], u.batOff+8*(bi+bi/u.ratio)); err != nil {
			return fmt.Errorf("%s: write BAT: %w", u.name, err)
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
