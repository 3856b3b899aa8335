package restore

import (
	"context"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/repo"
)

// EachFunc receives a disk's contents in order: n bytes at offset off,
// with data holding them, or data nil for a run of zeros (chunks that are
// not stored). data is only valid during the call.
type EachFunc func(off, n int64, data []byte) error

// Each walks disk d of a snapshot in order and calls fn for every chunk
// and every run of zero chunks, so a writer that needs the disk in order
// (a VM disk format, a stream with holes) gets it with the fetching,
// decryption and verification of the restore pipeline running ahead in
// parallel. Memory stays bounded: at most a fixed window of fetched runs
// waits for fn.
func Each(ctx context.Context, r *repo.Repository, d *repo.Disk, opts Options, fn EachFunc) (*Result, error) {
	start := time.Now()
	workers, prog, err := setup(r, d, &opts)
	if err != nil {
		return nil, err
	}
	var c counters

	// Each job gets a one-slot promise, queued in plan order; the
	// consumer waits on the promises in that order. The queue's capacity
	// bounds how far fetching runs ahead of fn.
	type task struct {
		j    job
		done chan fetched
	}
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan job, workers)
	g.Go(func() error {
		defer close(jobs)
		return plan(gctx, r, d, Options{}, jobs)
	})
	order := make(chan task, workers*2)
	work := make(chan task, workers)
	g.Go(func() error {
		defer close(order)
		defer close(work)
		for j := range jobs {
			t := task{j: j, done: make(chan fetched, 1)}
			select {
			case order <- t:
			case <-gctx.Done():
				return gctx.Err()
			}
			if j.zero {
				t.done <- fetched{}
				continue
			}
			select {
			case work <- t:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	b := newBuffers(d.ChunkSize)
	for range workers {
		g.Go(func() error {
			for t := range work {
				f, err := fetch(gctx, r, d, t.j.spans, nil, &c, b, opts.warn())
				f.err = err
				t.done <- f
				if err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		for t := range order {
			var f fetched
			select {
			case f = <-t.done:
			case <-gctx.Done():
				return gctx.Err()
			}
			if f.err != nil {
				return f.err
			}
			if t.j.zero {
				c.zero.Add((t.j.len + int64(d.ChunkSize) - 1) / int64(d.ChunkSize))
				if err := fn(t.j.off, t.j.len, nil); err != nil {
					return err
				}
				prog.Done.Add(t.j.len)
				continue
			}
			for k, s := range t.j.spans {
				if err := fn(s.off, int64(s.n), f.bufs[k]); err != nil {
					f.release()
					return err
				}
				c.written.Add(int64(s.n))
				c.chunksWritten.Add(1)
				prog.Done.Add(int64(s.n))
			}
			f.release()
			prog.Written.Store(c.written.Load())
			prog.Fetched.Store(c.fetched.Load())
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return c.result(d, start), nil
}
