// Package restore is the restore pipeline: it walks a disk's chunk list in
// order, fetches the blobs it needs with ranged reads of whole runs of a
// pack, verifies each chunk against its ID, and writes it to a file, a
// device or a stream. A delta restore hashes the target first and fetches
// and writes only the chunks that differ.
package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/repo"
)

// Target is a file or device being restored to.
type Target interface {
	io.WriterAt
	io.ReaderAt
	// Zero makes a range read as zeros.
	Zero(off, n int64, zeros []byte) error
}

// Options for a restore.
type Options struct {
	// Delta reads the target and writes only chunks that differ.
	Delta bool
	// Fresh says the target is a new, empty file: zero chunks need no
	// write at all.
	Fresh   bool
	Workers int
	// Progress, when set, is updated as the restore runs.
	Progress *Progress
	// Warn, when set, hears of copies of chunks that failed and were
	// read from another copy.
	Warn func(format string, args ...any)
}

// Progress is read by the caller while the restore runs.
type Progress struct {
	Total   atomic.Int64
	Done    atomic.Int64
	Written atomic.Int64
	Fetched atomic.Int64
}

// Result reports what a restore did.
type Result struct {
	Size          int64   `json:"size"`
	BytesWritten  int64   `json:"bytes_written"`
	BytesFetched  int64   `json:"bytes_fetched"`
	ChunksWritten int64   `json:"chunks_written"`
	ChunksSame    int64   `json:"chunks_unchanged"`
	ChunksZero    int64   `json:"chunks_zero"`
	Seconds       float64 `json:"seconds"`
}

type span struct {
	id  repo.ID
	loc repo.Location
	off int64
	n   int
}

type job struct {
	seq   int64
	zero  bool // a run of zero chunks at [off, off+length)
	off   int64
	len   int64
	spans []span // consecutive chunks whose blobs are adjacent in one pack
}

const (
	maxRun      = 4 << 20 // bytes of sealed blobs fetched in one request
	maxPlainRun = 4 << 20 // bytes of plaintext a run restores at most
)

type counters struct {
	written, fetched, chunksWritten, same, zero atomic.Int64
}

