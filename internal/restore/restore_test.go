package restore_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/backup/backuptest"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
	"github.com/sauve-backup/sauve/internal/restore"
)

const chunk = repo.MinChunkSize

// diskData makes n chunks of test disk and a tail of tail bytes: random
// chunks, zero chunks, compressible ones and repeats, from seed.
func diskData(seed uint64, n, tail int) []byte {
	rng := mrand.New(mrand.NewPCG(seed, 2))
	data := make([]byte, n*chunk+tail)
	for i := 0; i*chunk < len(data); i++ {
		c := data[i*chunk : min((i+1)*chunk, len(data))]
		switch k := rng.IntN(10); {
		case k < 3: // zero
		case k < 4 && i > 0:
			j := rng.IntN(i)
			copy(c, data[j*chunk:(j+1)*chunk])
		case k < 7:
			for b := range c {
				c[b] = byte(i*3 + b/100)
			}
		default:
			for b := range c {
				c[b] = byte(rng.Uint32())
			}
		}
	}
	return data
}

func isZero(b []byte) bool { return bytes.Equal(b, make([]byte, len(b))) }

// zeroChunks counts the chunks of data that are all zeros.
func zeroChunks(data []byte) (zero, other int64) {
	for off := 0; off < len(data); off += chunk {
		if isZero(data[off:min(off+chunk, len(data))]) {
			zero++
		} else {
			other++
		}
	}
	return zero, other
}

func backupDisk(t testing.TB, tr *repotest.Repo, data []byte, m extent.Map) *repo.Disk {
	t.Helper()
	return backuptest.Disk(t, tr, data, m, backup.Options{})
}

// memTarget is a restore target in memory that records what is done to
// it.
type memTarget struct {
	mu     sync.Mutex
	b      []byte
	writes []extent.Range
	zeros  []extent.Range
	reads  atomic.Int64
}

func (m *memTarget) grow(end int64) {
	if end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
}

func (m *memTarget) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(off + int64(len(p)))
	copy(m.b[off:], p)
	m.writes = append(m.writes, extent.Range{Start: off, End: off + int64(len(p))})
	return len(p), nil
}

func (m *memTarget) ReadAt(p []byte, off int64) (int, error) {
	m.reads.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.NewReader(m.b).ReadAt(p, off)
}

func (m *memTarget) Zero(off, n int64, _ []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(off + n)
	clear(m.b[off : off+n])
	m.zeros = append(m.zeros, extent.Range{Start: off, End: off + n})
	return nil
}

// bytes returns the target's content, cut to size as a restore's caller
// cuts a file.
func (m *memTarget) bytes(size int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(int64(size))
	return bytes.Clone(m.b[:size])
}

// spy is the repository as restore sees it, recording the runs fetched.
type spy struct {
	*repo.Repository
	mu   sync.Mutex
	runs []fetchedRun
}

type fetchedRun struct {
	chunks []repo.RunChunk
	want   []bool
}

func (s *spy) FetchRun(ctx context.Context, f repo.RunFetch, plains [][]byte) (int64, error) {
	s.mu.Lock()
	s.runs = append(s.runs, fetchedRun{chunks: f.Chunks, want: f.Want})
	s.mu.Unlock()
	return s.Repository.FetchRun(ctx, f, plains)
}

// fetched returns the disk offsets of the chunks fetched, in order.
func (s *spy) fetched() map[int64]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int64]bool{}
	for _, r := range s.runs {
		for k, c := range r.chunks {
			if r.want == nil || r.want[k] {
				out[c.Off] = true
			}
		}
	}
	return out
}

