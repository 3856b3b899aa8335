package repo

import (
	"container/list"
	"context"
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"
	"sync"
)

// chunkEntry is a chunk a DiskReader holds or is fetching. Whoever claims
// a missing chunk fetches it; everyone else waits on ready.
type chunkEntry struct {
	id    ID
	ready chan struct{} // closed once fetched or failed
	// Set before ready is closed, read-only after.
	buf   *[]byte // pooled memory; plain is a prefix of it
	plain []byte
	err   error
	// Guarded by chunkCache.mu.
	refs int           // readers copying out of plain
	elem *list.Element // in the LRU while cached
	gone bool          // no longer cached: buf is recycled at refs 0
}

// chunkCache holds decoded, verified chunks by ID, least recently used
// first out, within a budget of bytes; chunks being fetched are in it too
// (not counted), so that a chunk is fetched once however many readers
// want it.
type chunkCache struct {
	mu      sync.Mutex
	entries map[ID]*chunkEntry
	lru     *list.List // of *chunkEntry, most recent first
	bytes   int64      // of cached plaintext (buffer capacity)
	limit   int64
	peak    int64
	bufs    sync.Pool // *[]byte of cap chunk+DecodeSlack
	bufSize int
}

func newChunkCache(limit int64, chunkSize int) *chunkCache {
	return &chunkCache{entries: map[ID]*chunkEntry{}, lru: list.New(), limit: limit, bufSize: chunkSize + DecodeSlack}
}

// acquire returns the entry of id with a reference held, and whether the
// caller claimed it (it was missing: the caller must fetch it and call
// complete).
func (c *chunkCache) acquire(id ID) (*chunkEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[id]; ok {
		e.refs++
		if e.elem != nil {
			c.lru.MoveToFront(e.elem)
		}
		return e, false
	}
	e := &chunkEntry{id: id, ready: make(chan struct{}), refs: 1}
	c.entries[id] = e
	return e, true
}

// claim returns a new entry for id, or nil when id is cached or being
// fetched already (read-ahead holds no reference).
func (c *chunkCache) claim(id ID) *chunkEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[id]; ok {
		return nil
	}
	e := &chunkEntry{id: id, ready: make(chan struct{})}
	c.entries[id] = e
	return e
}

// buffer returns memory to decode a chunk into.
func (c *chunkCache) buffer() *[]byte {
	if b, ok := c.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, c.bufSize)
	return &b
}

// complete ends the fetch of e: with its plaintext (in buf), or with err
// (buf, if any, goes back to the pool). Either way waiters are woken.
func (c *chunkCache) complete(e *chunkEntry, buf *[]byte, plain []byte, err error) {
	c.mu.Lock()
	if err != nil {
		e.err = err
		c.drop(e)
		if buf != nil {
			c.bufs.Put(buf)
		}
	} else {
		e.buf, e.plain = buf, plain
		e.elem = c.lru.PushFront(e)
		c.bytes += int64(cap(*buf))
		c.evict()
		c.peak = max(c.peak, c.bytes)
	}
	c.mu.Unlock()
	close(e.ready)
}

// evict drops least recently used chunks until the cache fits its budget;
// c.mu is held.
func (c *chunkCache) evict() {
	for c.bytes > c.limit {
		el := c.lru.Back()
		if el == nil {
			return
		}
		c.drop(el.Value.(*chunkEntry))
	}
}

// drop takes e out of the cache; its memory is recycled once nobody
// reads it. c.mu is held.
func (c *chunkCache) drop(e *chunkEntry) {
	if c.entries[e.id] == e {
		delete(c.entries, e.id)
	}
	if e.elem != nil {
		c.lru.Remove(e.elem)
		e.elem = nil
		c.bytes -= int64(cap(*e.buf))
	}
	e.gone = true
	c.recycle(e)
}

func (c *chunkCache) recycle(e *chunkEntry) {
	if e.gone && e.refs == 0 && e.buf != nil {
		c.bufs.Put(e.buf)
		e.buf, e.plain = nil, nil
	}
}

// release gives back a reference acquire returned; with drop, the chunk
// leaves the cache too (once fetched).
func (c *chunkCache) release(e *chunkEntry, drop bool) {
	c.mu.Lock()
	e.refs--
	if drop && e.elem != nil {
		c.drop(e)
	}
	c.recycle(e)
	c.mu.Unlock()
}

// usage returns the bytes cached now and at most so far.
func (c *chunkCache) usage() (now, peak int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes, c.peak
}

// listEntry is a chunk list blob a DiskReader holds or is loading.
type listEntry struct {
	id    ID
	ready chan struct{}
	// Set before ready is closed.
	ids []byte // the blob's IDs as stored, 32 bytes each; nil when all are zero
	n   int    // entries
	err error
	// Guarded by listCache.mu.
	elem *list.Element
}

// listCache holds a bounded number of a disk's chunk list blobs by ID: a
// disk of 16 TiB has thousands, never all in memory, and lists of zeros
// (unused stretches of the disk) are one blob held as a count.
type listCache struct {
	mu      sync.Mutex
	entries map[ID]*listEntry
	lru     *list.List
	limit   int
}

func newListCache(limit int) *listCache {
	return &listCache{entries: map[ID]*listEntry{}, lru: list.New(), limit: limit}
}

// get returns list blob li of d, loading it if need be.
func (lc *listCache) get(ctx context.Context, r *Repository, d *Disk, li int) (*listEntry, error) {
	lid := d.ChunkLists[li]
	lc.mu.Lock()
	e, ok := lc.entries[lid]
	if ok {
		if e.elem != nil {
			lc.lru.MoveToFront(e.elem)
		}
	} else {
		e = &listEntry{id: lid, ready: make(chan struct{})}
		lc.entries[lid] = e
	}
	lc.mu.Unlock()
	if !ok {
		lc.load(ctx, r, d, e, li)
	}
	select {
	case <-e.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if e.err != nil {
		return nil, e.err
	}
	// One blob may serve several places (identical stretches of disk),
	// and the last list of a disk is shorter: the count must fit this
	// place.
	if want := listLen(d, li); int64(e.n) != want {
		return nil, fmt.Errorf("chunk list %s holds %d entries, disk %s needs %d at list %d", lid.Short(), e.n, d.Name, want, li)
	}
	return e, nil
}

// listLen is how many entries list blob li of d holds.
func listLen(d *Disk, li int) int64 {
	return min(int64(d.ListEntries), d.Chunks()-int64(li)*int64(d.ListEntries))
}

func (lc *listCache) load(ctx context.Context, r *Repository, d *Disk, e *listEntry, li int) {
	plain, err := r.readBlob(ctx, r.idx, r.cache, MetaBlob, e.id, nil, d.writer)
	if err == nil {
		e.n, err = checkChunkList(plain)
	}
	lc.mu.Lock()
	if err != nil {
		e.err = fmt.Errorf("chunk list %d of disk %s: %w", li, d.Name, err)
		delete(lc.entries, e.id)
	} else {
		// The IDs stay where they were decoded: no copy of a MiB.
		if e.ids = plain[12:]; extent.IsZero(e.ids) {
			e.ids = nil
		}
		e.elem = lc.lru.PushFront(e)
		for lc.lru.Len() > lc.limit {
			old := lc.lru.Remove(lc.lru.Back()).(*listEntry)
			old.elem = nil
			delete(lc.entries, old.id)
		}
	}
	lc.mu.Unlock()
	close(e.ready)
}

// at returns entry k of the list.
func (e *listEntry) at(k int64) ID {
	if e.ids == nil {
		return ZeroID
	}
	return ID(e.ids[32*k : 32*k+32])
}
