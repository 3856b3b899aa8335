// Package backup is the backup pipeline: it reads a disk in fixed-size,
// offset-aligned chunks (skipping what the data map says holds no data),
// hashes them, skips zero chunks and chunks the repository holds, and hands
// the rest to the repository to compress, seal and pack.
//
// The pipeline is four stages over bounded channels: plan (one goroutine,
// in disk order: which chunks to read, into which buffer), read, hash and
// save (two per CPU, each reading its own chunks), order (results back
// into disk order) and chunk list (the snapshot's list of chunk IDs).
// Buffers come from a fixed pool that the plan stage waits on, so memory
// does not depend on the disk's size, and a slow repository slows the
// reads down.
package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Repository is what a backup needs of the repository: its chunk size and
// keyed chunk IDs, and a write session to store chunks, chunk lists and
// the snapshot in.
type Repository interface {
	Config() repo.Config
	ChunkID(data []byte) repo.ID
	WithWriter(ctx context.Context, purpose string, fn func(w *repo.Writer) error) (repo.WriteStats, error)
	ChunkList(d *repo.Disk) *repo.ChunkList
}

// store is what the stages write through: the write session.
type store interface {
	SaveBlob(ctx context.Context, t repo.BlobType, id repo.ID, plain []byte) (repo.SaveResult, error)
	NewChunkListWriter() *repo.ChunkListWriter
	Reusable(id repo.ID) bool
	MayBase(sn *repo.Snapshot) bool
}

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
	// Verify, when set, is called once every disk has been read and
	// before the manifest is written: an error (the point-in-time copy
	// did not hold) stores no snapshot.
	Verify func() error
	// Base, when set, names the chunks that did not change since an
	// earlier snapshot's disk of this source was read: they are taken
	// from its chunk list instead of being read.
	Base *Base
	// Readers, when above 1, is how many chunks are read from At at once
	// (a source whose reads each wait a round trip, such as NBD); the
	// chunks still reach the later stages in order.
	Readers int
	// Concurrent says At may be read from several goroutines at once
	// (a file, a block device): each worker then reads the chunks it
	// hashes and compresses, instead of one reader feeding them all.
	Concurrent bool
	// Prior, when set, is the read map of an earlier backup of this disk
	// (ReadMap): the ranges it read, which are read again with those Map
	// gives. A block freed since still holds what that backup read, so a
	// chunk none of whose used blocks changed reads as it did then and is
	// not stored again; a chunk that changed anyway is stored with the
	// bytes outside Map as zeros, as without Prior.
	Prior extent.Map
	// Record, when set, hears in disk order what each chunk of a source
	// of known Size was stored as: the ranges read (the rest is zeros),
	// none for a chunk not read. It is the next backup's Prior.
	Record func(off, n int64, ranges []extent.Range) error
}

// Base is an earlier snapshot's disk of the same source, and the ranges
// of the source written since it was read (a change tracker's record).
// A chunk that overlaps no changed range is named by its ID in the base's
// chunk list, without being read, when the repository holds it where this
// writer may reuse it; others are read as usual. A base is used only if
// its snapshot was signed by the owner or this writer, and its disk has
// the size and chunk size of the source.
type Base struct {
	Snapshot *repo.Snapshot
	Disk     *repo.Disk
	Changed  extent.Map
}

// Options for a backup.
type Options struct {
	Host    string
	Tags    []string
	Parent  *repo.ID
	Workers int // hashing/compression goroutines; 0: two per CPU
	// Progress, when set, is updated as the backup runs.
	Progress *Progress
	// Time overrides the snapshot time (tests).
	Time time.Time
	// Program is recorded in the manifest.
	Program string
	// Quiesce, when set, is recorded in the manifest: how applications
	// were held still around the instant of the copies.
	Quiesce *repo.Quiescing
	// Machine, when set, is recorded in the snapshot.
	Machine *repo.Machine
	// Warn hears what went wrong without failing the backup: a base
	// whose chunk list cannot be read, so the rest of its disk is read
	// in full.
	Warn func(string)
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
	// Stats sums the disks' statistics; Seconds includes the wait for
	// the manifest.
	Stats repo.DiskStats
	Disks []repo.DiskStats
	Packs int
	// ParityBytes is the parity stored beside the packs (SetParity).
	ParityBytes int64
}

