package nbd

import (
	"context"
	"sync"

	"github.com/sauve-backup/sauve/internal/extent"
)

// mapWindow is how much block status one query asks about: a backup
// reads chunk by chunk, in order, so a large window costs a request per
// many chunks.
const mapWindow = 1 << 30

// Map returns the extent.Map of the ranges whose flags in metaContext
// satisfy data (for base:allocation, flags&StateZero == 0 keeps what may
// hold data; for a dirty bitmap, flags&1 != 0 keeps what changed). It
// asks the server lazily, a window at a time, and keeps the current
// window; it is safe for concurrent use.
func (c *Client) Map(ctx context.Context, metaContext string, data func(flags uint32) bool) extent.Map {
	return &statusMap{c: c, ctx: ctx, meta: metaContext, data: data}
}

type statusMap struct {
	c    *Client
	ctx  context.Context
	meta string
	data func(uint32) bool

	mu         sync.Mutex
	start, end int64          // the window cached
	ranges     []extent.Range // its data ranges, in order
}

// Data implements extent.Map.
func (m *statusMap) Data(off, n int64) ([]extent.Range, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	end := min(off+n, m.c.size)
	var out []extent.Range
	for off < end {
		if off < m.start || off >= m.end {
			if err := m.load(off); err != nil {
				return nil, err
			}
		}
		stop := min(end, m.end)
		for _, r := range m.ranges {
			if r.End > off && r.Start < stop {
				out = append(out, extent.Range{Start: max(r.Start, off), End: min(r.End, stop)})
			}
		}
		off = stop
	}
	return merge(out), nil
}

// load queries the window starting at off.
func (m *statusMap) load(off int64) error {
	m.ranges = m.ranges[:0]
	m.start, m.end = off, off
	err := m.c.BlockStatus(m.ctx, m.meta, off, min(mapWindow, m.c.size-off), func(e Extent) error {
		if m.data(e.Flags) {
			m.ranges = append(m.ranges, extent.Range{Start: e.Offset, End: e.Offset + e.Length})
		}
		m.end = e.Offset + e.Length
		return nil
	})
	if err != nil {
		m.start, m.end = 0, 0
	}
	return err
}

// merge joins adjacent ranges.
func merge(rs []extent.Range) []extent.Range {
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1].End == r.Start {
			out[n-1].End = r.End
			continue
		}
		out = append(out, r)
	}
	return out
}
