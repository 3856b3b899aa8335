// Package ext reads files out of an ext2, ext3 or ext4 filesystem given
// as an io.ReaderAt over its partition's bytes, without root, a mount or
// a restore of the disk: the file-level restore of sauve (ls, get, find)
// reads snapshots through it, fetching only the chunks the files use.
//
// Under metadata_csum it verifies the checksums of the superblock,
// inodes, extent tree blocks and directory leaf blocks, and of journal
// commit blocks; not yet those of group descriptors, htree index blocks,
// xattr blocks, or journal descriptor and data blocks.
//
// It reads the superblock (refusing incompatible features it does not
// know), group descriptors (meta_bg, flex_bg, 64bit), inodes of any size,
// extent trees of
// any depth, ext2/3 block maps (direct, indirect, double and triple),
// sparse files and unwritten extents (holes), inline data, linear and
// htree directories (an htree's leaves are plain directory blocks, and its
// index blocks look like one empty entry, so a linear read sees every
// name), fast, slow and inline symlinks, device files, FIFOs and sockets,
// and extended attributes in the inode, in an attribute block or in an
// EA inode, POSIX ACLs converted to the form getxattr(2) returns.
//
// A snapshot of a mounted filesystem holds a journal that needs recovery:
// the reader replays it in memory (journal.go), never writing the source.
//
// It is written here rather than taken from a library: the Go ext4
// readers available (github.com/masahiro331/go-ext4-filesystem, the ext4
// package of github.com/diskfs/go-diskfs) replay no jbd2 journal, so they
// read stale metadata from every snapshot of a mounted filesystem, and
// they lack parts of the rest (ext2/3 indirect block maps, xattr blocks
// and EA inodes, inline data).
//
// Every count and length read from the disk is bounded before it is used:
// a damaged or hostile image gives an error naming the inode and what is
// wrong, never a panic, a hang or a huge allocation.
package ext

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/blockmap"
	"github.com/sauve-backup/sauve/internal/fsread"
)

// Feature flags of the superblock this reader acts on.
const (
	compatHasJournal = 0x4

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompatExtents     = 0x40
	incompat64Bit       = 0x80 // read by blockmap.ExtGeometry
	incompatMMP         = 0x100
	incompatFlexBG      = 0x200
	incompatEAInode     = 0x400
	incompatDirData     = 0x1000
	incompatCsumSeed    = 0x2000
	incompatLargeDir    = 0x4000
	incompatInlineData  = 0x8000
	incompatEncrypt     = 0x10000
	incompatCasefold    = 0x20000
	// What this reader reads correctly: an unknown flag may change the
	// on-disk format in a way it would misread.
	incompatReadable = incompatFiletype | incompatRecover | incompatMetaBG | incompatExtents |
		incompat64Bit | incompatMMP | incompatFlexBG | incompatEAInode | incompatCsumSeed |
		incompatLargeDir | incompatInlineData | incompatEncrypt | incompatCasefold

	roSparseSuper  = 0x1
	roHugeFile     = 0x8
	roMetadataCsum = 0x400
)

// rootIno is the inode of the root directory.
const rootIno = 2

// Options tune Open.
type Options struct {
	// NoReplay reads the filesystem as it is on disk even when its
	// journal needs recovery (metadata may then be stale); without it,
	// a journal that cannot be replayed is an error.
	NoReplay bool
	// Warn hears of what was read with less certainty; nil: silence.
	Warn func(string)
}

// FS is an open ext2/3/4 filesystem. It is safe for concurrent use.
type FS struct {
	raw  io.ReaderAt // the partition as it is
	r    io.ReaderAt // the partition as the replayed journal shows it
	size int64
	sb   super
	// replayed counts the blocks the journal's replay overlays.
	replayed int

	dirs fsread.DirCache
}

// super holds what the reader needs from the superblock.
type super struct {
	bs        int64
	blocks    uint64
	inodes    uint64
	ipg       uint64
	bpg       uint64
	fdb       uint64
	isize     int
	descSize  int
	firstMeta uint64
	compat    uint32
	incompat  uint32
	ro        uint32
	seed      uint32
	label     string
	journal   uint32 // journal inode
	jdev      uint32 // external journal device
	backups   [2]uint32
	sparse2   bool
}

