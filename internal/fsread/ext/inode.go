package ext

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fsread"
)

// Inode flags this reader acts on.
const (
	flagEncrypt    = 0x800
	flagIndex      = 0x1000 // htree directory
	flagHugeFile   = 0x40000
	flagExtents    = 0x80000
	flagEAInode    = 0x200000
	flagInlineData = 0x10000000
)

// inode is a parsed on-disk inode.
type inode struct {
	ino     uint64
	raw     []byte // the whole on-disk inode (in-inode xattrs)
	mode    uint16
	uid     uint32
	gid     uint32
	size    int64
	links   uint16
	flags   uint32
	blocks  uint64 // i_blocks, in 512-byte units
	fileACL uint64
	extra   int // i_extra_isize
	// seed starts the metadata_csum checksums of the inode's extent
	// and directory blocks; 0 without metadata_csum.
	seed  uint32
	atime time.Time
	mtime time.Time
	ctime time.Time
}

// iblock is the inode's i_block area (block map, extent root, inline
// data, symlink or device number).
func (in *inode) iblock() []byte { return in.raw[40:100] }

func (f *FS) inode(ino uint64) (*inode, error) {
	s := &f.sb
	if ino == 0 || ino > s.inodes {
		return nil, fmt.Errorf("inode %d does not exist (the filesystem has %d)", ino, s.inodes)
	}
	g, idx := (ino-1)/s.ipg, (ino-1)%s.ipg
	t, err := f.inodeTable(g)
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	raw := make([]byte, s.isize)
	if err := f.readAt(raw, int64(t)*s.bs+int64(idx)*int64(s.isize)); err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	in := &inode{ino: ino, raw: raw, mode: le16(raw, 0), links: le16(raw, 26), flags: le32(raw, 32)}
	in.uid = uint32(le16(raw, 2)) | uint32(le16(raw, 120))<<16
	in.gid = uint32(le16(raw, 24)) | uint32(le16(raw, 122))<<16
	size := uint64(le32(raw, 4)) | uint64(le32(raw, 108))<<32
	if size > 1<<62 {
		return nil, fmt.Errorf("inode %d: damaged: size %d", ino, size)
	}
	in.size = int64(size)
	in.blocks = uint64(le32(raw, 28))
	if s.ro&roHugeFile != 0 {
		in.blocks |= uint64(le16(raw, 116)) << 32
		if in.flags&flagHugeFile != 0 {
			in.blocks *= uint64(s.bs / 512)
		}
	}
	in.fileACL = uint64(le32(raw, 104)) | uint64(le16(raw, 118))<<32
	if s.isize > 128 {
		in.extra = int(le16(raw, 128))
		if in.extra > s.isize-128 || in.extra&3 != 0 {
			return nil, fmt.Errorf("inode %d: damaged: extra size %d", ino, in.extra)
		}
	}
	if s.ro&roMetadataCsum != 0 {
		if err := in.checkCsum(s.seed); err != nil {
			return nil, err
		}
	}
	in.ctime = in.time(12, 132)
	in.mtime = in.time(16, 136)
	in.atime = in.time(8, 140)
	return in, nil
}

// checkCsum verifies the inode's metadata_csum checksum: crc32c over the
// inode number, the generation and the inode with its checksum fields
// zeroed.
func (in *inode) checkCsum(seed uint32) error {
	var num [8]byte
	le := func(b []byte, v uint32) { b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24) }
	le(num[:4], uint32(in.ino))
	le(num[4:], le32(in.raw, 100))
	c := crc32c(seed, num[:])
	in.seed = c
	cp := append([]byte(nil), in.raw...)
	cp[124], cp[125] = 0, 0
	stored := uint32(le16(in.raw, 124))
	hasHi := in.extra >= 4
	if hasHi {
		cp[130], cp[131] = 0, 0
		stored |= uint32(le16(in.raw, 130)) << 16
	}
	c = crc32c(c, cp)
	if !hasHi {
		c &= 0xFFFF
	}
	if c != stored {
		return fmt.Errorf("inode %d fails its checksum (damaged inode table)", in.ino)
	}
	return nil
}

// time decodes a timestamp: seconds at off, and, when the inode is large
// enough, the extra field at xoff (two epoch bits extending the seconds
// past 2038, then nanoseconds).
func (in *inode) time(off, xoff int) time.Time {
	sec := int64(int32(le32(in.raw, off)))
	var nsec int64
	if xoff+4 <= 128+in.extra {
		x := le32(in.raw, xoff)
		sec += int64(x&3) << 32
		nsec = int64(x >> 2)
		if nsec >= 1e9 {
			nsec = 0
		}
	}
	return time.Unix(sec, nsec)
}

