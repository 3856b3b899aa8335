// Package migrate copies a disk onto another by passes, as a migration
// of a running machine does: the first pass copies every used block of
// the source onto the target, and each later pass reads and hashes the
// source again and writes only the chunks whose hash changed since the
// previous pass, known from a local state file (State), so that the
// target is never read back (it may be remote, slow, or a VM image).
//
// Chunks are hashed with BLAKE3-256: a chunk is skipped only when its
// hash equals the one recorded after its last durable write, and a
// collision, which would silently leave a stale chunk on the target,
// must be out of reach whatever the data. Writes are batched: the batch's
// chunks are marked unknown in the state, written, the target is synced,
// and only then are their new hashes recorded, so that a pass killed at
// any instant leaves a state that claims nothing the target may not hold.
// The package knows nothing of devices, mounts or freezing: the caller
// (internal/cli) opens the source and target and freezes what it must.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
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

// Source is what a pass reads: Size bytes at At, of which only the
// ranges Map gives hold data (nil: all of it); the rest reads as zeros.
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
	// BytesRead are the bytes read of the source (free space is not).
	BytesRead int64 `json:"bytes_read"`
	// ChunksUnread are the chunks not read because the source's
	// Changes said they had not changed.
	ChunksUnread int64 `json:"chunks_unread"`
	// BytesWritten are the bytes of data written to the target,
	// BytesZeroed those made zeros (holes punched, discards).
	BytesWritten int64 `json:"bytes_written"`
	BytesZeroed  int64 `json:"bytes_zeroed"`
	// BytesChanged is the size of the chunks found changed: the delta.
	BytesChanged  int64   `json:"bytes_changed"`
	ChunksChanged int64   `json:"chunks_changed"`
	Chunks        int64   `json:"chunks"`
	Seconds       float64 `json:"seconds"`
	// ReadSeconds is the time spent reading and hashing, WriteSeconds
	// the time spent writing and syncing.
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
	r := &runner{ctx: ctx, src: src, t: t, st: st, o: o, cs: cs,
		p:     Pass{Start: time.Now(), Chunks: int64(len(st.hashes))},
		zeros: map[int]Hash{}}
	r.free = make([][]byte, max(1, int(o.Batch/int64(cs))))
	for i := range r.free {
		r.free[i] = make([]byte, cs)
	}
	err := r.run()
	r.p.Seconds = time.Since(r.p.Start).Seconds()
	return r.p, err
}

type runner struct {
	ctx   context.Context
	src   Source
	t     Target
	st    *State
	o     Options
	cs    int
	p     Pass
	zeros map[int]Hash // hash of n zeros, by n
	free  [][]byte     // chunk buffers not holding a pending chunk
	batch []pending
}

func (r *runner) run() error {
	hasher := blake3.New()
	for i := int64(0); i < int64(len(r.st.hashes)); i++ {
		if err := r.ctx.Err(); err != nil {
			return err
		}
		n := chunkLen(i, r.cs, r.src.Size)
		same, err := r.unchanged(i, n)
		if err != nil {
			return err
		}
		if same {
			r.p.ChunksUnread++
			if r.o.Progress != nil {
				r.o.Progress.Done.Add(int64(n))
			}
			continue
		}
		if len(r.free) == 0 {
			if err := r.flush(); err != nil {
				return err
			}
		}
		buf := r.free[len(r.free)-1][:n]
		t0 := time.Now()
		zero, err := r.read(i, buf)
		if err != nil {
			return err
		}
		var h Hash
		if zero {
			h = r.zeroHash(n)
		} else {
			hasher.Reset()
			hasher.Write(buf)
			copy(h[:], hasher.Sum(nil))
		}
		r.p.ReadSeconds += time.Since(t0).Seconds()
		if r.o.Progress != nil {
			r.o.Progress.Done.Add(int64(n))
		}
		if h == r.st.hashes[i] {
			continue
		}
		pd := pending{idx: i, hash: h}
		if !zero {
			pd.data = buf
			r.free = r.free[:len(r.free)-1]
		}
		r.batch = append(r.batch, pd)
		r.p.ChunksChanged++
		r.p.BytesChanged += int64(n)
		if r.o.Progress != nil {
			r.o.Progress.Changed.Add(int64(n))
		}
		// Zero chunks hold no buffer: bound the batch all the same, so
		// that the state is brought up to date as the pass goes.
		if int64(len(r.batch))*int64(r.cs) >= r.o.Batch {
			if err := r.flush(); err != nil {
				return err
			}
		}
	}
	return r.flush()
}

// unchanged says whether chunk i, of n bytes, is known unchanged since
// the previous pass without reading it.
func (r *runner) unchanged(i int64, n int) (bool, error) {
	if r.src.Changes == nil || r.st.hashes[i] == (Hash{}) {
		return false, nil
	}
	off := i * int64(r.cs)
	rs, err := r.src.Changes.Data(off, int64(n))
	if err != nil {
		return false, fmt.Errorf("changes of the source at %d: %w", off, err)
	}
	return len(rs) == 0, nil
}

func (r *runner) zeroHash(n int) Hash {
	h, ok := r.zeros[n]
	if !ok {
		h = ZeroHash(n)
		r.zeros[n] = h
	}
	return h
}

// read reads chunk i into buf, free space as zeros, and says whether it
// is all zeros.
func (r *runner) read(i int64, buf []byte) (bool, error) {
	off := i * int64(r.cs)
	clear(buf)
	ranges := []extent.Range{{Start: off, End: off + int64(len(buf))}}
	if r.src.Map != nil {
		var err error
		if ranges, err = r.src.Map.Data(off, int64(len(buf))); err != nil {
			return false, fmt.Errorf("map of the source at %d: %w", off, err)
		}
	}
	for _, rg := range ranges {
		if rg.Start < off || rg.End > off+int64(len(buf)) || rg.Start > rg.End {
			return false, fmt.Errorf("map of the source gave %d-%d outside %d-%d", rg.Start, rg.End, off, off+int64(len(buf)))
		}
		if err := r.o.Limit.Wait(r.ctx, rg.Len()); err != nil {
			return false, err
		}
		p := buf[rg.Start-off : rg.End-off]
		if _, err := r.src.At.ReadAt(p, rg.Start); err != nil && !(errors.Is(err, io.EOF) && rg.End >= r.src.Size) {
			return false, fmt.Errorf("read source at %d: %w", rg.Start, err)
		}
		r.p.BytesRead += rg.Len()
	}
	return extent.IsZero(buf), nil
}

// flush writes the batch: its chunks marked unknown, written, the target
// synced, their hashes recorded.
func (r *runner) flush() error {
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
		if err := r.write(pd); err != nil {
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
			r.free = append(r.free, pd.data[:cap(pd.data)])
		}
	}
	r.batch = r.batch[:0]
	return nil
}

func (r *runner) write(pd pending) error {
	if err := r.ctx.Err(); err != nil {
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
		if err := r.o.Limit.Wait(r.ctx, int64(n)); err != nil {
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
