// Package migrate copies a disk onto another by passes, as a migration
// of a running machine does: the first pass copies every chunk of the
// source that holds a used block onto the target, and each later pass
// reads and hashes those chunks again and writes only the ones whose
// hash changed since the previous pass, known from a local state file
// (State), so that the target is never read back (it may be remote,
// slow, or a VM image).
//
// The target is a valid copy when every used block of the source is
// equal on it; free blocks may hold anything. A chunk holding any used
// block is read in full, its free blocks as they are on the source:
// blocks freed since the last pass still hold their old bytes there, so
// the chunk hashes as before and is not written again (reading free
// space as zeros would make every chunk where a file was deleted or
// shrunk a change). A chunk holding no used block is not read: when the
// state knows what the target holds there, it is left as it is (free
// space); when it does not (an existing target's old bytes, a write torn
// by a crash), it is zeroed so that the state knows it from then on.
//
// Chunks are hashed with BLAKE3-256: a chunk is skipped only when its
// hash equals the one recorded after its last durable write, and a
// collision, which would silently leave a stale chunk on the target,
// must be out of reach whatever the data. Writes are batched: the batch's
// chunks are marked unknown in the state, written, the target is synced,
// and only then are their new hashes recorded, so that a pass killed at
// any instant leaves a state that claims nothing the target may not hold.
//
// A pass reads the source in order in one goroutine (or, for a source
// that serves several reads at once, Source.Readers at a time) and
// hashes the chunks read in a few others, while the batch is written:
// reading, hashing and writing overlap, and the state is updated in
// chunk order.
// The package knows nothing of devices, mounts or freezing: the caller
// (internal/cli) opens the source and target and freezes what it must.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/blake3"

	"github.com/sauve-backup/sauve/internal/extent"
)

// DefaultChunkSize is the unit of change tracking.
const DefaultChunkSize = 1 << 20

// DefaultBatch is how many bytes of changed chunks are written between
// two syncs of the target and the state.
const DefaultBatch = 64 << 20

// Source is what a pass reads: Size bytes at At, of which the ranges Map
// gives hold the used blocks (nil: all of it). At is read by one
// goroutine at a time, in order.
//
// Changes, when set, gives the ranges that may have changed since the
// previous pass (a QEMU dirty bitmap, the chunks of two snapshots that
// differ): a chunk with nothing in Changes is not read and keeps its
// hash, unless the state does not know it (a write a crash may have
// torn), which is read again. Nil: every chunk may have changed.
type Source struct {
	At      io.ReaderAt
	Size    int64
	Map     extent.Map
	Changes extent.Map
	// Readers, when above 1, is how many chunks are read from At at
	// once (At is then safe for concurrent use): a source whose reads
	// wait on a round trip (NBD, a repository) serves several better
	// than one. 0 or 1: one read at a time, in order, which a disk or a
	// file read ahead by the kernel serves best.
	Readers int
}

// Target is what a pass writes. It is never read.
type Target interface {
	WriteAt(p []byte, off int64) (int, error)
	// Zero makes [off, off+n) read as zeros (a hole, a discard).
	Zero(off, n int64) error
	// Sync makes every write and zeroing done so far durable.
	Sync() error
}

// Options say how a pass runs.
type Options struct {
	// Batch is how many bytes of changed chunks are written between two
	// syncs (DefaultBatch when 0).
	Batch int64
	// Limit, when set, throttles reads and writes.
	Limit *Limiter
	// Progress, when set, is updated as the pass goes.
	Progress *Progress
	// Hashers is how many goroutines hash the chunks read (0: one per
	// CPU, at most 4).
	Hashers int
}

// Progress is a pass's progress, updated atomically.
type Progress struct {
	Done    atomic.Int64 // bytes of the source gone through
	Changed atomic.Int64 // bytes of chunks found changed
	Written atomic.Int64 // bytes written or zeroed on the target
}

