// Package xfs reads files out of an XFS filesystem given as an
// io.ReaderAt over its partition's bytes, without root, a mount or a
// restore of the disk: the file-level restore of sauve (ls, get, find)
// reads snapshots through it, fetching only the chunks the files use.
//
// What it reads: the superblock of v5 (CRC-enabled) and v4 filesystems,
// refusing incompatible features it does not know; inodes v1 to v3
// (bigtime timestamps, large extent counters), located from their number
// (no inode btree is read); data and attribute forks in local,
// extent-list and B+tree (bmbt) form, unwritten extents read as zeros,
// like holes; directories in short form, block, leaf and node form (their
// data blocks below the 32 GiB leaf offset hold every entry, so hash, leaf
// and free-index blocks are not read); local and remote symlinks; extended
// attributes of the user, trusted and security namespaces in short form,
// leaf and node attribute forks, with values local or remote, and POSIX
// ACLs as system.posix_acl_access and system.posix_acl_default (as
// getxattr(2) returns them). On v5 it verifies the CRCs of the
// superblock, inodes, bmbt blocks, directory data blocks, attribute leaf,
// node and remote blocks and remote symlink blocks.
//
// A snapshot of a mounted XFS has a dirty log (no unmount record at its
// head). The reader replays it in memory, never writing the source
// (replay.go): the committed transactions' buffer and inode items, in the
// kernel's order, skipping cancelled (freed) buffers and inodes written
// back after the transaction. Not replayed: intents left unfinished
// (extents to free, deferred mapping, reference count and reverse map
// updates), so a reflink or exchange-range operation cut short shows as
// it was before; inode cluster buffers (unlinked lists); logs written by
// a big-endian machine; an external log. When the log cannot be replayed,
// or with Options.NoReplay, the reader warns that metadata may be stale
// and reads the filesystem as it is on disk.
//
// What it does not read: the realtime device (files flagged realtime are
// refused), parent pointers (skipped), the metadir tree (an unknown
// incompatible feature: refused), quotas, and CRCs of the AG headers,
// which it never reads.
//
// It is written here rather than taken from a library: the one Go XFS
// reader in use, github.com/masahiro331/go-xfs-filesystem (made for image
// scanners), reads v5 only, no extended attributes and no remote
// symlinks, replays no log, and allocates what the image's sizes say.
//
// Every count and length read from the disk is bounded before it is used:
// a damaged or hostile image gives an error naming the inode and what is
// wrong, never a panic, a hang or a huge allocation.
package xfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// Features of the superblock this reader acts on.
const (
	versionMoreBits = 0x8000
	features2FType  = 0x200

	incompatFType     = 0x1
	incompatSpinodes  = 0x2
	incompatMetaUUID  = 0x4
	incompatBigtime   = 0x8
	incompatNeedsRep  = 0x10
	incompatNrext64   = 0x20
	incompatExchRange = 0x40
	incompatParent    = 0x80
	// What this reader reads correctly: an unknown flag may change the
	// on-disk format in a way it would misread.
	incompatReadable = incompatFType | incompatSpinodes | incompatMetaUUID | incompatBigtime |
		incompatNrext64 | incompatExchRange | incompatParent
)

// Options tune Open.
type Options struct {
	// NoReplay reads the filesystem as it is on disk even when its log
	// is dirty (metadata may then be stale), with a warning. Without
	// it, a dirty log is replayed in memory; one that cannot be is
	// warned of, and the filesystem read as it is on disk.
	NoReplay bool
	// Warn hears of what was read with less certainty; nil: silence.
	Warn func(string)
	// skipCRC lets the fuzz targets reach the parsers behind the CRCs.
	skipCRC bool
}

// FS is an open XFS filesystem. It is safe for concurrent use.
type FS struct {
	r    io.ReaderAt
	size int64
	sb   super
	// dirtyLog says the log has no unmount record at its head.
	dirtyLog bool
	// replayed counts the sectors the log's replay overlays.
	replayed int
	skipCRC  bool

	dirs fsread.DirCache
}

