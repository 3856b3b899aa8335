package xfs

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fsread"
)

// Fork formats (di_format, di_aformat).
const (
	fmtDev     = 0
	fmtLocal   = 1
	fmtExtents = 2
	fmtBtree   = 3
)

// Inode flags this reader acts on.
const (
	diflagRealtime   = 0x1
	diflag2Bigtime   = 0x8
	diflag2Nrext64   = 0x10
	bigtimeEpochOffs = 1 << 31
)

// inode is a parsed on-disk inode.
type inode struct {
	ino       uint64
	raw       []byte
	version   byte
	mode      uint16
	format    byte
	aformat   byte
	uid, gid  uint32
	nlink     uint32
	size      int64
	flags     uint16
	flags2    uint64
	nextents  uint64
	anextents uint64
	data      []byte // the data fork
	attr      []byte // the attribute fork; nil without one
	atime     time.Time
	mtime     time.Time
	ctime     time.Time
}

func (in *inode) isDir() bool { return in.mode&fsread.TypeMask == fsread.TypeDir }

func (f *FS) inode(ino uint64) (*inode, error) {
	off, err := f.inoOffset(ino)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, f.sb.isize)
	if err := f.readAt(raw, off); err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	in, err := f.parseInode(ino, raw)
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	return in, nil
}

func (f *FS) parseInode(ino uint64, raw []byte) (*inode, error) {
	if string(raw[:2]) != "IN" {
		return nil, errors.New("bad magic (damaged inode, or not an inode)")
	}
	in := &inode{ino: ino, raw: raw, mode: be16(raw, 2), version: raw[4], format: raw[5], aformat: raw[83],
		uid: be32(raw, 8), gid: be32(raw, 12), flags: be16(raw, 90)}
	core := 100
	switch in.version {
	case 1:
		in.nlink = uint32(be16(raw, 6))
	case 2:
		in.nlink = be32(raw, 16)
	case 3:
		in.nlink = be32(raw, 16)
		core = 176
		if !f.sb.v5 {
			return nil, errors.New("a v3 inode on a v4 filesystem (damaged)")
		}
		if !f.crcOK(raw, 100) {
			return nil, errors.New("CRC mismatch (damaged inode)")
		}
		if be64(raw, 152) != ino {
			return nil, fmt.Errorf("the inode says it is inode %d (damaged or misplaced)", be64(raw, 152))
		}
		in.flags2 = be64(raw, 120)
	default:
		return nil, fmt.Errorf("inode version %d", in.version)
	}
	if f.sb.v5 && in.version != 3 {
		return nil, fmt.Errorf("a v%d inode on a v5 filesystem (damaged)", in.version)
	}
	size := be64(raw, 56)
	if size > 1<<62 {
		return nil, fmt.Errorf("damaged: size %d", size)
	}
	in.size = int64(size)
	if in.flags2&diflag2Nrext64 != 0 {
		in.nextents, in.anextents = be64(raw, 24), uint64(be32(raw, 76))
	} else {
		in.nextents, in.anextents = uint64(be32(raw, 76)), uint64(be16(raw, 80))
	}
	lit := raw[core:]
	in.data = lit
	if fo := int(raw[82]) * 8; fo != 0 {
		if fo >= len(lit) {
			return nil, fmt.Errorf("damaged: attribute fork at %d of a %d-byte literal area", fo, len(lit))
		}
		in.data, in.attr = lit[:fo], lit[fo:]
	}
	in.atime, in.mtime, in.ctime = in.time(32), in.time(40), in.time(48)
	return in, nil
}

// time decodes a timestamp: seconds and nanoseconds, or, under bigtime,
// nanoseconds since 1901.
func (in *inode) time(off int) time.Time {
	if in.flags2&diflag2Bigtime != 0 {
		v := be64(in.raw, off)
		return time.Unix(int64(v/1e9)-bigtimeEpochOffs, int64(v%1e9))
	}
	nsec := int64(be32(in.raw, off+4))
	if nsec >= 1e9 {
		nsec = 0
	}
	return time.Unix(int64(int32(be32(in.raw, off))), nsec)
}

func (in *inode) stat() fsread.Stat {
	st := fsread.Stat{Ino: in.ino, Mode: uint32(in.mode), Nlink: in.nlink, UID: in.uid, GID: in.gid,
		Size: in.size, Atime: in.atime, Mtime: in.mtime, Ctime: in.ctime}
	switch st.Type() {
	case fsread.TypeBlock, fsread.TypeChar:
		if in.format == fmtDev && len(in.data) >= 4 {
			d := be32(in.data, 0)
			st.Major, st.Minor = d>>18, d&0x3FFFF
		}
		st.Size = 0
	case fsread.TypeFIFO, fsread.TypeSocket:
		st.Size = 0
	}
	return st
}

// run maps n blocks of a fork from its block lblk to filesystem blocks
// from fsb.
type run struct {
	lblk, fsb, n uint64
	unwritten    bool
}

