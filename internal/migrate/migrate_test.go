package migrate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/sauve-backup/sauve/internal/extent"
)

const cs = 64 << 10

// memMap is a source's data ranges, as a layout gives them.
type memMap []extent.Range

func (m memMap) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	for _, r := range m {
		s, e := max(r.Start, off), min(r.End, off+n)
		if s < e {
			out = append(out, extent.Range{Start: s, End: e})
		}
	}
	return out, nil
}

// memTarget keeps what is synced apart from what is only written, so
// that a crash (drop) loses the latter; it fails the test if read.
type memTarget struct {
	t          *testing.T
	durable    []byte
	volatile   map[int64][]byte // offset: data (nil for zeros), in order below
	order      []int64
	writes     []int64 // chunk indexes written or zeroed, in order
	zeroed     []int64
	failWrites int // fail this write, counting from 1 (0: never)
	failSync   bool
}

func newTarget(t *testing.T, size int64) *memTarget {
	return &memTarget{t: t, durable: make([]byte, size), volatile: map[int64][]byte{}}
}

func (m *memTarget) ReadAt([]byte, int64) (int, error) {
	m.t.Fatal("the target was read")
	return 0, nil
}

func (m *memTarget) WriteAt(p []byte, off int64) (int, error) {
	if m.failWrites > 0 && len(m.writes)+1 >= m.failWrites {
		return 0, errors.New("injected write failure")
	}
	m.volatile[off] = append([]byte(nil), p...)
	m.order = append(m.order, off)
	m.writes = append(m.writes, off/cs)
	return len(p), nil
}

func (m *memTarget) Zero(off, n int64) error {
	if m.failWrites > 0 && len(m.writes)+1 >= m.failWrites {
		return errors.New("injected write failure")
	}
	m.volatile[off] = make([]byte, n)
	m.order = append(m.order, off)
	m.writes = append(m.writes, off/cs)
	m.zeroed = append(m.zeroed, off/cs)
	return nil
}

func (m *memTarget) Sync() error {
	if m.failSync {
		return errors.New("injected sync failure")
	}
	for _, off := range m.order {
		copy(m.durable[off:], m.volatile[off])
	}
	m.volatile, m.order = map[int64][]byte{}, nil
	return nil
}

// crash loses what was not synced, except for a random part of it: a
// write may or may not have reached the disk.
func (m *memTarget) crash(rng *rand.Rand) {
	for _, off := range m.order {
		if rng.IntN(2) == 0 {
			copy(m.durable[off:], m.volatile[off])
		}
	}
	m.volatile, m.order, m.writes, m.zeroed = map[int64][]byte{}, nil, nil, nil
	m.failWrites, m.failSync = 0, false
}

// disk is a source disk with garbage in its free ranges.
type disk struct {
	data []byte
	free memMap // the complement is what the map gives
}

func newDisk(size int64, seed uint64) *disk {
	rng := rand.New(rand.NewPCG(seed, 1))
	d := &disk{data: make([]byte, size)}
	for i := range d.data {
		d.data[i] = byte(rng.Uint32())
	}
	return d
}

func (d *disk) source() Source {
	var m memMap
	pos := int64(0)
	for _, f := range d.free {
		if f.Start > pos {
			m = append(m, extent.Range{Start: pos, End: f.Start})
		}
		pos = f.End
	}
	if pos < int64(len(d.data)) {
		m = append(m, extent.Range{Start: pos, End: int64(len(d.data))})
	}
	return Source{At: bytes.NewReader(d.data), Size: int64(len(d.data)), Map: m}
}

// used says whether chunk i holds a used byte of the disk.
func (d *disk) used(i int64) bool {
	rs, _ := d.source().Map.Data(i*cs, cs)
	return len(rs) > 0
}

// validCopy fails unless the target is a valid copy of d: every chunk
// that holds a used byte equal to the source's in full (free bytes
// included), the free chunks anything.
func validCopy(t *testing.T, what string, got []byte, d *disk) {
	t.Helper()
	for i := int64(0); i*cs < int64(len(d.data)); i++ {
		end := min((i+1)*cs, int64(len(d.data)))
		if d.used(i) && !bytes.Equal(got[i*cs:end], d.data[i*cs:end]) {
			t.Fatalf("%s: target chunk %d, which holds used blocks, differs from the source's", what, i)
		}
	}
}