// Pass is what one pass did.
type Pass struct {
	Number int       `json:"pass"`
	Start  time.Time `json:"start"`
	// BytesRead are the bytes read of the source: the chunks holding a
	// used block, in full.
	BytesRead int64 `json:"bytes_read"`
	// ChunksUnread are the chunks not read because the source's
	// Changes said they had not changed.
	ChunksUnread int64 `json:"chunks_unread"`
	// ChunksFree are the chunks holding no used block, not read (and
	// zeroed when the state did not know them).
	ChunksFree int64 `json:"chunks_free"`
	// BytesWritten are the bytes of data written to the target,
	// BytesZeroed those made zeros (holes punched, discards).
	BytesWritten int64 `json:"bytes_written"`
	BytesZeroed  int64 `json:"bytes_zeroed"`
	// BytesChanged is the size of the chunks found changed: the delta.
	BytesChanged  int64   `json:"bytes_changed"`
	ChunksChanged int64   `json:"chunks_changed"`
	Chunks        int64   `json:"chunks"`
	Seconds       float64 `json:"seconds"`
	// ReadSeconds is the time the pass was not writing (reading and
	// hashing), WriteSeconds the time spent writing and syncing.
	ReadSeconds  float64 `json:"read_seconds"`
	WriteSeconds float64 `json:"write_seconds"`
}

// ZeroHash returns the hash of n zero bytes: what a chunk of a new,
// all-holes target holds.
func ZeroHash(n int) Hash {
	h := blake3.New()
	var z [4096]byte
	for n > 0 {
		k := min(n, len(z))
		h.Write(z[:k])
		n -= k
	}
	var out Hash
	copy(out[:], h.Sum(nil))
	return out
}

// NewTargetHashes returns the hash of each chunk of cs bytes of a new,
// all-holes target of size bytes, for Create: the hashes of zeros, of a
// whole chunk and of the last one, computed once (hashing every chunk's
// zeros would cost a full read's CPU).
func NewTargetHashes(size int64, cs int) func(int64) Hash {
	full := ZeroHash(cs)
	last := ZeroHash(chunkLen((size+int64(cs)-1)/int64(cs)-1, cs, size))
	n := (size + int64(cs) - 1) / int64(cs)
	return func(i int64) Hash {
		if i == n-1 {
			return last
		}
		return full
	}
}

// chunkLen is the length of chunk i of a source of size bytes.
func chunkLen(i int64, cs int, size int64) int {
	return int(min(int64(cs), size-i*int64(cs)))
}

// pending is a changed chunk waiting for its batch's write.
type pending struct {
	idx  int64
	hash Hash
	data []byte // nil: zeros
}

// What the reader found a chunk to be.
type chunkKind int

const (
	chunkRead      chunkKind = iota // read (and hashed)
	chunkUnchanged                  // not in Changes, known: not read
	chunkFree                       // no used block, known: left as it is
	chunkFreeZero                   // no used block, unknown: to be zeroed
)

// chunk is one chunk as the reader and a hasher left it.
type chunk struct {
	idx  int64
	n    int
	kind chunkKind
	buf  []byte // chunkRead: the chunk's bytes
	hash Hash
	zero bool // chunkRead: all zeros (buf is given back at once)
	err  error
	done chan struct{} // chunkRead: closed once hashed
}

// pipelineDepth is how many chunks the reader may be ahead of the
// writer, besides the batch's.
const pipelineDepth = 8

// Run runs one pass of src onto t with st, the state of the previous
// passes, and returns what it did. On error the target and st are as a
// kill at that instant would leave them: the next pass makes them exact.
func Run(ctx context.Context, src Source, t Target, st *State, o Options) (Pass, error) {
	cs := st.Header.ChunkSize
	if src.Size != st.Header.Source.Size {
		return Pass{}, fmt.Errorf("source holds %d bytes, the state %d", src.Size, st.Header.Source.Size)
	}
	if o.Batch <= 0 {
		o.Batch = DefaultBatch
	}
	if o.Hashers <= 0 {
		o.Hashers = min(4, runtime.GOMAXPROCS(0))
	}
	r := &runner{src: src, t: t, st: st, o: o, cs: cs,
		p:        Pass{Start: time.Now(), Chunks: int64(len(st.hashes))},
		batchMax: int((o.Batch + int64(cs) - 1) / int64(cs)),
		zeroFull: ZeroHash(cs),
		zeroLast: ZeroHash(chunkLen(int64(len(st.hashes))-1, cs, src.Size)),
	}
	r.batchMax = max(1, r.batchMax)
	err := r.run(ctx)
	r.p.Seconds = time.Since(r.p.Start).Seconds()
	r.p.ReadSeconds = max(0, r.p.Seconds-r.p.WriteSeconds)
	return r.p, err
}

