package repo

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// RunChunk is one chunk of a disk as a reader fetches it: its ID, the
// copy of its blob to try first and its place on the disk.
type RunChunk struct {
	ID  ID
	Loc Location
	Off int64 // offset on the disk
	N   int   // plaintext length
}

// The caps of a run: one request fetches at most MaxRunSealed bytes of
// sealed blobs, and a run restores at most MaxRunPlain bytes of plaintext
// (one chunk when chunks are larger). Larger runs gain nothing on any
// backend measured and hold more memory per request in flight.
const (
	MaxRunSealed = 4 << 20
	MaxRunPlain  = 4 << 20
)

// BestCopy returns the copy of data chunk id to fetch first for a reader
// that prefers the copies of writer prefer: the best ranked, when it can
// be read at all (found without sorting every copy).
func (r *Repository) BestCopy(id ID, prefer WriterNum) (Location, error) {
	if c, n := r.idx.Best(DataBlob, id, prefer); n > 0 && !c.Missing {
		return c.Location, nil
	}
	return firstCopy(r.idx.Copies(id, prefer))
}

// firstCopy returns the best copy of a data chunk: copies come best
// first, and one in a pack recorded as damaged is still worth a try (only
// some of its blobs may be), one that cannot be read is not.
func firstCopy(copies []Copy) (Location, error) {
	why := ""
	for _, c := range copies {
		if c.Type != DataBlob {
			continue
		}
		if !c.Missing {
			return c.Location, nil
		}
		why = c.Damaged
	}
	if why == "" {
		return Location{}, ErrBlobMissing
	}
	if len(copies) == 1 {
		return Location{}, fmt.Errorf("its only copy cannot be used: %s", why)
	}
	return Location{}, fmt.Errorf("none of its %d copies can be used (last: %s)", len(copies), why)
}

// RunPlanner groups a disk's chunks, fed in disk order, into runs that
// one ranged read fetches: consecutive chunks whose blobs lie back to back
// in one pack, within the caps MaxRunSealed and MaxRunPlain. Restore and
// the disk reader's read-ahead plan with it, so both read storage alike.
type RunPlanner struct {
	chunk  int64
	cur    []RunChunk
	sealed int64
}

// NewRunPlanner returns a planner for a disk of chunkSize-byte chunks.
func NewRunPlanner(chunkSize int) *RunPlanner { return &RunPlanner{chunk: int64(chunkSize)} }

// Add appends the next chunk. When s cannot join the run being built,
// that run is returned, complete, and a new one starts with s.
func (p *RunPlanner) Add(s RunChunk) []RunChunk {
	if p.joins(s) {
		p.cur = append(p.cur, s)
		p.sealed += int64(s.Loc.Length)
		return nil
	}
	done := p.Flush()
	p.cur = []RunChunk{s}
	p.sealed = int64(s.Loc.Length)
	return done
}

func (p *RunPlanner) joins(s RunChunk) bool {
	if len(p.cur) == 0 {
		return false
	}
	last := p.cur[len(p.cur)-1]
	return last.Loc.Pack == s.Loc.Pack && int64(last.Loc.Offset)+int64(last.Loc.Length) == int64(s.Loc.Offset) &&
		last.Off+int64(last.N) == s.Off &&
		p.sealed+int64(s.Loc.Length) <= MaxRunSealed &&
		int64(len(p.cur)+1)*p.chunk <= max(MaxRunPlain, p.chunk)
}

// Flush returns the run being built (nil if none) and starts afresh.
func (p *RunPlanner) Flush() []RunChunk {
	done := p.cur
	p.cur, p.sealed = nil, 0
	return done
}

// RunFetch is a run for FetchRun to fetch.
type RunFetch struct {
	// Disk is the disk the run belongs to: its writer's copies are tried
	// first, and errors name it.
	Disk *Disk
	// Chunks is the run, as RunPlanner makes them.
	Chunks []RunChunk
	// Want says which chunks are needed; nil: all.
	Want []bool
	// Into returns where chunk k is decoded: an empty slice with room for
	// the chunk and DecodeSlack bytes more (with less room the chunk is
	// still decoded, into new memory, more slowly).
	Into func(k int) []byte
	// Warn hears of copies that failed and were replaced; nil: silence.
	Warn func(format string, args ...any)
}

// rawRuns recycles the buffers of sealed runs: a restore fetches every
// byte it writes through one of them. Short runs (a random read of a
// chunk) take buffers of their own pool, so as not to hold a whole run's
// memory each.
var (
	rawRuns   = runPool{size: MaxRunSealed}
	shortRuns = runPool{size: MaxRunSealed / 8}
)

type runPool struct {
	sync.Pool // *[]byte, cap >= size
	size      int
}

