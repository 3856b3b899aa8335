// Package ntfs reads files out of an NTFS filesystem given as an
// io.ReaderAt over its partition's bytes, without root, a mount or a
// restore of the disk: the file-level restore of sauve (ls, get, find)
// reads snapshots of Windows disks through it, fetching only the chunks
// the files use.
//
// It reads the boot sector (clusters up to 2 MiB, the negative size codes
// included), MFT records (their update sequence fixups checked),
// resident and non-resident attributes, runlists (sparse runs included),
// attribute lists (files, and an $MFT, in many fragments), directory
// indexes ($INDEX_ROOT and the INDX blocks of $INDEX_ALLOCATION: the
// whole tree is walked, each block once, DOS 8.3 names left out), the
// unnamed $DATA stream (sparse, LZNT1-compressed, read as zeros past its
// initialized size), hard links (one MFT record under several names: one
// Ino), Windows symlinks and junctions (reparse points), the Interix
// symlinks, devices, FIFOs and sockets ntfs-3g makes, and alternate data
// streams, given as user.NAME extended attributes as ntfs-3g does with
// its default streams_interface=xattr. Encrypted (EFS) files are an
// error.
//
// It shows files as ntfs-3g mounted as root with no options shows them:
// mode 0777, owner and group 0, st_nlink the record's link count (a DOS
// name beside a long one counts), the times of $STANDARD_INFORMATION, a
// directory's size that of its INDX blocks, and the system files (MFT
// records below 16, $MFT to $Extend) left out of listings, though their
// paths resolve. One difference: the absolute target of a symlink or
// junction (\??\C:\dir) reads as a path from this filesystem's root
// (/dir), where ntfs-3g prefixes its mount point, which a restore does
// not have.
//
// The $LogFile is not replayed: an image of a volume marked dirty (in
// use, or not cleanly unmounted) is read as it is on disk, with a
// warning.
//
// It is written here rather than taken from a library: the maintained Go
// reader, www.velocidex.com/golang/go-ntfs (v0.2.1), is a forensic tool
// whose directory listing drops the entries it cannot read without an
// error and lists each MFT record once per directory (so two hard links
// in one folder show as one name), and it brings a dozen modules.
//
// Every count and length read from the disk is bounded before it is used:
// a damaged or hostile image gives an error naming the MFT record and
// what is wrong, never a panic, a hang or a huge allocation.
package ntfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// Well-known MFT records.
const (
	recMFT      = 0
	recVolume   = 3
	recRoot     = 5
	firstUser   = 16 // records below are system files, hidden from listings
	maxRecSize  = 64 << 10
	minRecSize  = 512
	fixupSector = 512 // update sequence arrays protect 512-byte blocks
)

// Options tune Open.
type Options struct {
	// Warn hears of what was read with less certainty; nil: silence.
	Warn func(string)
}

// FS is an open NTFS filesystem. It is safe for concurrent use.
type FS struct {
	r        io.ReaderAt
	size     int64
	sectSize int64
	cs       int64 // cluster size
	clusters int64 // clusters in the volume
	recSize  int64 // MFT record size
	idxSize  int64 // index block size given by the boot sector
	mft      *stream
	label    string
	warn     func(string)

	mu   sync.Mutex
	recs map[uint64]*record // recently read records
	dirs fsread.DirCache
}

func le16(b []byte, off int) uint16 { return binary.LittleEndian.Uint16(b[off:]) }
func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
func le64(b []byte, off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }

// Open reads the filesystem of the size bytes of r.
func Open(r io.ReaderAt, size int64, opts Options) (*FS, error) {
	f := &FS{r: r, size: size, warn: opts.Warn, recs: map[uint64]*record{}}
	if f.warn == nil {
		f.warn = func(string) {}
	}
	if err := f.readBoot(); err != nil {
		return nil, err
	}
	if err := f.openMFT(); err != nil {
		return nil, fmt.Errorf("ntfs: $MFT: %w", err)
	}
	vol, err := f.record(recVolume)
	if err != nil {
		return nil, fmt.Errorf("ntfs: $Volume: %w", err)
	}
	if a := vol.find(atVolumeName, ""); a != nil && a.resident {
		f.label = utf16String(a.value)
	}
	if a := vol.find(atVolumeInfo, ""); a != nil && a.resident && len(a.value) >= 12 && le16(a.value, 10)&volDirty != 0 {
		f.warn("the NTFS volume is marked dirty (a snapshot of a mounted volume, or one not cleanly unmounted): its $LogFile is not replayed, so the latest changes may be missing")
	}
	if _, err := f.record(recRoot); err != nil {
		return nil, fmt.Errorf("ntfs: root directory: %w", err)
	}
	return f, nil
}