func TestToTarget(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(1, 300, 777)
	d := backupDisk(t, tr, data, nil)
	zero, other := zeroChunks(data)
	for _, fresh := range []bool{true, false} {
		t.Run(fmt.Sprintf("fresh=%v", fresh), func(t *testing.T) {
			tgt := &memTarget{}
			if !fresh { // an old disk, of other bytes, larger
				tgt.b = bytes.Repeat([]byte{0x5a}, len(data)+chunk)
			}
			res, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Fresh: fresh, Workers: 3})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(tgt.bytes(len(data)), data) {
				t.Fatal("restored bytes differ")
			}
			if res.ChunksZero != zero || res.ChunksWritten != other || res.Size != int64(len(data)) || res.BytesFetched == 0 {
				t.Errorf("result %+v; want %d zero chunks, %d written", res, zero, other)
			}
			if fresh && len(tgt.zeros) > 0 {
				t.Errorf("a fresh target was zeroed %d times", len(tgt.zeros))
			}
			if !fresh && len(tgt.zeros) == 0 {
				t.Error("zero chunks of an old target not zeroed")
			}
		})
	}
}

// TestEachInOrder: Each hands the disk over in order, every byte once,
// zeros as nil, however many workers fetch; ToStream writes it whole.
func TestEachInOrder(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(2, 500, 100)
	d := backupDisk(t, tr, data, nil)
	for _, workers := range []int{1, 2, 8} {
		next := int64(0)
		_, err := restore.Each(context.Background(), tr.Repository, d, restore.Options{Workers: workers}, func(off, n int64, b []byte) error {
			if off != next || n <= 0 {
				return fmt.Errorf("got %d bytes at %d, expected offset %d", n, off, next)
			}
			want := data[off : off+n]
			if (b == nil && !isZero(want)) || (b != nil && !bytes.Equal(b, want)) {
				return fmt.Errorf("wrong bytes at %d (nil: %v)", off, b == nil)
			}
			next += n
			return nil
		})
		if err != nil {
			t.Fatalf("%d workers: %v", workers, err)
		}
		if next != int64(len(data)) {
			t.Fatalf("%d workers: Each stopped at %d of %d", workers, next, len(data))
		}
		var out bytes.Buffer
		if _, err := restore.ToStream(context.Background(), tr.Repository, d, &out, restore.Options{Workers: workers}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("%d workers: the stream differs", workers)
		}
	}
}

// TestEachStopsOnError: an error from the callback ends Each with it.
func TestEachStopsOnError(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(3, 200, 0)
	d := backupDisk(t, tr, data, nil)
	stop := errors.New("enough")
	calls := 0
	_, err := restore.Each(context.Background(), tr.Repository, d, restore.Options{}, func(off, n int64, b []byte) error {
		if calls++; calls == 10 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || calls != 10 {
		t.Fatalf("Each = %v after %d calls", err, calls)
	}
}

// restoreAll runs the three ways to restore, each on its own.
var restoreAll = map[string]func(ctx context.Context, r restore.Repository, d *repo.Disk) error{
	"ToTarget": func(ctx context.Context, r restore.Repository, d *repo.Disk) error {
		_, err := restore.ToTarget(ctx, r, d, &memTarget{}, restore.Options{Fresh: true})
		return err
	},
	"ToStream": func(ctx context.Context, r restore.Repository, d *repo.Disk) error {
		_, err := restore.ToStream(ctx, r, d, io.Discard, restore.Options{})
		return err
	},
	"Each": func(ctx context.Context, r restore.Repository, d *repo.Disk) error {
		_, err := restore.Each(ctx, r, d, restore.Options{}, func(int64, int64, []byte) error { return nil })
		return err
	},
}

// TestCancel: cancelled mid-run, every restore returns promptly with the
// context's error and leaves no goroutine behind.
func TestCancel(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(4, 2000, 0)
	d := backupDisk(t, tr, data, nil)
	for name, run := range restoreAll {
		t.Run(name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			loads := tr.CountLoads(func(op string, h backend.Handle) error {
				time.Sleep(100 * time.Microsecond)
				return nil
			})
			go func() {
				for loads.Load() < 20 {
					time.Sleep(100 * time.Microsecond)
				}
				cancel()
			}()
			start := time.Now()
			err := run(ctx, tr.Repository, d)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled restore returned %v", err)
			}
			if took := time.Since(start); took > 2*time.Second {
				t.Fatalf("cancelled restore took %v", took)
			}
			if n := loads.Load(); n > 100 {
				t.Errorf("%d pack reads after cancelling at 20", n)
			}
			tr.Backend.Fail = nil
			repotest.WaitGoroutines(t, before)
		})
	}
}