// super holds what the reader needs from the superblock.
type super struct {
	v5        bool
	bs        int64
	blocklog  uint
	dblocks   uint64
	agblocks  uint64
	agcount   uint64
	agblklog  uint
	inopblog  uint
	isize     int
	sectsize  int
	dirblklog uint
	rootino   uint64
	logstart  uint64
	logblocks uint64
	ftype     bool
	incompat  uint32
	label     string
}

// Open reads the filesystem of the size bytes of r.
func Open(r io.ReaderAt, size int64, opts Options) (*FS, error) {
	warn := opts.Warn
	if warn == nil {
		warn = func(string) {}
	}
	f := &FS{r: r, size: size, skipCRC: opts.skipCRC}
	if err := f.readSuper(); err != nil {
		return nil, err
	}
	clean, lg, err := f.logClean()
	switch {
	case err != nil:
		warn(fmt.Sprintf("XFS log not checked (%v): metadata may be stale", err))
	case !clean:
		f.dirtyLog = true
		if opts.NoReplay {
			warn("XFS log not replayed: metadata may be stale (the filesystem was not cleanly unmounted: a snapshot of a mounted filesystem?)")
			break
		}
		o, err := f.replay(lg)
		if err != nil {
			warn(fmt.Sprintf("XFS log not replayed (%v): metadata may be stale", err))
			break
		}
		f.r, f.replayed = o, len(o.m)
		if err := f.readSuper(); err != nil {
			return nil, fmt.Errorf("after replaying the log: %w", err)
		}
	}
	return f, nil
}

// Label is the filesystem's volume label.
func (f *FS) Label() string { return f.sb.label }

// DirtyLog says whether the log needed recovery.
func (f *FS) DirtyLog() bool { return f.dirtyLog }

// Replayed is how many 512-byte sectors the replay of the log supersedes.
func (f *FS) Replayed() int { return f.replayed }