func newState(t *testing.T, size int64, fresh bool) *State {
	t.Helper()
	h := Header{ChunkSize: cs, Source: Identity{Path: "src", Size: size, Inode: 7}, Target: Identity{Path: "tgt", Size: size, Inode: 8}}
	var init func(int64) Hash
	if fresh {
		// A new target reads as zeros everywhere.
		init = func(i int64) Hash { return ZeroHash(chunkLen(i, cs, size)) }
	}
	st, err := Create(filepath.Join(t.TempDir(), "m.state"), h, init)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func reload(t *testing.T, st *State) *State {
	t.Helper()
	st.Close()
	s, err := Load(st.Path())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func run(t *testing.T, d *disk, tg *memTarget, st *State, o Options) Pass {
	t.Helper()
	p, err := Run(context.Background(), d.source(), tg, st, o)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The first pass writes every chunk holding a used block, in full,
// skips the zero chunks of a new target and does not read (nor write)
// its chunks holding no used block; a second pass over an unchanged
// source writes nothing.
func TestMigrateFirstPass(t *testing.T) {
	size := int64(8*cs + 1000) // a short last chunk
	d := newDisk(size, 1)
	clear(d.data[3*cs : 4*cs])                                                          // a zero chunk
	d.free = memMap{{Start: 5 * cs, End: 6 * cs}, {Start: 6*cs + 100, End: 7*cs - 100}} // a free chunk, a mostly free one
	tg := newTarget(t, size)
	st := newState(t, size, true)
	p := run(t, d, tg, st, Options{})
	validCopy(t, "first pass", tg.durable, d)
	if want := []int64{0, 1, 2, 4, 6, 7, 8}; !slices.Equal(tg.writes, want) {
		t.Errorf("first pass wrote chunks %v, want %v", tg.writes, want)
	}
	if !bytes.Equal(tg.durable[5*cs:6*cs], make([]byte, cs)) {
		t.Error("the free chunk of a new target was written")
	}
	if want := size - cs; p.BytesRead != want {
		t.Errorf("read %d bytes, want %d (the free chunk skipped, the mostly free one read in full)", p.BytesRead, want)
	}
	if p.BytesWritten != 6*cs+1000 || p.ChunksChanged != 7 || p.Chunks != 9 || p.ChunksFree != 1 {
		t.Errorf("first pass: %+v", p)
	}
	st = reload(t, st)
	tg.writes = nil
	p = run(t, d, tg, st, Options{})
	if len(tg.writes) != 0 || p.BytesChanged != 0 || p.BytesWritten != 0 {
		t.Errorf("unchanged source: wrote chunks %v (%+v)", tg.writes, p)
	}
}

// A delta pass writes exactly the chunks whose bytes changed: data
// changed, in a used chunk's free space too, a chunk become zeros
// (zeroed, not written). Not those where blocks were freed (their old
// bytes are still there), nor those become free altogether, which keep
// what the target had, changed or not, until they hold a used block
// again. An existing target's free chunks, unknown to the state, are
// zeroed at the first pass, as are its zero chunks.
func TestMigrateDeltaWritesOnlyChanged(t *testing.T) {
	size := int64(10 * cs)
	d := newDisk(size, 2)
	d.free = memMap{{Start: cs, End: 2 * cs}, {Start: 8*cs + 10, End: 8*cs + 500}}
	clear(d.data[9*cs:])
	tg := newTarget(t, size)
	for i := range tg.durable {
		tg.durable[i] = 0xee // an old disk's bytes
	}
	st := newState(t, size, false)
	p := run(t, d, tg, st, Options{Batch: 3 * cs})
	validCopy(t, "first pass", tg.durable, d)
	if !slices.Equal(tg.zeroed, []int64{1, 9}) || p.BytesRead != 9*cs || p.ChunksFree != 1 {
		t.Errorf("first pass zeroed %v, want [1 9]; %+v", tg.zeroed, p)
	}
	d.data[2*cs+77] ^= 1
	d.data[5*cs] ^= 0x80
	clear(d.data[6*cs : 7*cs])
	d.data[8*cs+20] ^= 1 // in a used chunk's free space
	d.data[7*cs+9] ^= 1  // in a chunk become free
	d.free = memMap{{Start: cs, End: 2 * cs}, {Start: 3 * cs, End: 3*cs + 4096}, {Start: 3*cs + 8192, End: 3*cs + 12288},
		{Start: 7 * cs, End: 8 * cs}, {Start: 8*cs + 10, End: 8*cs + 500}}
	old7 := append([]byte(nil), tg.durable[7*cs:8*cs]...)
	st = reload(t, st)
	tg.writes, tg.zeroed = nil, nil
	p = run(t, d, tg, st, Options{Batch: 3 * cs})
	validCopy(t, "delta pass", tg.durable, d)
	if want := []int64{2, 5, 6, 8}; !slices.Equal(tg.writes, want) {
		t.Errorf("delta pass wrote chunks %v, want %v", tg.writes, want)
	}
	if want := []int64{6}; !slices.Equal(tg.zeroed, want) {
		t.Errorf("delta pass zeroed chunks %v, want %v", tg.zeroed, want)
	}
	if p.ChunksChanged != 4 || p.BytesChanged != 4*cs || p.BytesWritten != 3*cs || p.BytesZeroed != cs || p.ChunksFree != 2 || p.BytesRead != 8*cs {
		t.Errorf("delta pass: %+v", p)
	}
	if !bytes.Equal(tg.durable[7*cs:8*cs], old7) {
		t.Error("the chunk become free was written")
	}
	// Used again: chunk 7 changed while free, so it is written now;
	// chunk 3's freed blocks used again with the same bytes are not.
	d.free = memMap{{Start: cs, End: 2 * cs}}
	st = reload(t, st)
	tg.writes, tg.zeroed = nil, nil
	run(t, d, tg, st, Options{Batch: 3 * cs})
	validCopy(t, "third pass", tg.durable, d)
	if want := []int64{7}; !slices.Equal(tg.writes, want) {
		t.Errorf("third pass wrote chunks %v, want %v", tg.writes, want)
	}
}

// checkClaims fails if the state claims a hash for a chunk that the
// target's durable bytes do not have.
func checkClaims(t *testing.T, st *State, durable []byte, what string) {
	t.Helper()
	for i, h := range st.Hashes() {
		if h == (Hash{}) {
			continue
		}
		c := durable[int64(i)*cs : min(int64(i+1)*cs, int64(len(durable)))]
		if got := Hash(blake3.Sum256(c)); got != h {
			t.Fatalf("%s: the state claims chunk %d, which the target does not hold", what, i)
		}
	}
}

// A pass killed at any write or at a sync, whose unsynced writes reach
// the target or not, leaves a state that claims no chunk the target
// does not hold; the next pass makes the target exact, also where the
// source went back to what the state held before the killed pass (a
// stale claim would skip that chunk).
func TestMigrateResumeAfterCrash(t *testing.T) {
	size := int64(12 * cs)
	for kill := 1; kill <= 12; kill++ {
		for _, atSync := range []bool{false, true} {
			t.Run(fmt.Sprintf("write%d-sync%v", kill, atSync), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(kill), 3))
				d := newDisk(size, 4)
				tg := newTarget(t, size)
				st := newState(t, size, true)
				run(t, d, tg, st, Options{Batch: 4 * cs})
				old := append([]byte(nil), d.data...)
				for i := range d.data {
					d.data[i] ^= 0x5a // every chunk changes
				}
				clear(d.data[7*cs : 8*cs])
				st = reload(t, st)
				tg.writes = nil
				if atSync {
					tg.failSync = true
				} else {
					tg.failWrites = kill
				}
				if _, err := Run(context.Background(), d.source(), tg, st, Options{Batch: 4 * cs, Hashers: 1 + kill%3}); err == nil {
					t.Fatal("the killed pass did not fail")
				}
				tg.crash(rng)
				st = reload(t, st)
				checkClaims(t, st, tg.durable, "after the crash")
				// The source goes back to its old bytes in half the chunks;
				// two chunks, which the killed pass may have torn, hold no
				// used block any more, and a third one's blocks are freed.
				for i := int64(0); i < 12; i += 2 {
					copy(d.data[i*cs:(i+1)*cs], old[i*cs:])
				}
				d.free = memMap{{Start: cs, End: 2 * cs}, {Start: 5 * cs, End: 6 * cs}, {Start: 10*cs + 100, End: 11*cs - 100}}
				run(t, d, tg, st, Options{Batch: 4 * cs, Hashers: 1 + kill%3})
				validCopy(t, "resumed pass", tg.durable, d)
				checkClaims(t, reload(t, st), tg.durable, "after the resumed pass")
			})
		}
	}
}

