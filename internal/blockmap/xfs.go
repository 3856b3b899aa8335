package blockmap

import (
	"fmt"
	"hash/crc32"
	"io"
	"sort"
)

// XFS keeps free space in two B+trees per allocation group; the one
// sorted by block number (bnobt) lists free extents in order, so the used
// blocks of an AG are its blocks minus those extents. The superblock and
// free-space headers are big-endian; v5 filesystems carry CRC32C
// checksums (stored little-endian) on every one of these structures.

const (
	xfsPageUnits   = 1 << 18 // blocks per bitmap page: 32 KiB of bits
	xfsMaxLevels   = 16
	xfsSBFeatIncNR = 1 << 4 // NEEDSREPAIR
)

type xfsFS struct {
	r        io.ReaderAt
	warn     func(string)
	bs       int64
	sect     int64
	dblocks  uint64
	agblocks uint64
	agcount  uint64
	v5       bool
	uuid     []byte

	ag     int64 // AG whose free extents are loaded, -1 none
	free   []xfsExtent
	agFull bool
	bits   []byte
	pg     page
	seen   map[uint64]bool
}

type xfsExtent struct{ start, n uint64 } // AG block numbers

func probeXFS(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	sb, err := read(r, 0, 512)
	if err != nil || sb == nil || string(sb[:4]) != "XFSB" {
		return nil, err
	}
	fs := &Filesystem{Type: "xfs", Label: cString(sb[108:120]), UUID: uuidString(sb[32:48])}
	x := &xfsFS{r: r, warn: warn, ag: -1}
	x.bs = int64(be32(sb, 4))
	x.dblocks = be64(sb, 8)
	x.agblocks = uint64(be32(sb, 84))
	x.agcount = uint64(be32(sb, 88))
	x.sect = int64(be16(sb, 102))
	blocklog, agblklog := sb[120], sb[124]
	version := be16(sb, 100) & 0xF
	x.v5 = version == 5
	x.uuid = sb[32:48]
	switch {
	case version != 4 && version != 5:
		fs.Full = fmt.Sprintf("unknown XFS version %d", version)
	case x.bs < 512 || x.bs > 65536 || x.bs&(x.bs-1) != 0 || int64(1)<<blocklog != x.bs:
		fs.Full = "superblock damaged: block size"
	case x.sect < 512 || x.sect > 32768 || x.sect&(x.sect-1) != 0 || x.sect > x.bs:
		fs.Full = "superblock damaged: sector size"
	case x.agblocks < 5 || x.agcount == 0 || agblklog > 31 || x.agblocks > uint64(1)<<agblklog:
		fs.Full = "superblock damaged: allocation group geometry"
	case x.dblocks == 0 || x.dblocks > x.agcount*x.agblocks || x.dblocks <= (x.agcount-1)*x.agblocks:
		fs.Full = "superblock damaged: block count does not match the allocation groups"
	case x.dblocks > uint64(size)/uint64(x.bs):
		fs.Full = fmt.Sprintf("the filesystem (%d bytes) is larger than its partition (%d bytes)", x.dblocks*uint64(x.bs), size)
	case sb[126] != 0:
		fs.Full = "mkfs.xfs did not finish on it"
	}
	if fs.Full != "" {
		return fs, nil
	}
	fs.Size, fs.BlockSize = int64(x.dblocks)*x.bs, int(x.bs)
	full, err := read(r, 0, int(x.sect))
	if err != nil {
		return nil, err
	}
	if x.v5 {
		if !xfsCRCOK(full, 224) {
			fs.Full = "superblock checksum mismatch (damaged superblock)"
			return fs, nil
		}
		if be32(sb, 216)&xfsSBFeatIncNR != 0 {
			fs.Full = "it is marked as needing xfs_repair"
			return fs, nil
		}
	}
	clean, why, err := x.logClean(sb, agblklog)
	if err != nil {
		return nil, err
	}
	if !clean {
		fs.Full = why
		return fs, nil
	}
	fs.m = &allocMap{unit: x.bs, units: int64(x.dblocks), p: x}
	return fs, nil
}

