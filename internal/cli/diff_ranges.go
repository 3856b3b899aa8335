package cli

import (
	"context"
	"fmt"

	"github.com/sauve-backup/sauve/internal/extent"
)

// diffReport is what diff found, as --json prints it.
type diffReport struct {
	A, B         string          `json:"-"`
	SizeA        int64           `json:"size_a"`
	SizeB        int64           `json:"size_b"`
	BytesDiffer  int64           `json:"bytes_differ"`
	RangesDiffer int             `json:"ranges_differ"`
	Ranges       []diffRange     `json:"ranges"` // the first 20 unless --all-ranges
	Partitions   []diffPartition `json:"partitions,omitempty"`
}

type diffRange struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
}

func (r *diffReport) differs() bool {
	if r.BytesDiffer > 0 || r.SizeA != r.SizeB {
		return true
	}
	for _, p := range r.Partitions {
		if len(p.Changes) > 0 {
			return true
		}
	}
	return false
}

// maxListed is how many ranges are listed without --all-ranges.
const maxListed = 20

// diffRanges compares two sides chunk by chunk; bytes past the end of
// the shorter count as differing.
func diffRanges(ctx context.Context, a, b *diffSide, all bool) (*diffReport, error) {
	if a.disk.ChunkSize != b.disk.ChunkSize {
		return nil, fmt.Errorf("%s has chunks of %d bytes, %s of %d: their chunk lists do not compare", a.name, a.disk.ChunkSize, b.name, b.disk.ChunkSize)
	}
	rep := &diffReport{A: a.name, B: b.name, SizeA: a.disk.Size, SizeB: b.disk.Size, Ranges: []diffRange{}}
	cs := int64(a.disk.ChunkSize)
	common := min(a.disk.Size, b.disk.Size)
	var cur *extent.Range
	add := func(r extent.Range) {
		if cur != nil && cur.End == r.Start {
			cur.End = r.End
			return
		}
		rep.flush(cur, all)
		cur = &r
	}
	for i := int64(0); i*cs < common; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		x, err := a.id(ctx, i)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", a.name, err)
		}
		y, err := b.id(ctx, i)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", b.name, err)
		}
		if x != y {
			add(extent.Range{Start: i * cs, End: min((i+1)*cs, common)})
		}
	}
	if end := max(a.disk.Size, b.disk.Size); end > common {
		add(extent.Range{Start: common, End: end})
	}
	rep.flush(cur, all)
	return rep, nil
}

func (rep *diffReport) flush(r *extent.Range, all bool) {
	if r == nil {
		return
	}
	rep.BytesDiffer += r.Len()
	rep.RangesDiffer++
	if all || len(rep.Ranges) < maxListed {
		rep.Ranges = append(rep.Ranges, diffRange{Start: r.Start, Length: r.Len()})
	}
}

func (g *globals) printDiff(rep *diffReport) {
	g.printf("comparing %s with %s\n", rep.A, rep.B)
	if rep.SizeA != rep.SizeB {
		g.printf("sizes differ: %s against %s\n", bytesIEC(rep.SizeA), bytesIEC(rep.SizeB))
	}
	if rep.BytesDiffer == 0 {
		g.printf("bytes: the same (%s)\n", bytesIEC(rep.SizeA))
	} else {
		g.printf("bytes: %d ranges differ, %s of %s\n", rep.RangesDiffer, bytesIEC(rep.BytesDiffer), bytesIEC(max(rep.SizeA, rep.SizeB)))
		for _, r := range rep.Ranges {
			g.printf("  %12d +%-12d (%s at %s)\n", r.Start, r.Length, bytesIEC(r.Length), bytesIEC(r.Start))
		}
		if n := rep.RangesDiffer - len(rep.Ranges); n > 0 {
			g.printf("  ... and %d more (--all-ranges lists them)\n", n)
		}
	}
	for _, p := range rep.Partitions {
		g.printPartitionDiff(p)
	}
}
