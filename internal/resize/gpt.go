package resize

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"
	"hash/crc32"
	"io"

	"github.com/sauve-backup/sauve/internal/blockmap/ptable"
)

// maxEntryBytes bounds the entry array a header may claim (the usual
// array is 16 KiB), as ptable does.
const maxEntryBytes = 4 << 20

// protective returns the index of the MBR's 0xEE entry, or -1.
func protective(mbr []byte) int {
	for i := 0; i < 4; i++ {
		if mbr[446+16*i+4] == 0xEE {
			return i
		}
	}
	return -1
}

// gpt is the primary GPT as read: its header sector and entry array.
type gpt struct {
	ss                  int
	hdr                 []byte // the whole header sector
	hsize               uint32
	altLBA, lastUse     uint64
	entryLBA            uint64
	nEntries, entrySize uint32
	entries             []byte
}

func planGPT(r io.ReaderAt, mbr []byte, oldSize, newSize int64, o Options) (*Result, error) {
	sizes := []int{512, 4096}
	if o.SectorSize != 0 {
		sizes = []int{o.SectorSize}
	}
	var g *gpt
	var firstErr error
	for _, ss := range sizes {
		var err error
		if g, err = readPrimary(r, oldSize, ss); err == nil {
			break
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if g == nil {
		return nil, firstErr
	}
	t, err := ptable.Read(r, oldSize, g.ss)
	if err != nil {
		return nil, fmt.Errorf("read the partition table: %w", err)
	}
	if t == nil || t.Kind != ptable.GPT || t.Damaged() {
		return nil, refuse("the GPT could not be read")
	}
	if err := checkProblems(t); err != nil {
		return nil, err
	}
	ss := int64(g.ss)
	newN := uint64(newSize / ss)
	arr := (uint64(g.nEntries)*uint64(g.entrySize) + uint64(ss) - 1) / uint64(ss)
	newAlt := newN - 1
	newLastUse := newAlt - arr - 1
	res := &Result{Kind: ptable.GPT, SectorSize: g.ss}
	if newLastUse < g.lastUse || g.altLBA > newAlt {
		return nil, refuse("the GPT already claims sectors up to %d, past the new end of the disk (%d sectors)", max(g.altLBA, g.lastUse), newN)
	}
	if g.altLBA == newAlt && g.lastUse == newLastUse && !o.GrowLastPartition {
		return res, nil // already right
	}
	if o.GrowLastPartition {
		gr, err := growGPT(g, newLastUse)
		if err != nil {
			return nil, err
		}
		res.Grown = gr
	}
	crc := crc32.ChecksumIEEE(g.entries)
	prim := append([]byte(nil), g.hdr...)
	binary.LittleEndian.PutUint64(prim[32:], newAlt)
	binary.LittleEndian.PutUint64(prim[48:], newLastUse)
	binary.LittleEndian.PutUint32(prim[88:], crc)
	back := append([]byte(nil), prim...)
	binary.LittleEndian.PutUint64(back[24:], newAlt)
	binary.LittleEndian.PutUint64(back[32:], 1)
	binary.LittleEndian.PutUint64(back[72:], newAlt-arr)
	sealHeader(prim, g.hsize)
	sealHeader(back, g.hsize)
	padded := make([]byte, arr*uint64(ss))
	copy(padded, g.entries)

	// The stale backup left at the old end would be found by tools that
	// look at the last sector of a disk of the old size; wipe it when it
	// lies where no partition is (it is then inside the grown one, or in
	// free space).
	if old := g.altLBA; old != newAlt && old > g.lastUse && old < newN {
		res.Patches = append(res.Patches, Patch{Off: int64(old) * ss, Data: make([]byte, ss)})
	}
	res.Patches = append(res.Patches,
		Patch{Off: int64(newAlt-arr) * ss, Data: padded},
		Patch{Off: int64(newAlt) * ss, Data: back},
		Patch{Off: int64(g.entryLBA) * ss, Data: padded},
		Patch{Off: ss, Data: prim},
	)
	if m := protectiveMBR(mbr, oldSize/ss, newN); m != nil {
		res.Patches = append(res.Patches, Patch{Off: 0, Data: m})
	}
	return res, nil
}

// readPrimary reads and checks the primary GPT at sector size ss. Only a
// primary GPT that is entirely valid is patched: the patch rewrites the
// backup from it.
func readPrimary(r io.ReaderAt, oldSize int64, ss int) (*gpt, error) {
	n := uint64(oldSize / int64(ss))
	if n < 4 {
		return nil, refuse("the disk is too small for a GPT with %d-byte sectors", ss)
	}
	b := make([]byte, ss)
	if err := readFull(r, b, int64(ss)); err != nil {
		return nil, fmt.Errorf("read the primary GPT header: %w", err)
	}
	if string(b[:8]) != "EFI PART" {
		return nil, refuse("protective MBR but no primary GPT header (sector 1, %d-byte sectors)", ss)
	}
	g := &gpt{ss: ss, hdr: b, hsize: binary.LittleEndian.Uint32(b[12:])}
	if g.hsize < 92 || int(g.hsize) > ss {
		return nil, refuse("the primary GPT header claims a size of %d bytes", g.hsize)
	}
	want := binary.LittleEndian.Uint32(b[16:])
	if crc32.ChecksumIEEE(headerForCRC(b, g.hsize)) != want {
		return nil, refuse("the primary GPT header fails its CRC check (repair the table, e.g. with gdisk, first)")
	}
	if binary.LittleEndian.Uint64(b[24:]) != 1 {
		return nil, refuse("the primary GPT header does not say it is at sector 1")
	}
	g.altLBA, g.lastUse = binary.LittleEndian.Uint64(b[32:]), binary.LittleEndian.Uint64(b[48:])
	firstUse := binary.LittleEndian.Uint64(b[40:])
	g.entryLBA = binary.LittleEndian.Uint64(b[72:])
	g.nEntries, g.entrySize = binary.LittleEndian.Uint32(b[80:]), binary.LittleEndian.Uint32(b[84:])
	if g.entrySize < 128 || g.entrySize&(g.entrySize-1) != 0 || uint64(g.nEntries)*uint64(g.entrySize) > maxEntryBytes || g.nEntries == 0 {
		return nil, refuse("the primary GPT header claims %d entries of %d bytes", g.nEntries, g.entrySize)
	}
	arr := (uint64(g.nEntries)*uint64(g.entrySize) + uint64(ss) - 1) / uint64(ss)
	if g.entryLBA < 2 || g.entryLBA+arr > firstUse || firstUse > g.lastUse || g.lastUse >= n || g.altLBA <= g.lastUse {
		return nil, refuse("the primary GPT header's entry array or usable sectors do not fit the disk")
	}
	g.entries = make([]byte, int(g.nEntries)*int(g.entrySize))
	if err := readFull(r, g.entries, int64(g.entryLBA)*int64(ss)); err != nil {
		return nil, fmt.Errorf("read the GPT entries: %w", err)
	}
	if crc32.ChecksumIEEE(g.entries) != binary.LittleEndian.Uint32(b[88:]) {
		return nil, refuse("the primary GPT entry array fails its CRC check (repair the table, e.g. with gdisk, first)")
	}
	return g, nil
}

func headerForCRC(b []byte, hsize uint32) []byte {
	h := append([]byte(nil), b[:hsize]...)
	clear(h[16:20])
	return h
}

func sealHeader(b []byte, hsize uint32) {
	binary.LittleEndian.PutUint32(b[16:], crc32.ChecksumIEEE(headerForCRC(b, hsize)))
}

// growGPT sets the ending LBA of the entry that ends last to lastUse.
func growGPT(g *gpt, lastUse uint64) (*Grown, error) {
	best := -1
	var bestEnd uint64
	for i := 0; i < int(g.nEntries); i++ {
		e := g.entries[i*int(g.entrySize):]
		if extent.IsZero(e[:16]) {
			continue
		}
		if end := binary.LittleEndian.Uint64(e[40:]); best < 0 || end > bestEnd {
			best, bestEnd = i, end
		}
	}
	if best < 0 {
		return nil, refuse("the GPT has no partition to grow")
	}
	e := g.entries[best*int(g.entrySize):]
	first := binary.LittleEndian.Uint64(e[32:])
	binary.LittleEndian.PutUint64(e[40:], lastUse)
	ss := int64(g.ss)
	return &Grown{Number: best + 1, Start: int64(first) * ss,
		OldSize: int64(bestEnd-first+1) * ss, NewSize: int64(lastUse-first+1) * ss}, nil
}

// protectiveMBR returns the MBR with its protective entry covering the
// new disk, or nil when it needs no change. An entry that did not cover
// the old disk up to its end (a hybrid MBR) is left alone.
func protectiveMBR(mbr []byte, oldN int64, newN uint64) []byte {
	i := protective(mbr)
	e := mbr[446+16*i:]
	count := binary.LittleEndian.Uint32(e[12:])
	lba := binary.LittleEndian.Uint32(e[8:])
	if lba != 1 || (count != 0xFFFFFFFF && int64(count) != oldN-1) {
		return nil
	}
	nc := uint32(min(newN-1, 0xFFFFFFFF))
	if nc == count {
		return nil
	}
	m := bytes.Clone(mbr)
	binary.LittleEndian.PutUint32(m[446+16*i+12:], nc)
	putCHS(m[446+16*i+5:], uint64(lba)+uint64(nc)-1)
	return m
}
