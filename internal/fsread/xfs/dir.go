package xfs

import (
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// leafOffset is where a directory's leaf (hash) blocks start: its data
// blocks, which hold every entry, lie below.
const leafOffset = 32 << 30

// maxDirBlocks bounds the data blocks of one directory read.
const maxDirBlocks = 1 << 22

// readDir calls fn for each entry of directory in, but "." and "..".
func (f *FS) readDir(in *inode, fn func(name string, ino uint64) error) error {
	if in.format == fmtLocal {
		return f.shortDir(in, fn)
	}
	rs, err := f.forkRuns(in, false)
	if err != nil {
		return err
	}
	per := uint64(1) << f.sb.dirblklog // filesystem blocks per directory block
	limit := uint64(leafOffset) / uint64(f.sb.bs)
	read, last := 0, ^uint64(0)
	for _, r := range rs {
		for l := r.lblk &^ (per - 1); l < r.lblk+r.n && l < limit; l += per {
			if l == last {
				continue // a directory block spread over two extents
			}
			last = l
			if read++; read > maxDirBlocks {
				return fmt.Errorf("directory inode %d: more than %d data blocks (damaged)", in.ino, maxDirBlocks)
			}
			b, err := f.readBlocks(rs, l, per)
			if err != nil {
				return fmt.Errorf("directory inode %d, block %d: %w", in.ino, l, err)
			}
			if err := f.dataBlock(in.ino, l, b, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// shortDir reads a short-form directory, kept in the inode: a header
// (entry count, whether inode numbers take 8 bytes, the parent), then
// entries (name length, offset, name, file type, inode number).
func (f *FS) shortDir(in *inode, fn func(name string, ino uint64) error) error {
	b := in.data
	if in.size < int64(len(b)) {
		b = b[:in.size]
	}
	if len(b) < 2 {
		return fmt.Errorf("directory inode %d: short-form header truncated", in.ino)
	}
	count, inoSize := int(b[0]), 4
	if b[1] != 0 {
		inoSize = 8
	}
	off := 2 + inoSize
	ft := 0
	if f.sb.ftype {
		ft = 1
	}
	for i := range count {
		if off+3 > len(b) {
			return fmt.Errorf("directory inode %d: short-form entry %d truncated", in.ino, i)
		}
		nl := int(b[off])
		end := off + 3 + nl + ft + inoSize
		if nl == 0 || end > len(b) {
			return fmt.Errorf("directory inode %d: short-form entry %d damaged", in.ino, i)
		}
		name := string(b[off+3 : off+3+nl])
		p := off + 3 + nl + ft
		var ino uint64
		if inoSize == 8 {
			ino = be64(b, p) & (1<<56 - 1)
		} else {
			ino = uint64(be32(b, p))
		}
		off = end
		if err := fn(name, ino); err != nil {
			return err
		}
	}
	return nil
}

// Magics of directory data blocks: with a leaf at their end (a single
// block directory) or without, v4 and v5.
const (
	magicBlock4 = "XD2B"
	magicData4  = "XD2D"
	magicBlock5 = "XDB3"
	magicData5  = "XDD3"
)

// dataBlock parses one directory data block b (logical block l).
func (f *FS) dataBlock(ino, l uint64, b []byte, fn func(name string, ino uint64) error) error {
	where := func(format string, a ...any) error {
		return fmt.Errorf("directory inode %d, block %d: "+format, append([]any{ino, l}, a...)...)
	}
	hdr := 16
	magic := string(b[:4])
	if f.sb.v5 {
		hdr = 64
		if magic != magicBlock5 && magic != magicData5 {
			return where("bad magic %q", magic)
		}
		if !f.crcOK(b, 4) {
			return where("CRC mismatch (damaged)")
		}
		if be64(b, 40) != ino {
			return where("owned by inode %d (damaged)", be64(b, 40))
		}
	} else if magic != magicBlock4 && magic != magicData4 {
		return where("bad magic %q", magic)
	}
	end := len(b)
	if magic == magicBlock4 || magic == magicBlock5 {
		// The leaf entries (8 bytes each) and the tail (count, stale).
		n := uint64(be32(b, len(b)-8))
		if n > uint64(len(b)-8-hdr)/8 {
			return where("%d leaf entries do not fit (damaged)", n)
		}
		end = len(b) - 8 - int(n)*8
	}
	ft := 0
	if f.sb.ftype {
		ft = 1
	}
	for off := hdr; off < end; {
		if end-off < 8 {
			return where("entry at %d truncated", off)
		}
		if be16(b, off) == 0xFFFF { // free space
			n := int(be16(b, off+2))
			if n < 8 || n%8 != 0 || n > end-off {
				return where("free space at %d of %d bytes (damaged)", off, n)
			}
			off += n
			continue
		}
		if end-off < 16 {
			return where("entry at %d truncated", off)
		}
		nl := int(b[off+8])
		n := (8 + 1 + nl + ft + 2 + 7) &^ 7
		if nl == 0 || n > end-off {
			return where("entry at %d damaged (name of %d bytes)", off, nl)
		}
		child := be64(b, off)
		name := string(b[off+9 : off+9+nl])
		off += n
		if name == "." || name == ".." {
			continue
		}
		if err := fn(name, child); err != nil {
			return err
		}
	}
	return nil
}

// maxSymlink is the longest symlink target XFS stores (XFS_SYMLINK_MAXLEN).
const maxSymlink = 1024

// readlink returns a symlink's target: in the inode (local), or in
// blocks (remote), each extent of them with a header on v5.
func (f *FS) readlink(in *inode) (string, error) {
	if in.mode&fsread.TypeMask != fsread.TypeSymlink {
		return "", errors.New("not a symbolic link")
	}
	if in.size <= 0 || in.size > maxSymlink {
		return "", fmt.Errorf("symlink inode %d: target of %d bytes (damaged)", in.ino, in.size)
	}
	size := int(in.size)
	if in.format == fmtLocal {
		if size > len(in.data) {
			return "", fmt.Errorf("symlink inode %d: local target of %d bytes does not fit (damaged)", in.ino, size)
		}
		return string(in.data[:size]), nil
	}
	rs, err := f.forkRuns(in, false)
	if err != nil {
		return "", err
	}
	hdr := 0
	if f.sb.v5 {
		hdr = 56
	}
	// A header starts each extent (not each block) of the target.
	out := make([]byte, 0, size)
	next := uint64(0)
	for _, r := range rs {
		if len(out) == size {
			break
		}
		if r.lblk != next || r.n*uint64(f.sb.bs) > uint64(maxSymlink+hdr)+uint64(f.sb.bs) || r.unwritten {
			return "", fmt.Errorf("symlink inode %d: damaged block map", in.ino)
		}
		b, err := f.readBlocks(rs, r.lblk, r.n)
		if err != nil {
			return "", fmt.Errorf("symlink inode %d: %w", in.ino, err)
		}
		n := min(len(b)-hdr, size-len(out))
		if f.sb.v5 {
			if string(b[:4]) != "XSLM" || !f.crcOK(b, 12) || be64(b, 32) != in.ino ||
				int(be32(b, 4)) != len(out) || int(be32(b, 8)) != n {
				return "", fmt.Errorf("symlink inode %d, block %d: bad header or CRC (damaged)", in.ino, r.lblk)
			}
		}
		out = append(out, b[hdr:hdr+n]...)
		next += r.n
	}
	if len(out) != size {
		return "", fmt.Errorf("symlink inode %d: target of %d bytes, %d mapped (damaged)", in.ino, size, len(out))
	}
	return string(out), nil
}
