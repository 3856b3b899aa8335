package restore

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// job is a unit of the restore: a run of zero chunks at [off, off+len),
// or a run of chunks whose blobs are adjacent in one pack.
type job struct {
	zero   bool
	off    int64
	len    int64
	chunks []repo.RunChunk
	// want is set by the compare stage: the chunks (of a zero run: the
	// chunk-sized pieces) the target lacks. nil: all of them.
	want []bool
}

// maxZeroRun bounds the zeros one job stands for, so that progress moves
// and a delta restore compares them in pieces.
const maxZeroRun = 64 << 20

// stage is a step of the pipeline that decides, before any fetch, what a
// job still has to do; false: nothing.
type stage func(j *job, s *scratch) (bool, error)

// deliverFunc hands a fetched job to where it goes; f is empty for a run
// of zeros.
type deliverFunc func(j *job, f *fetched, s *scratch) error

// scratch is one worker's memory, reused from job to job.
type scratch struct {
	zeros []byte // a chunk of zeros
	buf   []byte // the target's bytes under a job (delta)
}

// executor runs one restore: plan, compare, fetch, deliver.
type executor struct {
	r     Repository
	d     *repo.Disk
	opts  Options
	c     counters
	b     *buffers
	start time.Time
}

func newExecutor(r Repository, d *repo.Disk, opts Options) (*executor, error) {
	if err := setup(r, d, &opts); err != nil {
		return nil, err
	}
	return &executor{r: r, d: d, opts: opts, b: newBuffers(d.ChunkSize), start: time.Now()}, nil
}

// task is a job on its way through the pipeline; done carries its fetched
// chunks to an ordered consumer.
type task struct {
	j    *job
	done chan fetched
}