type runner struct {
	src      Source
	t        Target
	st       *State
	o        Options
	cs       int
	p        Pass
	batchMax int         // chunks of a batch
	zeroFull Hash        // hash of a whole chunk of zeros
	zeroLast Hash        // hash of the last chunk's zeros
	free     chan []byte // chunk buffers not in use
	batch    []pending
}

func (r *runner) zeroHash(i int64) Hash {
	if i == int64(len(r.st.hashes))-1 {
		return r.zeroLast
	}
	return r.zeroFull
}

// run starts the reader and the hashers, and writes what they find
// changed in chunk order. The reader and the hashers have stopped when
// it returns.
func (r *runner) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	r.free = make(chan []byte, r.batchMax+pipelineDepth+r.src.Readers)
	for range cap(r.free) {
		r.free <- make([]byte, r.cs)
	}
	chunks := make(chan *chunk, pipelineDepth+r.src.Readers)
	toHash := make(chan *chunk, pipelineDepth)
	workers := max(r.o.Hashers, r.src.Readers)
	wg.Add(1 + workers)
	go func() {
		defer wg.Done()
		defer close(chunks)
		defer close(toHash)
		r.read(ctx, chunks, toHash)
	}()
	for range workers {
		go func() {
			defer wg.Done()
			r.hash(ctx, toHash)
		}()
	}
	for c := range chunks {
		if c.done != nil {
			<-c.done
		}
		if c.err != nil {
			return c.err
		}
		if err := r.take(ctx, c); err != nil {
			return err
		}
	}
	// The reader stops early only when ctx ends.
	if err := ctx.Err(); err != nil {
		return err
	}
	return r.flush(ctx)
}

// hash hashes the chunks read until toHash is closed; with several
// Readers it reads them first.
func (r *runner) hash(ctx context.Context, toHash <-chan *chunk) {
	h := blake3.New()
	for c := range toHash {
		if r.src.Readers > 1 {
			if c.err = r.readChunk(ctx, c.idx, c.buf); c.err != nil {
				close(c.done)
				continue
			}
		}
		if c.zero = extent.IsZero(c.buf); !c.zero {
			h.Reset()
			h.Write(c.buf)
			copy(c.hash[:], h.Sum(nil))
		}
		close(c.done)
	}
}

