package resize

import (
	"io"
	"sort"

	"github.com/sauve-backup/sauve/internal/extent"
)

// Overlay presents the disk of oldSize bytes read through r and mapped by
// m, grown to any larger size (zeros past oldSize) with patches applied,
// for writers that stream an image front to back and so cannot patch it
// afterwards (the VM formats). The map it returns holds m's ranges and
// the patches'.
func Overlay(r io.ReaderAt, m extent.Map, oldSize int64, patches []Patch) (io.ReaderAt, extent.Map) {
	ps := append([]Patch(nil), patches...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Off < ps[j].Off })
	if m == nil {
		m = extent.Full{}
	}
	return &overlay{r: r, oldSize: oldSize, patches: ps}, &overlayMap{m: m, oldSize: oldSize, patches: ps}
}

type overlay struct {
	r       io.ReaderAt
	oldSize int64
	patches []Patch
}

func (o *overlay) ReadAt(b []byte, off int64) (int, error) {
	n := len(b)
	if off < o.oldSize {
		k := int(min(int64(n), o.oldSize-off))
		if err := readFull(o.r, b[:k], off); err != nil {
			return 0, err
		}
		clear(b[k:])
	} else {
		clear(b)
	}
	// Later patches win where they overlap earlier ones, as when written
	// in order.
	for _, p := range o.patches {
		lo, hi := max(p.Off, off), min(p.Off+int64(len(p.Data)), off+int64(n))
		if lo < hi {
			copy(b[lo-off:hi-off], p.Data[lo-p.Off:hi-p.Off])
		}
	}
	return n, nil
}

type overlayMap struct {
	m       extent.Map
	oldSize int64
	patches []Patch
}

func (o *overlayMap) Data(off, n int64) ([]extent.Range, error) {
	var rs []extent.Range
	if off < o.oldSize {
		base, err := o.m.Data(off, min(n, o.oldSize-off))
		if err != nil {
			return nil, err
		}
		rs = append(rs, base...)
	}
	for _, p := range o.patches {
		lo, hi := max(p.Off, off), min(p.Off+int64(len(p.Data)), off+n)
		if lo < hi {
			rs = append(rs, extent.Range{Start: lo, End: hi})
		}
	}
	return merge(rs), nil
}

// merge sorts ranges and joins those that overlap or touch.
func merge(rs []extent.Range) []extent.Range {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Start < rs[j].Start })
	var out []extent.Range
	for _, r := range rs {
		if k := len(out); k > 0 && r.Start <= out[k-1].End {
			out[k-1].End = max(out[k-1].End, r.End)
			continue
		}
		out = append(out, r)
	}
	return out
}