// A state file is refused when damaged, and used up to a torn last
// journal record; identities that differ say how.
func TestMigrateStateRefusals(t *testing.T) {
	size := int64(4 * cs)
	st := newState(t, size, true)
	if err := st.Set([]int64{1, 2}, []Hash{{1}, {2}}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	b0, _ := os.ReadFile(st.Path())
	j, _ := os.ReadFile(st.Path() + ".journal")
	os.WriteFile(st.Path()+".journal", j[:len(j)-5], 0o600) // the last record torn
	s, err := Load(st.Path())
	if err != nil {
		t.Fatal(err)
	}
	if s.Hashes()[1] != (Hash{1}) || s.Hashes()[2] != ZeroHash(cs) {
		t.Errorf("torn journal: chunks 1, 2 = %x, %x", s.Hashes()[1][:2], s.Hashes()[2][:2])
	}
	s.Close()
	if _, err := os.Stat(st.Path() + ".journal"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the journal was not folded into the state: %v", err)
	}
	os.WriteFile(st.Path(), b0, 0o600)
	j[journalHeader+3] ^= 1 // the first record damaged, a whole one after it
	os.WriteFile(st.Path()+".journal", j, 0o600)
	if _, err := Load(st.Path()); err == nil {
		t.Error("a journal damaged in its middle was used")
	}
	b0[30] ^= 1
	os.WriteFile(st.Path(), b0, 0o600)
	if _, err := Load(st.Path()); err == nil {
		t.Error("a damaged state file was used")
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none")); !errors.Is(err, ErrNoState) {
		t.Errorf("missing state: %v", err)
	}
	a := Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "x", FSUUIDs: []string{"u1"}}
	for _, c := range []struct {
		b    Identity
		want bool
	}{
		{a, false},
		{Identity{Path: "/dev/disk/by-id/x", Size: 100, Device: "8:0", DiskID: "x", FSUUIDs: []string{"u1"}}, false},
		{Identity{Path: "/dev/sda", Size: 101, Device: "8:0", DiskID: "x", FSUUIDs: []string{"u1"}}, true},
		{Identity{Path: "/dev/sda", Size: 100, Device: "8:16", DiskID: "x", FSUUIDs: []string{"u1"}}, true},
		{Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "y", FSUUIDs: []string{"u1"}}, true},
		{Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "x", FSUUIDs: []string{"u2"}}, true},
		{Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "x"}, true},
	} {
		if got := a.Mismatch(c.b) != ""; got != c.want {
			t.Errorf("%+v: mismatch %v, want %v (%q)", c.b, got, c.want, a.Mismatch(c.b))
		}
	}
	// A pass refuses a source of another size than the state's.
	d := newDisk(size+cs, 5)
	if _, err := Run(context.Background(), d.source(), newTarget(t, size+cs), reload(t, newState(t, size, true)), Options{}); err == nil {
		t.Error("a source of another size was migrated")
	}
}