func (in *inode) stat() fsread.Stat {
	st := fsread.Stat{Ino: in.ino, Mode: uint32(in.mode), Nlink: uint32(in.links), UID: in.uid, GID: in.gid,
		Size: in.size, Atime: in.atime, Mtime: in.mtime, Ctime: in.ctime}
	switch st.Type() {
	case fsread.TypeBlock, fsread.TypeChar:
		b := in.iblock()
		if old := le32(b, 0); old != 0 {
			st.Major, st.Minor = (old>>8)&0xFF, old&0xFF
		} else {
			d := le32(b, 4)
			st.Major, st.Minor = (d&0xFFF00)>>8, (d&0xFF)|((d>>12)&0xFFF00)
		}
		st.Size = 0
	case fsread.TypeFIFO, fsread.TypeSocket:
		st.Size = 0
	}
	return st
}

// run maps count logical blocks from lblk to physical blocks from pblk.
type run struct {
	lblk, pblk, n uint64
	unwritten     bool
}

// fileBlocks is how many blocks the inode's size spans.
func (f *FS) fileBlocks(in *inode) uint64 {
	return (uint64(in.size) + uint64(f.sb.bs) - 1) / uint64(f.sb.bs)
}

// runs maps the inode's blocks, in logical order, within its size.
func (f *FS) runs(in *inode) ([]run, error) {
	var rs []run
	var err error
	if in.flags&flagExtents != 0 {
		rs, err = f.extentRuns(in)
	} else {
		rs, err = f.mapRuns(in)
	}
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", in.ino, err)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].lblk < rs[j].lblk })
	for i := range rs {
		if rs[i].pblk+rs[i].n > f.sb.blocks || rs[i].pblk+rs[i].n < rs[i].pblk || rs[i].pblk < f.sb.fdb {
			return nil, fmt.Errorf("inode %d: blocks %d-%d lie outside the filesystem", in.ino, rs[i].pblk, rs[i].pblk+rs[i].n-1)
		}
		if i > 0 && rs[i].lblk < rs[i-1].lblk+rs[i-1].n {
			return nil, fmt.Errorf("inode %d: damaged block map: logical block %d mapped twice", in.ino, rs[i].lblk)
		}
	}
	return rs, nil
}

// maxNodes bounds the extent tree nodes or indirect blocks read for one
// file, whatever its damaged metadata claims.
const maxNodes = 1 << 20