func be16(b []byte, off int) uint16 { return binary.BigEndian.Uint16(b[off:]) }
func be32(b []byte, off int) uint32 { return binary.BigEndian.Uint32(b[off:]) }
func be64(b []byte, off int) uint64 { return binary.BigEndian.Uint64(b[off:]) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crcOK verifies an XFS metadata CRC: crc32c of b with the 4 bytes at off
// taken as zeros, stored little-endian at off.
func (f *FS) crcOK(b []byte, off int) bool {
	if off+4 > len(b) {
		return false
	}
	if f.skipCRC {
		return true
	}
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	c = crc32.Update(c, castagnoli, b[off+4:])
	return c == binary.LittleEndian.Uint32(b[off:])
}

func crc32cOf(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

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

// fsbOffset is the byte offset of the n blocks from filesystem block
// number fsb (an AG number in the high bits, a block of the AG below).
func (f *FS) fsbOffset(fsb, n uint64) (int64, error) {
	s := &f.sb
	ag, agbno := fsb>>s.agblklog, fsb&(1<<s.agblklog-1)
	if ag >= s.agcount || agbno >= s.agblocks || n > s.agblocks-agbno {
		return 0, fmt.Errorf("blocks %d+%d lie outside the filesystem (%d allocation groups of %d blocks)", fsb, n, s.agcount, s.agblocks)
	}
	return int64(ag*s.agblocks+agbno) * s.bs, nil
}

// block reads filesystem block fsb.
func (f *FS) block(fsb uint64) ([]byte, error) {
	off, err := f.fsbOffset(fsb, 1)
	if err != nil {
		return nil, err
	}
	p := make([]byte, f.sb.bs)
	return p, f.readAt(p, off)
}

func (f *FS) readSuper() error {
	sb := make([]byte, 512)
	if err := f.readAt(sb, 0); err != nil {
		return fmt.Errorf("xfs superblock: %w", err)
	}
	if string(sb[:4]) != "XFSB" {
		return errors.New("xfs superblock: no XFS magic")
	}
	ver := be16(sb, 100)
	s := super{bs: int64(be32(sb, 4)), dblocks: be64(sb, 8), rootino: be64(sb, 56), logstart: be64(sb, 48),
		agblocks: uint64(be32(sb, 84)), agcount: uint64(be32(sb, 88)), logblocks: uint64(be32(sb, 96)),
		sectsize: int(be16(sb, 102)), isize: int(be16(sb, 104)), blocklog: uint(sb[120]),
		agblklog: uint(sb[124]), inopblog: uint(sb[123]), dirblklog: uint(sb[192])}
	s.label = strings.TrimRight(string(sb[108:120]), "\x00")
	switch ver & 0xF {
	case 5:
		s.v5 = true
	case 4:
	default:
		return fmt.Errorf("xfs superblock: version %d is not supported (4 and 5 are)", ver&0xF)
	}
	switch {
	case s.blocklog < 9 || s.blocklog > 16 || s.bs != 1<<s.blocklog:
		return fmt.Errorf("xfs superblock damaged: block size %d", s.bs)
	case s.sectsize < 512 || s.sectsize > 32768 || s.sectsize&(s.sectsize-1) != 0 || int64(s.sectsize) > s.bs:
		return fmt.Errorf("xfs superblock damaged: sector size %d", s.sectsize)
	case s.isize < 256 && s.v5, s.isize < 128 || int64(s.isize) > s.bs/2 || s.isize&(s.isize-1) != 0:
		return fmt.Errorf("xfs superblock damaged: inode size %d", s.isize)
	case 1<<s.inopblog != s.bs/int64(s.isize):
		return fmt.Errorf("xfs superblock damaged: %d inodes per block", 1<<s.inopblog)
	case s.agblklog > 31 || s.agblocks == 0 || s.agblocks > 1<<s.agblklog || s.agcount == 0:
		return fmt.Errorf("xfs superblock damaged: allocation groups of %d blocks", s.agblocks)
	case s.dirblklog > 16-s.blocklog:
		return fmt.Errorf("xfs superblock damaged: directory blocks of 2^%d filesystem blocks", s.dirblklog)
	case s.dblocks == 0 || s.dblocks > s.agcount*s.agblocks || s.dblocks <= (s.agcount-1)*s.agblocks:
		return fmt.Errorf("xfs superblock damaged: %d blocks in %d allocation groups of %d", s.dblocks, s.agcount, s.agblocks)
	case s.dblocks > uint64(f.size)/uint64(s.bs):
		return fmt.Errorf("xfs: the filesystem (%d blocks of %d bytes) is larger than its partition (%d bytes): truncated image?", s.dblocks, s.bs, f.size)
	}
	if s.v5 {
		full := make([]byte, s.sectsize)
		if err := f.readAt(full, 0); err != nil {
			return fmt.Errorf("xfs superblock: %w", err)
		}
		if !f.crcOK(full, 224) {
			return errors.New("xfs superblock: CRC mismatch (damaged superblock)")
		}
		s.incompat = be32(sb, 216)
		switch {
		case s.incompat&incompatNeedsRep != 0:
			return errors.New("xfs: the filesystem is marked as needing repair (xfs_repair was interrupted): not read")
		case s.incompat&^incompatReadable != 0:
			return fmt.Errorf("xfs: unknown incompatible features %#x: this reader could misread the filesystem", s.incompat&^incompatReadable)
		}
		s.ftype = s.incompat&incompatFType != 0
	} else if ver&versionMoreBits != 0 {
		s.ftype = be32(sb, 200)&features2FType != 0
	}
	f.sb = s
	if _, err := f.inoOffset(s.rootino); err != nil {
		return fmt.Errorf("xfs superblock damaged: root inode: %w", err)
	}
	return nil
}

// inoOffset is where inode ino lies: its number holds an AG number, a
// block of the AG and the inode's place in that block.
func (f *FS) inoOffset(ino uint64) (int64, error) {
	s := &f.sb
	shift := s.agblklog + s.inopblog
	if shift >= 64 {
		return 0, fmt.Errorf("inode %d does not exist", ino)
	}
	ag, agbno, idx := ino>>shift, (ino>>s.inopblog)&(1<<s.agblklog-1), ino&(1<<s.inopblog-1)
	if ag >= s.agcount || agbno >= s.agblocks || (ag == s.agcount-1 && ag*s.agblocks+agbno >= s.dblocks) {
		return 0, fmt.Errorf("inode %d does not exist (it would lie outside the filesystem)", ino)
	}
	return int64(ag*s.agblocks+agbno)*s.bs + int64(idx)*int64(s.isize), nil
}

// resolve finds the inode of the absolute slash-separated path p (see
// fsread.Resolve).
func (f *FS) resolve(p string) (uint64, error) { return fsread.Resolve(tree{f}, f.sb.rootino, p) }

// tree is f as fsread.Resolve walks it.
type tree struct{ f *FS }

func (t tree) Names(ino uint64) (map[string]uint64, bool, error) {
	in, err := t.f.inode(ino)
	if err != nil || !in.isDir() {
		return nil, false, err
	}
	m, err := t.f.names(in)
	return m, true, err
}

func (t tree) Link(ino uint64) (string, bool, error) {
	in, err := t.f.inode(ino)
	if err != nil || in.mode&fsread.TypeMask != fsread.TypeSymlink {
		return "", false, err
	}
	target, err := t.f.readlink(in)
	return target, true, err
}

// names maps the names of directory in to their inodes.
func (f *FS) names(in *inode) (map[string]uint64, error) {
	return f.dirs.Names(in.ino, func(add func(string, uint64) error) error { return f.readDir(in, add) })
}

// at runs fn on the inode at path p; its errors name p.
func at[T any](f *FS, p string, fn func(*inode) (T, error)) (T, error) {
	var zero T
	ino, err := f.resolve(p)
	if err != nil {
		return zero, err
	}
	in, err := f.inode(ino)
	if err == nil {
		var v T
		if v, err = fn(in); err == nil {
			return v, nil
		}
	}
	return zero, fmt.Errorf("%s: %w", p, err)
}

// Lstat returns the metadata of the file at p (a symlink itself).
func (f *FS) Lstat(p string) (fsread.Stat, error) {
	return at(f, p, func(in *inode) (fsread.Stat, error) { return in.stat(), nil })
}

// ReadDir lists the directory at p, without "." and "..", in on-disk
// order.
func (f *FS) ReadDir(p string) ([]fsread.DirEntry, error) {
	return at(f, p, func(in *inode) ([]fsread.DirEntry, error) {
		if !in.isDir() {
			return nil, errors.New("not a directory")
		}
		var out []fsread.DirEntry
		err := f.readDir(in, func(name string, ino uint64) error {
			child, err := f.inode(ino)
			if err != nil {
				return fmt.Errorf("entry %q: %w", name, err)
			}
			out = append(out, fsread.DirEntry{Name: name, Stat: child.stat()})
			return nil
		})
		return out, err
	})
}

// Readlink returns the target of the symlink at p.
func (f *FS) Readlink(p string) (string, error) { return at(f, p, f.readlink) }

// Open opens the regular file at p.
func (f *FS) Open(p string) (fsread.File, error) {
	return at(f, p, func(in *inode) (fsread.File, error) {
		if in.mode&fsread.TypeMask != fsread.TypeRegular {
			return nil, errors.New("not a regular file")
		}
		return f.open(in)
	})
}

// Xattrs returns the extended attributes of the file at p.
func (f *FS) Xattrs(p string) ([]fsread.Xattr, error) { return at(f, p, f.xattrs) }
