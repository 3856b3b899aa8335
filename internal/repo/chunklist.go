package repo

import (
	"context"
	"encoding/binary"
	"fmt"
)

// ListEntries is how many chunk IDs one chunk list blob holds (1 MiB of
// IDs). A disk's chunk list is cut at fixed positions, so an unchanged
// stretch of disk gives identical list blobs, deduplicated like data.
const ListEntries = 32768

// Chunk list blob plaintext: "SVCL0001" | u32 n | n × 32-byte chunk ID,
// where ZeroID stands for a chunk of zeros (or of free space) that is not
// stored.
const chunkListMagic = "SVCL0001"

func encodeChunkList(ids []ID) []byte {
	b := make([]byte, 0, 12+32*len(ids))
	b = append(b, chunkListMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(ids)))
	for _, id := range ids {
		b = append(b, id[:]...)
	}
	return b
}

func decodeChunkList(b []byte) ([]ID, error) {
	n, err := checkChunkList(b)
	if err != nil {
		return nil, err
	}
	ids := make([]ID, n)
	for i := range ids {
		copy(ids[i][:], b[12+32*i:])
	}
	return ids, nil
}

// checkChunkList checks the header and length of a chunk list blob and
// returns how many IDs it holds.
func checkChunkList(b []byte) (int, error) {
	if len(b) < 12 || string(b[:8]) != chunkListMagic {
		return 0, fmt.Errorf("chunk list: bad header")
	}
	n := binary.LittleEndian.Uint32(b[8:12])
	if n > ListEntries*4 || len(b) != 12+32*int(n) {
		return 0, fmt.Errorf("chunk list: %d entries in %d bytes", n, len(b))
	}
	return int(n), nil
}

// ChunkListWriter stores a disk's chunk IDs, in order, as list blobs, in
// a write session (Writer.NewChunkListWriter).
type ChunkListWriter struct {
	w     *Writer
	cur   []ID
	lists []ID
	// Stored counts list blobs that were new.
	Stored int
}

// Append adds the next chunk's ID.
func (w *ChunkListWriter) Append(ctx context.Context, id ID) error {
	w.cur = append(w.cur, id)
	if len(w.cur) == ListEntries {
		return w.flush(ctx)
	}
	return nil
}

func (w *ChunkListWriter) flush(ctx context.Context) error {
	id, res, err := w.w.SaveMeta(ctx, encodeChunkList(w.cur))
	if err != nil {
		return fmt.Errorf("save chunk list: %w", err)
	}
	if res.New {
		w.Stored++
	}
	w.lists = append(w.lists, id)
	w.cur = w.cur[:0]
	return nil
}

// Close stores the last, partial list blob and returns the list blob IDs.
func (w *ChunkListWriter) Close(ctx context.Context) ([]ID, error) {
	if len(w.cur) > 0 {
		if err := w.flush(ctx); err != nil {
			return nil, err
		}
	}
	return w.lists, nil
}

// ChunkList reads a disk's chunk IDs by position, one list blob at a time.
type ChunkList struct {
	r      *Repository
	idx    *Index
	cache  *Cache
	d      *Disk
	n      int64
	loaded int // list blob in cur, or -1
	cur    []ID
}

// ChunkList returns a reader for d's chunk list.
func (r *Repository) ChunkList(d *Disk) *ChunkList {
	return r.chunkList(r.idx, r.cache, d)
}

func (r *Repository) chunkList(idx *Index, cache *Cache, d *Disk) *ChunkList {
	return &ChunkList{r: r, idx: idx, cache: cache, d: d, n: d.Chunks(), loaded: -1}
}

// readList reads and checks list blob li of the disk.
func (c *ChunkList) readList(ctx context.Context, li int) ([]ID, error) {
	lid := c.d.ChunkLists[li]
	plain, err := c.r.readBlob(ctx, c.idx, c.cache, MetaBlob, lid, nil, c.d.writer)
	if err != nil {
		return nil, fmt.Errorf("chunk list %d of disk %s: %w", li, c.d.Name, err)
	}
	ids, err := decodeChunkList(plain)
	if err != nil {
		return nil, fmt.Errorf("chunk list %s: %w", lid.Short(), err)
	}
	want := int64(c.d.ListEntries)
	if rest := c.n - int64(li)*want; rest < want {
		want = rest
	}
	if int64(len(ids)) != want {
		return nil, fmt.Errorf("chunk list %s holds %d entries, disk needs %d", lid.Short(), len(ids), want)
	}
	return ids, nil
}

// Writer is the snapshot's signer, whose copies of blobs a reader tries
// first.
func (d *Disk) Writer() WriterNum { return d.writer }

// Len is the number of chunks.
func (c *ChunkList) Len() int64 { return c.n }

// At returns the ID of chunk i. Access in increasing order is cheapest.
func (c *ChunkList) At(ctx context.Context, i int64) (ID, error) {
	if i < 0 || i >= c.n {
		return ID{}, fmt.Errorf("chunk %d out of range (disk has %d)", i, c.n)
	}
	li := int(i / int64(c.d.ListEntries))
	if li != c.loaded {
		ids, err := c.readList(ctx, li)
		if err != nil {
			return ID{}, err
		}
		c.cur, c.loaded = ids, li
	}
	return c.cur[i%int64(c.d.ListEntries)], nil
}
