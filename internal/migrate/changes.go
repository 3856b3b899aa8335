package migrate

import (
	"context"
	"fmt"
	"math/bits"

	"github.com/sauve-backup/sauve/internal/extent"
)

// ChunkChanges is the set of chunks of a disk marked changed, as an
// extent.Map of their bytes (a Source's Changes): one bit a chunk, so
// that it stays small whatever the disk and however scattered the
// changes.
type ChunkChanges struct {
	size int64
	cs   int64
	bits []uint64
}

// NewChunkChanges returns an empty set of the chunks of cs bytes of a
// disk of size bytes.
func NewChunkChanges(size int64, cs int) *ChunkChanges {
	n := (size + int64(cs) - 1) / int64(cs)
	return &ChunkChanges{size: size, cs: int64(cs), bits: make([]uint64, (n+63)/64)}
}

// Mark marks chunk i changed.
func (c *ChunkChanges) Mark(i int64) { c.bits[i/64] |= 1 << (i % 64) }

// Marked says whether chunk i is marked.
func (c *ChunkChanges) Marked(i int64) bool {
	return i >= 0 && i/64 < int64(len(c.bits)) && c.bits[i/64]&(1<<(i%64)) != 0
}

// Count is the number of chunks marked.
func (c *ChunkChanges) Count() int64 {
	var n int
	for _, w := range c.bits {
		n += bits.OnesCount64(w)
	}
	return int64(n)
}

// Data implements extent.Map: the bytes of the marked chunks within
// [off, off+n), clipped to it and to the disk.
func (c *ChunkChanges) Data(off, n int64) ([]extent.Range, error) {
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("changed chunks: range %d+%d", off, n)
	}
	end := min(off+n, c.size)
	var out []extent.Range
	for i := off / c.cs; i*c.cs < end; i++ {
		if !c.Marked(i) {
			continue
		}
		s, t := max(i*c.cs, off), min((i+1)*c.cs, end)
		if k := len(out) - 1; k >= 0 && out[k].End == s {
			out[k].End = t
		} else {
			out = append(out, extent.Range{Start: s, End: t})
		}
	}
	return out, nil
}

// DiffChunks marks in c the chunks i, of n, whose IDs a(i) and b(i)
// differ: two chunk lists of one disk, read in order.
func DiffChunks[ID comparable](ctx context.Context, c *ChunkChanges, n int64, a, b func(context.Context, int64) (ID, error)) error {
	if n < 0 || (n+63)/64 != int64(len(c.bits)) {
		return fmt.Errorf("%d chunks to compare, the set holds %d", n, len(c.bits)*64)
	}
	for i := range n {
		if i%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		x, err := a(ctx, i)
		if err != nil {
			return err
		}
		y, err := b(ctx, i)
		if err != nil {
			return err
		}
		if x != y {
			c.Mark(i)
		}
	}
	return nil
}