// Open reads the filesystem of the size bytes of r.
func Open(r io.ReaderAt, size int64, opts Options) (*FS, error) {
	warn := opts.Warn
	if warn == nil {
		warn = func(string) {}
	}
	f := &FS{raw: r, r: r, size: size}
	if err := f.readSuper(); err != nil {
		return nil, err
	}
	if f.sb.incompat&incompatRecover == 0 {
		return f, nil
	}
	why := "its journal needs recovery (a snapshot of a mounted filesystem, or one not cleanly unmounted)"
	if opts.NoReplay {
		warn(why + ": not replayed, metadata may be stale")
		return f, nil
	}
	if f.sb.compat&compatHasJournal == 0 || f.sb.journal == 0 {
		return nil, fmt.Errorf("ext: %s, but the journal is external (device %#x): it cannot be replayed (read the metadata as it is on disk, possibly stale, with --no-replay)", why, f.sb.jdev)
	}
	ov, err := f.replay(warn)
	if err != nil {
		return nil, fmt.Errorf("ext: %s, and replaying it failed: %w (read the metadata as it is on disk, possibly stale, with --no-replay)", why, err)
	}
	if len(ov.m) > 0 {
		f.r, f.replayed = ov, len(ov.m)
		// The journal may hold a newer superblock.
		if err := f.readSuper(); err != nil {
			return nil, fmt.Errorf("after replaying the journal: %w", err)
		}
	}
	return f, nil
}

// Label is the filesystem's volume label.
func (f *FS) Label() string { return f.sb.label }

// Replayed is how many blocks the replay of the journal supersedes.
func (f *FS) Replayed() int { return f.replayed }

func le16(b []byte, off int) uint16 { return binary.LittleEndian.Uint16(b[off:]) }
func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the kernel's crc32c(seed, p): no inversion on either side.
func crc32c(seed uint32, p []byte) uint32 { return ^crc32.Update(^seed, castagnoli, p) }

// readAt reads len(p) bytes at off of the partition, as replayed.
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

// block reads filesystem block b.
func (f *FS) block(b uint64) ([]byte, error) {
	if b >= f.sb.blocks {
		return nil, fmt.Errorf("block %d lies outside the filesystem (%d blocks)", b, f.sb.blocks)
	}
	p := make([]byte, f.sb.bs)
	return p, f.readAt(p, int64(b)*f.sb.bs)
}

func (f *FS) readSuper() error {
	sb := make([]byte, 1024)
	if err := f.readAt(sb, 1024); err != nil {
		return fmt.Errorf("ext superblock: %w", err)
	}
	if le16(sb, 56) != 0xEF53 {
		return errors.New("ext superblock: no ext2/3/4 magic")
	}
	s := super{compat: le32(sb, 92), incompat: le32(sb, 96), ro: le32(sb, 100)}
	s.label = strings.TrimRight(string(sb[120:136]), "\x00")
	switch {
	case s.incompat&incompatJournalDev != 0:
		return errors.New("ext: this is an external journal device, not a filesystem")
	case s.incompat&incompatCompression != 0:
		return errors.New("ext: the compression feature (never finished in Linux) is not supported")
	case s.incompat&incompatDirData != 0:
		return errors.New("ext: the dirdata feature (Lustre) is not supported")
	case s.incompat&^incompatReadable != 0:
		return fmt.Errorf("ext: unknown incompatible features %#x: this reader could misread the filesystem", s.incompat&^incompatReadable)
	}
	if s.ro&roMetadataCsum != 0 && crc32c(^uint32(0), sb[:1020]) != le32(sb, 1020) {
		return errors.New("ext superblock: checksum mismatch (damaged superblock)")
	}
	logBS := le32(sb, 24)
	if logBS > 6 {
		return fmt.Errorf("ext superblock damaged: block size 2^%d", 10+logBS)
	}
	s.bs = 1024 << logBS
	var damaged string
	if s.blocks, s.descSize, damaged = blockmap.ExtGeometry(sb); damaged != "" {
		return fmt.Errorf("ext superblock damaged: %s", damaged)
	}
	s.inodes, s.ipg, s.bpg = uint64(le32(sb, 0)), uint64(le32(sb, 40)), uint64(le32(sb, 32))
	s.fdb = uint64(le32(sb, 20))
	s.isize = 128
	if le32(sb, 76) != 0 { // dynamic revision
		s.isize = int(le16(sb, 88))
	}
	switch {
	case s.isize < 128 || int64(s.isize) > s.bs || s.isize&(s.isize-1) != 0:
		return fmt.Errorf("ext superblock damaged: inode size %d", s.isize)
	case s.ipg == 0 || s.bpg == 0 || s.inodes == 0:
		return errors.New("ext superblock damaged: zero inodes or blocks per group")
	case s.blocks <= s.fdb:
		return fmt.Errorf("ext superblock damaged: %d blocks", s.blocks)
	case s.blocks > uint64(f.size/s.bs):
		return fmt.Errorf("ext: the filesystem (%d blocks of %d bytes) is larger than its partition (%d bytes): truncated image?", s.blocks, s.bs, f.size)
	}
	s.firstMeta = uint64(le32(sb, 260))
	s.journal, s.jdev = le32(sb, 224), le32(sb, 228)
	s.backups = [2]uint32{le32(sb, 588), le32(sb, 592)}
	s.sparse2 = s.compat&0x200 != 0
	if s.incompat&incompatCsumSeed != 0 {
		s.seed = le32(sb, 624)
	} else {
		s.seed = crc32c(^uint32(0), sb[104:120])
	}
	f.sb = s
	return nil
}