// Run backs up src into r, in one write session, and writes the snapshot
// manifest last. The repository's index must be loaded.
func Run(ctx context.Context, r Repository, src Source, opts Options) (*Result, error) {
	return RunDisks(ctx, r, []Source{src}, opts)
}

// RunDisks backs up the disks of one machine, one after another, into
// one snapshot that lists them in order: a machine's disks restore
// together. Their names must differ. The manifest is written once every
// disk has been read and verified.
func RunDisks(ctx context.Context, r Repository, srcs []Source, opts Options) (*Result, error) {
	if err := checkNames(srcs); err != nil {
		return nil, err
	}
	start := time.Now()
	prog := opts.Progress
	if prog == nil {
		prog = new(Progress)
	}
	defer prog.Finished.Store(true)
	prog.Total.Store(TotalSize(srcs))
	var sn *repo.Snapshot
	ws, err := r.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		var disks []repo.Disk
		for _, src := range srcs {
			d, err := backupDisk(ctx, r, w, src, opts, prog)
			if err != nil {
				// A copy that stopped holding (a snapshot out of COW
				// space) fails reads: say why, not only how.
				if src.Verify != nil {
					if verr := src.Verify(); verr != nil {
						return fmt.Errorf("%s: %w (%v)", src.Path, verr, err)
					}
				}
				return err
			}
			disks = append(disks, *d)
		}
		for _, src := range srcs {
			if src.Verify != nil {
				if err := src.Verify(); err != nil {
					return fmt.Errorf("%s: %w", src.Path, err)
				}
			}
		}
		sn = newSnapshot(opts, start, disks)
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if err != nil {
		return nil, err
	}
	res := &Result{Snapshot: sn, Packs: ws.Packs, ParityBytes: ws.ParityBytes}
	for _, d := range sn.Disks {
		res.Disks = append(res.Disks, d.Stats)
		res.Stats.Add(d.Stats)
	}
	// The manifest was written after its last pack had been uploaded: the
	// result counts that wait too, which the manifest's Seconds cannot.
	res.Stats.Seconds = time.Since(start).Seconds()
	return res, nil
}

// Disk backs up one disk within the write session w, which the caller
// opened on r and writes the manifest of, and returns the disk's entry
// for it. It is the pipeline of Run without its session and manifest:
// what copying a snapshot into a repository that names chunks otherwise
// (another chunk size or ID key) does with each disk, read back through
// the source repository's disk reader.
func Disk(ctx context.Context, r Repository, w *repo.Writer, src Source, opts Options) (*repo.Disk, error) {
	if src.Size < 0 {
		return nil, errors.New("internal error: backup.Disk of a stream")
	}
	prog := opts.Progress
	if prog == nil {
		prog = new(Progress)
	}
	return backupDisk(ctx, r, w, src, opts, prog)
}

func checkNames(srcs []Source) error {
	if len(srcs) == 0 {
		return errors.New("no disk to back up")
	}
	seen := map[string]string{}
	for _, s := range srcs {
		if p, ok := seen[s.Name]; ok {
			return fmt.Errorf("two disks named %q (%s and %s): each disk of a snapshot needs its own name", s.Name, p, s.Path)
		}
		seen[s.Name] = s.Path
		if s.Size < 0 && len(srcs) > 1 {
			return fmt.Errorf("%s is a stream: a stream is backed up alone, not with other disks", s.Path)
		}
	}
	return nil
}

// TotalSize is the bytes a backup of srcs goes through, for progress:
// the sum of their sizes, a stream's size hint, or -1 for a stream of
// unknown length.
func TotalSize(srcs []Source) int64 {
	var n int64
	for _, s := range srcs {
		if s.Size < 0 {
			if s.SizeHint > 0 {
				return s.SizeHint
			}
			return -1
		}
		n += s.Size
	}
	return n
}

