package blockmap

import (
	"fmt"
	"io"
	"sort"
)

// ext2/3/4 feature flags this reader needs.
const (
	extCompatHasJournal   = 0x4
	extCompatSparseSuper2 = 0x200

	extIncompatRecover    = 0x4
	extIncompatJournalDev = 0x8
	extIncompatMetaBG     = 0x10
	extIncompat64Bit      = 0x80
	extIncompatFlexBG     = 0x200
	extIncompatCsumSeed   = 0x2000
	// Every incompat flag known when this was written: a filesystem
	// with another one may allocate in a way this reader does not know.
	extIncompatKnown = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000

	extROSparseSuper  = 0x1
	extROGdtCsum      = 0x10
	extROBigalloc     = 0x200
	extROMetadataCsum = 0x400

	extBGBlockUninit = 0x2
)

// ext4 is used when a feature ext3 lacks is on (the rule blkid follows).
const (
	ext3Incompat = 0x2 | 0x4 | 0x10
	ext3RO       = 0x1 | 0x2 | 0x4
)

type extGroup struct {
	bb, ib, it uint64 // block bitmap, inode bitmap, inode table
	flags      uint16
	bbCsum     uint32
}

type extFS struct {
	r          io.ReaderAt
	warn       func(string)
	bs         int64 // block size
	ratio      int64 // blocks per cluster
	blocks     uint64
	fdb        uint64 // first data block
	bpg, cpg   uint64 // blocks and clusters per group
	itb        uint64 // inode table blocks per group
	ngroups    uint64
	descSize   int
	dpb        uint64 // descriptors per block
	descBlocks uint64
	compat     uint32
	incompat   uint32
	ro         uint32
	rsvGDT     uint64
	firstMeta  uint64
	backupBGs  [2]uint32
	seed       uint32
	uuid       []byte
	groups     []extGroup
	csumUninit bool // BLOCK_UNINIT flags can be trusted
	meta       []extExtent
	maxMeta    uint64
	buf        []byte
	pg         page
}

type extExtent struct{ start, n uint64 }

func probeExt(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	sb, err := read(r, 1024, 1024)
	if err != nil || sb == nil || le16(sb, 56) != 0xEF53 {
		return nil, err
	}
	e := &extFS{r: r, warn: warn, compat: le32(sb, 92), incompat: le32(sb, 96), ro: le32(sb, 100)}
	typ := "ext2"
	switch {
	case e.incompat&^ext3Incompat != 0 || e.ro&^ext3RO != 0:
		typ = "ext4"
	case e.compat&extCompatHasJournal != 0:
		typ = "ext3"
	}
	fs := &Filesystem{Type: typ, Label: cString(sb[120:136]), UUID: uuidString(sb[104:120])}
	if e.incompat&extIncompatJournalDev != 0 {
		fs.Type, fs.Full = "jbd", "an external ext3/ext4 journal: every block is in use"
		return fs, nil
	}
	if reason := e.parse(sb, size); reason != "" {
		fs.Full = reason
		return fs, nil
	}
	fs.Size, fs.BlockSize = int64(e.blocks)*e.bs, int(e.bs*e.ratio)
	if reason, err := e.loadGroups(); err != nil {
		return nil, err
	} else if reason != "" {
		fs.Full = reason
		return fs, nil
	}
	units := (int64(e.blocks) + e.ratio - 1) / e.ratio
	fs.m = &allocMap{unit: e.bs * e.ratio, units: units, p: e}
	return fs, nil
}