// xfsCRCOK checks a v5 structure's CRC32C, stored little-endian at off.
func xfsCRCOK(b []byte, off int) bool {
	want := le32(b, off)
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	c = crc32.Update(c, castagnoli, b[off+4:])
	return c == want
}

// page implements pager: pages of xfsPageUnits blocks within one AG.
func (x *xfsFS) page(u int64) (*page, error) {
	ag := uint64(u) / x.agblocks
	if ag >= x.agcount {
		return &page{first: u, n: 1, all: true}, nil
	}
	agStart := ag * x.agblocks
	agLen := min(x.agblocks, x.dblocks-agStart)
	if int64(ag) != x.ag {
		if err := x.loadAG(ag, agLen); err != nil {
			return nil, err
		}
	}
	rel := uint64(u) - agStart
	first := rel &^ (xfsPageUnits - 1)
	n := min(uint64(xfsPageUnits), agLen-first)
	x.pg = page{first: int64(agStart + first), n: int64(n)}
	if x.agFull {
		x.pg.all = true
		return &x.pg, nil
	}
	if x.bits == nil {
		x.bits = make([]byte, xfsPageUnits/8)
	}
	b := x.bits[:(n+7)/8]
	for i := range b {
		b[i] = 0xFF
	}
	// Free extents are sorted: find the first that may overlap.
	lo, hi := 0, len(x.free)
	for lo < hi {
		m := (lo + hi) / 2
		if x.free[m].start+x.free[m].n <= first {
			lo = m + 1
		} else {
			hi = m
		}
	}
	for _, f := range x.free[lo:] {
		if f.start >= first+n {
			break
		}
		a, z := max(f.start, first), min(f.start+f.n, first+n)
		clearBits(b, int64(a-first), int64(z-first))
	}
	x.pg.bits = b
	return &x.pg, nil
}

// loadAG reads AG ag's free-space header and walks its bnobt. A damaged
// AG is imaged in full, with a warning.
func (x *xfsFS) loadAG(ag, agLen uint64) error {
	x.ag, x.free, x.agFull = int64(ag), x.free[:0], false
	bad := func(format string, args ...any) error {
		x.warn(fmt.Sprintf("allocation group %d: %s: its %d blocks are imaged in full", ag, fmt.Sprintf(format, args...), agLen))
		x.agFull, x.free = true, x.free[:0]
		return nil
	}
	agOff := int64(ag*x.agblocks) * x.bs
	agf, err := read(x.r, agOff+x.sect, int(x.sect))
	if err != nil {
		return fmt.Errorf("xfs AG %d header: %w", ag, err)
	}
	if agf == nil || string(agf[:4]) != "XAGF" {
		return bad("free-space header (AGF) missing")
	}
	if x.v5 && !xfsCRCOK(agf, 216) {
		return bad("free-space header (AGF) fails its checksum")
	}
	if uint64(be32(agf, 8)) != ag || uint64(be32(agf, 12)) != agLen {
		return bad("free-space header (AGF) describes another group")
	}
	root, levels, freeblks := uint64(be32(agf, 16)), be32(agf, 28), uint64(be32(agf, 52))
	if levels == 0 || levels > xfsMaxLevels || root == 0 || root >= agLen {
		return bad("free-space tree root %d at level %d is invalid", root, levels)
	}
	x.seen = map[uint64]bool{}
	if msg, err := x.walk(ag, agLen, root, int(levels)-1); err != nil {
		return err
	} else if msg != "" {
		return bad("%s", msg)
	}
	var sum, end uint64
	for _, f := range x.free {
		if f.start < end || f.n == 0 || f.start+f.n > agLen {
			return bad("free extents overlap or lie outside the group")
		}
		end = f.start + f.n
		sum += f.n
	}
	if sum != freeblks {
		return bad("free-space tree lists %d free blocks, the header %d", sum, freeblks)
	}
	return x.addFreeList(ag, agLen, agOff, agf)
}