// TestFailingBackend: pack reads that fail (from the sixth on: the
// chunk list and a few runs are read) fail the restore, with an error
// naming the disk and the offset.
func TestFailingBackend(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(5, 300, 0)
	d := backupDisk(t, tr, data, nil)
	boom := errors.New("connection reset")
	for name, run := range restoreAll {
		t.Run(name, func(t *testing.T) {
			n := 0
			var mu sync.Mutex
			tr.Backend.Fail = func(op string, h backend.Handle) error {
				mu.Lock()
				defer mu.Unlock()
				if op == "load" && h.Type == backend.PackFile {
					if n++; n > 5 {
						return boom
					}
				}
				return nil
			}
			defer func() { tr.Backend.Fail = nil }()
			err := run(context.Background(), tr.Repository, d)
			if !errors.Is(err, boom) || !strings.Contains(err.Error(), "disk vda at offset ") {
				t.Fatalf("restore over a failing backend: %v", err)
			}
		})
	}
}

// TestDamagedCopy: a copy that fails to verify is replaced by another
// copy (and a warning); without another copy the restore fails, naming
// the offset.
func TestDamagedCopy(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(6, 100, 0)
	d := backupDisk(t, tr, data, nil)
	healed, lost := firstData(data, 10), firstData(data, 60)
	tr.Duplicate(t, chunkID(tr, data, healed))
	for _, off := range []int64{healed, lost} {
		loc := tr.BestCopy(t, d, chunkID(tr, data, off))
		tr.Backend.Damage(repotest.PackHandle(loc.Pack), int64(loc.Offset)+10)
	}
	var warns atomic.Int32
	warn := func(string, ...any) { warns.Add(1) }
	_, err := restore.ToTarget(context.Background(), tr.Repository, d, &memTarget{}, restore.Options{Fresh: true, Warn: warn})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("offset %d", lost)) {
		t.Fatalf("restore of a chunk without a good copy: %v", err)
	}
	// The lost chunk's copy restored, the other one is read from its
	// second copy.
	loc := tr.BestCopy(t, d, chunkID(tr, data, lost))
	tr.Backend.Damage(repotest.PackHandle(loc.Pack), int64(loc.Offset)+10)
	warns.Store(0)
	tgt := &memTarget{}
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Fresh: true, Warn: warn}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.bytes(len(data)), data) {
		t.Fatal("restored bytes differ")
	}
	if warns.Load() == 0 {
		t.Error("no warning of the damaged copy")
	}
}

// TestTruncatedPack: a pack cut short (a short read, or a listing that
// shows it too short) costs the chunks in its lost part; a second copy
// elsewhere saves them.
func TestTruncatedPack(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(7, 100, 0)
	d := backupDisk(t, tr, data, nil)
	// A chunk in a pack that does not hold the chunk list too (a
	// truncated list would fail the restore before any chunk).
	listPack := tr.Index().Copies(d.ChunkLists[0], repo.NoWriter)[0].Pack
	off := firstData(data, 50)
	loc := tr.BestCopy(t, d, chunkID(tr, data, off))
	for loc.Pack == listPack {
		off = firstData(data, int(off/chunk)+1)
		loc = tr.BestCopy(t, d, chunkID(tr, data, off))
	}
	pack := repotest.PackHandle(loc.Pack)
	whole, _ := tr.Backend.Get(pack)
	tr.Backend.Truncate(pack, int64(loc.Offset)+int64(loc.Length)/2)
	// Read while the index still takes the pack for whole: short reads.
	_, err := restore.ToTarget(context.Background(), tr.Repository, d, &memTarget{}, restore.Options{Fresh: true})
	if err == nil || !strings.Contains(err.Error(), "disk vda at offset ") {
		t.Fatalf("restore from a truncated pack: %v", err)
	}
	// Loaded again, the listing shows it too short.
	tr.Reopen(t)
	_, err = restore.ToTarget(context.Background(), tr.Repository, d, &memTarget{}, restore.Options{Fresh: true})
	if err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("restore from a pack listed too short: %v", err)
	}
	// With the chunks of the lost part stored again elsewhere, it
	// restores.
	tr.Backend.Put(pack, whole)
	tr.Reopen(t)
	var lost []int64
	for o := int64(0); o < int64(len(data)); o += chunk {
		if l, err := tr.Repository.BestCopy(chunkID(tr, data, o), d.Writer()); err == nil && l.Pack == loc.Pack && l.Offset+l.Length > loc.Offset+loc.Length/2 {
			lost = append(lost, o)
		}
	}
	for _, o := range lost {
		tr.Duplicate(t, chunkID(tr, data, o))
	}
	tr.Backend.Truncate(pack, int64(loc.Offset)+int64(loc.Length)/2)
	tgt := &memTarget{}
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Fresh: true}); err != nil {
		t.Fatalf("restore with second copies: %v", err)
	}
	if !bytes.Equal(tgt.bytes(len(data)), data) {
		t.Fatal("restored bytes differ")
	}
}

