package repo

import (
	"context"
	"fmt"
	"io"
	"sync"
)

// DiskReader reads a snapshot's disk at any offset, chunk by chunk,
// through the copies its writer stored first. It is safe for concurrent
// use, one read at a time, and keeps one chunk list blob in memory.
type DiskReader struct {
	r    *Repository
	d    *Disk
	ctx  context.Context
	mu   sync.Mutex
	list *ChunkList
}

// NewDiskReader returns a reader of disk d of a loaded snapshot; reads run
// under ctx.
func (r *Repository) NewDiskReader(ctx context.Context, d *Disk) *DiskReader {
	return &DiskReader{r: r, d: d, ctx: ctx, list: r.ChunkList(d)}
}

// Size is the disk's size.
func (dr *DiskReader) Size() int64 { return dr.d.Size }

// ReadAt implements io.ReaderAt.
func (dr *DiskReader) ReadAt(p []byte, off int64) (int, error) {
	dr.mu.Lock()
	defer dr.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("read disk %s at %d: negative offset", dr.d.Name, off)
	}
	cs := int64(dr.d.ChunkSize)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= dr.d.Size {
			return n, io.EOF
		}
		i := pos / cs
		id, err := dr.list.At(dr.ctx, i)
		if err != nil {
			return n, err
		}
		within := pos - i*cs
		clen := min(cs, dr.d.Size-i*cs)
		k := int(min(int64(len(p)-n), clen-within))
		if id.IsZero() {
			clear(p[n : n+k])
		} else {
			plain, err := dr.r.ReadBlobFor(dr.ctx, DataBlob, id, nil, dr.d.writer)
			if err != nil {
				return n, fmt.Errorf("disk %s at offset %d: %w", dr.d.Name, i*cs, err)
			}
			if int64(len(plain)) != clen {
				return n, fmt.Errorf("disk %s at offset %d: chunk of %d bytes, expected %d", dr.d.Name, i*cs, len(plain), clen)
			}
			copy(p[n:n+k], plain[within:])
		}
		n += k
	}
	return n, nil
}
