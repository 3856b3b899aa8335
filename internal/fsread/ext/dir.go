package ext

import (
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// maxDirBlocks bounds the blocks of one directory read (largedir
// directories reach a few GiB; damaged sizes claim more).
const maxDirBlocks = 1 << 22

// readDir calls fn for each entry of directory in, but "." and "..".
func (f *FS) readDir(in *inode, fn func(name string, ino uint64) error) error {
	if in.flags&flagEncrypt != 0 {
		return fmt.Errorf("directory inode %d is encrypted (fscrypt): its names cannot be read without its key", in.ino)
	}
	if in.flags&flagInlineData != 0 {
		data, err := f.inlineData(in)
		if err != nil {
			return err
		}
		if len(data) < 4 {
			return fmt.Errorf("directory inode %d: inline data too short", in.ino)
		}
		// The parent's inode number, then entries in the rest of
		// i_block, then entries in the system.data attribute.
		first := min(len(data), 60)
		if err := f.dirents(in.ino, data[4:first], fn); err != nil {
			return err
		}
		return f.dirents(in.ino, data[first:], fn)
	}
	if f.fileBlocks(in) > maxDirBlocks {
		return fmt.Errorf("directory inode %d: %d bytes (damaged size?)", in.ino, in.size)
	}
	fl, err := f.open(in)
	if err != nil {
		return err
	}
	for _, r := range fl.rs {
		if r.unwritten {
			continue
		}
		for i := range r.n {
			b, err := f.block(r.pblk + i)
			if err != nil {
				return fmt.Errorf("directory inode %d, block %d: %w", in.ino, r.lblk+i, err)
			}
			// A leaf block under metadata_csum ends with a fake entry
			// holding its checksum. Htree index blocks (the root,
			// block 0, and nodes that start with an empty entry as
			// long as the block) have another tail, not checked: the
			// root may keep a stale leaf tail from before the
			// directory was indexed.
			index := in.flags&flagIndex != 0 && (r.lblk+i == 0 || (le32(b, 0) == 0 && int64(le16(b, 4)) == f.sb.bs))
			if t := len(b) - 12; in.seed != 0 && !index && le32(b, t) == 0 && le16(b, t+4) == 12 && b[t+6] == 0 && b[t+7] == 0xDE {
				if crc32c(in.seed, b[:t]) != le32(b, t+8) {
					return fmt.Errorf("directory inode %d, block %d fails its checksum (damaged)", in.ino, r.lblk+i)
				}
				b = b[:t]
			}
			if err := f.dirents(in.ino, b, fn); err != nil {
				return fmt.Errorf("block %d: %w", r.lblk+i, err)
			}
		}
	}
	return nil
}

// dirents parses one directory block (or inline area) b.
func (f *FS) dirents(ino uint64, b []byte, fn func(name string, ino uint64) error) error {
	filetype := f.sb.incompat&incompatFiletype != 0
	for off := 0; off+8 <= len(b); {
		child := uint64(le32(b, off))
		rec := int(le16(b, off+4))
		if f.sb.bs >= 65536 && (rec == 65535 || rec == 0) {
			rec = 65536 // a whole 64 KiB block
		}
		nameLen := int(b[off+6])
		if !filetype {
			nameLen = int(le16(b, off+6))
		}
		if rec < 8 || rec%4 != 0 || rec > len(b)-off || nameLen > rec-8 {
			return fmt.Errorf("directory inode %d: damaged entry at offset %d (length %d, name length %d)", ino, off, rec, nameLen)
		}
		name := string(b[off+8 : off+8+nameLen])
		off += rec
		if child == 0 || name == "." || name == ".." {
			continue
		}
		if nameLen == 0 {
			return fmt.Errorf("directory inode %d: an entry without a name (inode %d)", ino, child)
		}
		if err := fn(name, child); err != nil {
			return err
		}
	}
	return nil
}

// inlineData is the content of an inline-data inode: i_block, then the
// value of its system.data attribute.
func (f *FS) inlineData(in *inode) ([]byte, error) {
	data := append([]byte(nil), in.iblock()...)
	xs, err := f.inodeXattrs(in)
	if err != nil {
		return nil, err
	}
	for _, x := range xs {
		if x.Name == "system.data" {
			data = append(data, x.Value...)
		}
	}
	return data, nil
}

// readlink returns a symlink's target: in i_block (fast), inline, or in
// a data block (slow).
func (f *FS) readlink(in *inode) (string, error) {
	if in.mode&fsread.TypeMask != fsread.TypeSymlink {
		return "", errors.New("not a symbolic link")
	}
	if in.size > 4096 || in.size > f.sb.bs {
		return "", fmt.Errorf("symlink inode %d: target of %d bytes (damaged?)", in.ino, in.size)
	}
	// The kernel's test: an inode with no blocks but its xattr block's
	// keeps its target in i_block.
	eaBlocks := uint64(0)
	if in.fileACL != 0 {
		eaBlocks = uint64(f.sb.bs / 512)
	}
	fast := in.flags&flagInlineData == 0 && in.blocks == eaBlocks
	if in.flags&flagEAInode != 0 {
		fast = in.size < 60
	}
	if fast {
		if in.size >= 60 {
			return "", fmt.Errorf("symlink inode %d: fast symlink of %d bytes (damaged)", in.ino, in.size)
		}
		return string(in.iblock()[:in.size]), nil
	}
	fl, err := f.open(in)
	if err != nil {
		return "", err
	}
	p := make([]byte, in.size)
	if _, err := fl.ReadAt(p, 0); err != nil && in.size > 0 {
		return "", err
	}
	return string(p), nil
}