// Label is the filesystem's volume label.
func (f *FS) Label() string { return f.label }

// readAt reads len(p) bytes at off of the partition.
func (f *FS) readAt(p []byte, off int64) error {
	if off < 0 || off > f.size || int64(len(p)) > f.size-off {
		return fmt.Errorf("read of %d bytes at %d lies outside the filesystem (%d bytes)", len(p), off, f.size)
	}
	n, err := f.r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read at %d: %w", off, err)
}

// sizeCode decodes the boot sector's size of an MFT record or index
// block: clusters if positive, else 2^-v bytes.
func sizeCode(v byte, cs int64) (int64, bool) {
	if s := int8(v); s > 0 {
		return int64(s) * cs, true
	} else if s < 0 && s >= -31 {
		return 1 << -s, true
	}
	return 0, false
}

func (f *FS) readBoot() error {
	b := make([]byte, 512)
	if err := f.readAt(b, 0); err != nil {
		return fmt.Errorf("ntfs boot sector: %w", err)
	}
	if string(b[3:11]) != "NTFS    " {
		return errors.New("ntfs boot sector: no NTFS signature")
	}
	if le16(b, 510) != 0xAA55 {
		return errors.New("ntfs boot sector: no 0xAA55 end marker (damaged)")
	}
	f.sectSize = int64(le16(b, 11))
	if f.sectSize < 256 || f.sectSize > 4096 || f.sectSize&(f.sectSize-1) != 0 {
		return fmt.Errorf("ntfs boot sector damaged: %d bytes per sector", f.sectSize)
	}
	spc := int64(b[13])
	if spc > 128 { // Windows' encoding of clusters over 64 KiB: 2^(256-v) sectors
		if 256-spc > 12 {
			return fmt.Errorf("ntfs boot sector damaged: sectors per cluster code %#x", b[13])
		}
		spc = 1 << (256 - spc)
	}
	if spc == 0 || spc&(spc-1) != 0 {
		return fmt.Errorf("ntfs boot sector damaged: %d sectors per cluster", spc)
	}
	f.cs = spc * f.sectSize
	if f.cs > 2<<20 {
		return fmt.Errorf("ntfs boot sector damaged: clusters of %d bytes", f.cs)
	}
	sectors := le64(b, 0x28)
	if sectors == 0 || sectors > uint64(1)<<50 {
		return fmt.Errorf("ntfs boot sector damaged: %d sectors", sectors)
	}
	if int64(sectors)*f.sectSize > f.size+f.sectSize { // the backup boot sector may lie past the partition's end
		return fmt.Errorf("ntfs: the filesystem (%d sectors of %d bytes) is larger than its partition (%d bytes): truncated image?", sectors, f.sectSize, f.size)
	}
	f.clusters = int64(sectors) * f.sectSize / f.cs
	var ok bool
	if f.recSize, ok = sizeCode(b[0x40], f.cs); !ok || f.recSize < minRecSize || f.recSize > maxRecSize || f.recSize&(f.recSize-1) != 0 {
		return fmt.Errorf("ntfs boot sector damaged: MFT record size code %#x", b[0x40])
	}
	if f.idxSize, ok = sizeCode(b[0x44], f.cs); !ok || f.idxSize < minRecSize || f.idxSize > maxRecSize || f.idxSize&(f.idxSize-1) != 0 {
		return fmt.Errorf("ntfs boot sector damaged: index block size code %#x", b[0x44])
	}
	if mftLCN := le64(b, 0x30); mftLCN == 0 || mftLCN >= uint64(f.clusters) {
		return fmt.Errorf("ntfs boot sector damaged: $MFT at cluster %d of %d", mftLCN, f.clusters)
	}
	return nil
}

// openMFT reads $MFT's record from where the boot sector says, then its
// $DATA runlist: the stream all other records are read through. Its
// attribute list, if it has one, names extension records that the first
// runs of that stream must reach.
func (f *FS) openMFT() error {
	b := make([]byte, 512)
	if err := f.readAt(b, 0); err != nil {
		return err
	}
	off := int64(le64(b, 0x30)) * f.cs
	raw := make([]byte, f.recSize)
	if err := f.readAt(raw, off); err != nil {
		return err
	}
	rec, err := f.parseRecord(recMFT, raw)
	if err != nil {
		return err
	}
	a := rec.find(atData, "")
	if a == nil || a.resident {
		return errors.New("no non-resident $DATA")
	}
	if a.lowVCN != 0 {
		return errors.New("$DATA does not start at VCN 0")
	}
	f.mft, err = f.newStream(recMFT, []*attr{a})
	if err != nil {
		return err
	}
	if rec.find(atAttrList, "") == nil {
		return nil
	}
	if err := f.loadExtensions(rec); err != nil {
		return err
	}
	s, err := f.dataStream(rec, "")
	if err != nil {
		return err
	}
	f.mft = s
	f.mu.Lock()
	clear(f.recs)
	f.mu.Unlock()
	return nil
}