// maxNodes bounds the bmbt blocks read for one fork, whatever its
// damaged metadata claims; maxLevels bounds the tree's depth (XFS's
// bmbt has at most 9 levels).
const (
	maxNodes  = 1 << 20
	maxLevels = 9
)

// forkRuns maps the blocks of a fork in extent or btree format, sorted,
// each checked to lie inside the filesystem.
func (f *FS) forkRuns(in *inode, attr bool) ([]run, error) {
	fork, format, n, which := in.data, in.format, in.nextents, "data"
	if attr {
		fork, format, n, which = in.attr, in.aformat, in.anextents, "attribute"
	}
	// Only a file's blocks below its size are read (the rest are
	// preallocated); a directory's leaf blocks lie past its size.
	nb := maxFileBlocks(f.sb.bs)
	if !attr && !in.isDir() {
		nb = (uint64(in.size) + uint64(f.sb.bs) - 1) / uint64(f.sb.bs)
	}
	var rs []run
	var err error
	switch format {
	case fmtExtents:
		if n > uint64(len(fork)/16) {
			return nil, fmt.Errorf("inode %d: %d extents do not fit in its %s fork", in.ino, n, which)
		}
		rs = appendRecs(rs, fork, int(n), nb)
	case fmtBtree:
		rs, err = f.btreeRuns(in, fork, nb)
	default:
		return nil, fmt.Errorf("inode %d: %s fork of format %d holds no extents", in.ino, which, format)
	}
	if err != nil {
		return nil, fmt.Errorf("inode %d's %s fork: %w", in.ino, which, err)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].lblk < rs[j].lblk })
	for i, r := range rs {
		if r.lblk+r.n > maxFileBlocks(f.sb.bs) {
			return nil, fmt.Errorf("inode %d's %s fork: damaged: extent at block %d beyond the largest file", in.ino, which, r.lblk)
		}
		if _, err := f.fsbOffset(r.fsb, r.n); err != nil {
			return nil, fmt.Errorf("inode %d's %s fork: extent at block %d: %w", in.ino, which, r.lblk, err)
		}
		if i > 0 && r.lblk < rs[i-1].lblk+rs[i-1].n {
			return nil, fmt.Errorf("inode %d's %s fork: damaged: block %d mapped twice", in.ino, which, r.lblk)
		}
	}
	return rs, nil
}

// maxFileBlocks is the most blocks a fork may map: byte offsets stay
// below 2^62.
func maxFileBlocks(bs int64) uint64 { return uint64(1<<62) / uint64(bs) }

// appendRecs decodes n bmbt records (128 bits: unwritten flag, 54-bit
// file offset, 52-bit block, 21-bit length), skipping empty ones and
// those from block nb.
func appendRecs(rs []run, b []byte, n int, nb uint64) []run {
	for i := range n {
		l0, l1 := be64(b, 16*i), be64(b, 16*i+8)
		r := run{unwritten: l0>>63 != 0, lblk: (l0 &^ (1 << 63)) >> 9, fsb: (l0&0x1FF)<<43 | l1>>21, n: l1 & 0x1FFFFF}
		if r.n != 0 && r.lblk < nb {
			rs = append(rs, r)
		}
	}
	return rs
}

