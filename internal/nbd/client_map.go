package nbd

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/sauve-backup/sauve/internal/extent"
)

// Extent is a range of the export with the flags a meta context gives it.
type Extent struct {
	Offset, Length int64
	Flags          uint32
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// Windows of block status a Map asks for at once.
const (
	minWindow = 64 << 20
	maxWindow = 1 << 30
)

// BlockStatus gives fn, in order, the extents of metaContext (one the
// server agreed to) that cover [off, off+length), clipped to it, asking
// the server again until the range is covered. [off, off+length) must lie
// within the export.
func (c *Client) BlockStatus(ctx context.Context, metaContext string, off, length int64, fn func(e Extent) error) error {
	id, err := c.contextID(metaContext)
	if err != nil {
		return err
	}
	if off < 0 || length < 0 || off > c.info.size-length {
		return fmt.Errorf("nbd %s: block status of [%d, +%d) outside the export of %d bytes", c.addr, off, length, c.info.size)
	}
	end := off + length
	for pos := off; pos < end; {
		exts, err := c.blockStatusOnce(ctx, id, pos, end)
		if err != nil {
			return fmt.Errorf("nbd %s: block status of %q at [%d, %d): %w", c.addr, metaContext, pos, end, err)
		}
		next := pos
		for _, e := range exts {
			a, b := max(e.Offset, pos), min(e.End(), end)
			if a >= b {
				continue
			}
			if err := fn(Extent{Offset: a, Length: b - a, Flags: e.Flags}); err != nil {
				return err
			}
			next = b
		}
		if next <= pos {
			return fmt.Errorf("nbd %s: block status of %q at %d: %w", c.addr, metaContext, pos, protoErr("no progress"))
		}
		pos = next
	}
	return nil
}

// blockStatusOnce sends one block status request for context id from pos
// towards end, widened to the minimum block size, and returns the extents
// of the reply, contiguous from at most pos, clipped to the export.
func (c *Client) blockStatusOnce(ctx context.Context, id uint32, pos, end int64) ([]Extent, error) {
	a := c.align
	start := pos / a * a
	stop := min((end+a-1)/a*a, c.info.size, start+maxStatusLength/a*a)
	r, err := c.send(&request{cmd: CmdBlockStatus, off: start, length: uint32(stop - start), ctxID: id})
	if err != nil {
		return nil, err
	}
	select {
	case <-r.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if r.err != nil {
		return nil, r.err
	}
	exts := r.extents
	for i, e := range exts {
		if e.End() >= c.info.size {
			exts = exts[:i+1]
			exts[i].Length = c.info.size - e.Offset
			break
		}
	}
	return exts, nil
}

// Map returns the map of the export whose data are the extents of
// metaContext whose flags satisfy data: for base:allocation,
// flags&StateZero == 0; for a dirty bitmap, flags&StateDirty != 0. It asks
// for block status lazily, a window of at least 64 MiB at a time, and
// keeps the last window, so a backup reading in order costs few requests.
// ctx bounds every request the map makes. The map is safe for concurrent
// use.
func (c *Client) Map(ctx context.Context, metaContext string, data func(flags uint32) bool) extent.Map {
	return &statusMap{c: c, ctx: ctx, name: metaContext, data: data}
}

type statusMap struct {
	c    *Client
	ctx  context.Context
	name string
	data func(uint32) bool

	mu  sync.Mutex
	win []Extent // contiguous extents of the last window asked
}

// Data implements extent.Map.
func (m *statusMap) Data(off, n int64) ([]extent.Range, error) {
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("nbd %s: data map of [%d, +%d): negative range", m.c.addr, off, n)
	}
	id, err := m.c.contextID(m.name)
	if err != nil {
		return nil, err
	}
	end := min(off+n, m.c.info.size)
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []extent.Range
	for pos := off; pos < end; {
		if err := m.cover(id, pos, end); err != nil {
			return nil, fmt.Errorf("nbd %s: block status of %q at %d: %w", m.c.addr, m.name, pos, err)
		}
		i := sort.Search(len(m.win), func(i int) bool { return m.win[i].End() > pos })
		for ; i < len(m.win) && m.win[i].Offset < end; i++ {
			e := m.win[i]
			if m.data(e.Flags) {
				out = appendRange(out, extent.Range{Start: max(e.Offset, pos), End: min(e.End(), end)})
			}
		}
		pos = min(m.win[len(m.win)-1].End(), end)
	}
	return out, nil
}

// cover makes the window hold pos, asking for [pos, end) or more.
func (m *statusMap) cover(id uint32, pos, end int64) error {
	if len(m.win) > 0 && m.win[0].Offset <= pos && pos < m.win[len(m.win)-1].End() {
		return nil
	}
	m.win = nil
	want := min(max(end-pos, minWindow), maxWindow)
	exts, err := m.c.blockStatusOnce(m.ctx, id, pos, min(pos+want, m.c.info.size))
	if err != nil {
		return err
	}
	if len(exts) == 0 || exts[len(exts)-1].End() <= pos {
		return protoErr("block status reply does not reach offset %d", pos)
	}
	m.win = exts
	return nil
}

// appendRange appends r to rs, joining it to the last range it touches.
func appendRange(rs []extent.Range, r extent.Range) []extent.Range {
	if n := len(rs); n > 0 && rs[n-1].End == r.Start {
		rs[n-1].End = r.End
		return rs
	}
	return append(rs, r)
}