// child returns the record a directory entry's file reference names,
// checking its sequence number: a mismatch means the entry outlived its
// file and the record was reused.
func (f *FS) child(ref uint64) (*record, error) {
	rec, err := f.record(refNum(ref))
	if err != nil {
		return nil, err
	}
	if seq := uint16(ref >> 48); seq != 0 && seq != rec.seq {
		return nil, fmt.Errorf("stale directory entry: MFT record %d is now another file (sequence number %d, the entry has %d)", rec.num, rec.seq, seq)
	}
	return rec, nil
}

// resolve finds the file reference of the absolute slash-separated
// path p (see fsread.Resolve).
func (f *FS) resolve(p string) (uint64, error) { return fsread.Resolve(tree{f}, recRoot, p) }

// tree is f as fsread.Resolve walks it.
type tree struct{ f *FS }

func (t tree) Names(ref uint64) (map[string]uint64, bool, error) {
	rec, err := t.f.child(ref)
	if err != nil || !rec.isDir() {
		return nil, false, err
	}
	m, err := t.f.names(rec)
	return m, true, err
}

func (t tree) Link(ref uint64) (string, bool, error) {
	rec, err := t.f.child(ref)
	if err != nil {
		return "", false, err
	}
	n, err := t.f.node(rec)
	if err != nil || n.stat.Type() != fsread.TypeSymlink {
		return "", false, err
	}
	return n.target, true, nil
}

// names maps the names of directory rec to their file references.
func (f *FS) names(rec *record) (map[string]uint64, error) {
	return f.dirs.Names(rec.num, func(add func(string, uint64) error) error { return f.readDir(rec, add) })
}

// at runs fn on the file at path p; its errors name p.
func at[T any](f *FS, p string, fn func(*node) (T, error)) (T, error) {
	var zero T
	ref, err := f.resolve(p)
	if err != nil {
		return zero, err
	}
	rec, err := f.child(ref)
	if err == nil {
		var n *node
		if n, err = f.node(rec); err == nil {
			var v T
			if v, err = fn(n); err == nil {
				return v, nil
			}
		}
	}
	return zero, fmt.Errorf("%s: %w", p, err)
}

// Lstat returns the metadata of the file at p (a symlink itself).
func (f *FS) Lstat(p string) (fsread.Stat, error) {
	return at(f, p, func(n *node) (fsread.Stat, error) { return n.stat, nil })
}

// ReadDir lists the directory at p, without "." and "..", in index
// order, leaving out the system files as ntfs-3g does.
func (f *FS) ReadDir(p string) ([]fsread.DirEntry, error) {
	return at(f, p, func(n *node) ([]fsread.DirEntry, error) {
		if !n.rec.isDir() {
			return nil, errors.New("not a directory")
		}
		var out []fsread.DirEntry
		err := f.readDir(n.rec, func(name string, ref uint64) error {
			if refNum(ref) < firstUser {
				return nil
			}
			rec, err := f.child(ref)
			if err != nil {
				return fmt.Errorf("entry %q: %w", name, err)
			}
			cn, err := f.node(rec)
			if err != nil {
				return fmt.Errorf("entry %q: %w", name, err)
			}
			out = append(out, fsread.DirEntry{Name: name, Stat: cn.stat})
			return nil
		})
		return out, err
	})
}

// Readlink returns the target of the symlink at p.
func (f *FS) Readlink(p string) (string, error) {
	return at(f, p, func(n *node) (string, error) {
		if n.stat.Type() != fsread.TypeSymlink {
			return "", errors.New("not a symbolic link")
		}
		return n.target, nil
	})
}

// Open opens the regular file at p.
func (f *FS) Open(p string) (fsread.File, error) {
	return at(f, p, func(n *node) (fsread.File, error) {
		if n.stat.Type() != fsread.TypeRegular {
			return nil, errors.New("not a regular file")
		}
		return f.dataStream(n.rec, "")
	})
}

// Xattrs returns the alternate data streams of the file at p as user.*
// extended attributes.
func (f *FS) Xattrs(p string) ([]fsread.Xattr, error) {
	return at(f, p, func(n *node) ([]fsread.Xattr, error) { return f.xattrs(n.rec) })
}