// --until-delta: a source changing a little converges; one changing as
// much at every pass is found not to, after Stalls passes.
func TestMigrateConvergence(t *testing.T) {
	size := int64(32 * cs)
	for _, c := range []struct {
		name    string
		churn   func(pass int) int // chunks changed before the pass
		want    Verdict
		byPass  int
		maxPass int
	}{
		{"shrinking", func(p int) int { return 16 >> p }, Converged, 3, 10},
		{"faster than the copy", func(int) int { return 10 }, Diverging, 5, 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newDisk(size, 6)
			tg := newTarget(t, size)
			st := newState(t, size, true)
			conv := Convergence{Goal: 2 * cs}
			var v Verdict
			pass := 0
			for pass = 1; pass <= c.maxPass; pass++ {
				for k := 0; k < c.churn(pass) && pass > 1; k++ {
					d.data[int64(k)*cs] ^= 0xff
				}
				p := run(t, d, tg, st, Options{})
				if v = conv.Add(p.BytesChanged); v != Continue {
					break
				}
			}
			if v != c.want || pass != c.byPass {
				t.Fatalf("verdict %v at pass %d, want %v at pass %d", v, pass, c.want, c.byPass)
			}
			validCopy(t, "last pass", tg.durable, d)
		})
	}
	r := Estimate(time.Time{}, Pass{BytesRead: 100, Seconds: 1, ReadSeconds: 1})
	if r.CopyRate != 100 || r.ChangeRate != 0 || r.NextSeconds != 1 {
		t.Errorf("first pass rates %+v", r)
	}
}

