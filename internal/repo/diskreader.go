package repo

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/sauve-backup/sauve/internal/extent"
)

// ReaderOptions tune a DiskReader. Zero values pick defaults.
type ReaderOptions struct {
	// CacheSize bounds the decoded chunks kept, in bytes (default 64
	// MiB; at least two chunks).
	CacheSize int64
	// ReadAhead is how far past a sequential read chunks are fetched
	// ahead of it, in bytes (default a quarter of the cache, at most
	// half of it; negative: no read-ahead).
	ReadAhead int64
	// Fetchers bounds the runs read ahead at once (default 2 per CPU).
	Fetchers int
	// Warn hears of copies of chunks that failed and were read from
	// another copy; nil: silence.
	Warn func(format string, args ...any)
	// Want, when set, says which chunks (by index) a sequential reader
	// reads: read-ahead fetches no other, so that a reader that skips
	// most chunks (a migration's delta between two snapshots) does not
	// fetch what it skips. Reads of other chunks still fetch them.
	Want func(i int64) bool
}

// DefaultReaderCache is the default budget of a DiskReader's cache.
const DefaultReaderCache = 64 << 20

// readerLists bounds the chunk list blobs a DiskReader holds (1 MiB each
// at most).
const readerLists = 8

// DiskReader reads one disk of a snapshot at any offset: an io.ReaderAt,
// safe for concurrent use, and an extent.Map of the ranges that hold
// stored chunks (the rest is zeros or free space, which read as zeros).
//
// Chunks are fetched with the batched ranged reads of FetchRun, verified
// against their IDs and kept in a cache bounded in bytes; a chunk several
// readers want at once is fetched once, and reads of different chunks
// fetch in parallel. Sequential reads are detected and the runs after
// them fetched ahead, in the background. Memory stays bounded whatever
// the disk's size: a few chunk list blobs, the cache, and the runs in
// flight.
type DiskReader struct {
	r      *Repository
	d      *Disk
	ctx    context.Context
	cancel context.CancelFunc
	opts   ReaderOptions
	cs     int64

	lists  *listCache
	chunks *chunkCache
	ra     readAhead
	planMu sync.Mutex    // held while read-ahead claims chunks
	sem    chan struct{} // read-ahead fetches in flight
	wg     sync.WaitGroup

	closeMu sync.RWMutex // held to add to wg
	closed  bool

	fetched atomic.Int64
	runs    atomic.Int64
}

// NewDiskReader returns a reader of disk d of a loaded snapshot; reads
// run under ctx until Close.
func (r *Repository) NewDiskReader(ctx context.Context, d *Disk, opts ReaderOptions) (*DiskReader, error) {
	if d.ChunkSize != r.cfg.ChunkSize {
		return nil, fmt.Errorf("disk %s has chunk size %d, repository %d", d.Name, d.ChunkSize, r.cfg.ChunkSize)
	}
	if d.Size < 0 || d.Size > maxDiskSize || d.ListEntries <= 0 || d.ListEntries > ListEntries {
		return nil, fmt.Errorf("disk %s: bad geometry (size %d, %d chunks a list)", d.Name, d.Size, d.ListEntries)
	}
	if int64(len(d.ChunkLists)) != (d.Chunks()+int64(d.ListEntries)-1)/int64(d.ListEntries) {
		return nil, fmt.Errorf("disk %s: %d chunk lists for %d chunks", d.Name, len(d.ChunkLists), d.Chunks())
	}
	cs := int64(d.ChunkSize)
	if opts.CacheSize <= 0 {
		opts.CacheSize = DefaultReaderCache
	}
	opts.CacheSize = max(opts.CacheSize, 2*(cs+DecodeSlack))
	if opts.ReadAhead == 0 {
		opts.ReadAhead = opts.CacheSize / 4
	}
	opts.ReadAhead = min(opts.ReadAhead, opts.CacheSize/2)
	if opts.Fetchers <= 0 {
		opts.Fetchers = 2 * runtime.GOMAXPROCS(0)
	}
	if opts.Warn == nil {
		opts.Warn = func(string, ...any) {}
	}
	dr := &DiskReader{
		r: r, d: d, opts: opts, cs: cs,
		lists:  newListCache(readerLists),
		chunks: newChunkCache(opts.CacheSize, d.ChunkSize),
		sem:    make(chan struct{}, opts.Fetchers),
	}
	dr.ctx, dr.cancel = context.WithCancel(ctx)
	dr.ra.wake = make(chan struct{}, 1)
	if opts.ReadAhead > 0 {
		dr.spawn(dr.readAhead)
	}
	return dr, nil
}