// TestRunCaps: runs are what one ranged read fetches, within the caps,
// however the packs are laid out: few large runs from large packs (the
// sealed or the plaintext cap binding), many small ones from small packs.
func TestRunCaps(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(8, 8))
	random := make([]byte, 12<<20)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := bytes.Repeat([]byte("a compressible sentence, over and over. "), 12<<20/40)
	for off := 0; off+8 <= len(text); off += chunk {
		binary.LittleEndian.PutUint64(text[off:], uint64(off)) // no two chunks alike
	}
	cases := []struct {
		name     string
		pack     int
		data     []byte
		min, max int // runs
	}{
		// 3072 chunks of 4125 sealed bytes: 1016 a run.
		{"sealed cap", 32 << 20, random, 4, 4},
		// Compressed, 1024 chunks (4 MiB) a run.
		{"plaintext cap", 32 << 20, text, 3, 3},
		// Packs of 16 chunks: at least a run per pack.
		{"small packs", 0, random[:2<<20], 2 << 20 / (16 * chunk), 512},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{PackSize: tc.pack})
			d := backuptest.InOrder(t, tr, tc.data)
			s := &spy{Repository: tr.Repository}
			tgt := &memTarget{}
			if _, err := restore.ToTarget(context.Background(), s, d, tgt, restore.Options{Fresh: true}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(tgt.bytes(len(tc.data)), tc.data) {
				t.Fatal("restored bytes differ")
			}
			for _, r := range s.runs {
				checkRun(t, r.chunks)
			}
			if n := len(s.runs); n < tc.min || n > tc.max {
				t.Errorf("%d runs, want %d to %d", n, tc.min, tc.max)
			}
			// One write per run.
			if len(tgt.writes) != len(s.runs) {
				t.Errorf("%d writes for %d runs", len(tgt.writes), len(s.runs))
			}
		})
	}
}

func checkRun(t *testing.T, run []repo.RunChunk) {
	t.Helper()
	var sealed, plain int64
	for k, c := range run {
		sealed += int64(c.Loc.Length)
		plain += int64(c.N)
		if k > 0 {
			p := run[k-1]
			if c.Loc.Pack != p.Loc.Pack || c.Loc.Offset != p.Loc.Offset+p.Loc.Length || c.Off != p.Off+int64(p.N) {
				t.Fatalf("chunk %d of a run does not follow the one before it", k)
			}
		}
	}
	if len(run) > 1 && (sealed > repo.MaxRunSealed || plain > repo.MaxRunPlain) {
		t.Fatalf("run of %d chunks: %d sealed bytes, %d plain", len(run), sealed, plain)
	}
}