// parse checks the superblock; it returns why the filesystem cannot be
// mapped, or "".
func (e *extFS) parse(sb []byte, size int64) string {
	logBS := le32(sb, 24)
	if logBS > 6 {
		return fmt.Sprintf("superblock damaged: block size 2^%d", 10+logBS)
	}
	e.bs = 1024 << logBS
	e.ratio = 1
	if e.ro&extROBigalloc != 0 {
		logC := le32(sb, 28)
		if logC < logBS || logC > 29 {
			return "superblock damaged: bad cluster size"
		}
		e.ratio = int64(1) << (logC - logBS)
	}
	if e.ro&extROMetadataCsum != 0 {
		if sb[373] != 1 {
			return fmt.Sprintf("unknown checksum type %d", sb[373])
		}
		if crc32c(^uint32(0), sb[:1020]) != le32(sb, 1020) {
			return "superblock checksum mismatch (damaged superblock)"
		}
	}
	if e.incompat&^extIncompatKnown != 0 {
		return fmt.Sprintf("unknown incompatible features %#x", e.incompat&^extIncompatKnown)
	}
	state := le16(sb, 58)
	switch {
	case e.incompat&extIncompatRecover != 0:
		return "its journal needs recovery (mounted, or not cleanly unmounted): the bitmaps on disk may be stale"
	case state&2 != 0:
		return "it records errors: run e2fsck"
	case state&1 == 0:
		return "it was not cleanly unmounted (or is mounted): the bitmaps may be stale"
	}
	var damaged string
	if e.blocks, e.descSize, damaged = ExtGeometry(sb); damaged != "" {
		return "superblock damaged: " + damaged
	}
	e.fdb = uint64(le32(sb, 20))
	e.bpg = uint64(le32(sb, 32))
	e.cpg = e.bpg
	if e.ratio > 1 {
		e.cpg = uint64(le32(sb, 36))
		e.bpg = e.cpg * uint64(e.ratio)
		if e.fdb != 0 {
			return "superblock damaged: bigalloc with a first data block"
		}
	}
	ipg, isize := uint64(le32(sb, 40)), uint64(le16(sb, 88))
	if le32(sb, 76) == 0 {
		isize = 128
	}
	wantFDB := uint64(0)
	if e.bs == 1024 && e.ratio == 1 {
		wantFDB = 1
	}
	switch {
	case e.fdb != wantFDB:
		return fmt.Sprintf("superblock damaged: first data block %d", e.fdb)
	case e.cpg == 0 || e.cpg > uint64(e.bs)*8 || e.cpg%8 != 0:
		return fmt.Sprintf("superblock damaged: %d blocks per group", e.bpg)
	case e.blocks <= e.fdb:
		return fmt.Sprintf("superblock damaged: %d blocks", e.blocks)
	case ipg == 0 || isize < 128 || isize > uint64(e.bs) || isize&(isize-1) != 0:
		return "superblock damaged: inode geometry"
	case e.blocks > uint64(size)/uint64(e.bs):
		return fmt.Sprintf("the filesystem (%d bytes) is larger than its partition (%d bytes)", e.blocks*uint64(e.bs), size)
	}
	e.itb = (ipg*isize + uint64(e.bs) - 1) / uint64(e.bs)
	e.ngroups = (e.blocks - e.fdb + e.bpg - 1) / e.bpg
	e.dpb = uint64(e.bs) / uint64(e.descSize)
	e.descBlocks = (e.ngroups + e.dpb - 1) / e.dpb
	e.rsvGDT = uint64(le16(sb, 206))
	e.firstMeta = uint64(le32(sb, 260))
	e.backupBGs = [2]uint32{le32(sb, 588), le32(sb, 592)}
	e.uuid = append([]byte(nil), sb[104:120]...)
	if e.incompat&extIncompatCsumSeed != 0 {
		e.seed = le32(sb, 624)
	} else {
		e.seed = crc32c(^uint32(0), e.uuid)
	}
	e.csumUninit = e.ro&(extROMetadataCsum|extROGdtCsum) != 0
	return ""
}

// ExtGeometry reads the block count and the group descriptor size of an
// ext2/3/4 superblock sb (1024 bytes); damaged says what is wrong with
// them, or is "". The file reader (fsread/ext) shares it.
func ExtGeometry(sb []byte) (blocks uint64, descSize int, damaged string) {
	blocks, descSize = uint64(le32(sb, 4)), 32
	if le32(sb, 96)&extIncompat64Bit != 0 {
		blocks |= uint64(le32(sb, 336)) << 32
		descSize = int(le16(sb, 254))
		if descSize < 64 || descSize > 1024 || descSize&(descSize-1) != 0 {
			return 0, 0, fmt.Sprintf("group descriptor size %d", descSize)
		}
	}
	return blocks, descSize, ""
}

func (e *extFS) hasSuper(g uint64) bool {
	switch {
	case g == 0:
		return true
	case e.compat&extCompatSparseSuper2 != 0:
		return g == uint64(e.backupBGs[0]) || g == uint64(e.backupBGs[1])
	case g == 1 || e.ro&extROSparseSuper == 0:
		return true
	}
	for _, p := range []uint64{3, 5, 7} {
		n := p
		for n < g {
			n *= p
		}
		if n == g {
			return true
		}
	}
	return false
}

