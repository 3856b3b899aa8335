package ext

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
)

// jbd2 block types and features.
const (
	jbdMagic      = 0xC03B3998
	jbdDescriptor = 1
	jbdCommit     = 2
	jbdSuperV1    = 3
	jbdSuperV2    = 4
	jbdRevoke     = 5

	jbdRevokeFeat     = 0x1
	jbd64Bit          = 0x2
	jbdAsyncCommit    = 0x4
	jbdCsumV2         = 0x8
	jbdCsumV3         = 0x10
	jbdFastCommit     = 0x20
	jbdCompatChecksum = 0x1 // compat: v1 checksums (crc32 of each transaction)

	jbdKnown = jbdRevokeFeat | jbd64Bit | jbdAsyncCommit | jbdCsumV2 | jbdCsumV3 | jbdFastCommit

	tagEscape   = 0x1
	tagSameUUID = 0x2
	tagLastTag  = 0x8
)

func be32(b []byte, off int) uint32 { return binary.BigEndian.Uint32(b[off:]) }
func be16(b []byte, off int) uint16 { return binary.BigEndian.Uint16(b[off:]) }

// copyOf is where the newest committed copy of a filesystem block is in
// the journal.
type copyOf struct {
	phys    uint64 // filesystem block holding the copy
	escaped bool   // the copy's first four bytes were the jbd2 magic, zeroed
}

// overlay reads the partition with the journal's committed blocks in
// place of the ones on disk: recovery done in memory.
type overlay struct {
	r  io.ReaderAt
	bs int64
	m  map[uint64]copyOf
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b := uint64(pos / o.bs)
		in := pos - int64(b)*o.bs
		n := min(int64(len(p)-done), o.bs-in)
		c, ok := o.m[b]
		if !ok {
			// Read up to the next replayed block in one go.
			for n < int64(len(p)-done) {
				if _, ok := o.m[uint64((pos+n)/o.bs)]; ok {
					break
				}
				n = min(int64(len(p)-done), n+o.bs)
			}
			k, err := o.r.ReadAt(p[done:done+int(n)], pos)
			done += k
			if err != nil {
				return done, err
			}
			continue
		}
		blk := make([]byte, o.bs)
		if k, err := o.r.ReadAt(blk, int64(c.phys)*o.bs); k != len(blk) {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return done, fmt.Errorf("journal copy of block %d: %w", b, err)
		}
		if c.escaped {
			binary.BigEndian.PutUint32(blk, jbdMagic)
		}
		done += copy(p[done:done+int(n)], blk[in:])
	}
	return done, nil
}

// jtag is one block a transaction logs.
type jtag struct {
	fsBlock uint64
	jblock  uint64 // journal block of the copy
	escaped bool
}

type transaction struct {
	seq     uint32
	tags    []jtag
	revokes []uint64
}

