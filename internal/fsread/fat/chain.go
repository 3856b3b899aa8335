package fat

import (
	"fmt"
	"sort"
)

// FAT pages are read and kept in pages of this many bytes: following a
// chain reads neighbouring entries.
const (
	fatPage     = 4096
	maxFATPages = 1024 // 4 MiB of FAT kept
)

// fatByte returns byte off of the FAT in use.
func (f *FS) fatByte(off int64) (byte, error) {
	if off < 0 || off >= f.fatBytes {
		return 0, fmt.Errorf("FAT offset %d outside the FAT (%d bytes)", off, f.fatBytes)
	}
	pg := off / fatPage
	f.mu.Lock()
	p, ok := f.pages[pg]
	f.mu.Unlock()
	if !ok {
		n := min(int64(fatPage), f.fatBytes-pg*fatPage)
		p = make([]byte, n)
		if err := f.readAt(p, f.fatStart+pg*fatPage); err != nil {
			return 0, fmt.Errorf("read the FAT: %w", err)
		}
		f.mu.Lock()
		if len(f.pages) >= maxFATPages {
			clear(f.pages)
		}
		f.pages[pg] = p
		f.mu.Unlock()
	}
	return p[off-pg*fatPage], nil
}

// Kinds of FAT entry values.
const (
	nextCluster = iota
	endOfChain
	freeCluster
	badCluster
)

// next returns the FAT entry of cluster c, and what it means.
func (f *FS) next(c uint32) (uint32, int, error) {
	var v uint32
	var off int64
	switch f.bits {
	case 12:
		off = int64(c) + int64(c)/2
	case 16:
		off = int64(c) * 2
	default:
		off = int64(c) * 4
	}
	for i := range f.bits / 8 {
		b, err := f.fatByte(off + int64(i))
		if err != nil {
			return 0, 0, err
		}
		v |= uint32(b) << (8 * i)
	}
	if f.bits == 12 {
		// Two entries share three bytes: the even one takes the low
		// 12 bits, the odd one the high 12 bits of a 16-bit word.
		b, err := f.fatByte(off + 1)
		if err != nil {
			return 0, 0, err
		}
		v = uint32(b)<<8 | v
		if c%2 == 1 {
			v >>= 4
		}
		v &= 0xFFF
	}
	if f.bits == 32 {
		v &= 0x0FFFFFFF // the top four bits are reserved
	}
	bad := uint32(1)<<f.bits - 9 // 0xFF7, 0xFFF7, 0x0FFFFFF7
	if f.bits == 32 {
		bad = 0x0FFFFFF7
	}
	switch {
	case v == 0:
		return v, freeCluster, nil
	case v == bad:
		return v, badCluster, nil
	case v > bad:
		return v, endOfChain, nil
	}
	return v, nextCluster, nil
}

// run is a piece of a chain: n consecutive clusters from cluster first,
// holding the bytes from logical offset off.
type run struct {
	off   int64
	first uint32
	n     uint32
}

// chain follows the cluster chain from cluster first for at most max
// clusters (more is not read). A chain that ends early stops there:
// the caller knows whether that is damage. A cluster outside the data
// area, a free or bad cluster in the chain, or a chain that comes back
// to itself is an error.
func (f *FS) chain(first uint32, max int64) ([]run, error) {
	var rs []run
	c := first
	for k := int64(0); k < max; k++ {
		if !f.validCluster(c) {
			return nil, fmt.Errorf("cluster %d (after %d of the chain) lies outside the data area (clusters 2 to %d)", c, k, f.clusters+1)
		}
		if l := len(rs) - 1; l >= 0 && rs[l].first+rs[l].n == c {
			rs[l].n++
		} else {
			rs = append(rs, run{off: k * f.clusterSize, first: c, n: 1})
		}
		if k+1 == max {
			break
		}
		v, kind, err := f.next(c)
		if err != nil {
			return nil, fmt.Errorf("FAT entry of cluster %d: %w", c, err)
		}
		switch kind {
		case endOfChain:
			return rs, loops(rs)
		case freeCluster:
			return nil, fmt.Errorf("the chain reaches free cluster %d after %d clusters (damaged FAT)", c, k+1)
		case badCluster:
			return nil, fmt.Errorf("the chain reaches a cluster marked bad after cluster %d (damaged FAT)", c)
		}
		c = v
	}
	return rs, loops(rs)
}

// loops says whether runs rs use a cluster twice: a chain that loops
// (which chain bounds, but reads the same clusters again) or joins
// itself.
func loops(rs []run) error {
	s := append([]run(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].first < s[j].first })
	for i := 1; i < len(s); i++ {
		if s[i-1].first+s[i-1].n > s[i].first {
			return fmt.Errorf("the cluster chain loops (cluster %d is in it twice; damaged FAT)", s[i].first)
		}
	}
	return nil
}