func (e *extFS) groupStart(g uint64) uint64 { return e.fdb + g*e.bpg }

// superBlock is where group g's superblock (or backup) lives: with 1 KiB
// blocks and no first data block (bigalloc) the primary is in block 1.
func (e *extFS) superBlock(g uint64) uint64 {
	if g == 0 && e.fdb == 0 && e.bs == 1024 {
		return 1
	}
	return e.groupStart(g)
}

// descBlock is where descriptor block i lives.
func (e *extFS) descBlock(i uint64) uint64 {
	if e.incompat&extIncompatMetaBG == 0 || i < e.firstMeta {
		return e.superBlock(0) + 1 + i
	}
	g := i * e.dpb
	b := e.superBlock(g)
	if e.hasSuper(g) {
		b++
	}
	return b
}

// loadGroups reads and checks every group descriptor.
func (e *extFS) loadGroups() (string, error) {
	// The count comes from the superblock: memory grows with the
	// descriptors actually read, not with what a damaged one claims.
	e.groups = make([]extGroup, 0, min(e.ngroups, 1024))
	blk := make([]byte, e.bs)
	var le [4]byte
	for i := uint64(0); i < e.descBlocks; i++ {
		b := e.descBlock(i)
		if b >= e.blocks {
			return fmt.Sprintf("group descriptor block %d lies outside the filesystem", b), nil
		}
		if err := readAt(e.r, blk, int64(b)*e.bs); err != nil {
			return "", fmt.Errorf("ext group descriptors: %w", err)
		}
		for k := uint64(0); k < e.dpb && uint64(len(e.groups)) < e.ngroups; k++ {
			g := uint64(len(e.groups))
			d := blk[k*uint64(e.descSize) : (k+1)*uint64(e.descSize)]
			gd := extGroup{bb: uint64(le32(d, 0)), ib: uint64(le32(d, 4)), it: uint64(le32(d, 8)), flags: le16(d, 18), bbCsum: uint32(le16(d, 24))}
			if e.descSize >= 64 {
				gd.bb |= uint64(le32(d, 32)) << 32
				gd.ib |= uint64(le32(d, 36)) << 32
				gd.it |= uint64(le32(d, 40)) << 32
				gd.bbCsum |= uint32(le16(d, 56)) << 16
			}
			le[0], le[1], le[2], le[3] = byte(g), byte(g>>8), byte(g>>16), byte(g>>24)
			stored := le16(d, 30)
			switch {
			case e.ro&extROMetadataCsum != 0:
				c := crc32c(e.seed, le[:])
				c = crc32c(c, d[:30])
				c = crc32c(c, []byte{0, 0})
				c = crc32c(c, d[32:])
				if uint16(c) != stored {
					return fmt.Sprintf("group descriptor %d fails its checksum (damaged): run e2fsck", g), nil
				}
			case e.ro&extROGdtCsum != 0:
				c := crc16(0xFFFF, e.uuid)
				c = crc16(c, le[:])
				c = crc16(c, d[:30])
				if e.incompat&extIncompat64Bit != 0 {
					c = crc16(c, d[32:])
				}
				if c != stored {
					return fmt.Sprintf("group descriptor %d fails its checksum (damaged): run e2fsck", g), nil
				}
			}
			if reason := e.checkGroup(g, &gd); reason != "" {
				return reason, nil
			}
			e.groups = append(e.groups, gd)
		}
	}
	if e.csumUninit {
		for g := range e.groups {
			if e.groups[g].flags&extBGBlockUninit != 0 {
				e.indexMeta()
				break
			}
		}
	}
	return "", nil
}

func (e *extFS) checkGroup(g uint64, gd *extGroup) string {
	inFS := func(b, n uint64) bool { return b >= e.fdb && b < e.blocks && n <= e.blocks-b }
	if !inFS(gd.bb, 1) || !inFS(gd.ib, 1) || !inFS(gd.it, e.itb) {
		return fmt.Sprintf("group %d's bitmaps or inode table (blocks %d, %d, %d) lie outside the filesystem", g, gd.bb, gd.ib, gd.it)
	}
	if e.incompat&extIncompatFlexBG == 0 {
		s := e.groupStart(g)
		in := func(b, n uint64) bool { return b >= s && b+n <= s+e.bpg }
		if !in(gd.bb, 1) || !in(gd.ib, 1) || !in(gd.it, e.itb) {
			return fmt.Sprintf("group %d's bitmaps or inode table lie outside the group, and flex_bg is off", g)
		}
	}
	return ""
}

