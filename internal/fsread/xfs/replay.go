package xfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Replaying the log in memory: the committed transactions between the
// log's tail and its head are read, and their buffer and inode items laid
// over the partition's bytes (an overlay; the source is never written),
// as the kernel's log recovery would write them, the CRCs of replayed
// blocks recomputed as the kernel does when it writes them back. Only
// what reading files needs is replayed: buffers (directory, attribute,
// bmbt and symlink blocks, allocation group headers, the superblock) and
// inodes; intents (extents to free, deferred mappings, reference counts,
// reverse maps) are not finished, and inode cluster buffers (their
// unlinked lists) are not replayed. Log record CRCs are not verified: a
// torn record is recognised by its blocks' cycle numbers.

// Log operation flags and client.
const (
	opStart    = 0x01
	opCommit   = 0x02
	opWasCont  = 0x08
	opUnmount  = 0x20
	clientTran = 0x69
)

// Log item types, and buffer item flags.
const (
	itemInode     = 0x123b
	itemBuf       = 0x123c
	blfInodeBuf   = 0x1
	blfCancel     = 0x2
	blfChunk      = 128
	ilogCore      = 0x001
	ilogDData     = 0x002
	ilogDExt      = 0x004
	ilogDBroot    = 0x008
	ilogDev       = 0x010
	ilogAData     = 0x040
	ilogAExt      = 0x080
	ilogABroot    = 0x100
	maxOverlay    = 256 << 20 // bytes of replayed sectors kept in memory
	maxRegions    = 1 << 16   // regions of one log item
	maxLogRecords = 1 << 22
	maxRecord     = 256 << 10
)

// overlay is the partition with replayed sectors laid over it.
type overlay struct {
	base io.ReaderAt
	m    map[int64][]byte // 512-byte sectors by number
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.base.ReadAt(p, off)
	for s := off / bbSize; s*bbSize < off+int64(n); s++ {
		b, ok := o.m[s]
		if !ok {
			continue
		}
		a, z := max(off, s*bbSize), min(off+int64(n), (s+1)*bbSize)
		copy(p[a-off:z-off], b[a-s*bbSize:z-s*bbSize])
	}
	return n, err
}

// region is one logged region of an item.
type logItem struct{ regions [][]byte }

type logTrans struct {
	lsn    uint64
	header bool // the transaction header was seen
	items  []*logItem
	// want is how many regions the last item has (its format says).
	want int
}

// logRecords walks the records from the tail to the head, calling fn with
// each record's LSN and data (cycle stamps undone).
func (f *FS) logRecords(lg *logGeom, fn func(lsn uint64, data []byte, ops int) error) error {
	hdr, err := lg.bb(lg.lastRec)
	if err != nil {
		return err
	}
	tail := int64(be64(hdr, 24) & 0xFFFFFFFF)
	if tail >= lg.n {
		return fmt.Errorf("log tail at block %d of %d (damaged)", tail, lg.n)
	}
	for i, count := tail, 0; i != lg.head%lg.n; count++ {
		if count > maxLogRecords {
			return errors.New("too many log records (damaged)")
		}
		h, err := lg.bb(i)
		if err != nil {
			return err
		}
		if be32(h, 0) != logHeaderMagic {
			return fmt.Errorf("no log record header at block %d (damaged or torn log)", i)
		}
		h = append([]byte(nil), h...)
		hblks, dataLen := lg.recordSize(h)
		nbb := (dataLen + bbSize - 1) / bbSize
		// Log records hold up to 256 KiB, described by up to 8 headers
		// of 64 blocks each.
		if dataLen < 0 || dataLen > maxRecord || hblks > maxRecord/logCycleSize || nbb > 64*hblks || hblks+nbb > lg.n {
			return fmt.Errorf("log record at block %d of %d bytes (damaged)", i, dataLen)
		}
		ext := make([][]byte, hblks) // the extended headers hold the rest of the cycle data
		ext[0] = h
		for j := int64(1); j < hblks; j++ {
			b, err := lg.bb((i + j) % lg.n)
			if err != nil {
				return err
			}
			ext[j] = append([]byte(nil), b...)
		}
		data := make([]byte, nbb*bbSize)
		cycle := be32(h, 4)
		for k := int64(0); k < nbb; k++ {
			b, err := lg.bb((i + hblks + k) % lg.n)
			if err != nil {
				return err
			}
			// The part of a record past the end of the log, written
			// at its start, is stamped with the next cycle.
			want := cycle
			if i+hblks+k >= lg.n {
				want++
			}
			if be32(b, 0) != want {
				return fmt.Errorf("log record at block %d is torn", i)
			}
			d := data[k*bbSize : (k+1)*bbSize]
			copy(d, b)
			j, idx := k/64, int(k%64)
			src := ext[j][44+4*idx:]
			if j > 0 {
				src = ext[j][4+4*idx:]
			}
			copy(d[:4], src[:4])
		}
		if err := fn(be64(h, 16), data[:dataLen], int(be32(h, 40))); err != nil {
			return fmt.Errorf("log record at block %d: %w", i, err)
		}
		i = (i + hblks + nbb) % lg.n
	}
	return nil
}

