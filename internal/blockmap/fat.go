package blockmap

import (
	"fmt"
	"io"
)

// FAT12/16/32: the reserved sectors, the FATs and (FAT12/16) the root
// directory are always used; a data cluster is used when its FAT entry is
// not zero. The map works in sectors because the data area need not start
// on a cluster boundary.

const fatPageSectors = 1 << 18

type fatFS struct {
	r          io.ReaderAt
	warn       func(string)
	bps        int64
	spc        int64
	firstData  int64 // sectors
	clusters   int64
	bits       int // 12, 16, 32
	fatOff     int64
	buf, raw   []byte
	pg         page
	sectorsMax int64
}

func probeFAT(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	b, err := read(r, 0, 512)
	if err != nil || b == nil {
		return nil, err
	}
	if (b[0] != 0xEB && b[0] != 0xE9) || b[510] != 0x55 || b[511] != 0xAA {
		return nil, nil
	}
	bps, spc := int64(le16(b, 11)), int64(b[13])
	reserved, nfats, rootEnt := int64(le16(b, 14)), int64(b[16]), int64(le16(b, 17))
	total, fatsz := int64(le16(b, 19)), int64(le16(b, 22))
	media := b[21]
	if total == 0 {
		total = int64(le32(b, 32))
	}
	fat32 := fatsz == 0
	if fat32 {
		fatsz = int64(le32(b, 36))
	}
	if bps < 512 || bps > 4096 || bps&(bps-1) != 0 || spc == 0 || spc&(spc-1) != 0 || reserved == 0 ||
		nfats == 0 || nfats > 4 || fatsz == 0 || total == 0 || (media != 0xF0 && media < 0xF8) {
		return nil, nil
	}
	f := &fatFS{r: r, warn: warn, bps: bps, spc: spc}
	rootSectors := (rootEnt*32 + bps - 1) / bps
	f.firstData = reserved + nfats*fatsz + rootSectors
	if f.firstData >= total {
		return nil, nil
	}
	f.clusters = (total - f.firstData) / spc
	switch {
	case f.clusters < 4085:
		f.bits = 12
	case f.clusters < 65525:
		f.bits = 16
	default:
		f.bits = 32
	}
	if (f.bits == 32) != fat32 || (fat32 && rootEnt != 0) {
		return nil, nil
	}
	active := int64(0)
	labelOff, serialOff := 43, 39
	if fat32 {
		labelOff, serialOff = 71, 67
		if ef := le16(b, 40); ef&0x80 != 0 {
			active = int64(ef & 0xF)
		}
		if active >= nfats {
			return nil, nil
		}
	}
	fs := &Filesystem{Type: fmt.Sprintf("fat%d", f.bits), BlockSize: int(bps * spc)}
	if b[labelOff-5] == 0x29 { // extended boot signature
		fs.Label = cString(b[labelOff : labelOff+11])
		fs.UUID = fmt.Sprintf("%04X-%04X", le16(b, serialOff+2), le16(b, serialOff))
		if fs.Label == "NO NAME" {
			fs.Label = ""
		}
	}
	f.fatOff = (reserved + active*fatsz) * bps
	if need := (f.clusters + 2) * int64(f.bits) / 8; need > fatsz*bps {
		fs.Full = fmt.Sprintf("its FAT (%d bytes) is too small for its %d clusters", fatsz*bps, f.clusters)
		return fs, nil
	}
	if total > size/bps {
		fs.Full = fmt.Sprintf("the filesystem (%d bytes) is larger than its partition (%d bytes)", total*bps, size)
		return fs, nil
	}
	// The first FAT entry repeats the media byte.
	first, err := read(r, f.fatOff, 1)
	if err != nil {
		return nil, err
	}
	if first == nil || first[0] != media {
		return nil, nil
	}
	f.sectorsMax = f.firstData + f.clusters*spc
	fs.Size = f.sectorsMax * bps
	fs.m = &allocMap{unit: bps, units: f.sectorsMax, p: f}
	return fs, nil
}

// page implements pager: the sectors before the data area, then
// fatPageSectors sectors of clusters at a time.
func (f *fatFS) page(u int64) (*page, error) {
	if u < f.firstData {
		f.pg = page{first: 0, n: f.firstData, all: true}
		return &f.pg, nil
	}
	rel := (u - f.firstData) / fatPageSectors * fatPageSectors
	first := f.firstData + rel
	n := min(int64(fatPageSectors), f.sectorsMax-first)
	c0 := rel/f.spc + 2
	nc := (n + f.spc - 1) / f.spc
	f.pg = page{first: first, n: n}
	if f.buf == nil {
		f.buf = make([]byte, fatPageSectors/8)
	}
	bm := f.buf[:(n+7)/8]
	clear(bm)
	// The FAT bytes holding entries c0 .. c0+nc-1.
	a := c0 * int64(f.bits) / 8
	z := ((c0+nc)*int64(f.bits) + 7) / 8
	if cap(f.raw) < int(z-a) {
		f.raw = make([]byte, z-a)
	}
	raw := f.raw[:z-a]
	if err := readAt(f.r, raw, f.fatOff+a); err != nil {
		if err == errShort {
			f.warn(fmt.Sprintf("FAT entries of clusters %d-%d cannot be read: imaged in full", c0, c0+nc-1))
			f.pg.all = true
			return &f.pg, nil
		}
		return nil, fmt.Errorf("fat: %w", err)
	}
	for k := int64(0); k < nc; k++ {
		c := c0 + k
		var e uint32
		switch f.bits {
		case 12:
			o := c*3/2 - a
			v := uint32(raw[o]) | uint32(raw[o+1])<<8
			if c&1 == 0 {
				e = v & 0xFFF
			} else {
				e = v >> 4
			}
		case 16:
			e = uint32(le16(raw, int(c*2-a)))
		case 32:
			e = le32(raw, int(c*4-a)) & 0x0FFFFFFF
		}
		if e != 0 {
			setBits(bm, k*f.spc, min((k+1)*f.spc, n))
		}
	}
	f.pg.bits = bm
	return &f.pg, nil
}