// groupHasSuper says whether group g holds a copy of the superblock (and
// so, without meta_bg, of the descriptors).
func (s *super) groupHasSuper(g uint64) bool {
	if g <= 1 {
		return g == 0 || !s.sparse2 || s.backups[0] == 1 || s.backups[1] == 1
	}
	if s.sparse2 {
		return g == uint64(s.backups[0]) || g == uint64(s.backups[1])
	}
	if s.ro&roSparseSuper == 0 {
		return true
	}
	for _, p := range [...]uint64{3, 5, 7} {
		q := p
		for q < g {
			q *= p
		}
		if q == g {
			return true
		}
	}
	return false
}

// inodeTable is where group g's inode table starts.
func (f *FS) inodeTable(g uint64) (uint64, error) {
	s := &f.sb
	perBlock := uint64(s.bs) / uint64(s.descSize)
	i := g / perBlock
	// The primary superblock is in block 0, or block 1 with 1 KiB
	// blocks; the descriptors follow it (or, under meta_bg, sit at the
	// start of the first group of each meta group).
	b := uint64(1024/s.bs) + 1 + i
	if s.incompat&incompatMetaBG != 0 && i >= s.firstMeta {
		mg := i * perBlock
		b = s.fdb + mg*s.bpg
		if s.groupHasSuper(mg) {
			b++
		}
	}
	blk, err := f.block(b)
	if err != nil {
		return 0, fmt.Errorf("group descriptor of group %d: %w", g, err)
	}
	d := blk[(g%perBlock)*uint64(s.descSize):]
	t := uint64(le32(d, 8))
	if s.descSize >= 64 {
		t |= uint64(le32(d, 40)) << 32
	}
	itb := (s.ipg*uint64(s.isize) + uint64(s.bs) - 1) / uint64(s.bs)
	if t < s.fdb || t >= s.blocks || s.blocks-t < itb {
		return 0, fmt.Errorf("group %d's inode table (block %d) lies outside the filesystem", g, t)
	}
	return t, nil
}

// resolve finds the inode of the absolute slash-separated path p (see
// fsread.Resolve).
func (f *FS) resolve(p string) (uint64, error) { return fsread.Resolve(tree{f}, rootIno, p) }

// tree is f as fsread.Resolve walks it.
type tree struct{ f *FS }

func (t tree) Names(ino uint64) (map[string]uint64, bool, error) {
	in, err := t.f.inode(ino)
	if err != nil || in.mode&fsread.TypeMask != fsread.TypeDir {
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

func (f *FS) lookup(p string) (*inode, error) {
	return at(f, p, func(in *inode) (*inode, error) { return in, nil })
}

// Lstat returns the metadata of the file at p (a symlink itself).
func (f *FS) Lstat(p string) (fsread.Stat, error) {
	return at(f, p, func(in *inode) (fsread.Stat, error) { return in.stat(), nil })
}

// ReadDir lists the directory at p, without "." and "..", in on-disk
// order.
func (f *FS) ReadDir(p string) ([]fsread.DirEntry, error) {
	return at(f, p, func(in *inode) ([]fsread.DirEntry, error) {
		if in.mode&fsread.TypeMask != fsread.TypeDir {
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

// Xattrs returns the extended attributes of the file at p, but the
// system.data attribute that holds inline data.
func (f *FS) Xattrs(p string) ([]fsread.Xattr, error) {
	return at(f, p, func(in *inode) ([]fsread.Xattr, error) {
		xs, err := f.xattrs(in)
		out := xs[:0]
		for _, x := range xs {
			if x.Name != "system.data" {
				out = append(out, x)
			}
		}
		return out, err
	})
}