// replay scans the journal (its inode's blocks, read as they are on
// disk) and maps every block its committed transactions log, except the
// ones a later revoke record cancels, as jbd2's recovery does.
func (f *FS) replay(warn func(string)) (*overlay, error) {
	jin, err := f.inode(uint64(f.sb.journal))
	if err != nil {
		return nil, fmt.Errorf("journal inode: %w", err)
	}
	rs, err := f.runs(jin)
	if err != nil {
		return nil, fmt.Errorf("journal inode: %w", err)
	}
	// phys maps a journal block to the filesystem block holding it.
	phys := func(j uint64) (uint64, error) {
		i := sort.Search(len(rs), func(i int) bool { return rs[i].lblk+rs[i].n > j })
		if i < len(rs) && j >= rs[i].lblk {
			return rs[i].pblk + j - rs[i].lblk, nil
		}
		return 0, fmt.Errorf("journal block %d is not mapped by the journal inode %d", j, f.sb.journal)
	}
	read := func(j uint64) ([]byte, error) {
		p, err := phys(j)
		if err != nil {
			return nil, err
		}
		return f.block(p)
	}
	jsb, err := read(0)
	if err != nil {
		return nil, fmt.Errorf("journal superblock: %w", err)
	}
	if be32(jsb, 0) != jbdMagic || (be32(jsb, 4) != jbdSuperV1 && be32(jsb, 4) != jbdSuperV2) {
		return nil, errors.New("journal superblock: bad magic")
	}
	if int64(be32(jsb, 12)) != f.sb.bs {
		return nil, fmt.Errorf("journal block size %d differs from the filesystem's %d", be32(jsb, 12), f.sb.bs)
	}
	maxlen, first, seq, start := uint64(be32(jsb, 16)), uint64(be32(jsb, 20)), be32(jsb, 24), uint64(be32(jsb, 28))
	var incompat uint32
	if be32(jsb, 4) == jbdSuperV2 {
		incompat = be32(jsb, 40)
	}
	if incompat&^jbdKnown != 0 {
		return nil, fmt.Errorf("journal has unknown incompatible features %#x", incompat&^jbdKnown)
	}
	if maxlen > f.fileBlocks(jin) || first == 0 || first >= maxlen {
		return nil, fmt.Errorf("journal superblock damaged: %d blocks from %d, the inode holds %d", maxlen, first, f.fileBlocks(jin))
	}
	last := maxlen // one past the last block of the log
	if incompat&jbdFastCommit != 0 {
		fc := uint64(be32(jsb, 0x54))
		if fc == 0 {
			fc = 256
		}
		if fc >= maxlen-first {
			return nil, errors.New("journal superblock damaged: fast commit area larger than the journal")
		}
		last -= fc
		warn("the journal has fast commits: they are not replayed, the last fsync'ed changes may be missing")
	}
	ov := &overlay{r: f.raw, bs: f.sb.bs, m: map[uint64]copyOf{}}
	if start == 0 {
		return ov, nil // clean: nothing to replay
	}
	if start < first || start >= last {
		return nil, fmt.Errorf("journal superblock damaged: log starts at block %d", start)
	}
	tagSize := 8
	switch {
	case incompat&jbdCsumV3 != 0:
		tagSize = 16
	case incompat&jbdCsumV2 != 0:
		tagSize = 10
		if incompat&jbd64Bit != 0 {
			tagSize = 14
		}
	case incompat&jbd64Bit != 0:
		tagSize = 12
	}
	tail := 0
	if incompat&(jbdCsumV2|jbdCsumV3) != 0 {
		tail = 4
	}
	next := func(j uint64) uint64 {
		if j+1 >= last {
			return first
		}
		return j + 1
	}

	var compat uint32
	if be32(jsb, 4) == jbdSuperV2 {
		compat = be32(jsb, 36)
	}
	csumSeed := crc32c(^uint32(0), jsb[48:64])
	sum := ^uint32(0) // v1 checksum of the transaction so far
	var txs []transaction
	cur := transaction{seq: seq}
	j := start
	// The log is at most the journal's length: each step moves on by at
	// least one block, so the scan ends.
	for steps := uint64(0); steps < last; {
		b, err := read(j)
		if err != nil {
			return nil, fmt.Errorf("journal block %d: %w", j, err)
		}
		if be32(b, 0) != jbdMagic || be32(b, 8) != cur.seq {
			break // the end of the log
		}
		steps++
		switch be32(b, 4) {
		case jbdDescriptor:
			tags, err := parseTags(b[:len(b)-tail], tagSize, incompat&jbd64Bit != 0)
			if err != nil {
				return nil, fmt.Errorf("journal descriptor block %d: %w", j, err)
			}
			sum = crc32be(sum, b)
			for _, t := range tags {
				j = next(j)
				steps++
				t.jblock = j
				cur.tags = append(cur.tags, t)
				if compat&jbdCompatChecksum != 0 {
					d, err := read(j)
					if err != nil {
						return nil, fmt.Errorf("journal block %d: %w", j, err)
					}
					sum = crc32be(sum, d)
				}
			}
			j = next(j)
		case jbdRevoke:
			recs, err := parseRevoke(b, incompat&jbd64Bit != 0)
			if err != nil {
				return nil, fmt.Errorf("journal revoke block %d: %w", j, err)
			}
			cur.revokes = append(cur.revokes, recs...)
			j = next(j)
		case jbdCommit:
			if !commitOK(b, incompat, sum, csumSeed, compat) {
				steps = last // as jbd2: a commit that fails its checksum ends the log
				break
			}
			sum = ^uint32(0)
			txs = append(txs, cur)
			cur = transaction{seq: cur.seq + 1}
			j = next(j)
		default:
			steps = last // unknown block type: the end of the log
		}
	}
	revoked := map[uint64]uint32{}
	for _, tx := range txs {
		for _, b := range tx.revokes {
			if s, ok := revoked[b]; !ok || int32(tx.seq-s) > 0 {
				revoked[b] = tx.seq
			}
		}
	}
	for _, tx := range txs {
		for _, t := range tx.tags {
			if s, ok := revoked[t.fsBlock]; ok && int32(tx.seq-s) <= 0 {
				continue
			}
			if t.fsBlock >= f.sb.blocks {
				return nil, fmt.Errorf("transaction %d logs block %d, outside the filesystem", tx.seq, t.fsBlock)
			}
			p, err := phys(t.jblock)
			if err != nil {
				return nil, err
			}
			ov.m[t.fsBlock] = copyOf{phys: p, escaped: t.escaped}
		}
	}
	return ov, nil
}