// run restores the disk. compare, when set, runs first for every job.
// With ordered, deliver sees the jobs one at a time in disk order; without,
// the workers call it as they finish jobs.
func (e *executor) run(ctx context.Context, compare stage, ordered bool, deliver deliverFunc) (*Result, error) {
	g, gctx := errgroup.WithContext(ctx)
	work := make(chan task, e.opts.Workers)
	var order chan task
	if ordered {
		// The queue's capacity bounds how far fetching runs ahead of an
		// ordered consumer.
		order = make(chan task, e.opts.Workers*2)
	}
	g.Go(func() error {
		defer close(work)
		if order != nil {
			defer close(order)
		}
		return plan(gctx, e.r, e.d, e.opts.Only, func(j *job) error { return dispatch(gctx, j, work, order) })
	})
	for range e.opts.Workers {
		g.Go(func() error {
			s := &scratch{zeros: make([]byte, e.d.ChunkSize)}
			for t := range work {
				f, err := e.process(gctx, t.j, compare, s)
				if ordered {
					f.err = err
					t.done <- f
					if err != nil {
						return err
					}
					continue
				}
				if err == nil {
					err = e.finish(t.j, f, s, deliver)
				}
				if err != nil {
					return err
				}
			}
			return nil
		})
	}
	if ordered {
		g.Go(func() error { return e.consume(gctx, order, deliver) })
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return e.c.result(e.d, e.start), nil
}

// dispatch queues a job for the workers and, when order is not nil, for
// the ordered consumer; a run of zeros needs no worker then.
func dispatch(ctx context.Context, j *job, work, order chan task) error {
	t := task{j: j}
	if order != nil {
		t.done = make(chan fetched, 1)
		select {
		case order <- t:
		case <-ctx.Done():
			return ctx.Err()
		}
		if j.zero {
			t.done <- fetched{}
			return nil
		}
	}
	select {
	case work <- t:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// process runs the compare and fetch stages of a job.
func (e *executor) process(ctx context.Context, j *job, compare stage, s *scratch) (fetched, error) {
	if compare != nil {
		need, err := compare(j, s)
		if err != nil || !need {
			return fetched{}, err
		}
	}
	if j.zero {
		return fetched{}, nil
	}
	return e.fetch(ctx, j)
}

// consume delivers fetched jobs in disk order.
func (e *executor) consume(ctx context.Context, order chan task, deliver deliverFunc) error {
	for t := range order {
		var f fetched
		select {
		case f = <-t.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if f.err != nil {
			return f.err
		}
		if err := e.finish(t.j, f, nil, deliver); err != nil {
			return err
		}
	}
	return nil
}

// finish delivers a job, gives its memory back and counts it done.
func (e *executor) finish(j *job, f fetched, s *scratch, deliver deliverFunc) error {
	defer f.release()
	if j.zero {
		e.c.zero.Add((j.len + int64(e.d.ChunkSize) - 1) / int64(e.d.ChunkSize))
	}
	if err := deliver(j, &f, s); err != nil {
		return err
	}
	p := e.opts.Progress
	p.Done.Add(overlap(e.opts.Only, j.off, j.len))
	p.Written.Store(e.c.written.Load())
	p.Fetched.Store(e.c.fetched.Load())
	return nil
}

// overlap is how much of [off, off+n) falls inside only (all of it when
// only is nil).
func overlap(only []extent.Range, off, n int64) int64 {
	if only == nil {
		return n
	}
	var sum int64
	for _, w := range only {
		sum += max(0, min(w.End, off+n)-max(w.Start, off))
	}
	return sum
}

// plan walks the chunk list and groups it into jobs: runs of zero chunks,
// and runs of chunks stored next to each other in one pack, which one
// ranged read fetches (repo.RunPlanner). Chunks outside only (when set)
// are left out.
func plan(ctx context.Context, r Repository, d *repo.Disk, only []extent.Range, emit func(*job) error) error {
	list := r.ChunkList(d)
	cs := int64(d.ChunkSize)
	runs := repo.NewRunPlanner(d.ChunkSize)
	var zero *job
	emitRun := func(run []repo.RunChunk) error {
		if run == nil {
			return nil
		}
		last := run[len(run)-1]
		return emit(&job{off: run[0].Off, len: last.Off + int64(last.N) - run[0].Off, chunks: run})
	}
	first, end := int64(0), list.Len()
	if len(only) > 0 {
		first, end = only[0].Start/cs, min(end, (only[len(only)-1].End+cs-1)/cs)
	}
	for i := first; i < end; i++ {
		id, err := list.At(ctx, i)
		if err != nil {
			return err
		}
		off := i * cs
		n := min(cs, d.Size-off)
		if overlap(only, off, n) == 0 {
			// Jobs are contiguous on the disk: end those under way.
			if err := emitRun(runs.Flush()); err != nil {
				return err
			}
			if zero != nil {
				if err := emit(zero); err != nil {
					return err
				}
				zero = nil
			}
			continue
		}
		if id.IsZero() {
			if err := emitRun(runs.Flush()); err != nil {
				return err
			}
			if zero != nil && zero.len < maxZeroRun {
				zero.len += n
				continue
			}
			if zero != nil {
				if err := emit(zero); err != nil {
					return err
				}
			}
			zero = &job{zero: true, off: off, len: n}
			continue
		}
		if zero != nil {
			if err := emit(zero); err != nil {
				return err
			}
			zero = nil
		}
		loc, err := r.BestCopy(id, d.Writer())
		if err != nil {
			return fmt.Errorf("chunk %s at offset %d of disk %s: %w", id.Short(), off, d.Name, err)
		}
		if err := emitRun(runs.Add(repo.RunChunk{ID: id, Loc: loc, Off: off, N: int(n)})); err != nil {
			return err
		}
	}
	if zero != nil {
		return emit(zero)
	}
	return emitRun(runs.Flush())
}

// buffers recycles the memory of fetched runs: without it a restore
// allocates every byte it writes, and the zeroing, page faults and garbage
// collection of that memory cost a tenth of its CPU time.
type buffers struct {
	chunk  int
	plains sync.Pool // *[]byte, cap >= repo.MaxRunPlain + repo.DecodeSlack
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
	chunks [][]byte
	plain  *[]byte
	b      *buffers
	err    error
}

func (f *fetched) release() {
	if f.plain != nil {
		f.b.plains.Put(f.plain)
	}
	f.plain, f.chunks = nil, nil
}

// contiguous returns the run's plaintext as one slice when every chunk of
// it is present, so that it is written with one call.
func (f *fetched) contiguous() ([]byte, bool) {
	if f.plain == nil {
		return nil, false
	}
	n := 0
	for _, b := range f.chunks {
		if b == nil {
			return nil, false
		}
		n += len(b)
	}
	return (*f.plain)[:n], true
}

// fetch is the fetch stage: the job's wanted chunks, verified, decoded
// in place into one buffer, chunk k at k×chunk size. Decoding wants
// chunk+DecodeSlack of room at each start, which the buffer's tail
// provides for the last chunk and the next slot (decoded later) for the
// others.
func (e *executor) fetch(ctx context.Context, j *job) (fetched, error) {
	cs := e.b.chunk
	total := len(j.chunks)*cs + repo.DecodeSlack
	f := fetched{chunks: make([][]byte, len(j.chunks)), b: e.b, plain: pooled(&e.b.plains, total, repo.MaxRunPlain+repo.DecodeSlack)}
	buf := *f.plain
	n, err := e.r.FetchRun(ctx, repo.RunFetch{
		Disk: e.d, Chunks: j.chunks, Want: j.want, Warn: e.opts.Warn,
		Into: func(k int) []byte { return buf[k*cs : k*cs : total] },
	}, f.chunks)
	e.c.fetched.Add(n)
	if err != nil {
		f.release()
		return fetched{}, err
	}
	return f, nil
}
