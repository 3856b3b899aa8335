// Package backup is the backup pipeline: it reads a disk in fixed-size,
// offset-aligned chunks (skipping what the block map says holds no data),
// hashes them, skips zero chunks and chunks the repository holds, and hands
// the rest to the repository to compress, seal and pack. Reading, hashing,
// compression and upload run concurrently over bounded channels and a fixed
// set of buffers, so memory does not depend on the disk's size.
package backup

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

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Source describes the disk to back up.
type Source struct {
	Name string // the disk's name in the snapshot
	Path string // where it was read from
	Kind string // file, device, stdin
	Size int64  // -1 for a stream of unknown length
	// At reads a disk of known Size at any offset (a file, a device, the
	// virtual disk of an image); Stream is read once, in order, when Size
	// is -1 (standard input, a FIFO). A source has one or the other.
	At     io.ReaderAt
	Stream io.Reader
	// SizeHint is the expected length of a stream, for progress only.
	SizeHint int64
	// Map says which ranges hold data; nil means all of it. Ignored for
	// streams.
	Map extent.Map
	// Describe, when set, is called once the source has been read and
	// before the manifest is written, to add what reading it learned
	// (partitions, used bytes) to the disk's entry.
	Describe func(*repo.Disk)
}

// Options for a backup.
type Options struct {
	Host    string
	Tags    []string
	Parent  *repo.ID
	Workers int // hashing/compression goroutines; 0: one per CPU
	// Progress, when set, is updated as the backup runs.
	Progress *Progress
	// Time overrides the snapshot time (tests).
	Time time.Time
	// Program is recorded in the manifest.
	Program string
}

// Progress is read by the caller while the backup runs.
type Progress struct {
	Total    atomic.Int64 // logical size, -1 unknown
	Done     atomic.Int64 // logical bytes processed
	Read     atomic.Int64 // bytes read from the source
	New      atomic.Int64 // bytes in new chunks (before compression)
	Stored   atomic.Int64 // bytes those took once compressed and sealed
	Reused   atomic.Int64 // bytes in chunks the repository had
	Zero     atomic.Int64 // bytes in zero or unmapped chunks
	Finished atomic.Bool
}

// Result is what a finished backup reports.
type Result struct {
	Snapshot *repo.Snapshot
	Stats    repo.DiskStats
	Packs    int
}

type job struct {
	i    int64
	n    int // chunk length
	buf  []byte
	zero bool
}

type result struct {
	i      int64
	id     repo.ID
	n      int
	kind   int // chunkZero, chunkNew, chunkReused
	coded  int
	sealed int
}

const (
	chunkZero = iota
	chunkNew
	chunkReused
)

// Run backs up src into r, in one write session, and writes the snapshot
// manifest last. The repository's index must be loaded.
func Run(ctx context.Context, r *repo.Repository, src Source, opts Options) (*Result, error) {
	var res *Result
	st, err := r.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		var err error
		res, err = run(ctx, r, w, src, opts)
		return err
	})
	if err != nil {
		return nil, err
	}
	res.Packs = st.Packs
	return res, nil
}