// read goes through the chunks in order, reads those that must be, and
// hands them to the hashers and, in order, to the writer; it stops at
// the first error (sent as a chunk) or when ctx ends.
func (r *runner) read(ctx context.Context, chunks, toHash chan<- *chunk) {
	send := func(ch chan<- *chunk, c *chunk) bool {
		select {
		case ch <- c:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for i := int64(0); i < int64(len(r.st.hashes)); i++ {
		if ctx.Err() != nil {
			return
		}
		c := &chunk{idx: i, n: chunkLen(i, r.cs, r.src.Size)}
		c.kind, c.err = r.classify(i, c.n)
		if c.err == nil && c.kind == chunkRead {
			select {
			case c.buf = <-r.free:
			case <-ctx.Done():
				return
			}
			c.buf = c.buf[:c.n]
			if r.src.Readers <= 1 {
				c.err = r.readChunk(ctx, i, c.buf)
			}
			if c.err == nil {
				c.done = make(chan struct{})
				if !send(toHash, c) {
					return
				}
			}
		}
		// c.err is the hasher's once c is sent to it: a read error
		// there reaches the writer, which stops the pass.
		failed := c.done == nil && c.err != nil
		if !send(chunks, c) || failed {
			return
		}
	}
}

// classify says what chunk i, of n bytes, is to the pass. It reads the
// state's hash of a chunk not yet taken by the writer, which only
// changes the hashes of chunks it has taken.
func (r *runner) classify(i int64, n int) (chunkKind, error) {
	off := i * int64(r.cs)
	known := r.st.hashes[i] != (Hash{})
	if r.src.Changes != nil && known {
		rs, err := r.src.Changes.Data(off, int64(n))
		if err != nil {
			return 0, fmt.Errorf("changes of the source at %d: %w", off, err)
		}
		if len(rs) == 0 {
			return chunkUnchanged, nil
		}
	}
	if r.src.Map == nil {
		return chunkRead, nil
	}
	rs, err := r.src.Map.Data(off, int64(n))
	if err != nil {
		return 0, fmt.Errorf("map of the source at %d: %w", off, err)
	}
	for _, rg := range rs {
		if rg.Start < off || rg.End > off+int64(n) || rg.Start >= rg.End {
			return 0, fmt.Errorf("map of the source gave %d-%d outside %d-%d", rg.Start, rg.End, off, off+int64(n))
		}
	}
	switch {
	case len(rs) > 0:
		return chunkRead, nil
	case known:
		return chunkFree, nil
	}
	return chunkFreeZero, nil
}

// readChunk reads chunk i in full into buf.
func (r *runner) readChunk(ctx context.Context, i int64, buf []byte) error {
	off := i * int64(r.cs)
	if err := r.o.Limit.Wait(ctx, int64(len(buf))); err != nil {
		return err
	}
	n, err := r.src.At.ReadAt(buf, off)
	if err != nil && !(errors.Is(err, io.EOF) && off+int64(len(buf)) >= r.src.Size) {
		return fmt.Errorf("read source at %d: %w", off+int64(n), err)
	}
	clear(buf[n:]) // past the end of a source that shrank: zeros
	return nil
}

// take is the writer's part of chunk c: counted, and batched when it
// changed.
func (r *runner) take(ctx context.Context, c *chunk) error {
	if r.o.Progress != nil {
		r.o.Progress.Done.Add(int64(c.n))
	}
	pd := pending{idx: c.idx}
	switch c.kind {
	case chunkUnchanged:
		r.p.ChunksUnread++
		return nil
	case chunkFree:
		r.p.ChunksFree++
		return nil
	case chunkFreeZero:
		r.p.ChunksFree++
		pd.hash = r.zeroHash(c.idx)
	case chunkRead:
		r.p.BytesRead += int64(c.n)
		pd.hash = c.hash
		if c.zero {
			pd.hash = r.zeroHash(c.idx)
		}
		if pd.hash == r.st.hashes[c.idx] || c.zero {
			r.free <- c.buf[:cap(c.buf)]
		} else {
			pd.data = c.buf
		}
		if pd.hash == r.st.hashes[c.idx] {
			return nil
		}
	}
	r.batch = append(r.batch, pd)
	r.p.ChunksChanged++
	r.p.BytesChanged += int64(c.n)
	if r.o.Progress != nil {
		r.o.Progress.Changed.Add(int64(c.n))
	}
	// Zero chunks hold no buffer: the batch is bounded all the same, so
	// that the state is brought up to date as the pass goes.
	if len(r.batch) >= r.batchMax {
		return r.flush(ctx)
	}
	return nil
}

// flush writes the batch: its chunks marked unknown, written, the target
// synced, their hashes recorded.
func (r *runner) flush(ctx context.Context) error {
	if len(r.batch) == 0 {
		return nil
	}
	t0 := time.Now()
	defer func() { r.p.WriteSeconds += time.Since(t0).Seconds() }()
	idx := make([]int64, len(r.batch))
	unknown := make([]Hash, len(r.batch))
	hashes := make([]Hash, len(r.batch))
	for k, pd := range r.batch {
		idx[k], hashes[k] = pd.idx, pd.hash
	}
	if err := r.st.Set(idx, unknown); err != nil {
		return err
	}
	for _, pd := range r.batch {
		if err := r.write(ctx, pd); err != nil {
			return err
		}
	}
	if err := r.t.Sync(); err != nil {
		return fmt.Errorf("sync target: %w", err)
	}
	if err := r.st.Set(idx, hashes); err != nil {
		return err
	}
	for _, pd := range r.batch {
		if pd.data != nil {
			r.free <- pd.data[:cap(pd.data)]
		}
	}
	r.batch = r.batch[:0]
	return nil
}

func (r *runner) write(ctx context.Context, pd pending) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	off := pd.idx * int64(r.cs)
	n := chunkLen(pd.idx, r.cs, r.src.Size)
	if pd.data == nil {
		if err := r.t.Zero(off, int64(n)); err != nil {
			return fmt.Errorf("zero target at %d: %w", off, err)
		}
		r.p.BytesZeroed += int64(n)
	} else {
		if err := r.o.Limit.Wait(ctx, int64(n)); err != nil {
			return err
		}
		if _, err := r.t.WriteAt(pd.data[:n], off); err != nil {
			return fmt.Errorf("write target at %d: %w", off, err)
		}
		r.p.BytesWritten += int64(n)
	}
	if r.o.Progress != nil {
		r.o.Progress.Written.Add(int64(n))
	}
	return nil
}
