package xfs

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// Flags of an attribute: its namespace, and whether it is complete and
// its value local.
const (
	attrLocal      = 0x1
	attrRoot       = 0x2 // trusted.
	attrSecure     = 0x4 // security.
	attrParent     = 0x8 // a parent pointer
	attrIncomplete = 0x80
)

// maxXattrValue is the largest value Linux allows (XATTR_SIZE_MAX).
const maxXattrValue = 65536

// Magics of attribute fork blocks (the 16 bits of a da_blkinfo).
const (
	magicLeaf4 = 0xFBEE
	magicNode4 = 0xFEBE
	magicLeaf5 = 0x3BEE
	magicNode5 = 0x3EBE
)

// xattrs returns the attributes of in.
func (f *FS) xattrs(in *inode) ([]fsread.Xattr, error) {
	if in.attr == nil || (in.aformat == fmtExtents && in.anextents == 0) {
		return nil, nil // no fork, or an empty one
	}
	var out []fsread.Xattr
	add := func(flags byte, name, value []byte) error {
		x, ok, err := named(flags, name, value)
		if err != nil {
			return err
		}
		if ok {
			out = append(out, x)
		}
		return nil
	}
	var err error
	switch in.aformat {
	case fmtLocal:
		err = shortAttrs(in.attr, add)
	case fmtExtents, fmtBtree:
		err = f.leafAttrs(in, add)
	default:
		err = fmt.Errorf("attribute fork of format %d", in.aformat)
	}
	if err != nil {
		return nil, fmt.Errorf("inode %d's attributes: %w", in.ino, err)
	}
	return out, nil
}

// named gives an attribute the name getxattr(2) knows it by; ok is false
// for what Linux does not show as an attribute (parent pointers,
// attributes half set).
func named(flags byte, name, value []byte) (fsread.Xattr, bool, error) {
	if flags&(attrParent|attrIncomplete) != 0 {
		return fsread.Xattr{}, false, nil
	}
	n := string(name)
	switch {
	case flags&attrRoot != 0 && (n == "SGI_ACL_FILE" || n == "SGI_ACL_DEFAULT"):
		v, err := aclToXattr(value)
		if err != nil {
			return fsread.Xattr{}, false, fmt.Errorf("%s: %w", n, err)
		}
		if n == "SGI_ACL_FILE" {
			return fsread.Xattr{Name: "system.posix_acl_access", Value: v}, true, nil
		}
		return fsread.Xattr{Name: "system.posix_acl_default", Value: v}, true, nil
	case flags&attrRoot != 0:
		n = "trusted." + n
	case flags&attrSecure != 0:
		n = "security." + n
	default:
		n = "user." + n
	}
	return fsread.Xattr{Name: n, Value: append([]byte(nil), value...)}, true, nil
}

// shortAttrs reads a short-form attribute fork: a header (total size,
// count), then entries (name length, value length, flags, name, value).
func shortAttrs(b []byte, add func(flags byte, name, value []byte) error) error {
	if len(b) < 4 {
		return errors.New("short-form header truncated")
	}
	total := int(be16(b, 0))
	if total < 4 || total > len(b) {
		return fmt.Errorf("short-form attributes of %d bytes (damaged)", total)
	}
	b = b[:total]
	off := 4
	for i := range int(b[2]) {
		if off+3 > len(b) {
			return fmt.Errorf("short-form attribute %d truncated", i)
		}
		nl, vl, flags := int(b[off]), int(b[off+1]), b[off+2]
		if off+3+nl+vl > len(b) {
			return fmt.Errorf("short-form attribute %d runs past the fork", i)
		}
		name := b[off+3 : off+3+nl]
		if err := add(flags, name, b[off+3+nl:off+3+nl+vl]); err != nil {
			return err
		}
		off += 3 + nl + vl
	}
	return nil
}

// leafAttrs reads attributes kept in blocks of the attribute fork: block
// 0 is a leaf, or the root of a dabtree whose leftmost path leads to the
// first leaf; leaves chain to the next by their forward pointer.
func (f *FS) leafAttrs(in *inode, add func(flags byte, name, value []byte) error) error {
	rs, err := f.forkRuns(in, true)
	if err != nil {
		return err
	}
	nodeMagic, leafMagic, blkinfo := uint16(magicNode4), uint16(magicLeaf4), 12
	if f.sb.v5 {
		nodeMagic, leafMagic, blkinfo = magicNode5, magicLeaf5, 56
	}
	seen := map[uint64]bool{}
	visit := func(l uint64) ([]byte, error) {
		if seen[l] || len(seen) > maxDirBlocks {
			return nil, fmt.Errorf("block %d visited twice (a loop: damaged)", l)
		}
		seen[l] = true
		b, err := f.readBlocks(rs, l, 1)
		if err != nil {
			return nil, err
		}
		if m := be16(b, 8); m != nodeMagic && m != leafMagic {
			return nil, fmt.Errorf("block %d: bad magic %#x", l, m)
		}
		if f.sb.v5 && (!f.crcOK(b, 12) || be64(b, 48) != in.ino) {
			return nil, fmt.Errorf("block %d: CRC mismatch or wrong owner (damaged)", l)
		}
		return b, nil
	}
	l := uint64(0)
	b, err := visit(l)
	for depth := 0; err == nil && be16(b, 8) == nodeMagic; depth++ {
		// A node: count and level, then (hash, before) pairs.
		if depth > maxLevels || be16(b, blkinfo) == 0 {
			return fmt.Errorf("block %d: damaged node", l)
		}
		hdr := blkinfo + 4
		if f.sb.v5 {
			hdr += 4
		}
		l = uint64(be32(b, hdr+4))
		b, err = visit(l)
	}
	for err == nil {
		if be16(b, 8) != leafMagic {
			return fmt.Errorf("block %d: a node where a leaf was expected (damaged)", l)
		}
		if err := f.leafBlock(in, rs, b, blkinfo, add); err != nil {
			return fmt.Errorf("block %d: %w", l, err)
		}
		next := uint64(be32(b, 0))
		if next == 0 {
			return nil
		}
		l = next
		b, err = visit(l)
	}
	return err
}