// extentRuns walks the inode's extent tree.
func (f *FS) extentRuns(in *inode) ([]run, error) {
	nb := f.fileBlocks(in)
	var rs []run
	nodes := 0
	var walk func(node []byte, depth int, where string) error
	walk = func(node []byte, depth int, where string) error {
		if le16(node, 0) != 0xF30A {
			return fmt.Errorf("extent node %s: bad magic", where)
		}
		n, d := int(le16(node, 2)), int(le16(node, 6))
		if 12+12*n > len(node) {
			return fmt.Errorf("extent node %s: %d entries do not fit", where, n)
		}
		if depth >= 0 && d != depth {
			return fmt.Errorf("extent node %s: depth %d, its parent says %d", where, d, depth)
		}
		if d > 5 {
			return fmt.Errorf("extent node %s: depth %d", where, d)
		}
		for i := range n {
			e := node[12+12*i:]
			lblk := uint64(le32(e, 0))
			if d == 0 {
				l := uint64(le16(e, 4))
				unwritten := l > 32768
				if unwritten {
					l -= 32768
				}
				p := uint64(le32(e, 8)) | uint64(le16(e, 6))<<32
				if lblk >= nb || l == 0 {
					continue // past the end (preallocated), or empty
				}
				if uint64(len(rs)) >= nb || uint64(len(rs)) >= f.sb.blocks {
					return errors.New("more extents than the file has blocks (damaged)")
				}
				rs = append(rs, run{lblk: lblk, pblk: p, n: min(l, nb-lblk), unwritten: unwritten})
				continue
			}
			if lblk >= nb {
				continue
			}
			if nodes++; nodes > maxNodes || uint64(nodes) > f.sb.blocks {
				return errors.New("extent tree has too many nodes (damaged)")
			}
			child := uint64(le32(e, 4)) | uint64(le16(e, 8))<<32
			b, err := f.block(child)
			if err != nil {
				return fmt.Errorf("extent node at block %d: %w", child, err)
			}
			if in.seed != 0 {
				// The tail after the node's room for entries.
				tail := 12 + 12*int(le16(b, 4))
				if tail+4 > len(b) || crc32c(in.seed, b[:tail]) != le32(b, tail) {
					return fmt.Errorf("extent node at block %d fails its checksum (damaged)", child)
				}
			}
			if err := walk(b, d-1, fmt.Sprintf("at block %d", child)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(in.iblock(), -1, "in the inode"); err != nil {
		return nil, err
	}
	return rs, nil
}

// mapRuns walks an ext2/3 block map: twelve direct blocks, then an
// indirect, a double and a triple indirect block.
func (f *FS) mapRuns(in *inode) ([]run, error) {
	nb := f.fileBlocks(in)
	per := uint64(f.sb.bs / 4)
	var rs []run
	add := func(l, p uint64) {
		if k := len(rs) - 1; k >= 0 && rs[k].lblk+rs[k].n == l && rs[k].pblk+rs[k].n == p {
			rs[k].n++
			return
		}
		rs = append(rs, run{lblk: l, pblk: p, n: 1})
	}
	nodes := 0
	// walk maps the blocks under pointer p at level (0: a data block),
	// which start at logical block l.
	var walk func(p uint64, level int, l uint64) error
	walk = func(p uint64, level int, l uint64) error {
		if p == 0 || l >= nb {
			return nil
		}
		if level == 0 {
			// A sane map points at distinct blocks: no more than
			// the filesystem has.
			if uint64(len(rs)) >= f.sb.blocks {
				return errors.New("block map maps more blocks than the filesystem has (damaged)")
			}
			add(l, p)
			return nil
		}
		if nodes++; nodes > maxNodes || uint64(nodes) > f.sb.blocks {
			return errors.New("block map has too many indirect blocks (damaged)")
		}
		b, err := f.block(p)
		if err != nil {
			return fmt.Errorf("indirect block %d: %w", p, err)
		}
		span := uint64(1)
		for range level - 1 {
			span *= per
		}
		for i := range per {
			if err := walk(uint64(le32(b, int(4*i))), level-1, l+i*span); err != nil {
				return err
			}
		}
		return nil
	}
	ib := in.iblock()
	for i := range 12 {
		if err := walk(uint64(le32(ib, 4*i)), 0, uint64(i)); err != nil {
			return nil, err
		}
	}
	base := uint64(12)
	span := per
	for level := 1; level <= 3; level++ {
		if err := walk(uint64(le32(ib, 44+4*level)), level, base); err != nil {
			return nil, err
		}
		base += span
		span *= per
	}
	return rs, nil
}

// file is a regular file's content.
type file struct {
	f    *FS
	ino  uint64
	size int64
	rs   []run
	// inline holds the content of an inline-data file.
	inline []byte
}

func (f *FS) open(in *inode) (*file, error) {
	if in.flags&flagEncrypt != 0 {
		return nil, fmt.Errorf("inode %d is encrypted (fscrypt): its content cannot be read without its key", in.ino)
	}
	fl := &file{f: f, ino: in.ino, size: in.size}
	if in.flags&flagInlineData != 0 {
		data, err := f.inlineData(in)
		if err != nil {
			return nil, err
		}
		if int64(len(data)) < in.size {
			return nil, fmt.Errorf("inode %d: inline data holds %d bytes, its size is %d", in.ino, len(data), in.size)
		}
		fl.inline = data[:in.size]
		return fl, nil
	}
	rs, err := f.runs(in)
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
	if fl.inline != nil {
		copy(p, fl.inline[off:])
	} else if err := fl.read(p, off); err != nil {
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
		phys := int64(r.pblk)*bs + a - int64(r.lblk)*bs
		if err := fl.f.readAt(p[a-off:z-off], phys); err != nil {
			return err
		}
	}
	return nil
}

// Data lists the ranges that hold data: written extents, within the size.
func (fl *file) Data() ([]extent.Range, error) {
	if fl.inline != nil {
		if fl.size == 0 {
			return nil, nil
		}
		return []extent.Range{{Start: 0, End: fl.size}}, nil
	}
	bs := fl.f.sb.bs
	var out []extent.Range
	for _, r := range fl.rs {
		if r.unwritten {
			continue
		}
		a, z := int64(r.lblk)*bs, min(int64(r.lblk+r.n)*bs, fl.size)
		if k := len(out) - 1; k >= 0 && out[k].End == a {
			out[k].End = z
			continue
		}
		out = append(out, extent.Range{Start: a, End: z})
	}
	return out, nil
}
