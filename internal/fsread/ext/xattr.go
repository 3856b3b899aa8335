package ext

import (
	"encoding/binary"
	"fmt"

	"github.com/sauve-backup/sauve/internal/fsread"
)

const xattrMagic = 0xEA020000

// maxXattrValue is the largest value Linux allows (XATTR_SIZE_MAX).
const maxXattrValue = 65536

// xattrPrefixes are the namespaces of the name index of an entry.
var xattrPrefixes = map[byte]string{
	1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default",
	4: "trusted.", 6: "security.", 7: "system.", 8: "system.richacl",
}

// xattrs returns every attribute of in: in the inode, then in its block.
func (f *FS) xattrs(in *inode) ([]fsread.Xattr, error) {
	xs, err := f.inodeXattrs(in)
	if err != nil {
		return nil, err
	}
	if in.fileACL == 0 {
		return xs, nil
	}
	b, err := f.block(in.fileACL)
	if err != nil {
		return nil, fmt.Errorf("inode %d's xattr block: %w", in.ino, err)
	}
	if le32(b, 0) != xattrMagic || le32(b, 8) != 1 {
		return nil, fmt.Errorf("inode %d's xattr block %d: bad header", in.ino, in.fileACL)
	}
	more, err := f.xattrEntries(in.ino, b, 32, 0)
	if err != nil {
		return nil, fmt.Errorf("inode %d's xattr block %d: %w", in.ino, in.fileACL, err)
	}
	return append(xs, more...), nil
}

// inodeXattrs returns the attributes kept in the inode, after its extra
// fields.
func (f *FS) inodeXattrs(in *inode) ([]fsread.Xattr, error) {
	start := 128 + in.extra
	if len(in.raw) <= 128 || start+4 > len(in.raw) || le32(in.raw, start) != xattrMagic {
		return nil, nil
	}
	xs, err := f.xattrEntries(in.ino, in.raw, start+4, start+4)
	if err != nil {
		return nil, fmt.Errorf("inode %d's in-inode xattrs: %w", in.ino, err)
	}
	return xs, nil
}

// xattrEntries parses the entries of b from off; values lie at their
// offset from base.
func (f *FS) xattrEntries(ino uint64, b []byte, off, base int) ([]fsread.Xattr, error) {
	var out []fsread.Xattr
	for {
		if off+4 > len(b) {
			return nil, fmt.Errorf("entries run past the end at %d", off)
		}
		if le32(b, off) == 0 {
			return out, nil
		}
		if off+16 > len(b) {
			return nil, fmt.Errorf("entry at %d runs past the end", off)
		}
		nameLen, idx := int(b[off]), b[off+1]
		voff, vinum, vsize := int(le16(b, off+2)), le32(b, off+4), int(le32(b, off+8))
		if off+16+nameLen > len(b) {
			return nil, fmt.Errorf("entry name at %d runs past the end", off)
		}
		name := string(b[off+16 : off+16+nameLen])
		off += (16 + nameLen + 3) &^ 3
		if vsize > maxXattrValue {
			return nil, fmt.Errorf("attribute %q: value of %d bytes", name, vsize)
		}
		var value []byte
		if vinum != 0 {
			v, err := f.eaInodeValue(uint64(vinum), vsize)
			if err != nil {
				return nil, fmt.Errorf("attribute %q: %w", name, err)
			}
			value = v
		} else {
			if base+voff+vsize > len(b) {
				return nil, fmt.Errorf("attribute %q: value at %d (%d bytes) runs past the end", name, base+voff, vsize)
			}
			value = append([]byte(nil), b[base+voff:base+voff+vsize]...)
		}
		prefix, ok := xattrPrefixes[idx]
		if !ok {
			continue // a namespace Linux does not name: nothing could set it back
		}
		if idx == 2 || idx == 3 {
			v, err := aclToXattr(value)
			if err != nil {
				return nil, fmt.Errorf("attribute %s: %w", prefix, err)
			}
			value = v
		}
		out = append(out, fsread.Xattr{Name: prefix + name, Value: value})
	}
}

// eaInodeValue reads a value kept in its own inode (ea_inode).
func (f *FS) eaInodeValue(ino uint64, size int) ([]byte, error) {
	in, err := f.inode(ino)
	if err != nil {
		return nil, err
	}
	if in.flags&flagEAInode == 0 || in.flags&flagInlineData != 0 || in.size != int64(size) {
		return nil, fmt.Errorf("inode %d is not the attribute's value inode", ino)
	}
	fl, err := f.open(in)
	if err != nil {
		return nil, err
	}
	v := make([]byte, size)
	if _, err := fl.ReadAt(v, 0); err != nil && size > 0 {
		return nil, err
	}
	return v, nil
}

// aclToXattr converts an ACL from ext4's compact form (version 1,
// short entries without an ID for the owner, group, mask and other) to
// the form getxattr(2) returns (version 2, every entry with an ID).
func aclToXattr(v []byte) ([]byte, error) {
	if len(v) < 4 || le32(v, 0) != 1 {
		return nil, fmt.Errorf("ACL of unknown version")
	}
	out := binary.LittleEndian.AppendUint32(nil, 2)
	for off := 4; off < len(v); {
		if off+4 > len(v) {
			return nil, fmt.Errorf("ACL entry at %d truncated", off)
		}
		tag, perm := le16(v, off), le16(v, off+2)
		id := uint32(0xFFFFFFFF)
		switch tag {
		case 2, 8: // ACL_USER, ACL_GROUP
			if off+8 > len(v) {
				return nil, fmt.Errorf("ACL entry at %d truncated", off)
			}
			id = le32(v, off+4)
			off += 8
		case 1, 4, 0x10, 0x20:
			off += 4
		default:
			return nil, fmt.Errorf("ACL entry of unknown tag %#x", tag)
		}
		out = binary.LittleEndian.AppendUint16(out, tag)
		out = binary.LittleEndian.AppendUint16(out, perm)
		out = binary.LittleEndian.AppendUint32(out, id)
	}
	return out, nil
}