// parseTags reads the block tags of a descriptor block b (its checksum
// tail cut off).
func parseTags(b []byte, size int, is64 bool) ([]jtag, error) {
	var tags []jtag
	for off := 12; off+size <= len(b); {
		t := jtag{fsBlock: uint64(be32(b, off))}
		var flags uint32
		if size == 16 { // csum v3: a 32-bit flags word
			flags = be32(b, off+4)
			if is64 {
				t.fsBlock |= uint64(be32(b, off+8)) << 32
			}
		} else {
			flags = uint32(be16(b, off+6))
			if is64 && size >= 12 {
				t.fsBlock |= uint64(be32(b, off+8)) << 32
			}
		}
		t.escaped = flags&tagEscape != 0
		tags = append(tags, t)
		off += size
		if flags&tagSameUUID == 0 {
			off += 16
		}
		if flags&tagLastTag != 0 {
			return tags, nil
		}
	}
	if len(tags) == 0 {
		return nil, errors.New("no block tag")
	}
	return tags, nil
}

// parseRevoke reads the blocks a revoke block cancels.
func parseRevoke(b []byte, is64 bool) ([]uint64, error) {
	n := int(be32(b, 12))
	if n < 16 || n > len(b) {
		return nil, fmt.Errorf("record size %d", n)
	}
	rec := 4
	if is64 {
		rec = 8
	}
	var out []uint64
	for off := 16; off+rec <= n; off += rec {
		if is64 {
			out = append(out, binary.BigEndian.Uint64(b[off:]))
		} else {
			out = append(out, uint64(be32(b, off)))
		}
	}
	return out, nil
}

// commitOK checks a commit block's checksum as jbd2's recovery does: with
// csum v2/v3, crc32c of the block with its checksum zeroed; with v1, the
// big-endian crc32 of the transaction's descriptor and data blocks (a
// commit without one is accepted only before any had one, which the
// reader simplifies to: accepted).
func commitOK(b []byte, incompat, sum, seed, compat uint32) bool {
	stored := be32(b, 16)
	switch {
	case incompat&(jbdCsumV2|jbdCsumV3) != 0:
		c := append([]byte(nil), b...)
		binary.BigEndian.PutUint32(c[16:], 0)
		return crc32c(seed, c) == stored
	case compat&jbdCompatChecksum != 0:
		if b[12] == 0 && b[13] == 0 && stored == 0 {
			return true
		}
		return b[12] == 1 && b[13] == 4 && stored == sum
	}
	return true
}

// crc32beTable is the table of the big-endian (unreflected) CRC-32 of
// polynomial 0x04C11DB7 that jbd2's v1 checksums use.
var crc32beTable = func() (t [256]uint32) {
	for i := range t {
		c := uint32(i) << 24
		for range 8 {
			if c&0x80000000 != 0 {
				c = c<<1 ^ 0x04C11DB7
			} else {
				c <<= 1
			}
		}
		t[i] = c
	}
	return t
}()

// crc32be is the kernel's crc32_be(crc, p): no inversion.
func crc32be(crc uint32, p []byte) uint32 {
	for _, b := range p {
		crc = crc<<8 ^ crc32beTable[byte(crc>>24)^b]
	}
	return crc
}