// rawRun returns a buffer for n sealed bytes and the pool to put it back.
func rawRun(n int) (*[]byte, *runPool) {
	p := &rawRuns
	if n <= shortRuns.size {
		p = &shortRuns
	}
	if b, ok := p.Get().(*[]byte); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b, p
	}
	b := make([]byte, n, max(n, p.size))
	return &b, p
}

// FetchRun reads a run of blobs with one ranged request and opens each
// wanted chunk in place, verified against its ID, into f.Into(k); plains
// (as long as f.Chunks) receives the plaintexts, nil where not wanted. A
// chunk whose copy in the run fails, or every chunk when the request
// does, is read from its other copies (ReadBlobFor). It returns the bytes
// fetched by the ranged request.
func (r *Repository) FetchRun(ctx context.Context, f RunFetch, plains [][]byte) (int64, error) {
	if len(f.Chunks) == 0 || len(plains) != len(f.Chunks) || (f.Want != nil && len(f.Want) != len(f.Chunks)) {
		return 0, fmt.Errorf("fetch of a run: %d spans, %d outputs, %d wanted", len(f.Chunks), len(plains), len(f.Want))
	}
	warn := f.Warn
	if warn == nil {
		warn = func(string, ...any) {}
	}
	first, last := f.Chunks[0].Loc, f.Chunks[len(f.Chunks)-1].Loc
	length := int64(last.Offset) + int64(last.Length) - int64(first.Offset)
	var (
		raw     []byte
		fetched int64
		runErr  error
	)
	// A run is at most MaxRunSealed bytes, or one sealed chunk; anything
	// longer comes from an index entry that cannot be right, and is not
	// worth the memory: each chunk is then read on its own.
	if length <= 0 || length > max(MaxRunSealed, int64(r.cfg.ChunkSize)+maxSealedOverhead) {
		runErr = fmt.Errorf("%d bytes in pack %s at %d cannot be a run", length, first.Pack.Short(), first.Offset)
	} else {
		rawp, pool := rawRun(int(length))
		defer pool.Put(rawp)
		raw = *rawp
		runErr = r.ReadPackRange(ctx, first.Pack, int64(first.Offset), raw)
	}
	if runErr != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		warn("disk %s: chunks at offset %d: %v; trying other copies", f.Disk.Name, f.Chunks[0].Off, runErr)
	} else {
		fetched = length
	}
	for k, s := range f.Chunks {
		plains[k] = nil
		if f.Want != nil && !f.Want[k] {
			continue
		}
		var raw1 []byte
		if runErr == nil {
			rel := int64(s.Loc.Offset) - int64(first.Offset)
			if rel < 0 || rel+int64(s.Loc.Length) > length {
				return fetched, fmt.Errorf("disk %s at offset %d: blob outside its run", f.Disk.Name, s.Off)
			}
			raw1 = raw[rel : rel+int64(s.Loc.Length)]
		}
		plain, err := r.openChunk(ctx, f, s, f.Into(k), raw1, warn)
		if err != nil {
			return fetched, err
		}
		plains[k] = plain
	}
	return fetched, nil
}

// openChunk opens one chunk of a run into dst: from raw, its sealed bytes
// in the run (nil when the run could not be read), else from its other
// copies.
func (r *Repository) openChunk(ctx context.Context, f RunFetch, s RunChunk, dst []byte, raw []byte, warn func(string, ...any)) ([]byte, error) {
	var plain []byte
	err := errNoRun
	if raw != nil {
		plain, err = r.OpenBlobInPlace(dst, s.ID, s.Loc, raw)
		if err != nil {
			warn("disk %s at offset %d: %v; trying other copies", f.Disk.Name, s.Off, err)
		}
	}
	if err != nil {
		plain, err = r.ReadBlobFor(ctx, DataBlob, s.ID, dst, f.Disk.writer)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("disk %s at offset %d: %w", f.Disk.Name, s.Off, err)
	}
	plain = plain[len(dst):]
	if len(plain) != s.N {
		return nil, fmt.Errorf("chunk %s at offset %d of disk %s: %d bytes, expected %d", s.ID.Short(), s.Off, f.Disk.Name, len(plain), s.N)
	}
	if s.N > 0 && cap(dst) >= s.N && &dst[:1][0] != &plain[0] {
		// decode had no room in dst and decoded elsewhere; the caller
		// wants the chunk where it asked (a run written at once).
		plain = append(dst, plain...)
	}
	return plain, nil
}

var errNoRun = errors.New("run not read")

// maxSealedOverhead is what sealing adds to a chunk at most: nonce, tag
// and the coding byte, with room to spare.
const maxSealedOverhead = 64

// CheckDataKey returns nil when the key opens chunk data, and why not
// otherwise (a write-only key).
func (r *Repository) CheckDataKey() error {
	_, err := r.dataOpener()
	return err
}