// leafBlock reads the entries of one attribute leaf block: after the
// header (count, ...), entries (hash, offset of name and value, flags).
func (f *FS) leafBlock(in *inode, rs []run, b []byte, blkinfo int, add func(flags byte, name, value []byte) error) error {
	hdr := 32
	if f.sb.v5 {
		hdr = 80
	}
	count := int(be16(b, blkinfo))
	if count > (len(b)-hdr)/8 {
		return fmt.Errorf("%d entries do not fit (damaged)", count)
	}
	for i := range count {
		e := b[hdr+8*i:]
		idx, flags := int(be16(e, 4)), e[6]
		if idx < hdr || idx+4 > len(b) {
			return fmt.Errorf("entry %d at %d (damaged)", i, idx)
		}
		if flags&attrLocal != 0 {
			vl, nl := int(be16(b, idx)), int(b[idx+2])
			if idx+3+nl+vl > len(b) {
				return fmt.Errorf("entry %d runs past the block (damaged)", i)
			}
			if err := add(flags, b[idx+3:idx+3+nl], b[idx+3+nl:idx+3+nl+vl]); err != nil {
				return err
			}
			continue
		}
		if idx+9 > len(b) {
			return fmt.Errorf("entry %d runs past the block (damaged)", i)
		}
		blk, vl, nl := uint64(be32(b, idx)), int(be32(b, idx+4)), int(b[idx+8])
		if idx+9+nl > len(b) {
			return fmt.Errorf("entry %d runs past the block (damaged)", i)
		}
		name := b[idx+9 : idx+9+nl]
		if flags&(attrParent|attrIncomplete) != 0 {
			continue
		}
		v, err := f.remoteValue(in, rs, blk, vl)
		if err != nil {
			return fmt.Errorf("attribute %q: %w", name, err)
		}
		if err := add(flags, name, v); err != nil {
			return err
		}
	}
	return nil
}

// remoteValue reads a value kept in blocks of the attribute fork from
// block l, each block with a header on v5.
func (f *FS) remoteValue(in *inode, rs []run, l uint64, size int) ([]byte, error) {
	if size < 0 || size > maxXattrValue {
		return nil, fmt.Errorf("remote value of %d bytes (damaged)", size)
	}
	hdr := 0
	if f.sb.v5 {
		hdr = 56
	}
	per := int(f.sb.bs) - hdr
	out := make([]byte, 0, size)
	for ; len(out) < size; l++ {
		b, err := f.readBlocks(rs, l, 1)
		if err != nil {
			return nil, err
		}
		n := min(per, size-len(out))
		if f.sb.v5 && (string(b[:4]) != "XARM" || !f.crcOK(b, 12) || be64(b, 32) != in.ino ||
			int(be32(b, 4)) != len(out) || int(be32(b, 8)) != n) {
			return nil, fmt.Errorf("remote value block %d: bad header or CRC (damaged)", l)
		}
		out = append(out, b[hdr:hdr+n]...)
	}
	return out, nil
}

// aclToXattr converts an ACL from XFS's form (big-endian count, then
// tag, id, permissions of 12 bytes each) to the form getxattr(2) returns
// (version 2, then little-endian tag, permissions, id of 8 bytes each).
func aclToXattr(v []byte) ([]byte, error) {
	if len(v) < 4 {
		return nil, errors.New("ACL truncated")
	}
	n := int(be32(v, 0))
	if n > (len(v)-4)/12 {
		return nil, fmt.Errorf("ACL of %d entries in %d bytes (damaged)", n, len(v))
	}
	out := binary.LittleEndian.AppendUint32(nil, 2)
	for i := range n {
		e := v[4+12*i:]
		tag, id, perm := be32(e, 0), be32(e, 4), be16(e, 8)
		switch tag {
		case 2, 8: // ACL_USER, ACL_GROUP
		case 1, 4, 0x10, 0x20:
			id = 0xFFFFFFFF
		default:
			return nil, fmt.Errorf("ACL entry of unknown tag %#x", tag)
		}
		out = binary.LittleEndian.AppendUint16(out, uint16(tag))
		out = binary.LittleEndian.AppendUint16(out, perm)
		out = binary.LittleEndian.AppendUint32(out, id)
	}
	return out, nil
}