// btreeRuns walks a fork in B+tree format: a root in the inode, then
// BMAP/BMA3 blocks; only the subtrees mapping blocks below nb.
func (f *FS) btreeRuns(in *inode, root []byte, nb uint64) ([]run, error) {
	if len(root) < 4 {
		return nil, errors.New("btree root does not fit")
	}
	level, nrecs := int(be16(root, 0)), int(be16(root, 2))
	maxr := (len(root) - 4) / 16
	if level == 0 || level > maxLevels || nrecs > maxr {
		return nil, fmt.Errorf("damaged btree root (level %d, %d records)", level, nrecs)
	}
	hdr, magic := 24, "BMAP"
	if f.sb.v5 {
		hdr, magic = 72, "BMA3"
	}
	var rs []run
	// A tree reaches each block once: a block met again is a loop, or
	// a damaged tree that would map the same extents over and over.
	seen := map[uint64]bool{}
	var walk func(ptr uint64, level int) error
	walk = func(ptr uint64, level int) error {
		if len(seen) >= maxNodes || uint64(len(seen)) >= f.sb.dblocks {
			return errors.New("btree has too many blocks (damaged)")
		}
		if seen[ptr] {
			return fmt.Errorf("btree block %d reached twice (damaged)", ptr)
		}
		seen[ptr] = true
		b, err := f.block(ptr)
		if err != nil {
			return fmt.Errorf("btree block %d: %w", ptr, err)
		}
		if string(b[:4]) != magic {
			return fmt.Errorf("btree block %d: bad magic", ptr)
		}
		if f.sb.v5 && (!f.crcOK(b, 64) || be64(b, 56) != in.ino) {
			return fmt.Errorf("btree block %d: CRC mismatch or wrong owner (damaged)", ptr)
		}
		lv, n := int(be16(b, 4)), int(be16(b, 6))
		maxn := (len(b) - hdr) / 16
		if lv != level || n > maxn {
			return fmt.Errorf("btree block %d: damaged (level %d, expected %d; %d records)", ptr, lv, level, n)
		}
		if lv == 0 {
			rs = appendRecs(rs, b[hdr:], n, nb)
			if uint64(len(rs)) > min(f.sb.dblocks, nb) {
				return errors.New("more extents than the file or the filesystem has blocks (damaged)")
			}
			return nil
		}
		for i := range n {
			if be64(b, hdr+8*i) >= nb {
				break // the keys are the first file blocks the subtrees map
			}
			if err := walk(be64(b, hdr+8*maxn+8*i), lv-1); err != nil {
				return err
			}
		}
		return nil
	}
	for i := range nrecs {
		if be64(root, 4+8*i) >= nb {
			break
		}
		if err := walk(be64(root, 4+8*maxr+8*i), level-1); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

// blockAt finds the run mapping block lblk of a fork.
func blockAt(rs []run, lblk uint64) (run, bool) {
	i := sort.Search(len(rs), func(i int) bool { return rs[i].lblk+rs[i].n > lblk })
	if i < len(rs) && rs[i].lblk <= lblk {
		return rs[i], true
	}
	return run{}, false
}

// readBlocks reads n blocks of a fork from lblk; a hole or unwritten
// block is an error (metadata has none).
func (f *FS) readBlocks(rs []run, lblk, n uint64) ([]byte, error) {
	out := make([]byte, 0, n*uint64(f.sb.bs))
	for i := range n {
		r, ok := blockAt(rs, lblk+i)
		if !ok || r.unwritten {
			return nil, fmt.Errorf("block %d is not mapped", lblk+i)
		}
		off, err := f.fsbOffset(r.fsb+(lblk+i-r.lblk), 1)
		if err != nil {
			return nil, err
		}
		b := out[len(out) : len(out)+int(f.sb.bs)]
		if err := f.readAt(b, off); err != nil {
			return nil, err
		}
		out = out[:len(out)+int(f.sb.bs)]
	}
	return out, nil
}

// file is a regular file's content.
type file struct {
	f    *FS
	ino  uint64
	size int64
	rs   []run
}

func (f *FS) open(in *inode) (*file, error) {
	if in.flags&diflagRealtime != 0 {
		return nil, fmt.Errorf("inode %d lives on the realtime device, which this reader does not read", in.ino)
	}
	fl := &file{f: f, ino: in.ino, size: in.size}
	if in.size == 0 && in.nextents == 0 && in.format == fmtExtents {
		return fl, nil
	}
	rs, err := f.forkRuns(in, false)
	if err != nil {
		return nil, err
	}
	fl.rs = rs
	return fl, nil
}

func (fl *file) Size() int64 { return fl.size }

// ReadAt reads the file: holes and unwritten extents read as zeros.
func (fl *file) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("inode %d: negative offset", fl.ino)
	}
	if off >= fl.size {
		return 0, io.EOF
	}
	n := len(p)
	short := false
	if int64(n) > fl.size-off {
		n, short = int(fl.size-off), true
	}
	p = p[:n]
	if err := fl.read(p, off); err != nil {
		return 0, fmt.Errorf("inode %d at %d: %w", fl.ino, off, err)
	}
	if short {
		return n, io.EOF
	}
	return n, nil
}

func (fl *file) read(p []byte, off int64) error {
	bs := fl.f.sb.bs
	clear(p)
	end := off + int64(len(p))
	i := sort.Search(len(fl.rs), func(i int) bool { return int64(fl.rs[i].lblk+fl.rs[i].n)*bs > off })
	for ; i < len(fl.rs) && int64(fl.rs[i].lblk)*bs < end; i++ {
		r := fl.rs[i]
		if r.unwritten {
			continue
		}
		a, z := max(off, int64(r.lblk)*bs), min(end, int64(r.lblk+r.n)*bs)
		base, err := fl.f.fsbOffset(r.fsb, r.n)
		if err != nil {
			return err
		}
		if err := fl.f.readAt(p[a-off:z-off], base+a-int64(r.lblk)*bs); err != nil {
			return err
		}
	}
	return nil
}

// Data lists the ranges that hold data: written extents, within the size.
func (fl *file) Data() ([]extent.Range, error) {
	bs := fl.f.sb.bs
	var out []extent.Range
	for _, r := range fl.rs {
		a := int64(r.lblk) * bs
		if r.unwritten || a >= fl.size {
			continue
		}
		z := min(int64(r.lblk+r.n)*bs, fl.size)
		if k := len(out) - 1; k >= 0 && out[k].End == a {
			out[k].End = z
			continue
		}
		out = append(out, extent.Range{Start: a, End: z})
	}
	return out, nil
}