// A limited pass takes the time its bytes need at the rate.
func TestMigrateLimitRate(t *testing.T) {
	size := int64(16 * cs) // 1 MiB read, 1 MiB written
	d := newDisk(size, 8)
	start := time.Now()
	run(t, d, newTarget(t, size), newState(t, size, true), Options{Limit: NewLimiter(4 << 20)})
	// 2 MiB at 4 MiB/s, less the quarter second of burst allowed.
	if took := time.Since(start); took < 200*time.Millisecond || took > 3*time.Second {
		t.Errorf("2 MiB at 4 MiB/s took %s", took)
	}
	if NewLimiter(0) != nil {
		t.Error("rate 0 limits")
	}
}

// With Changes, a pass reads only the chunks that may have changed and
// those the state does not know (torn by a crash), and the target is
// exact for every change Changes names.
func TestMigrateChangesSkipsUnread(t *testing.T) {
	size := int64(10 * cs)
	d := newDisk(size, 5)
	tg := newTarget(t, size)
	st := newState(t, size, true)
	run(t, d, tg, st, Options{})
	d.data[2*cs+5] ^= 1
	d.data[7*cs] ^= 1
	if err := st.Set([]int64{4}, []Hash{{}}); err != nil { // as a crash leaves it
		t.Fatal(err)
	}
	tg.writes = nil
	src := d.source()
	src.Changes = memMap{{Start: 2*cs + 5, End: 2*cs + 6}, {Start: 7 * cs, End: 7*cs + 1}}
	p, err := Run(context.Background(), src, tg, st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	validCopy(t, "pass with changes", tg.durable, d)
	if want := []int64{2, 4, 7}; !slices.Equal(tg.writes, want) {
		t.Errorf("wrote chunks %v, want %v", tg.writes, want)
	}
	if p.ChunksUnread != 7 || p.BytesRead != 3*cs {
		t.Errorf("read %d bytes, %d chunks unread; want %d, 7", p.BytesRead, p.ChunksUnread, 3*cs)
	}
	// A change outside Changes is not seen: Changes must be complete.
	d.data[9*cs] ^= 1
	src.Changes = memMap{}
	tg.writes = nil
	if _, err := Run(context.Background(), src, tg, st, Options{}); err != nil {
		t.Fatal(err)
	}
	if len(tg.writes) != 0 {
		t.Errorf("empty Changes: wrote chunks %v", tg.writes)
	}
}

// failingReader fails the read of one offset, and records a read after
// the pass returned.
type failingReader struct {
	t        *testing.T
	r        *bytes.Reader
	failAt   int64
	returned atomic.Bool
}

func (f *failingReader) ReadAt(p []byte, off int64) (int, error) {
	if f.returned.Load() {
		f.t.Error("the source was read after the pass returned")
	}
	if off == f.failAt {
		return 0, errors.New("injected read failure")
	}
	return f.r.ReadAt(p, off)
}

// A read failing, or the pass cancelled, ends the pass with an error,
// its reader and hashers stopped: the source is not read after Run
// returns, and the state claims nothing the target does not hold.
func TestMigrateStopsOnError(t *testing.T) {
	size := int64(40 * cs)
	d := newDisk(size, 9)
	for _, c := range []struct {
		name    string
		failAt  int64
		cancel  bool
		readers int
	}{{"read error", 17 * cs, false, 0}, {"cancelled", -1, true, 0}, {"read error/4 readers", 17 * cs, false, 4}, {"cancelled/4 readers", -1, true, 4}} {
		t.Run(c.name, func(t *testing.T) {
			tg := newTarget(t, size)
			st := newState(t, size, true)
			fr := &failingReader{t: t, r: bytes.NewReader(d.data), failAt: c.failAt}
			src := d.source()
			src.At, src.Readers = fr, c.readers
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			o := Options{Batch: 4 * cs}
			if c.cancel {
				o.Progress = new(Progress)
				go func() {
					for o.Progress.Done.Load() < 9*cs {
						time.Sleep(time.Millisecond)
					}
					cancel()
				}()
				o.Limit = NewLimiter(8 << 20) // slow enough to be cancelled midway
			}
			_, err := Run(ctx, src, tg, st, o)
			fr.returned.Store(true)
			if err == nil || !c.cancel && !strings.Contains(err.Error(), "injected read failure") || c.cancel && !errors.Is(err, context.Canceled) {
				t.Fatalf("pass: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
			tg.crash(rand.New(rand.NewPCG(1, 2)))
			checkClaims(t, reload(t, st), tg.durable, "after the failed pass")
		})
	}
}

// slowReader answers each read after a delay, as an NBD server over a
// link does, and records how many reads it served at once.
type slowReader struct {
	r         *bytes.Reader
	in, most  atomic.Int64
	readCount atomic.Int64
}

func (s *slowReader) ReadAt(p []byte, off int64) (int, error) {
	n := s.in.Add(1)
	defer s.in.Add(-1)
	for m := s.most.Load(); n > m && !s.most.CompareAndSwap(m, n); m = s.most.Load() {
	}
	s.readCount.Add(1)
	time.Sleep(2 * time.Millisecond)
	return s.r.ReadAt(p, off)
}

// With Readers, chunks are read several at once, and the pass does what
// a pass reading one at a time does: the same chunks written, in order,
// the same state.
func TestMigrateParallelReaders(t *testing.T) {
	size := int64(30*cs + 555)
	d := newDisk(size, 11)
	d.free = memMap{{Start: 4 * cs, End: 6 * cs}}
	var want []int64
	for _, readers := range []int{1, 4} {
		tg := newTarget(t, size)
		st := newState(t, size, true)
		sr := &slowReader{r: bytes.NewReader(d.data)}
		src := d.source()
		src.At, src.Readers = sr, readers
		p, err := Run(context.Background(), src, tg, st, Options{Batch: 5 * cs})
		if err != nil {
			t.Fatal(err)
		}
		validCopy(t, fmt.Sprintf("%d readers", readers), tg.durable, d)
		if readers == 1 {
			want = tg.writes
			if sr.most.Load() != 1 {
				t.Errorf("one reader: %d reads at once", sr.most.Load())
			}
		} else {
			if !slices.Equal(tg.writes, want) {
				t.Errorf("%d readers wrote chunks %v, one reader %v", readers, tg.writes, want)
			}
			if sr.most.Load() < 2 {
				t.Errorf("%d readers: never more than %d reads at once", readers, sr.most.Load())
			}
		}
		if p.BytesRead != size-2*cs || sr.readCount.Load() != 29 {
			t.Errorf("%d readers: read %d bytes in %d reads, want %d in 29", readers, p.BytesRead, sr.readCount.Load(), size-2*cs)
		}
		st = reload(t, st)
		tg.writes = nil
		if p, err = Run(context.Background(), src, tg, st, Options{}); err != nil || len(tg.writes) != 0 || p.BytesChanged != 0 {
			t.Errorf("%d readers, unchanged source: wrote %v (%v)", readers, tg.writes, err)
		}
	}
}

// NewTargetHashes gives each chunk the hash of its length of zeros, the
// last one short or whole.
func TestNewTargetHashes(t *testing.T) {
	for _, size := range []int64{1, cs - 1, cs, cs + 1, 5 * cs, 5*cs + 4096} {
		h := NewTargetHashes(size, cs)
		for i := int64(0); i*cs < size; i++ {
			if got, want := h(i), ZeroHash(chunkLen(i, cs, size)); got != want {
				t.Errorf("size %d, chunk %d: not the hash of its %d zeros", size, i, chunkLen(i, cs, size))
			}
		}
	}
}