// replay reads the committed transactions of the log and lays their
// items over the partition.
func (f *FS) replay(lg *logGeom) (*overlay, error) {
	open := map[uint32]*logTrans{}
	var done []*logTrans
	total := 0
	err := f.logRecords(lg, func(lsn uint64, data []byte, ops int) error {
		for off, op := 0, 0; op < ops; op++ {
			if off+12 > len(data) {
				return fmt.Errorf("operation header at %d truncated", off)
			}
			tid, n, client, flags := be32(data, off), int(be32(data, off+4)), data[off+8], data[off+9]
			off += 12
			if n < 0 || n > len(data)-off {
				return fmt.Errorf("operation of %d bytes at %d runs past the record", n, off)
			}
			body := data[off : off+n]
			off += n
			if client != clientTran || flags&opUnmount != 0 {
				continue
			}
			t := open[tid]
			if t == nil {
				if flags&opStart == 0 && n > 0 && flags&opCommit == 0 {
					// A transaction started before the tail: its
					// earlier changes are on disk already.
					continue
				}
				t = &logTrans{lsn: lsn}
				open[tid] = t
			}
			if total += n; total > maxOverlay {
				return errors.New("the log holds more than this reader replays in memory")
			}
			if n > 0 {
				if err := t.add(body, flags&opWasCont != 0); err != nil {
					return fmt.Errorf("transaction %#x: %w", tid, err)
				}
			}
			if flags&opCommit != 0 {
				done = append(done, t)
				delete(open, tid)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	o := &overlay{base: f.r, m: map[int64][]byte{}}
	return o, f.apply(o, done)
}

// add appends one operation's data to the transaction: the header,
// then the regions of its items.
func (t *logTrans) add(b []byte, cont bool) error {
	if !t.header {
		if len(b) < 4 || binary.LittleEndian.Uint32(b) != 0x5452414E {
			return errors.New("no transaction header (a log written by a big-endian machine, or damaged)")
		}
		t.header = true
		return nil
	}
	if cont {
		if len(t.items) == 0 || len(t.items[len(t.items)-1].regions) == 0 {
			return errors.New("a continued region without its start")
		}
		it := t.items[len(t.items)-1]
		it.regions[len(it.regions)-1] = append(it.regions[len(it.regions)-1], b...)
		return nil
	}
	if len(t.items) == 0 || len(t.items[len(t.items)-1].regions) >= t.want {
		if len(b) < 4 {
			return errors.New("item format truncated")
		}
		t.want = int(binary.LittleEndian.Uint16(b[2:]))
		if t.want == 0 || t.want > maxRegions {
			return fmt.Errorf("item of %d regions (damaged)", t.want)
		}
		t.items = append(t.items, &logItem{})
	}
	it := t.items[len(t.items)-1]
	it.regions = append(it.regions, append([]byte(nil), b...))
	return nil
}

// apply lays the transactions' items over the partition, in order; a
// buffer freed later in the log (cancelled) is not replayed before its
// cancellation, as the kernel does.
func (f *FS) apply(o *overlay, ts []*logTrans) error {
	type key struct{ blk, n int64 }
	cancels := map[key]int{}
	for _, t := range ts {
		for _, it := range t.items {
			if blk, n, flags, ok := bufFormat(it); ok && flags&blfCancel != 0 {
				cancels[key{blk, n}]++
			}
		}
	}
	isCancelled := func(blk, n int64) bool { return cancels[key{blk, n}] > 0 }
	for _, t := range ts {
		// Buffers, then inodes (which may be written into buffers
		// replayed), then the cancellations, which may end a buffer's
		// cancelled span: the kernel's order.
		for pass := 0; pass < 3; pass++ {
			for _, it := range t.items {
				if len(it.regions[0]) < 4 {
					continue
				}
				typ := binary.LittleEndian.Uint16(it.regions[0])
				blk, n, flags, isBuf := bufFormat(it)
				var err error
				switch {
				case pass == 0 && isBuf && flags&(blfInodeBuf|blfCancel) == 0 && !isCancelled(blk, n):
					err = f.applyBuf(o, it, blk, n)
				case pass == 1 && typ == itemInode:
					err = f.applyInode(o, it, t.lsn, isCancelled)
				case pass == 2 && isBuf && flags&blfCancel != 0:
					k := key{blk, n}
					if cancels[k]--; cancels[k] <= 0 {
						delete(cancels, k)
					}
				}
				if err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// bufFormat decodes a buffer item's format: its first sector, its length
// in sectors, its flags.
func bufFormat(it *logItem) (blk, n int64, flags uint16, ok bool) {
	b := it.regions[0]
	if len(b) < 20 || binary.LittleEndian.Uint16(b) != itemBuf {
		return 0, 0, 0, false
	}
	return int64(binary.LittleEndian.Uint64(b[8:])), int64(binary.LittleEndian.Uint16(b[6:])), binary.LittleEndian.Uint16(b[4:]), true
}

// read reads n bytes at off through the overlay.
func (f *FS) readOver(o *overlay, off int64, n int) ([]byte, error) {
	p := make([]byte, n)
	if off < 0 || off > f.size || int64(n) > f.size-off {
		return nil, fmt.Errorf("replayed item at %d (%d bytes) lies outside the filesystem", off, n)
	}
	if _, err := o.ReadAt(p, off); err != nil && err != io.EOF {
		return nil, err
	}
	return p, nil
}

// write lays p over the partition at off.
func (o *overlay) write(p []byte, off int64) error {
	for s := off / bbSize; s*bbSize < off+int64(len(p)); s++ {
		b, ok := o.m[s]
		if !ok {
			if len(o.m) >= maxOverlay/bbSize {
				return errors.New("the log replays more than this reader keeps in memory")
			}
			b = make([]byte, bbSize)
			if _, err := o.ReadAt(b, s*bbSize); err != nil && err != io.EOF {
				return err
			}
			o.m[s] = b
		}
		a, z := max(off, s*bbSize), min(off+int64(len(p)), (s+1)*bbSize)
		copy(b[a-s*bbSize:z-s*bbSize], p[a-off:z-off])
	}
	return nil
}

// applyBuf replays a buffer item: each run of set bits of its dirty map
// names 128-byte chunks, which the next region holds.
func (f *FS) applyBuf(o *overlay, it *logItem, blk, n int64) error {
	fmtb := it.regions[0]
	words := int(binary.LittleEndian.Uint32(fmtb[16:]))
	if words > (len(fmtb)-20)/4 || n == 0 || n > 1<<10 || blk < 0 || blk > f.size/bbSize {
		return fmt.Errorf("buffer item at sector %d: damaged format", blk)
	}
	buf, err := f.readOver(o, blk*bbSize, int(n*bbSize))
	if err != nil {
		return err
	}
	bit := func(i int) bool {
		return i < words*32 && binary.LittleEndian.Uint32(fmtb[20+4*(i/32):])&(1<<(i%32)) != 0
	}
	r := 1
	for i := 0; i < words*32; {
		if !bit(i) {
			i++
			continue
		}
		j := i
		for bit(j) {
			j++
		}
		if r >= len(it.regions) {
			return fmt.Errorf("buffer item at sector %d: fewer regions than its map says", blk)
		}
		src := it.regions[r]
		r++
		a := i * blfChunk
		if a > len(buf) {
			return fmt.Errorf("buffer item at sector %d: chunk %d past its end", blk, i)
		}
		copy(buf[a:min(len(buf), j*blfChunk)], src)
		i = j
	}
	f.fixCRC(buf)
	return o.write(buf, blk*bbSize)
}

// fixCRC recomputes the CRC of a replayed v5 metadata block, as the
// kernel does when it writes the block back.
func (f *FS) fixCRC(b []byte) {
	if !f.sb.v5 || len(b) < 64 {
		return
	}
	at := -1
	switch string(b[:4]) {
	case "XFSB":
		if len(b) < f.sb.sectsize {
			return
		}
		b = b[:f.sb.sectsize]
		at = 224
	case magicBlock5, magicData5, "XDF3":
		at = 4
	case "BMA3":
		at = 64
	case "XSLM":
		at = 12
	case "XARM":
		for off := 0; off+int(f.sb.bs) <= len(b); off += int(f.sb.bs) {
			setCRC(b[off:off+int(f.sb.bs)], 12)
		}
		return
	}
	switch be16(b, 8) {
	case magicLeaf5, magicNode5, 0x3DF1, 0x3DFF:
		at = 12
	}
	if at >= 0 {
		setCRC(b, at)
	}
}

func setCRC(b []byte, off int) {
	if off+4 > len(b) {
		return
	}
	binary.LittleEndian.PutUint32(b[off:], 0)
	binary.LittleEndian.PutUint32(b[off:], crc32cOf(b))
}

// applyInode replays an inode item: its core (logged in the machine's
// byte order), then its data and attribute forks.
func (f *FS) applyInode(o *overlay, it *logItem, lsn uint64, cancelled func(blk, n int64) bool) error {
	fb := it.regions[0]
	le := binary.LittleEndian
	var fields, asize, dsize uint32
	var ino, rdev uint64
	var blk, blen, boff int64
	switch len(fb) {
	case 56:
		fields, asize, dsize = le.Uint32(fb[4:]), uint32(le.Uint16(fb[8:])), uint32(le.Uint16(fb[10:]))
		ino, rdev = le.Uint64(fb[16:]), uint64(le.Uint32(fb[24:]))
		blk, blen, boff = int64(le.Uint64(fb[40:])), int64(int32(le.Uint32(fb[48:]))), int64(int32(le.Uint32(fb[52:])))
	case 52: // the 32-bit layout, without padding
		fields, asize, dsize = le.Uint32(fb[4:]), uint32(le.Uint16(fb[8:])), uint32(le.Uint16(fb[10:]))
		ino, rdev = le.Uint64(fb[12:]), uint64(le.Uint32(fb[20:]))
		blk, blen, boff = int64(le.Uint64(fb[36:])), int64(int32(le.Uint32(fb[44:]))), int64(int32(le.Uint32(fb[48:])))
	default:
		return fmt.Errorf("inode item of %d bytes (damaged)", len(fb))
	}
	if cancelled(blk, blen) || fields&ilogCore == 0 || len(it.regions) < 2 {
		return nil
	}
	isize := f.sb.isize
	if boff < 0 || boff+int64(isize) > blen*bbSize || blk < 0 || blk > f.size/bbSize {
		return fmt.Errorf("inode item of inode %d: damaged placement", ino)
	}
	at := blk*bbSize + boff
	disk, err := f.readOver(o, at, isize)
	if err != nil {
		return fmt.Errorf("inode item of inode %d: %w", ino, err)
	}
	if string(disk[:2]) == "IN" && disk[4] >= 3 {
		if d := be64(disk, 112); d != 0 && d != ^uint64(0) && d > lsn {
			return nil // written back after this transaction
		}
	}
	core, err := logDinode(it.regions[1], disk)
	if err != nil {
		return fmt.Errorf("inode item of inode %d: %w", ino, err)
	}
	lit := 100
	if core[4] >= 3 {
		lit = 176
	}
	out := append([]byte(nil), disk...)
	if string(disk[:2]) != "IN" {
		clear(out)
		binary.BigEndian.PutUint32(out[96:], 0xFFFFFFFF) // no next unlinked
	}
	next := be32(out, 96)
	copy(out, core)
	binary.BigEndian.PutUint32(out[96:], next)
	forkoff := lit + int(out[82])*8
	if out[82] == 0 {
		forkoff = isize
	}
	if forkoff > isize {
		return fmt.Errorf("inode item of inode %d: damaged fork offset", ino)
	}
	r := 2
	if fields&(ilogDData|ilogDExt|ilogDBroot) != 0 && r < len(it.regions) {
		if err := putFork(out[lit:forkoff], it.regions[r][:min(len(it.regions[r]), int(dsize))], fields&ilogDBroot != 0, f.bmbtHdr()); err != nil {
			return fmt.Errorf("inode item of inode %d: %w", ino, err)
		}
		r++
	} else if fields&ilogDev != 0 && forkoff-lit >= 4 {
		binary.BigEndian.PutUint32(out[lit:], uint32(rdev))
	}
	if fields&(ilogAData|ilogAExt|ilogABroot) != 0 && r < len(it.regions) && forkoff < isize {
		if err := putFork(out[forkoff:], it.regions[r][:min(len(it.regions[r]), int(asize))], fields&ilogABroot != 0, f.bmbtHdr()); err != nil {
			return fmt.Errorf("inode item of inode %d: %w", ino, err)
		}
	}
	if core[4] >= 3 {
		setCRC(out, 100)
	}
	return o.write(out, at)
}

func (f *FS) bmbtHdr() int {
	if f.sb.v5 {
		return 72
	}
	return 24
}

// putFork writes a logged fork: as it is, or, for a B+tree root logged
// in memory's form (a long btree block header, keys and pointers spaced
// for the logged size), in the inode's form (level, count, keys and
// pointers spaced for the fork).
func putFork(dst, src []byte, broot bool, hdr int) error {
	if !broot {
		if len(src) > len(dst) {
			return errors.New("logged fork larger than the fork")
		}
		copy(dst, src)
		return nil
	}
	if len(src) < hdr || len(dst) < 4 {
		return errors.New("logged btree root truncated")
	}
	n := int(be16(src, 6))
	inMax, outMax := (len(src)-hdr)/16, (len(dst)-4)/16
	if n > inMax || n > outMax {
		return errors.New("logged btree root of too many records")
	}
	clear(dst)
	copy(dst[0:2], src[4:6])
	copy(dst[2:4], src[6:8])
	for i := range n {
		copy(dst[4+8*i:4+8*i+8], src[hdr+8*i:])
		copy(dst[4+8*outMax+8*i:4+8*outMax+8*i+8], src[hdr+8*inMax+8*i:])
	}
	return nil
}

// logDinode converts a logged inode core (the logging machine's byte
// order: little-endian) to the on-disk form (big-endian).
func logDinode(l, disk []byte) ([]byte, error) {
	if len(l) < 96 || binary.LittleEndian.Uint16(l) != 0x494E {
		return nil, errors.New("logged inode core damaged or big-endian")
	}
	n := 100
	if l[4] >= 3 {
		n = 176
	}
	if len(l) < n-4 || len(disk) < n {
		return nil, errors.New("logged inode core truncated")
	}
	out := make([]byte, n)
	copy(out, l[:min(len(l), n)])
	swap := func(off, size int) {
		for i := range size / 2 {
			out[off+i], out[off+size-1-i] = out[off+size-1-i], out[off+i]
		}
	}
	var flags2 uint64
	if n == 176 {
		flags2 = binary.LittleEndian.Uint64(l[120:])
	}
	ts := func(off int) {
		if flags2&diflag2Bigtime != 0 {
			swap(off, 8)
		} else {
			swap(off, 4)
			swap(off+4, 4)
		}
	}
	for _, fl := range [][2]int{{0, 2}, {2, 2}, {6, 2}, {8, 4}, {12, 4}, {16, 4}, {20, 2}, {22, 2},
		{56, 8}, {64, 8}, {72, 4}, {76, 4}, {80, 2}, {84, 4}, {88, 2}, {90, 2}, {92, 4}} {
		swap(fl[0], fl[1])
	}
	if flags2&diflag2Nrext64 != 0 {
		swap(24, 8)
	} else {
		swap(30, 2)
	}
	ts(32)
	ts(40)
	ts(48)
	if n == 176 {
		for _, fl := range [][2]int{{104, 8}, {112, 8}, {120, 8}, {128, 4}, {152, 8}} {
			swap(fl[0], fl[1])
		}
		ts(144)
	}
	return out, nil
}