func run(ctx context.Context, r *repo.Repository, w *repo.Writer, src Source, opts Options) (*Result, error) {
	start := time.Now()
	cs := r.Config().ChunkSize
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	prog := opts.Progress
	if prog == nil {
		prog = new(Progress)
	}
	prog.Total.Store(src.Size)
	if src.Size < 0 && src.SizeHint > 0 {
		prog.Total.Store(src.SizeHint)
	}
	defer prog.Finished.Store(true)

	// A fixed pool of buffers bounds memory: the reader waits for a free
	// buffer when hashing or uploading falls behind.
	nbuf := workers*2 + 2
	free := make(chan []byte, nbuf)
	for range nbuf {
		free <- make([]byte, cs)
	}
	jobs := make(chan job, workers)
	results := make(chan result, workers*2)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)

	var readBytes atomic.Int64
	g.Go(func() error {
		defer close(jobs)
		return readChunks(gctx, src, cs, free, jobs, &readBytes, prog)
	})

	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		g.Go(func() error {
			defer wg.Done()
			zeros := make([]byte, cs)
			for j := range jobs {
				res := result{i: j.i, n: j.n, kind: chunkZero}
				if !j.zero && !bytes.Equal(j.buf[:j.n], zeros[:j.n]) {
					res.id = r.ChunkID(j.buf[:j.n])
					sr, err := w.SaveBlob(gctx, repo.DataBlob, res.id, j.buf[:j.n])
					if err != nil {
						return fmt.Errorf("store chunk at offset %d: %w", j.i*int64(cs), err)
					}
					if sr.New {
						res.kind, res.coded, res.sealed = chunkNew, sr.Coded, sr.Sealed
					} else {
						res.kind = chunkReused
					}
				}
				if j.buf != nil {
					free <- j.buf
				}
				select {
				case results <- res:
				case <-gctx.Done():
					return gctx.Err()
				}
			}
			return nil
		})
	}
	go func() { wg.Wait(); close(results) }()

	var (
		stats  repo.DiskStats
		lists  []repo.ID
		chunks int64
		size   int64
		lw     = w.NewChunkListWriter()
	)
	g.Go(func() error {
		// Results arrive out of order; the chunk list needs them in order.
		pending := map[int64]result{}
		next := int64(0)
		for res := range results {
			pending[res.i] = res
			for {
				p, ok := pending[next]
				if !ok {
					break
				}
				delete(pending, next)
				next++
				if err := lw.Append(gctx, p.id); err != nil {
					return err
				}
				n := int64(p.n)
				size += n
				switch p.kind {
				case chunkZero:
					stats.ChunksZero++
					prog.Zero.Add(n)
				case chunkNew:
					stats.ChunksNew++
					stats.BytesNew += n
					stats.BytesNewCoded += int64(p.coded)
					stats.BytesStored += int64(p.sealed)
					prog.New.Add(n)
					prog.Stored.Add(int64(p.sealed))
				case chunkReused:
					stats.ChunksReused++
					prog.Reused.Add(n)
				}
				prog.Done.Add(n)
			}
		}
		chunks = next
		if len(pending) != 0 {
			return errors.New("internal error: chunk results missing")
		}
		var err error
		lists, err = lw.Close(gctx)
		return err
	})

	if err := g.Wait(); err != nil {
		return nil, err
	}
	if src.Size >= 0 && size != src.Size {
		return nil, fmt.Errorf("read %d bytes of %s, expected %d (did the source shrink?)", size, src.Path, src.Size)
	}
	if want := (size + int64(cs) - 1) / int64(cs); want != chunks {
		return nil, fmt.Errorf("internal error: %d chunks for %d bytes", chunks, size)
	}
	stats.BytesRead = readBytes.Load()
	stats.Seconds = time.Since(start).Seconds()
	t := opts.Time
	if t.IsZero() {
		t = start
	}
	sn := &repo.Snapshot{
		Time: t.UTC(), Host: opts.Host, Tags: opts.Tags, Parent: opts.Parent, Program: opts.Program,
		Disks: []repo.Disk{{
			Name: src.Name, Source: src.Path, Kind: src.Kind, Size: size, ChunkSize: cs,
			ChunkLists: lists, ListEntries: repo.ListEntries, Stats: stats,
		}},
	}
	if src.Describe != nil {
		src.Describe(&sn.Disks[0])
	}
	if _, err := w.SaveSnapshot(ctx, sn); err != nil {
		return nil, err
	}
	return &Result{Snapshot: sn, Stats: stats}, nil
}

// readChunks reads the source sequentially and sends one job per chunk.
func readChunks(ctx context.Context, src Source, cs int, free chan []byte, jobs chan<- job, read *atomic.Int64, prog *Progress) error {
	send := func(j job) error {
		select {
		case jobs <- j:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	getBuf := func() ([]byte, error) {
		select {
		case b := <-free:
			return b, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if src.Size < 0 {
		for i := int64(0); ; i++ {
			buf, err := getBuf()
			if err != nil {
				return err
			}
			n, err := io.ReadFull(src.Stream, buf)
			read.Add(int64(n))
			prog.Read.Add(int64(n))
			if n > 0 {
				if err := send(job{i: i, n: n, buf: buf}); err != nil {
					return err
				}
			} else {
				free <- buf
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil
			}
			if err != nil {
				return fmt.Errorf("read %s at offset %d: %w", src.Path, i*int64(cs), err)
			}
		}
	}
	m := src.Map
	if m == nil {
		m = extent.Full{}
	}
	for i, off := int64(0), int64(0); off < src.Size; i, off = i+1, off+int64(cs) {
		n := int64(cs)
		if off+n > src.Size {
			n = src.Size - off
		}
		ranges, err := m.Data(off, n)
		if err != nil {
			return fmt.Errorf("map of %s at offset %d: %w", src.Path, off, err)
		}
		if len(ranges) == 0 {
			if err := send(job{i: i, n: int(n), zero: true}); err != nil {
				return err
			}
			continue
		}
		buf, err := getBuf()
		if err != nil {
			return err
		}
		got, err := extent.ReadRanges(src.At, buf[:n], off, ranges)
		read.Add(got)
		prog.Read.Add(got)
		if err != nil {
			free <- buf
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("read %s at offset %d: source ended early (did it shrink?)", src.Path, off)
			}
			return fmt.Errorf("read %s at offset %d: %w", src.Path, off, err)
		}
		if err := send(job{i: i, n: int(n), buf: buf}); err != nil {
			return err
		}
	}
	return nil
}