// indexMeta sorts every group's bitmaps and inode table by location, so
// the used blocks of a BLOCK_UNINIT group (whose bitmap is not on disk)
// can be computed.
func (e *extFS) indexMeta() {
	e.meta = make([]extExtent, 0, 3*len(e.groups))
	for _, gd := range e.groups {
		e.meta = append(e.meta, extExtent{gd.bb, 1}, extExtent{gd.ib, 1}, extExtent{gd.it, e.itb})
	}
	sort.Slice(e.meta, func(i, j int) bool { return e.meta[i].start < e.meta[j].start })
	e.maxMeta = max(e.itb, 1)
}

// page implements pager: one block group per page.
func (e *extFS) page(u int64) (*page, error) {
	ub := uint64(u) * uint64(e.ratio) // first block of the unit
	if ub < e.fdb {
		e.pg = page{first: 0, n: int64(e.fdb), all: true}
		return &e.pg, nil
	}
	g := (ub - e.fdb) / e.bpg
	if g >= uint64(len(e.groups)) {
		return &page{first: u, n: 1, all: true}, nil
	}
	gs := e.groupStart(g)
	ge := min(gs+e.bpg, e.blocks)
	nClusters := (ge - gs + uint64(e.ratio) - 1) / uint64(e.ratio)
	e.pg = page{first: int64(gs / uint64(e.ratio)), n: int64(nClusters)}
	if e.buf == nil {
		e.buf = make([]byte, e.bs)
	}
	gd := &e.groups[g]
	if e.csumUninit && gd.flags&extBGBlockUninit != 0 {
		clear(e.buf)
		e.markUninit(g, gs, ge)
		e.pg.bits = e.buf
		return &e.pg, nil
	}
	if err := readAt(e.r, e.buf, int64(gd.bb)*e.bs); err != nil {
		return nil, fmt.Errorf("ext block bitmap of group %d: %w", g, err)
	}
	if e.ro&extROMetadataCsum != 0 {
		c := crc32c(e.seed, e.buf[:e.cpg/8])
		if e.descSize < 58 {
			c &= 0xFFFF
		}
		if c != gd.bbCsum {
			e.warn(fmt.Sprintf("block bitmap of group %d fails its checksum: the group's %d blocks are imaged in full", g, ge-gs))
			e.pg.all = true
			return &e.pg, nil
		}
	}
	e.pg.bits = e.buf
	return &e.pg, nil
}

// markUninit sets in e.buf the blocks of group g (blocks [gs, ge)) that a
// BLOCK_UNINIT group still uses: its superblock and descriptor copies and
// any group's bitmaps and inode table placed in it.
func (e *extFS) markUninit(g, gs, ge uint64) {
	mark := func(b, n uint64) {
		a, z := max(b, gs), min(b+n, ge)
		if a >= z {
			return
		}
		r := uint64(e.ratio)
		setBits(e.buf, int64((a-gs)/r), int64((z-gs+r-1)/r))
	}
	sb := e.superBlock(g)
	if e.hasSuper(g) {
		mark(sb, 1)
	}
	if e.incompat&extIncompatMetaBG == 0 || g/e.dpb < e.firstMeta {
		if e.hasSuper(g) {
			old := e.descBlocks + e.rsvGDT
			if e.incompat&extIncompatMetaBG != 0 {
				old = e.firstMeta
			}
			mark(sb+1, old)
		}
	} else if m := g % e.dpb; m == 0 || m == 1 || m == e.dpb-1 {
		b := sb
		if e.hasSuper(g) {
			b++
		}
		mark(b, 1)
	}
	i := sort.Search(len(e.meta), func(i int) bool { return e.meta[i].start >= ge })
	for i--; i >= 0 && e.meta[i].start+e.maxMeta > gs; i-- {
		mark(e.meta[i].start, e.meta[i].n)
	}
}
