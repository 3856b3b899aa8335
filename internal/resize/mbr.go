package resize

import (
	"bytes"
	"encoding/binary"
	"io"

	"github.com/sauve-backup/sauve/internal/blockmap/ptable"
)

// maxLogical bounds the EBR chain walk, as ptable does.
const maxLogical = 256

func isExtended(t byte) bool { return t == 0x05 || t == 0x0F || t == 0x85 }

// planMBR grows the partition that ends last, if asked: an MBR has
// nothing at the end of the disk to move.
func planMBR(r io.ReaderAt, mbr []byte, t *ptable.Table, oldSize, newSize int64, o Options) (*Result, error) {
	ss := int64(t.SectorSize)
	res := &Result{Kind: ptable.MBR, SectorSize: t.SectorSize}
	if !o.GrowLastPartition {
		return res, nil
	}
	if err := checkProblems(t); err != nil {
		return nil, err
	}
	newN := newSize / ss
	if newN > 1<<32 {
		return nil, refuse("an MBR partition table cannot address a disk over %d sectors (2 TiB with 512-byte sectors): convert it to GPT first", int64(1)<<32)
	}
	// The primary entry that ends last.
	best, ext := -1, -1
	var bestEnd int64
	for i := 0; i < 4; i++ {
		e := mbr[446+16*i:]
		lba, count := int64(binary.LittleEndian.Uint32(e[8:])), int64(binary.LittleEndian.Uint32(e[12:]))
		if e[4] == 0 || count == 0 {
			continue
		}
		if isExtended(e[4]) && ext < 0 {
			ext = i
		}
		if best < 0 || lba+count > bestEnd {
			best, bestEnd = i, lba+count
		}
	}
	if best < 0 {
		return nil, refuse("the MBR has no partition to grow")
	}
	for _, p := range t.Partitions {
		if p.End() > bestEnd*ss {
			return nil, refuse("partition %d ends after the last primary partition", p.Number)
		}
	}
	m := bytes.Clone(mbr)
	e := m[446+16*best:]
	lba := int64(binary.LittleEndian.Uint32(e[8:]))
	if best != ext {
		setEntry(e, lba, newN-lba)
		res.Grown = &Grown{Number: best + 1, Start: lba * ss, OldSize: (bestEnd - lba) * ss, NewSize: (newN - lba) * ss}
		res.Patches = []Patch{{Off: 0, Data: m}}
		return res, nil
	}
	patches, gr, err := growLogical(r, lba, bestEnd, newN, ss, oldSize)
	if err != nil {
		return nil, err
	}
	setEntry(e, lba, newN-lba)
	// The EBRs first, the MBR last, as for GPT: the MBR is what tools
	// read first.
	res.Patches = append(patches, Patch{Off: 0, Data: m})
	res.Grown = gr
	return res, nil
}

// growLogical walks the EBR chain of the extended partition at base
// ending at extEnd (sectors) and grows the logical partition that ends
// last to newN, updating the link to its EBR too.
func growLogical(r io.ReaderAt, base, extEnd, newN, ss, oldSize int64) ([]Patch, *Grown, error) {
	type ebr struct {
		at   int64  // sector
		b    []byte // the EBR sector
		prev int    // index of the EBR linking to this one, -1 for the first
	}
	var chain []ebr
	at, prev := base, -1
	seen := map[int64]bool{}
	for len(chain) < maxLogical {
		if seen[at] || at < base || at >= extEnd || (at+1)*ss > oldSize {
			break
		}
		seen[at] = true
		b := make([]byte, 512)
		if err := readFull(r, b, at*ss); err != nil {
			return nil, nil, err
		}
		if b[510] != 0x55 || b[511] != 0xAA {
			break
		}
		chain = append(chain, ebr{at: at, b: b, prev: prev})
		next := b[446+16:]
		if !isExtended(next[4]) || binary.LittleEndian.Uint32(next[12:]) == 0 {
			break
		}
		prev = len(chain) - 1
		at = base + int64(binary.LittleEndian.Uint32(next[8:]))
	}
	best := -1
	var bestEnd, bestStart int64
	for i, c := range chain {
		l := c.b[446:]
		count := int64(binary.LittleEndian.Uint32(l[12:]))
		if l[4] == 0 || count == 0 {
			continue
		}
		start := c.at + int64(binary.LittleEndian.Uint32(l[8:]))
		if best < 0 || start+count > bestEnd {
			best, bestStart, bestEnd = i, start, start+count
		}
	}
	if best < 0 {
		return nil, nil, refuse("the extended partition ends last but holds no logical partition to grow")
	}
	c := chain[best]
	rel := int64(binary.LittleEndian.Uint32(c.b[446+8:]))
	setEntry(c.b[446:], c.at+rel, newN-bestStart)
	patches := []Patch{{Off: c.at * ss, Data: c.b}}
	if c.prev >= 0 {
		p := chain[c.prev]
		link := p.b[446+16:]
		setEntry(link, c.at, newN-c.at)
		patches = append(patches, Patch{Off: p.at * ss, Data: p.b})
	}
	num := best + 5
	return patches, &Grown{Number: num, Start: bestStart * ss, OldSize: (bestEnd - bestStart) * ss, NewSize: (newN - bestStart) * ss}, nil
}

// setEntry sets an MBR entry's size to count sectors and its CHS end to
// match; start is the entry's absolute first sector (its LBA field,
// relative in an EBR, is left as it is).
func setEntry(e []byte, start, count int64) {
	binary.LittleEndian.PutUint32(e[12:], uint32(count))
	putCHS(e[5:], uint64(start+count-1))
}

// putCHS writes the CHS address of lba in the usual 255-head,
// 63-sector geometry, or the 1023/254/63 that means "beyond CHS".
func putCHS(b []byte, lba uint64) {
	const heads, sectors = 255, 63
	c := lba / (heads * sectors)
	h := (lba / sectors) % heads
	s := lba%sectors + 1
	if c > 1023 {
		c, h, s = 1023, 254, 63
	}
	b[0] = byte(h)
	b[1] = byte(s) | byte(c>>8)<<6
	b[2] = byte(c)
}