// backupDisk runs the pipeline over one disk and returns its entry.
func backupDisk(ctx context.Context, r Repository, w store, src Source, opts Options, prog *Progress) (*repo.Disk, error) {
	start := time.Now()
	p := newPipeline(r, src, opts, prog)
	if err := p.useBase(w); err != nil {
		return nil, err
	}
	out, err := p.run(ctx, w)
	if err != nil {
		return nil, err
	}
	out.stats.Seconds = time.Since(start).Seconds()
	d := &repo.Disk{
		Name: src.Name, Source: src.Path, Kind: src.Kind, Size: out.size, ChunkSize: p.cs,
		ChunkLists: out.lists, ListEntries: repo.ListEntries, Stats: out.stats,
	}
	if p.usedBase {
		id := src.Base.Snapshot.ID
		d.Base = &id
	}
	if src.Describe != nil {
		src.Describe(d)
	}
	return d, nil
}

// newSnapshot is the manifest of a finished run.
func newSnapshot(opts Options, start time.Time, disks []repo.Disk) *repo.Snapshot {
	t := opts.Time
	if t.IsZero() {
		t = start
	}
	return &repo.Snapshot{
		Time: t.UTC(), Host: opts.Host, Tags: opts.Tags, Parent: opts.Parent, Program: opts.Program,
		Disks: disks, Quiesce: opts.Quiesce, Machine: opts.Machine,
	}
}

// pipeline is one backup's stages and the state they share.
type pipeline struct {
	r       Repository
	src     Source
	opts    Options
	cs      int
	workers int
	prog    *Progress
	// prior is the Source's Prior until it fails to read.
	prior extent.Map
	// base, when set, lists the chunks of the earlier disk whose
	// unchanged chunks are taken without reading (Source.Base).
	base *repo.ChunkList
	w    store
	// usedBase says some chunk was taken from the base (it may have
	// been dropped since, when its chunk list proved unreadable).
	usedBase bool
	// free is the pool of chunk buffers: the read stage takes one per
	// chunk it reads, the hash and save stage gives it back.
	free chan []byte
	// read counts the bytes read from the source, by whichever stage
	// reads them.
	readBytes atomic.Int64
}

// job is one chunk read: its buffer, or none for a chunk the data map
// says holds no data.
type job struct {
	i    int64
	n    int // chunk length
	buf  []byte
	zero bool
	// fromBase: the chunk is unchanged since the base was read; base is
	// its ID there (zero for a chunk of zeros).
	fromBase bool
	base     repo.ID
	// ranges are the parts of the chunk (at off) read into buf; unread
	// says the hash and save stage reads them itself, so that reading is
	// spread over the workers instead of waiting for one reader
	// goroutine to be scheduled (see readInWorkers).
	ranges []extent.Range
	off    int64
	unread bool
	// now, when prior is set, are the ranges of the chunk the data map
	// gives: ranges adds those the Prior read map gives.
	now   []extent.Range
	prior bool
	// id is the chunk's ID when settlePrior computed it already.
	id     repo.ID
	hashed bool
}

// result is what the hash and save stage did with one chunk.
type result struct {
	i      int64
	id     repo.ID // zero for a zero chunk
	n      int
	kind   int // chunkZero, chunkNew, chunkReused
	coded  int
	sealed int
	// off and ranges are the chunk's offset and what of it was stored
	// as read (Source.Record).
	off    int64
	ranges []extent.Range
}

const (
	chunkZero = iota
	chunkNew
	chunkReused
	chunkUnchanged // taken from the base without reading
)

// output is what the stages produced: the chunk list and its tallies.
type output struct {
	lists  []repo.ID
	chunks int64
	size   int64
	read   int64
	stats  repo.DiskStats
}