// ToTarget restores disk d of a snapshot onto t.
func ToTarget(ctx context.Context, r *repo.Repository, d *repo.Disk, t Target, opts Options) (*Result, error) {
	start := time.Now()
	workers, prog, err := setup(r, d, &opts)
	if err != nil {
		return nil, err
	}
	var c counters
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan job, workers)
	g.Go(func() error {
		defer close(jobs)
		return plan(gctx, r, d, opts, jobs)
	})
	b := newBuffers(d.ChunkSize)
	for range workers {
		g.Go(func() error {
			zeros := make([]byte, d.ChunkSize)
			for j := range jobs {
				if err := apply(gctx, r, d, t, j, opts, zeros, &c, b); err != nil {
					return err
				}
				prog.Done.Add(jobLen(j))
				prog.Written.Store(c.written.Load())
				prog.Fetched.Store(c.fetched.Load())
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return c.result(d, start), nil
}

// ToStream writes disk d to w in order, zeros included.
func ToStream(ctx context.Context, r *repo.Repository, d *repo.Disk, w io.Writer, opts Options) (*Result, error) {
	opts.Delta, opts.Fresh = false, false
	zeros := make([]byte, 1<<20)
	return Each(ctx, r, d, opts, func(off, n int64, data []byte) error {
		if data != nil {
			if _, err := w.Write(data); err != nil {
				return fmt.Errorf("write output: %w", err)
			}
			return nil
		}
		for n > 0 {
			k := min(n, int64(len(zeros)))
			if _, err := w.Write(zeros[:k]); err != nil {
				return fmt.Errorf("write output: %w", err)
			}
			n -= k
		}
		return nil
	})
}

// setup checks that d can be restored with r's key before anything is
// written, and settles the worker count and progress counters.
func setup(r *repo.Repository, d *repo.Disk, opts *Options) (int, *Progress, error) {
	if d.ChunkSize != r.Config().ChunkSize {
		return 0, nil, fmt.Errorf("disk %s has chunk size %d, repository %d", d.Name, d.ChunkSize, r.Config().ChunkSize)
	}
	if !r.CanDecrypt() && d.Stats.ChunksNew+d.Stats.ChunksReused > 0 {
		if _, err := r.Keys().DataOpener(); err != nil {
			return 0, nil, err
		}
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0) * 2
	}
	if opts.Progress == nil {
		opts.Progress = new(Progress)
	}
	opts.Progress.Total.Store(d.Size)
	return workers, opts.Progress, nil
}

func (c *counters) result(d *repo.Disk, start time.Time) *Result {
	return &Result{
		Size: d.Size, BytesWritten: c.written.Load(), BytesFetched: c.fetched.Load(),
		ChunksWritten: c.chunksWritten.Load(), ChunksSame: c.same.Load(), ChunksZero: c.zero.Load(),
		Seconds: time.Since(start).Seconds(),
	}
}

func jobLen(j job) int64 {
	if j.zero {
		return j.len
	}
	var n int64
	for _, s := range j.spans {
		n += int64(s.n)
	}
	return n
}

// plan walks the chunk list and groups it into jobs: runs of zero chunks,
// and runs of chunks stored next to each other in one pack, which one
// ranged read fetches.
func plan(ctx context.Context, r *repo.Repository, d *repo.Disk, opts Options, jobs chan<- job) error {
	list := r.ChunkList(d)
	cs := int64(d.ChunkSize)
	var cur job
	seq := int64(0)
	flush := func() error {
		if !cur.zero && len(cur.spans) == 0 {
			return nil
		}
		cur.seq = seq
		seq++
		select {
		case jobs <- cur:
		case <-ctx.Done():
			return ctx.Err()
		}
		cur = job{}
		return nil
	}
	var sealedRun int64
	for i := int64(0); i < list.Len(); i++ {
		id, err := list.At(ctx, i)
		if err != nil {
			return err
		}
		off := i * cs
		n := min(cs, d.Size-off)
		if id.IsZero() {
			if cur.zero && cur.off+cur.len == off && cur.len < 64<<20 {
				cur.len += n
				continue
			}
			if err := flush(); err != nil {
				return err
			}
			cur = job{zero: true, off: off, len: n}
			continue
		}
		loc, err := bestCopy(r.Index(), id, d.Writer())
		if err != nil {
			return fmt.Errorf("chunk %s at offset %d of disk %s: %w", id.Short(), off, d.Name, err)
		}
		if !cur.zero && len(cur.spans) > 0 {
			last := cur.spans[len(cur.spans)-1].loc
			if last.Pack == loc.Pack && last.Offset+last.Length == loc.Offset && sealedRun+int64(loc.Length) <= maxRun &&
				int64(len(cur.spans)+1)*cs <= max(maxPlainRun, cs) {
				cur.spans = append(cur.spans, span{id: id, loc: loc, off: off, n: int(n)})
				sealedRun += int64(loc.Length)
				continue
			}
		}
		if err := flush(); err != nil {
			return err
		}
		cur = job{spans: []span{{id: id, loc: loc, off: off, n: int(n)}}}
		sealedRun = int64(loc.Length)
	}
	return flush()
}

// bestCopy returns the copy of a data chunk to fetch first: the best
// ranked, when it can be read at all (without sorting every copy).
func bestCopy(x *repo.Index, id repo.ID, prefer repo.WriterNum) (repo.Location, error) {
	if c, n := x.Best(repo.DataBlob, id, prefer); n > 0 && !c.Missing {
		return c.Location, nil
	}
	return firstCopy(x.Copies(id, prefer))
}

// firstCopy returns the best copy of a data chunk: copies come best
// first, and one in a pack recorded as damaged is still worth a try (only
// some of its blobs may be), one that cannot be read is not.
func firstCopy(copies []repo.Copy) (repo.Location, error) {
	why := ""
	for _, c := range copies {
		if c.Type != repo.DataBlob {
			continue
		}
		if !c.Missing {
			return c.Location, nil
		}
		why = c.Damaged
	}
	if why == "" {
		return repo.Location{}, repo.ErrBlobMissing
	}
	if len(copies) == 1 {
		return repo.Location{}, fmt.Errorf("its only copy cannot be used: %s", why)
	}
	return repo.Location{}, fmt.Errorf("none of its %d copies can be used (last: %s)", len(copies), why)
}

// buffers recycles the memory of fetched runs: without it a restore
// allocates every byte it writes, and the zeroing, page faults and garbage
// collection of that memory cost a tenth of its CPU time.
type buffers struct {
	chunk  int
	raws   sync.Pool // *[]byte, cap >= maxRun: sealed blobs of a run
	plains sync.Pool // *[]byte, cap >= maxPlainRun + repo.DecodeSlack
}

func newBuffers(chunkSize int) *buffers { return &buffers{chunk: chunkSize} }

// pooled returns a buffer of length n from p, or a new one with room for
// atLeast bytes.
func pooled(p *sync.Pool, n, atLeast int) *[]byte {
	if b, ok := p.Get().(*[]byte); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, max(n, atLeast))
	return &b
}

// fetched holds the verified plaintext of a run's chunks (nil where not
// wanted), each a slice of one buffer in disk order, until release gives
// the memory back.
type fetched struct {
	bufs  [][]byte
	plain *[]byte
	b     *buffers
	err   error
}

func (f *fetched) release() {
	if f.plain != nil {
		f.b.plains.Put(f.plain)
	}
	f.plain, f.bufs = nil, nil
}

// contiguous returns the run's plaintext as one slice when every chunk of
// it is present, so that it is written with one call.
func (f *fetched) contiguous() ([]byte, bool) {
	n := 0
	for _, b := range f.bufs {
		if b == nil {
			return nil, false
		}
		n += len(b)
	}
	return (*f.plain)[:n], true
}

// fetch reads the run of blobs with one request and returns each chunk's
// verified plaintext. want, if not nil, says which spans are needed. A
// chunk whose copy in the run fails (or all of them, when the request
// does) is read from its other copies.
func fetch(ctx context.Context, r *repo.Repository, d *repo.Disk, spans []span, want []bool, c *counters, b *buffers, warn func(string, ...any)) (fetched, error) {
	first, last := spans[0].loc, spans[len(spans)-1].loc
	length := int64(last.Offset+last.Length) - int64(first.Offset)
	rawp := pooled(&b.raws, int(length), maxRun)
	defer b.raws.Put(rawp)
	raw := *rawp
	runErr := r.ReadPackRange(ctx, first.Pack, int64(first.Offset), raw)
	if runErr != nil {
		if ctx.Err() != nil {
			return fetched{}, ctx.Err()
		}
		warn("chunks at disk offset %d: %v; trying other copies", spans[0].off, runErr)
	} else {
		c.fetched.Add(length)
	}
	// Chunk k decodes into [k*chunk, k*chunk+n) of one buffer; only the
	// disk's last chunk, always last in its run, is shorter than a chunk.
	// Decoding wants chunk+DecodeSlack of room at each start, which the
	// buffer's tail provides for the last chunk and the next slot (not yet
	// decoded) for the others.
	total := len(spans)*b.chunk + repo.DecodeSlack
	out := fetched{bufs: make([][]byte, len(spans)), b: b, plain: pooled(&b.plains, total, maxPlainRun+repo.DecodeSlack)}
	buf := *out.plain
	for k, s := range spans {
		if want != nil && !want[k] {
			continue
		}
		pos := k * b.chunk
		rel := s.loc.Offset - first.Offset
		var plain []byte
		err := runErr
		if err == nil {
			plain, err = r.OpenBlobInPlace(buf[pos:pos:total], s.id, s.loc, raw[rel:rel+s.loc.Length])
			if err != nil {
				warn("disk offset %d: %v; trying other copies", s.off, err)
			}
		}
		if err != nil {
			plain, err = r.ReadBlobFor(ctx, repo.DataBlob, s.id, buf[pos:pos:total], d.Writer())
		}
		if err != nil {
			out.release()
			return fetched{}, fmt.Errorf("disk offset %d: %w", s.off, err)
		}
		if len(plain) != s.n {
			out.release()
			return fetched{}, fmt.Errorf("chunk %s at disk offset %d: %d bytes, expected %d", s.id.Short(), s.off, len(plain), s.n)
		}
		if &plain[0] != &buf[pos] {
			// decode had room, so it decoded in place; were that ever to
			// change, copying keeps the run contiguous.
			copy(buf[pos:], plain)
		}
		out.bufs[k] = buf[pos : pos+s.n : pos+s.n]
	}
	return out, nil
}

func (o Options) warn() func(string, ...any) {
	if o.Warn == nil {
		return func(string, ...any) {}
	}
	return o.Warn
}

func apply(ctx context.Context, r *repo.Repository, d *repo.Disk, t Target, j job, opts Options, zeros []byte, c *counters, b *buffers) error {
	if j.zero {
		c.zero.Add((j.len + int64(len(zeros)) - 1) / int64(len(zeros)))
		if opts.Fresh {
			return nil
		}
		if opts.Delta {
			// Zero only the chunks of the run that are not zero already.
			buf := make([]byte, len(zeros))
			for off := j.off; off < j.off+j.len; off += int64(len(zeros)) {
				n := min(int64(len(zeros)), j.off+j.len-off)
				if _, err := t.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
					return fmt.Errorf("read target at %d: %w", off, err)
				}
				if bytes.Equal(buf[:n], zeros[:n]) {
					continue
				}
				if err := t.Zero(off, n, zeros); err != nil {
					return fmt.Errorf("zero target at %d: %w", off, err)
				}
				c.written.Add(n)
			}
			return nil
		}
		if err := t.Zero(j.off, j.len, zeros); err != nil {
			return fmt.Errorf("zero target at %d: %w", j.off, err)
		}
		c.written.Add(j.len)
		return nil
	}
	var want []bool
	if opts.Delta {
		want = make([]bool, len(j.spans))
		any := false
		buf := make([]byte, len(zeros))
		for k, s := range j.spans {
			n, err := t.ReadAt(buf[:s.n], s.off)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read target at %d: %w", s.off, err)
			}
			if n == s.n && r.ChunkID(buf[:s.n]) == s.id {
				c.same.Add(1)
				continue
			}
			want[k], any = true, true
		}
		if !any {
			return nil
		}
	}
	f, err := fetch(ctx, r, d, j.spans, want, c, b, opts.warn())
	if err != nil {
		return err
	}
	defer f.release()
	if all, ok := f.contiguous(); ok {
		// One write for the run: fewer, larger writes go to a device (or
		// O_DIRECT file) at a better rate.
		if _, err := t.WriteAt(all, j.spans[0].off); err != nil {
			return fmt.Errorf("write target at %d: %w", j.spans[0].off, err)
		}
		c.written.Add(int64(len(all)))
		c.chunksWritten.Add(int64(len(j.spans)))
		return nil
	}
	for k, s := range j.spans {
		if f.bufs[k] == nil {
			continue
		}
		if _, err := t.WriteAt(f.bufs[k], s.off); err != nil {
			return fmt.Errorf("write target at %d: %w", s.off, err)
		}
		c.written.Add(int64(s.n))
		c.chunksWritten.Add(1)
	}
	return nil
}