// Close stops the reader's background fetches and waits for them. Reads
// after it fail.
func (dr *DiskReader) Close() error {
	dr.closeMu.Lock()
	dr.closed = true
	dr.closeMu.Unlock()
	dr.cancel()
	dr.wg.Wait()
	return nil
}

// spawn runs fn in a goroutine that Close waits for; once the reader is
// closing, fn runs in the caller instead (it ends at once: the context
// is cancelled).
func (dr *DiskReader) spawn(fn func()) {
	dr.closeMu.RLock()
	defer dr.closeMu.RUnlock()
	if dr.closed {
		fn()
		return
	}
	dr.wg.Add(1)
	go func() {
		defer dr.wg.Done()
		fn()
	}()
}

// Size is the disk's size.
func (dr *DiskReader) Size() int64 { return dr.d.Size }

// ReaderStats say what a DiskReader did so far.
type ReaderStats struct {
	BytesFetched int64 // by ranged reads of runs
	Runs         int64 // runs fetched
	Cached       int64 // bytes in the cache now
	PeakCached   int64 // at most
}

// Stats reports what the reader did so far.
func (dr *DiskReader) Stats() ReaderStats {
	now, peak := dr.chunks.usage()
	return ReaderStats{BytesFetched: dr.fetched.Load(), Runs: dr.runs.Load(), Cached: now, PeakCached: peak}
}

// chunkID returns the ID of chunk i.
func (dr *DiskReader) chunkID(i int64) (ID, error) {
	per := int64(dr.d.ListEntries)
	e, err := dr.lists.get(dr.ctx, dr.r, dr.d, int(i/per))
	if err != nil {
		return ID{}, err
	}
	return e.at(i % per), nil
}

// chunkLen is the length of chunk i: the chunk size, less for the last.
func (dr *DiskReader) chunkLen(i int64) int64 { return min(dr.cs, dr.d.Size-i*dr.cs) }

// ReadAt implements io.ReaderAt: it fills p from off, and returns io.EOF
// when p reaches past the end of the disk.
func (dr *DiskReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read disk %s at %d: negative offset", dr.d.Name, off)
	}
	if off >= dr.d.Size {
		if err := dr.ctx.Err(); err != nil {
			return 0, fmt.Errorf("read disk %s at %d: %w", dr.d.Name, off, err)
		}
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), dr.d.Size)
	var done int64
	err := dr.ReadEach(off, end-off, func(at, n int64, data []byte) error {
		if data == nil {
			clear(p[at-off : at-off+n])
		} else {
			copy(p[at-off:], data)
		}
		done = at + n - off
		return nil
	})
	if err != nil {
		return int(done), err
	}
	if end-off < int64(len(p)) {
		return int(end - off), io.EOF
	}
	return len(p), nil
}

// ReadEach is ReadAt without the copy: fn receives the disk's bytes in
// [off, off+n) in order and in pieces, each n bytes at offset off, with
// data holding them (valid during the call only), or nil for zeros. A
// copy to a writer that buffers what it is given (a VM disk image) saves
// one pass over the data this way. The range must lie within the disk.
func (dr *DiskReader) ReadEach(off, n int64, fn func(off, n int64, data []byte) error) error {
	if off < 0 || n < 0 || n > dr.d.Size-off {
		return fmt.Errorf("read disk %s: range %d+%d outside it", dr.d.Name, off, n)
	}
	if err := dr.ctx.Err(); err != nil {
		return fmt.Errorf("read disk %s at %d: %w", dr.d.Name, off, err)
	}
	end := off + n
	seq, behind := dr.noteRead(off, end)
	if behind {
		dr.planAhead()
	}
	// A window at a time, so that a huge read holds only a window of
	// chunks at once.
	window := max(dr.cs, MaxRunPlain)
	for pos := off; pos < end; {
		next := min(end, (pos/window+1)*window)
		if err := dr.readWindow(pos, next, seq, fn); err != nil {
			return err
		}
		pos = next
	}
	return nil
}

// want is a chunk a read needs: where it is and its cache entry.
type want struct {
	i     int64
	entry *chunkEntry
}