func newPipeline(r Repository, src Source, opts Options, prog *Progress) *pipeline {
	p := &pipeline{r: r, src: src, opts: opts, cs: r.Config().ChunkSize, workers: opts.Workers, prog: prog, prior: src.Prior}
	if src.Size < 0 {
		p.prior = nil
	}
	if p.workers <= 0 {
		// Two per CPU: a worker spends most of its time in libzstd
		// (cgo), in reads and waiting for a pack to be written, none of
		// which needs the Go scheduler; with one per CPU a core sat idle
		// a sixth of the time (docs/BENCHMARKS.md, issue 16, third part).
		p.workers = 2 * runtime.GOMAXPROCS(0)
	}
	// Two buffers per worker keep every worker busy while the reader
	// fills the next; two more absorb the order stage's waits.
	nbuf := p.workers*2 + 2
	if src.Readers > 1 {
		nbuf += src.Readers // each reader holds one while it reads
	}
	p.free = make(chan []byte, nbuf)
	for range nbuf {
		p.free <- make([]byte, p.cs)
	}
	return p
}

// run runs the stages and checks that they covered the whole source.
func (p *pipeline) run(ctx context.Context, s store) (*output, error) {
	jobs := make(chan job, p.workers)
	results := make(chan result, p.workers*2)
	out := &output{}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(jobs)
		return p.read(gctx, jobs)
	})
	var wg sync.WaitGroup
	for range p.workers {
		wg.Add(1)
		g.Go(func() error {
			defer wg.Done()
			return p.hashAndSave(gctx, s, jobs, results)
		})
	}
	go func() { wg.Wait(); close(results) }()
	g.Go(func() error {
		lw := s.NewChunkListWriter()
		err := order(gctx, results, func(res result) error {
			out.chunks++
			out.size += int64(res.n)
			p.tally(&out.stats, res)
			if p.src.Record != nil && p.src.Size >= 0 {
				if err := p.src.Record(res.off, int64(res.n), res.ranges); err != nil {
					return err
				}
			}
			return lw.Append(gctx, res.id)
		})
		if err != nil {
			return err
		}
		out.lists, err = lw.Close(gctx)
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if p.src.Size >= 0 && out.size != p.src.Size {
		return nil, fmt.Errorf("read %d bytes of %s, expected %d (did the source shrink?)", out.size, p.src.Path, p.src.Size)
	}
	if want := (out.size + int64(p.cs) - 1) / int64(p.cs); want != out.chunks {
		return nil, fmt.Errorf("internal error: %d chunks for %d bytes", out.chunks, out.size)
	}
	out.read = p.readBytes.Load()
	out.stats.BytesRead = out.read
	return out, nil
}

// useBase checks the source's base and, when it may be used, opens its
// chunk list. A base that does not fit is an error of the caller's.
func (p *pipeline) useBase(w store) error {
	b := p.src.Base
	if b == nil {
		return nil
	}
	switch {
	case b.Snapshot == nil || b.Disk == nil || b.Changed == nil:
		return errors.New("internal error: incomplete base")
	case !w.MayBase(b.Snapshot):
		return fmt.Errorf("snapshot %s was signed by %s: only a snapshot of the owner or of this writer can be the base of an incremental read", b.Snapshot.ID.Short(), b.Snapshot.Signer)
	case b.Disk.Size != p.src.Size || b.Disk.ChunkSize != p.cs:
		return fmt.Errorf("disk %s of snapshot %s has %d bytes in chunks of %d, the source %d bytes in chunks of %d: it cannot be the base of an incremental read",
			b.Disk.Name, b.Snapshot.ID.Short(), b.Disk.Size, b.Disk.ChunkSize, p.src.Size, p.cs)
	}
	p.base, p.w = p.r.ChunkList(b.Disk), w
	return nil
}

// unchanged returns the base's ID of chunk i at off (n bytes) when the
// chunk did not change since the base was read and the repository holds
// it where this writer may reuse it; zero says the base's chunk was zeros.
func (p *pipeline) unchanged(ctx context.Context, i, off, n int64) (repo.ID, bool, error) {
	if p.base == nil {
		return repo.ID{}, false, nil
	}
	changed, err := p.src.Base.Changed.Data(off, n)
	if err != nil {
		return repo.ID{}, false, fmt.Errorf("changes of %s at offset %d: %w", p.src.Path, off, err)
	}
	if len(changed) > 0 {
		return repo.ID{}, false, nil
	}
	id, err := p.base.At(ctx, i)
	if err != nil {
		if ctx.Err() != nil {
			return repo.ID{}, false, ctx.Err()
		}
		// A damaged or missing chunk list must not stop every backup
		// to come (they would all pick the same base): the source
		// holds the data, so the rest is read from it.
		p.base = nil
		if p.opts.Warn != nil {
			p.opts.Warn(fmt.Sprintf("disk %s: the chunk list of base snapshot %s cannot be read (%v): the rest of the disk is read in full",
				p.src.Name, p.src.Base.Snapshot.ID.Short(), err))
		}
		return repo.ID{}, false, nil
	}
	if id.IsZero() || p.w.Reusable(id) {
		p.usedBase = true
		return id, true, nil
	}
	return repo.ID{}, false, nil
}

// read is the read stage: it walks the source in order and sends one job
// per chunk, read. A Concurrent source's chunks are read by the hash and
// save stage instead (the jobs carry the ranges to read).
func (p *pipeline) read(ctx context.Context, jobs chan<- job) error {
	if p.src.Size < 0 {
		return p.readStream(ctx, jobs, p.count)
	}
	if p.src.Readers > 1 {
		return p.readParallel(ctx, jobs, p.count)
	}
	return p.plan(ctx, func(t *readTask) error {
		if t.ranges != nil {
			if p.src.Concurrent {
				// Read by a worker (readInWorkers): one reader
				// goroutine feeding a worker per core ran only once
				// a worker blocked for want of a job, so a core sat
				// idle through every read.
				t.j.unread = true
				return send(ctx, jobs, t.j)
			}
			p.fill(t)
			if err := p.filled(t, p.count); err != nil {
				return err
			}
		}
		return send(ctx, jobs, t.j)
	})
}

// count adds n bytes read from the source.
func (p *pipeline) count(n int64) {
	p.readBytes.Add(n)
	p.prog.Read.Add(n)
}

// addPrior adds to t's ranges those the Prior read map gives for the
// chunk at off (n bytes). A read map that fails to read is dropped, with
// a warning: the rest of the disk is read as its data map says.
func (p *pipeline) addPrior(t *readTask, off, n int64) {
	if p.prior == nil {
		return
	}
	pr, err := p.prior.Data(off, n)
	if err != nil {
		p.prior = nil
		if p.opts.Warn != nil {
			p.opts.Warn(fmt.Sprintf("disk %s: the read map of the last backup cannot be read (%v): from offset %d on, free blocks read as zeros", p.src.Name, err, off))
		}
		return
	}
	if len(pr) == 0 {
		return
	}
	u := extent.Union(t.ranges, pr)
	if slices.Equal(u, t.ranges) {
		return
	}
	t.j.now, t.j.prior, t.ranges = t.ranges, true, u
}

// settlePrior decides what a chunk read with a Prior's ranges is stored
// as, and returns the ranges it holds: as read, when the repository holds
// it so (none of its used blocks changed since that backup: what was
// freed since still holds what it read), else as the data map alone
// says, the bytes of the Prior's ranges zeroed, which is what would be
// stored without a Prior. A chunk is never stored with data the data map
// does not name unless it is stored already.
func (p *pipeline) settlePrior(s store, j *job) []extent.Range {
	buf := j.buf[:j.n]
	if extent.IsZero(buf) {
		return j.ranges
	}
	id := p.r.ChunkID(buf)
	if s.Reusable(id) {
		j.id, j.hashed = id, true
		return j.ranges
	}
	clearOutside(buf, j.off, j.now)
	return j.now
}

// readInWorkers reads the ranges of a job that the read stage left to
// the hash and save stage; on error its buffer goes back to the pool.
func (p *pipeline) readInWorkers(j *job) error {
	t := &readTask{j: *j, off: j.off, ranges: j.ranges}
	p.fill(t)
	return p.filled(t, p.count)
}

// readTask is one chunk of the read stage: its job, and the ranges of it
// to read into the job's buffer (none for a chunk that is not read).
type readTask struct {
	j      job
	off    int64
	ranges []extent.Range
	got    int64
	err    error
	done   chan struct{} // closed once read, for readParallel
}

// plan walks the source in order and hands each chunk to do: taken from
// the base, zero, or to be read (with a buffer from the pool).
func (p *pipeline) plan(ctx context.Context, do func(*readTask) error) error {
	m := p.src.Map
	if m == nil {
		m = extent.Full{}
	}
	cs := int64(p.cs)
	for i, off := int64(0), int64(0); off < p.src.Size; i, off = i+1, off+cs {
		n := min(cs, p.src.Size-off)
		t := &readTask{j: job{i: i, n: int(n)}, off: off}
		id, ok, err := p.unchanged(ctx, i, off, n)
		switch {
		case err != nil:
			return err
		case ok:
			t.j.zero, t.j.base, t.j.fromBase = id.IsZero(), id, true
		default:
			if t.ranges, err = m.Data(off, n); err != nil {
				return fmt.Errorf("map of %s at offset %d: %w", p.src.Path, off, err)
			}
			p.addPrior(t, off, n)
			if len(t.ranges) == 0 {
				t.ranges, t.j.zero = nil, true
			} else if t.j.buf, err = p.buffer(ctx); err != nil {
				return err
			}
			t.j.ranges, t.j.off = t.ranges, off
		}
		if err := do(t); err != nil {
			return err
		}
	}
	return nil
}

// fill reads t's ranges into its buffer.
func (p *pipeline) fill(t *readTask) {
	t.got, t.err = extent.ReadRanges(p.src.At, t.j.buf[:t.j.n], t.off, t.ranges)
}

// filled counts what fill read and explains its error; on error the
// buffer goes back to the pool.
func (p *pipeline) filled(t *readTask, count func(int64)) error {
	count(t.got)
	if t.err == nil {
		return nil
	}
	p.free <- t.j.buf
	if errors.Is(t.err, io.EOF) {
		return fmt.Errorf("read %s at offset %d: source ended early (did it shrink?)", p.src.Path, t.off)
	}
	return fmt.Errorf("read %s at offset %d: %w", p.src.Path, t.off, t.err)
}

// readParallel is the read stage with Readers chunks read at once: plan
// hands the chunks to read to the readers, and every chunk, in order, to
// a queue that passes each on once it is read. The queue's length bounds
// how far plan may go ahead of the oldest chunk not yet read.
func (p *pipeline) readParallel(ctx context.Context, jobs chan<- job, count func(int64)) error {
	g, ctx := errgroup.WithContext(ctx)
	work := make(chan *readTask)
	queue := make(chan *readTask, 2*p.src.Readers)
	ready := make(chan struct{})
	close(ready)
	g.Go(func() error {
		defer close(queue)
		defer close(work)
		return p.plan(ctx, func(t *readTask) error {
			t.done = ready
			if t.ranges != nil {
				t.done = make(chan struct{})
			}
			if err := send(ctx, queue, t); err != nil || t.ranges == nil {
				return err
			}
			return send(ctx, work, t)
		})
	})
	for range p.src.Readers {
		g.Go(func() error {
			for t := range work {
				p.fill(t)
				close(t.done)
			}
			return nil
		})
	}
	g.Go(func() error {
		for t := range queue {
			select {
			case <-t.done:
			case <-ctx.Done():
				return ctx.Err()
			}
			if t.ranges != nil {
				if err := p.filled(t, count); err != nil {
					return err
				}
			}
			if err := send(ctx, jobs, t.j); err != nil {
				return err
			}
		}
		return nil
	})
	return g.Wait()
}

// readStream reads a stream of unknown length to its end.
func (p *pipeline) readStream(ctx context.Context, jobs chan<- job, count func(int64)) error {
	for i := int64(0); ; i++ {
		buf, err := p.buffer(ctx)
		if err != nil {
			return err
		}
		n, err := io.ReadFull(p.src.Stream, buf)
		count(int64(n))
		if n > 0 {
			if err := send(ctx, jobs, job{i: i, n: n, buf: buf}); err != nil {
				return err
			}
		} else {
			p.free <- buf
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s at offset %d: %w", p.src.Path, i*int64(p.cs), err)
		}
	}
}

// buffer takes a chunk buffer from the pool, waiting for one.
func (p *pipeline) buffer(ctx context.Context) ([]byte, error) {
	select {
	case b := <-p.free:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func send[T any](ctx context.Context, ch chan<- T, v T) error {
	select {
	case ch <- v:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// hashAndSave is the hash and save stage: it tells zero chunks apart,
// names the others by their keyed hash and stores those the repository
// does not hold.
func (p *pipeline) hashAndSave(ctx context.Context, s store, jobs <-chan job, results chan<- result) error {
	zeros := make([]byte, p.cs)
	for j := range jobs {
		if j.unread {
			if err := p.readInWorkers(&j); err != nil {
				return err
			}
		}
		res := result{i: j.i, n: j.n, kind: chunkZero, off: j.off, ranges: j.ranges}
		if j.prior && !j.zero {
			res.ranges = p.settlePrior(s, &j)
		}
		switch {
		case j.fromBase && !j.base.IsZero():
			res.id, res.kind = j.base, chunkUnchanged
		case j.fromBase:
		case !j.zero && !bytes.Equal(j.buf[:j.n], zeros[:j.n]):
			res.id = j.id
			if !j.hashed {
				res.id = p.r.ChunkID(j.buf[:j.n])
			}
			sr, err := s.SaveBlob(ctx, repo.DataBlob, res.id, j.buf[:j.n])
			if err != nil {
				return fmt.Errorf("store chunk at offset %d: %w", j.i*int64(p.cs), err)
			}
			res.kind = chunkReused
			if sr.New {
				res.kind, res.coded, res.sealed = chunkNew, sr.Coded, sr.Sealed
			}
		}
		if j.buf != nil {
			p.free <- j.buf
		}
		if err := send(ctx, results, res); err != nil {
			return err
		}
	}
	return nil
}

// order is the order stage: results arrive in any order, fn gets them in
// disk order.
func order(ctx context.Context, results <-chan result, fn func(result) error) error {
	pending := map[int64]result{}
	next := int64(0)
	for res := range results {
		pending[res.i] = res
		for {
			r, ok := pending[next]
			if !ok {
				break
			}
			delete(pending, next)
			next++
			if err := fn(r); err != nil {
				return err
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(pending) != 0 {
		return errors.New("internal error: chunk results missing")
	}
	return nil
}

// tally counts one chunk, in disk order, in the disk's statistics and
// the progress the caller reads.
func (p *pipeline) tally(st *repo.DiskStats, res result) {
	n := int64(res.n)
	switch res.kind {
	case chunkZero:
		st.ChunksZero++
		p.prog.Zero.Add(n)
	case chunkNew:
		st.ChunksNew++
		st.BytesNew += n
		st.BytesNewCoded += int64(res.coded)
		st.BytesStored += int64(res.sealed)
		p.prog.New.Add(n)
		p.prog.Stored.Add(int64(res.sealed))
	case chunkReused:
		st.ChunksReused++
		p.prog.Reused.Add(n)
	case chunkUnchanged:
		st.ChunksUnchanged++
		st.BytesUnchanged += n
		p.prog.Reused.Add(n)
	}
	p.prog.Done.Add(n)
}
