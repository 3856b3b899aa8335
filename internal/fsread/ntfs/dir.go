package ntfs

import (
	"fmt"
	"strings"
)

// Index entry flags.
const (
	entrySubnode = 0x1
	entryLast    = 0x2
	nsDOS        = 2 // a file's 8.3 name, beside its long one
)

// readDir calls fn for each name in directory rec, with its file
// reference, but "." (the root's own entry) and DOS 8.3 names. It walks the whole index tree, the root and
// every INDX block its entries point down to, each block once.
func (f *FS) readDir(rec *record, fn func(name string, ref uint64) error) error {
	root := rec.find(atIndexRoot, "$I30")
	if root == nil || !root.resident {
		return fmt.Errorf("MFT record %d: %w", rec.num, errNoIndex)
	}
	v := root.value
	if len(v) < 0x20 {
		return fmt.Errorf("MFT record %d: $INDEX_ROOT too short", rec.num)
	}
	bs := int64(le32(v, 8))
	seen := map[string]bool{}
	var down []int64
	visit := func(b []byte) error {
		return f.entries(b, func(name string, ref uint64, sub int64) error {
			if sub >= 0 {
				down = append(down, sub)
			}
			if name == "" || seen[name] {
				return nil
			}
			seen[name] = true
			return fn(name, ref)
		})
	}
	if err := visit(v[0x10:]); err != nil {
		return fmt.Errorf("MFT record %d, $INDEX_ROOT: %w", rec.num, err)
	}
	if len(down) == 0 {
		return nil
	}
	segs := rec.all(atIndexAlloc, "$I30")
	if len(segs) == 0 {
		return fmt.Errorf("MFT record %d: index entries point to blocks, but there is no $INDEX_ALLOCATION", rec.num)
	}
	if bs < minRecSize || bs > maxRecSize || bs&(bs-1) != 0 {
		return fmt.Errorf("MFT record %d: index blocks of %d bytes (damaged)", rec.num, bs)
	}
	alloc, err := f.newStream(rec.num, segs)
	if err != nil {
		return fmt.Errorf("MFT record %d, $INDEX_ALLOCATION: %w", rec.num, err)
	}
	// Block numbers count clusters, or 512-byte units when blocks are
	// smaller than clusters.
	unit := f.cs
	if bs < f.cs {
		unit = 512
	}
	done := map[int64]bool{}
	b := make([]byte, bs)
	for len(down) > 0 {
		vcn := down[len(down)-1]
		down = down[:len(down)-1]
		if done[vcn] {
			continue // a loop in a damaged index, or a block pointed to twice
		}
		done[vcn] = true
		if vcn < 0 || vcn > alloc.size/unit || alloc.size-vcn*unit < bs {
			return fmt.Errorf("MFT record %d: index block at VCN %d lies outside $INDEX_ALLOCATION (%d bytes)", rec.num, vcn, alloc.size)
		}
		if err := alloc.readFull(b, vcn*unit); err != nil {
			return fmt.Errorf("MFT record %d, index block %d: %w", rec.num, vcn, err)
		}
		if err := indexBlock(b, vcn); err != nil {
			return fmt.Errorf("MFT record %d, index block %d: %w", rec.num, vcn, err)
		}
		if err := visit(b[0x18:]); err != nil {
			return fmt.Errorf("MFT record %d, index block %d: %w", rec.num, vcn, err)
		}
	}
	return nil
}

// indexBlock checks an INDX block and undoes its fixups.
func indexBlock(b []byte, vcn int64) error {
	if string(b[:4]) != "INDX" {
		return fmt.Errorf("no INDX signature (damaged)")
	}
	if err := fixup(b); err != nil {
		return err
	}
	if got := int64(le64(b, 0x10)); got != vcn {
		return fmt.Errorf("says it is block %d (damaged)", got)
	}
	return nil
}

// entries parses an index node: a header (where entries start and end,
// from the header) then entries, each a file reference, lengths, flags, a
// $FILE_NAME key and, for a node with children, the VCN of the block
// below it. fn gets the name ("" for none to list) and sub (-1: none).
func (f *FS) entries(h []byte, fn func(name string, ref uint64, sub int64) error) error {
	if len(h) < 16 {
		return fmt.Errorf("index header too short")
	}
	start, end := int64(le32(h, 0)), int64(le32(h, 4))
	if start < 16 || start > end || end > int64(len(h)) {
		return fmt.Errorf("damaged index header (entries %d-%d of %d bytes)", start, end, len(h))
	}
	b := h[:end]
	for off := int(start); ; {
		if off+16 > len(b) {
			return fmt.Errorf("index entries end without a last entry")
		}
		ref, n, kl, flags := le64(b, off), int(le16(b, off+8)), int(le16(b, off+10)), le16(b, off+12)
		if n < 16 || n%8 != 0 || n > len(b)-off || 16+kl > n {
			return fmt.Errorf("damaged index entry at %d (length %d, key %d)", off, n, kl)
		}
		sub := int64(-1)
		if flags&entrySubnode != 0 {
			if n < 16+kl+8 {
				return fmt.Errorf("index entry at %d too short for its child pointer", off)
			}
			sub = int64(le64(b, off+n-8))
		}
		name := ""
		if flags&entryLast == 0 {
			k := b[off+16 : off+16+kl]
			if len(k) < 0x42 || 0x42+2*int(k[0x40]) > len(k) {
				return fmt.Errorf("damaged file name in index entry at %d", off)
			}
			name = utf16String(k[0x42 : 0x42+2*int(k[0x40])])
			switch {
			case k[0x41] == nsDOS, name == ".":
				name = ""
			case strings.ContainsAny(name, "/\x00"):
				f.warn(fmt.Sprintf("record %d: name %q holds a slash or NUL: left out", refNum(ref), name))
				name = ""
			}
		}
		if err := fn(name, ref, sub); err != nil {
			return err
		}
		if flags&entryLast != 0 {
			return nil
		}
		off += n
	}
}
