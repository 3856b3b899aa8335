// Package restore is the restore pipeline: it walks a disk's chunk list in
// order, fetches the blobs it needs with ranged reads of whole runs of a
// pack, verifies each chunk against its ID, and writes it to a file, a
// device or a stream. A delta restore hashes the target first and fetches
// and writes only the chunks that differ.
//
// One executor runs every restore as stages: plan (chunk list to jobs),
// compare (delta restores only: which chunks the target lacks), fetch,
// and deliver, either as workers finish (a target written at any offset)
// or in disk order (a stream, Each).
package restore

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Repository is what a restore needs of a repository (*repo.Repository
// has it).
type Repository interface {
	// Config gives the repository's chunk size.
	Config() repo.Config
	// CheckDataKey says why the key cannot open chunk data, if it cannot.
	CheckDataKey() error
	ChunkList(d *repo.Disk) *repo.ChunkList
	// BestCopy picks the copy of a chunk to fetch first.
	BestCopy(id repo.ID, prefer repo.WriterNum) (repo.Location, error)
	// FetchRun fetches a run of chunks with one ranged read.
	FetchRun(ctx context.Context, f repo.RunFetch, plains [][]byte) (int64, error)
	// ChunkID hashes a chunk (delta restores compare the target's).
	ChunkID(data []byte) repo.ID
}

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
	// Only, when set, restores just these ranges of the disk (sorted,
	// apart): chunks outside them are neither fetched nor written, and
	// the target is written inside them alone. ToTarget only.
	Only []extent.Range
	// Shift is subtracted from the disk's offsets on the target, so
	// that a partition restored alone (Only its range) starts at 0.
	Shift int64
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

// ToTarget restores disk d of a snapshot onto t.
func ToTarget(ctx context.Context, r Repository, d *repo.Disk, t Target, opts Options) (*Result, error) {
	e, err := newExecutor(r, d, opts)
	if err != nil {
		return nil, err
	}
	if opts.Only != nil {
		t = &windowTarget{t: t, only: opts.Only, shift: opts.Shift}
	}
	tw := &targetWriter{t: t, fresh: opts.Fresh, c: &e.c}
	var cmp stage
	if opts.Delta {
		cmp = (&comparer{t: t, r: r, cs: d.ChunkSize, c: &e.c}).compare
	}
	return e.run(ctx, cmp, false, tw.write)
}

// ToStream writes disk d to w in order, zeros included.
func ToStream(ctx context.Context, r Repository, d *repo.Disk, w io.Writer, opts Options) (*Result, error) {
	opts.Delta, opts.Fresh = false, false
	zeros := make([]byte, 1<<20)
	return Each(ctx, r, d, opts, func(off, n int64, data []byte) error {
		if data != nil {
			if _, err := w.Write(data); err != nil {
				return fmt.Errorf("write output at %d: %w", off, err)
			}
			return nil
		}
		for n > 0 {
			k := min(n, int64(len(zeros)))
			if _, err := w.Write(zeros[:k]); err != nil {
				return fmt.Errorf("write output at %d: %w", off, err)
			}
			n -= k
			off += k
		}
		return nil
	})
}

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
func Each(ctx context.Context, r Repository, d *repo.Disk, opts Options, fn EachFunc) (*Result, error) {
	opts.Delta, opts.Fresh, opts.Only, opts.Shift = false, false, nil, 0
	e, err := newExecutor(r, d, opts)
	if err != nil {
		return nil, err
	}
	return e.run(ctx, nil, true, func(j *job, f *fetched, _ *scratch) error {
		if j.zero {
			return fn(j.off, j.len, nil)
		}
		for k, c := range j.chunks {
			if err := fn(c.Off, int64(c.N), f.chunks[k]); err != nil {
				return err
			}
			e.c.written.Add(int64(c.N))
			e.c.chunksWritten.Add(1)
		}
		return nil
	})
}

// setup checks that d can be restored with r's key before anything is
// written, and settles the worker count and progress counters.
func setup(r Repository, d *repo.Disk, opts *Options) error {
	if d.ChunkSize != r.Config().ChunkSize {
		return fmt.Errorf("disk %s has chunk size %d, repository %d", d.Name, d.ChunkSize, r.Config().ChunkSize)
	}
	if d.Stats.ChunksNew+d.Stats.ChunksReused > 0 {
		if err := r.CheckDataKey(); err != nil {
			return err
		}
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0) * 2
	}
	if opts.Progress == nil {
		opts.Progress = new(Progress)
	}
	if opts.Warn == nil {
		opts.Warn = func(string, ...any) {}
	}
	opts.Progress.Total.Store(d.Size)
	if opts.Only != nil {
		var n int64
		for i, w := range opts.Only {
			if w.Start < 0 || w.End > d.Size || w.Start >= w.End || i > 0 && w.Start < opts.Only[i-1].End {
				return fmt.Errorf("restore of disk %s: ranges %v are not sorted, apart and inside its %d bytes", d.Name, opts.Only, d.Size)
			}
			n += w.Len()
		}
		opts.Progress.Total.Store(n)
	}
	return nil
}

type counters struct {
	written, fetched, chunksWritten, same, zero atomic.Int64
}

func (c *counters) result(d *repo.Disk, start time.Time) *Result {
	return &Result{
		Size: d.Size, BytesWritten: c.written.Load(), BytesFetched: c.fetched.Load(),
		ChunksWritten: c.chunksWritten.Load(), ChunksSame: c.same.Load(), ChunksZero: c.zero.Load(),
		Seconds: time.Since(start).Seconds(),
	}
}