// addFreeList adds the blocks of the AG free list (AGFL), kept in reserve
// for tree growth and holding nothing, to the free extents. A free list
// that does not check out is left alone: its few blocks are then read.
func (x *xfsFS) addFreeList(ag, agLen uint64, agOff int64, agf []byte) error {
	first, last, count := be32(agf, 40), be32(agf, 44), be32(agf, 48)
	if count == 0 {
		return nil
	}
	agfl, err := read(x.r, agOff+3*x.sect, int(x.sect))
	if err != nil {
		return fmt.Errorf("xfs AG %d free list: %w", ag, err)
	}
	hdr := 0
	if x.v5 {
		hdr = 36
		if agfl == nil || string(agfl[:4]) != "XAFL" || !xfsCRCOK(agfl, 32) {
			return nil
		}
	}
	if agfl == nil {
		return nil
	}
	size := uint32(len(agfl)-hdr) / 4
	if first >= size || last >= size || count > size || (last+size-first)%size+1 != count {
		return nil
	}
	extra := make([]xfsExtent, 0, count)
	for i, k := first, uint32(0); k < count; i, k = (i+1)%size, k+1 {
		b := uint64(be32(agfl, hdr+4*int(i)))
		if b == 0 || b >= agLen {
			return nil
		}
		extra = append(extra, xfsExtent{b, 1})
	}
	for _, e := range extra {
		i := sort.Search(len(x.free), func(i int) bool { return x.free[i].start+x.free[i].n > e.start })
		if i < len(x.free) && x.free[i].start <= e.start {
			return nil // a free-list block the trees call free: damaged
		}
	}
	x.free = append(x.free, extra...)
	sort.Slice(x.free, func(i, j int) bool { return x.free[i].start < x.free[j].start })
	return nil
}

// walk collects the free extents under bnobt block agbno, in order.
func (x *xfsFS) walk(ag, agLen, agbno uint64, level int) (string, error) {
	// A tree never shares blocks: a block seen twice is a loop or a
	// crafted fan-out, which must not keep the reader busy.
	if x.seen[agbno] {
		return "free-space tree loops", nil
	}
	x.seen[agbno] = true
	off := int64(ag*x.agblocks+agbno) * x.bs
	b, err := read(x.r, off, int(x.bs))
	if err != nil {
		return "", fmt.Errorf("xfs AG %d free-space tree block %d: %w", ag, agbno, err)
	}
	if b == nil {
		return fmt.Sprintf("free-space tree block %d lies outside the filesystem", agbno), nil
	}
	hdr := 16
	magic := "ABTB"
	if x.v5 {
		hdr, magic = 56, "AB3B"
	}
	if string(b[:4]) != magic {
		return fmt.Sprintf("free-space tree block %d has no %s magic", agbno, magic), nil
	}
	if x.v5 && (!xfsCRCOK(b, 52) || be64(b, 16) != uint64(off/512) || uint64(be32(b, 48)) != ag) {
		return fmt.Sprintf("free-space tree block %d fails its checksum or owner check", agbno), nil
	}
	lvl, n := int(be16(b, 4)), int(be16(b, 6))
	if lvl != level {
		return fmt.Sprintf("free-space tree block %d is at level %d, expected %d", agbno, lvl, level), nil
	}
	if level == 0 {
		if n > (int(x.bs)-hdr)/8 {
			return fmt.Sprintf("free-space tree block %d holds %d records", agbno, n), nil
		}
		for i := range n {
			rec := b[hdr+8*i:]
			x.free = append(x.free, xfsExtent{uint64(be32(rec, 0)), uint64(be32(rec, 4))})
		}
		return "", nil
	}
	maxrecs := (int(x.bs) - hdr) / 12
	if n == 0 || n > maxrecs {
		return fmt.Sprintf("free-space tree node %d holds %d keys", agbno, n), nil
	}
	ptrs := make([]uint64, n)
	for i := range n {
		ptrs[i] = uint64(be32(b, hdr+8*maxrecs+4*i))
	}
	for _, p := range ptrs {
		if p == 0 || p >= agLen {
			return fmt.Sprintf("free-space tree points at block %d, outside the group", p), nil
		}
		if msg, err := x.walk(ag, agLen, p, level-1); msg != "" || err != nil {
			return msg, err
		}
	}
	return "", nil
}