// TestDelta: a delta restore reads the target, fetches and writes only
// the chunks that differ, and zeroes only zero chunks that are not zero.
func TestDelta(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(9, 400, 300)
	d := backupDisk(t, tr, data, nil)
	old := bytes.Clone(data)
	var changed, dirtied []int64
	rng := mrand.New(mrand.NewPCG(9, 1))
	for off := int64(0); off < int64(len(data)); off += chunk {
		end := min(off+chunk, int64(len(data)))
		switch zero := isZero(data[off:end]); {
		case rng.IntN(10) != 0:
		case zero: // a zero chunk the target holds data in
			old[off+5] = 1
			dirtied = append(dirtied, off)
		default: // a chunk that changed, one way or another
			if rng.IntN(2) == 0 {
				clear(old[off:end])
			} else {
				old[end-1] ^= 0xff
			}
			changed = append(changed, off)
		}
	}
	if len(changed) < 5 || len(dirtied) < 5 {
		t.Fatalf("test data: %d changed, %d dirtied", len(changed), len(dirtied))
	}
	tgt := &memTarget{b: bytes.Clone(old)}
	s := &spy{Repository: tr.Repository}
	res, err := restore.ToTarget(context.Background(), s, d, tgt, restore.Options{Delta: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.bytes(len(data)), data) {
		t.Fatal("delta restore: bytes differ")
	}
	_, other := zeroChunks(data)
	if res.ChunksWritten != int64(len(changed)) || res.ChunksSame != other-int64(len(changed)) {
		t.Errorf("result %+v; %d chunks changed of %d", res, len(changed), other)
	}
	if got := s.fetched(); fmt.Sprint(sorted(got)) != fmt.Sprint(changed) {
		t.Errorf("fetched chunks at %v, changed at %v", sorted(got), changed)
	}
	if fmt.Sprint(starts(tgt.writes)) != fmt.Sprint(changed) {
		t.Errorf("wrote at %v, changed at %v", starts(tgt.writes), changed)
	}
	if zeroed := starts(tgt.zeros); fmt.Sprint(zeroed) != fmt.Sprint(dirtied) {
		t.Errorf("zeroed %v, dirtied %v", zeroed, dirtied)
	}
	var zeroedBytes, dirtiedBytes int64
	for _, z := range tgt.zeros {
		zeroedBytes += z.Len()
	}
	for _, o := range dirtied {
		dirtiedBytes += min(chunk, int64(len(data))-o)
	}
	if zeroedBytes != dirtiedBytes {
		t.Errorf("zeroed %d bytes for %d dirtied", zeroedBytes, dirtiedBytes)
	}
	// Once more: nothing differs, nothing is written.
	tgt.writes, tgt.zeros = nil, nil
	res, err = restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Delta: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.BytesWritten != 0 || len(tgt.writes)+len(tgt.zeros) != 0 || res.BytesFetched != 0 {
		t.Errorf("a second delta restore did something: %+v", res)
	}
}

// TestDeltaShortTarget: a target shorter than the disk is completed.
func TestDeltaShortTarget(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(10, 100, 0)
	d := backupDisk(t, tr, data, nil)
	tgt := &memTarget{b: bytes.Clone(data[:len(data)/2+100])}
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Delta: true}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.bytes(len(data)), data) {
		t.Fatal("bytes differ")
	}
}

// TestSkippedChunks: chunks the backup's map left out (free space) are
// zero chunks: not stored, restored as zeros.
func TestSkippedChunks(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(11, 64, 0)
	for i := range data {
		data[i] |= 1 // no zero chunk of its own
	}
	m := mapOf{{Start: 0, End: 10 * chunk}, {Start: 20*chunk + 100, End: 30 * chunk}, {Start: 60 * chunk, End: 64 * chunk}}
	d := backupDisk(t, tr, data, m)
	want := make([]byte, len(data))
	for _, r := range m {
		copy(want[r.Start:r.End], data[r.Start:r.End])
	}
	tgt := &memTarget{b: bytes.Repeat([]byte{7}, len(data))}
	res, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.bytes(len(data)), want) {
		t.Fatal("bytes differ")
	}
	if zero, _ := zeroChunks(want); res.ChunksZero != zero || zero != 64-10-10-4 {
		t.Errorf("%d zero chunks restored, %d skipped", res.ChunksZero, zero)
	}
}