// readWindow hands [off, end), within one window, to fn: chunks the
// cache lacks are claimed and fetched, runs of them at once, and every
// chunk is handed over once there. A sequential read drops the chunks it
// read to their end from the cache (read behind, and likely never
// again): a stream through the disk holds the memory of its read-ahead
// only, and reuses it while the processor's caches still hold it.
func (dr *DiskReader) readWindow(off, end int64, seq bool, fn func(off, n int64, data []byte) error) error {
	var (
		wants   []want
		claimed []RunChunk
		entries []*chunkEntry
	)
	defer func() {
		for _, w := range wants {
			dr.chunks.release(w.entry, seq && (w.i+1)*dr.cs <= end)
		}
	}()
	for i := off / dr.cs; i*dr.cs < end; i++ {
		id, err := dr.chunkID(i)
		if err != nil {
			return fmt.Errorf("read disk %s at offset %d: %w", dr.d.Name, i*dr.cs, err)
		}
		if id.IsZero() {
			continue
		}
		e, mine := dr.chunks.acquire(id)
		wants = append(wants, want{i: i, entry: e})
		if !mine {
			continue
		}
		c, err := dr.runChunk(i, id)
		if err != nil {
			dr.chunks.complete(e, nil, nil, err)
			continue
		}
		claimed, entries = append(claimed, c), append(entries, e)
	}
	runs := planRuns(dr.d.ChunkSize, claimed, entries)
	for k, run := range runs {
		if k == len(runs)-1 {
			dr.fetch(run.chunks, run.entries)
			break
		}
		dr.spawn(func() { dr.fetch(run.chunks, run.entries) })
	}
	return dr.deliver(off, end, wants, fn)
}

// runChunk is chunk i, of ID id, as FetchRun wants it.
func (dr *DiskReader) runChunk(i int64, id ID) (RunChunk, error) {
	loc, err := dr.r.BestCopy(id, dr.d.writer)
	if err != nil {
		return RunChunk{}, fmt.Errorf("disk %s at offset %d: chunk %s: %w", dr.d.Name, i*dr.cs, id.Short(), err)
	}
	return RunChunk{ID: id, Loc: loc, Off: i * dr.cs, N: int(dr.chunkLen(i))}, nil
}

// deliver waits for the chunks of a window, [off, end), and hands them
// to fn in order, with the zeros between them.
func (dr *DiskReader) deliver(off, end int64, wants []want, fn func(off, n int64, data []byte) error) error {
	pos := off
	for _, w := range wants {
		start := w.i * dr.cs
		if start > pos {
			if err := fn(pos, start-pos, nil); err != nil {
				return err
			}
		}
		e := w.entry
		select {
		case <-e.ready:
		case <-dr.ctx.Done():
			return fmt.Errorf("read disk %s at offset %d: %w", dr.d.Name, start, dr.ctx.Err())
		}
		if e.err != nil {
			return e.err
		}
		from := max(start, off)
		to := min(start+int64(len(e.plain)), end)
		if err := fn(from, to-from, e.plain[from-start:to-start]); err != nil {
			return err
		}
		pos = to
	}
	if pos < end {
		return fn(pos, end-pos, nil)
	}
	return nil
}

// Data implements extent.Map: the ranges within [off, off+n) that hold
// stored chunks, clipped to the disk. The rest reads as zeros.
func (dr *DiskReader) Data(off, n int64) ([]extent.Range, error) {
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("map of disk %s: range %d+%d", dr.d.Name, off, n)
	}
	end := dr.d.Size
	if n < end-off {
		end = off + n
	}
	per := int64(dr.d.ListEntries)
	var out []extent.Range
	for i := off / dr.cs; i*dr.cs < end; {
		li := i / per
		e, err := dr.lists.get(dr.ctx, dr.r, dr.d, int(li))
		if err != nil {
			return nil, fmt.Errorf("map of disk %s at offset %d: %w", dr.d.Name, i*dr.cs, err)
		}
		stop := (li + 1) * per
		if e.ids == nil {
			i = stop // a list of zeros: no data in it
			continue
		}
		for ; i < stop && i*dr.cs < end; i++ {
			if e.at(i % per).IsZero() {
				continue
			}
			s, t := max(i*dr.cs, off), min((i+1)*dr.cs, end)
			if k := len(out) - 1; k >= 0 && out[k].End == s {
				out[k].End = t
			} else {
				out = append(out, extent.Range{Start: s, End: t})
			}
		}
	}
	return out, nil
}
