package blockmap

import "github.com/sauve-backup/sauve/internal/extent"

// page is a piece of a filesystem's allocation bitmap: one bit per unit
// (block or cluster), least significant bit first, set when the unit is
// in use.
type page struct {
	first, n int64  // the units it covers
	bits     []byte // nil: see all
	all      bool   // with bits nil: every unit used (else every unit free)
}

func (p *page) covers(u int64) bool { return p.n > 0 && u >= p.first && u < p.first+p.n }

// pager returns the page of the bitmap that covers unit u. Pages are
// asked for in increasing order in a backup, so an implementation reads
// each piece of the on-disk bitmap once and keeps one page in memory.
type pager interface {
	page(u int64) (*page, error)
}

// allocMap is the Map of a filesystem from its allocation bitmap, read a
// page at a time: memory stays bounded by the page size whatever the
// filesystem's size. Offsets are relative to the filesystem's start.
type allocMap struct {
	unit  int64 // bytes per unit
	units int64
	p     pager
	cur   *page
}

// Data implements Map. Units past the end of the filesystem are not
// asked for: the caller clips windows to the filesystem's size.
func (m *allocMap) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := off + n
	u := off / m.unit
	uEnd := min((end+m.unit-1)/m.unit, m.units)
	add := func(a, b int64) { // units [a, b) are used
		r := extent.Range{Start: max(a*m.unit, off), End: min(b*m.unit, end)}
		if r.Start >= r.End {
			return
		}
		if k := len(out); k > 0 && out[k-1].End == r.Start {
			out[k-1].End = r.End
			return
		}
		out = append(out, r)
	}
	for u < uEnd {
		if m.cur == nil || !m.cur.covers(u) {
			p, err := m.p.page(u)
			if err != nil {
				return nil, err
			}
			if !p.covers(u) {
				// A pager that cannot place u treats it as used: never
				// skip what is not understood.
				p = &page{first: u, n: 1, all: true}
			}
			m.cur = p
		}
		p := m.cur
		stop := min(uEnd, p.first+p.n)
		if p.bits == nil {
			if p.all {
				add(u, stop)
			}
			u = stop
			continue
		}
		for u < stop {
			i := u - p.first
			// Whole bytes at once where aligned.
			if i&7 == 0 && stop-u >= 8 {
				switch p.bits[i>>3] {
				case 0:
					u += 8
					continue
				case 0xFF:
					add(u, u+8)
					u += 8
					continue
				}
			}
			if p.bits[i>>3]&(1<<(i&7)) != 0 {
				add(u, u+1)
			}
			u++
		}
	}
	return out, nil
}

func setBit(b []byte, i int64) { b[i>>3] |= 1 << (i & 7) }

// setBits sets bits [a, b) of bm.
func setBits(bm []byte, a, b int64) {
	for ; a < b && a&7 != 0; a++ {
		setBit(bm, a)
	}
	for ; a+8 <= b; a += 8 {
		bm[a>>3] = 0xFF
	}
	for ; a < b; a++ {
		setBit(bm, a)
	}
}

// clearBits clears bits [a, b) of bm.
func clearBits(bm []byte, a, b int64) {
	for ; a < b && a&7 != 0; a++ {
		bm[a>>3] &^= 1 << (a & 7)
	}
	for ; a+8 <= b; a += 8 {
		bm[a>>3] = 0
	}
	for ; a < b; a++ {
		bm[a>>3] &^= 1 << (a & 7)
	}
}