// TestWriteOnlyKey: a key that cannot open chunk data is refused before
// anything is written.
func TestWriteOnlyKey(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(12, 20, 0)
	d := backupDisk(t, tr, data, nil)
	r := tr.Open(t, tr.WriteOnly(t, "web1"))
	tgt := &memTarget{}
	_, err := restore.ToTarget(context.Background(), r, d, tgt, restore.Options{})
	if !errors.Is(err, crypto.ErrWriteOnly) || len(tgt.writes)+len(tgt.zeros) != 0 {
		t.Fatalf("restore with a write-only key: %v, %d writes", err, len(tgt.writes))
	}
}

type mapOf []extent.Range

func (m mapOf) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	for _, r := range m {
		if s, e := max(r.Start, off), min(r.End, off+n); s < e {
			out = append(out, extent.Range{Start: s, End: e})
		}
	}
	return out, nil
}

func firstData(data []byte, from int) int64 {
	for off := int64(from) * chunk; off < int64(len(data)); off += chunk {
		if !isZero(data[off : off+chunk]) {
			return off
		}
	}
	panic("no data chunk")
}

func chunkID(tr *repotest.Repo, data []byte, off int64) repo.ID {
	return tr.ChunkID(data[off:min(off+chunk, int64(len(data)))])
}

func sorted(m map[int64]bool) []int64 { return slices.Sorted(maps.Keys(m)) }

// starts returns the offsets of the chunks that ranges cover, in order.
func starts(rs []extent.Range) []int64 {
	var out []int64
	for _, r := range rs {
		for o := r.Start; o < r.End; o += chunk {
			out = append(out, o)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// TestOnlyWindows restores parts of a disk: a partition alone, shifted
// to 0 (whole, onto a fresh target, then delta), and scattered ranges in
// place; chunks outside are not fetched, bytes outside not touched.
func TestOnlyWindows(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(4, 200, 500)
	d := backupDisk(t, tr, data, nil)
	part := extent.Range{Start: 3*chunk + 1000, End: 9*chunk - 77}
	s := &spy{Repository: tr.Repository}
	tgt := &memTarget{}
	prog := new(restore.Progress)
	opts := restore.Options{Only: []extent.Range{part}, Shift: part.Start, Fresh: true, Progress: prog}
	if _, err := restore.ToTarget(context.Background(), s, d, tgt, opts); err != nil {
		t.Fatal(err)
	}
	if got := tgt.bytes(int(part.Len())); !bytes.Equal(got, data[part.Start:part.End]) || len(tgt.b) > int(part.Len()) {
		t.Fatalf("partition restore: %d bytes, content equal %v", len(tgt.b), bytes.Equal(got, data[part.Start:part.End]))
	}
	for off := range s.fetched() {
		if off+chunk <= part.Start || off >= part.End {
			t.Errorf("fetched the chunk at %d, outside %v", off, part)
		}
	}
	if prog.Total.Load() != part.Len() || prog.Done.Load() != part.Len() {
		t.Errorf("progress %d of %d, want %d", prog.Done.Load(), prog.Total.Load(), part.Len())
	}
	// Delta onto the partition with one byte changed: one chunk written,
	// within the partition's bounds.
	tgt.b[chunk] ^= 1
	tgt.writes = nil
	opts.Fresh, opts.Delta = false, true
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, opts); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.bytes(int(part.Len())), data[part.Start:part.End]) || len(tgt.writes) != 1 {
		t.Fatalf("delta partition restore: %d writes %v", len(tgt.writes), tgt.writes)
	}
	// Two ranges in place onto a disk of other bytes: only they change.
	only := []extent.Range{{Start: 0, End: 512}, {Start: int64(len(data)) - 3*chunk - 5, End: int64(len(data))}}
	tgt = &memTarget{b: bytes.Repeat([]byte{0x5a}, len(data))}
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, tgt, restore.Options{Only: only}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x5a}, len(data))
	for _, r := range only {
		copy(want[r.Start:r.End], data[r.Start:r.End])
	}
	if !bytes.Equal(tgt.bytes(len(data)), want) {
		t.Fatal("ranges restored in place: bytes outside them changed, or inside them differ")
	}
	bad := restore.Options{Only: []extent.Range{{Start: 10, End: 5}}}
	if _, err := restore.ToTarget(context.Background(), tr.Repository, d, &memTarget{}, bad); err == nil {
		t.Error("an empty range was taken")
	}
}
