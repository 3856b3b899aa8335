package repo_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/backup/backuptest"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// diskData makes n chunks of test disk, and a tail of tail bytes: a mix
// of random chunks, zero chunks, compressible ones and repeats of earlier
// ones, from seed.
func diskData(seed uint64, n, tail int) []byte {
	rng := mrand.New(mrand.NewPCG(seed, 1))
	cs := chunk
	data := make([]byte, n*cs+tail)
	for i := 0; i*cs < len(data); i++ {
		c := data[i*cs : min((i+1)*cs, len(data))]
		switch k := rng.IntN(10); {
		case k < 3: // zero
		case k < 5 && i > 0: // a repeat
			j := rng.IntN(i)
			copy(c, data[j*cs:(j+1)*cs])
		case k < 7: // compressible
			for b := range c {
				c[b] = byte(i + b/64)
			}
		default:
			for b := range c {
				c[b] = byte(rng.Uint32())
			}
		}
	}
	return data
}

// backupDisk backs data up and returns the disk as a reader loads it.
func backupDisk(t testing.TB, tr *repotest.Repo, data []byte, m extent.Map) *repo.Disk {
	t.Helper()
	return backuptest.Disk(t, tr, data, m, backup.Options{})
}

func newReader(t testing.TB, tr *repotest.Repo, d *repo.Disk, opts repo.ReaderOptions) *repo.DiskReader {
	t.Helper()
	dr, err := tr.NewDiskReader(context.Background(), d, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dr.Close() })
	return dr
}

// checkRead compares a read of dr with the same read of want.
func checkRead(t *testing.T, dr io.ReaderAt, want []byte, off int64, n int) {
	t.Helper()
	got := bytes.Repeat([]byte{0xa5}, n)
	exp := make([]byte, n)
	gn, gerr := dr.ReadAt(got, off)
	en, eerr := bytes.NewReader(want).ReadAt(exp, off)
	if gn != en || (gerr == nil) != (eerr == nil) || (eerr != nil && !errors.Is(gerr, eerr)) {
		t.Fatalf("ReadAt(%d bytes at %d) = %d, %v; want %d, %v", n, off, gn, gerr, en, eerr)
	}
	if !bytes.Equal(got[:gn], exp[:en]) {
		t.Fatalf("ReadAt(%d bytes at %d): wrong bytes", n, off)
	}
}

func TestDiskReaderReadAt(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(1, 40, 1000)
	d := backupDisk(t, tr, data, nil)
	dr := newReader(t, tr, d, repo.ReaderOptions{})
	size := int64(len(data))
	cases := []struct {
		name string
		off  int64
		n    int
	}{
		{"first byte", 0, 1},
		{"first chunk", 0, chunk},
		{"within a chunk", 100, 200},
		{"across a chunk boundary", chunk - 10, 20},
		{"across several chunks", chunk/2 + 3, 5 * chunk},
		{"the whole disk", 0, len(data)},
		{"up to the end exactly", size - 1500, 1500},
		{"the short last chunk", 40 * chunk, 1000},
		{"past the end", size - 10, 100},
		{"at the end", size, 10},
		{"beyond the end", size + chunk, 10},
		{"empty", 5, 0},
		{"empty at the end", size, 0},
		{"larger than a window", 3, 2*repo.MaxRunPlain + 77},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { checkRead(t, dr, data, tc.off, tc.n) })
	}
	if _, err := dr.ReadAt(make([]byte, 1), -1); err == nil {
		t.Error("a negative offset reads")
	}
}

// TestDiskReaderRandom: random reads, random sizes, any cache size,
// read the source's bytes with io.ReaderAt's semantics.
func TestDiskReaderRandom(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(2, 97, 123)
	d := backupDisk(t, tr, data, nil)
	rng := mrand.New(mrand.NewPCG(3, 4))
	for _, cache := range []int64{1, 6 * chunk, 0} {
		dr := newReader(t, tr, d, repo.ReaderOptions{CacheSize: cache})
		for range 400 {
			off := rng.Int64N(int64(len(data)) + 2*chunk)
			n := rng.IntN(3 * chunk)
			if rng.IntN(8) == 0 {
				n = rng.IntN(40 * chunk)
			}
			checkRead(t, dr, data, off, n)
		}
	}
}

// TestDiskReaderConcurrent: many goroutines reading at random places, at
// once, through a small cache (run it with -race).
func TestDiskReaderConcurrent(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(5, 200, 0)
	d := backupDisk(t, tr, data, nil)
	dr := newReader(t, tr, d, repo.ReaderOptions{CacheSize: 16 * chunk})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(g), 9))
			buf := make([]byte, 3*chunk)
			for range 150 {
				off := rng.Int64N(int64(len(data)))
				n := 1 + rng.IntN(len(buf))
				if g%4 == 0 { // some read in order, to start read-ahead
					off = int64(g) * 10 * chunk
				}
				k, err := dr.ReadAt(buf[:n], off)
				want := data[off:min(off+int64(n), int64(len(data)))]
				if k != len(want) || (k < n) != errors.Is(err, io.EOF) || !bytes.Equal(buf[:k], want) {
					errs <- fmt.Errorf("ReadAt(%d at %d) = %d, %v", n, off, k, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := dr.Stats(); st.PeakCached > 16*chunk {
		t.Errorf("cache held %d bytes, limit %d", st.PeakCached, 16*chunk)
	}
}

// TestDiskReaderFetchesOnce: readers that want one chunk at once fetch
// it once.
func TestDiskReaderFetchesOnce(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(6, 20, 0)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	d := backupDisk(t, tr, data, nil)
	dr := newReader(t, tr, d, repo.ReaderOptions{ReadAhead: -1})
	checkRead(t, dr, data, 0, 1) // the chunk list, loaded
	loads := tr.CountLoads(func(string, backend.Handle) error {
		time.Sleep(20 * time.Millisecond) // readers pile up on the fetch
		return nil
	})
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			checkRead(t, dr, data, 5*chunk+10, 100)
		}()
	}
	close(start)
	wg.Wait()
	if n := loads.Load(); n != 1 {
		t.Fatalf("12 readers of one chunk made %d pack reads, want 1", n)
	}
}

// TestDiskReaderFetchesInParallel: readers of chunks in different packs
// fetch at the same time (no lock held around fetches): each pack read
// waits until another is under way, and would time out alone.
func TestDiskReaderFetchesInParallel(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(7, 64, 0)
	d := backupDisk(t, tr, data, nil)
	a, b := int64(-1), int64(-1)
	for i := int64(0); i < d.Chunks() && b < 0; i++ {
		id := tr.ChunkID(data[i*chunk : (i+1)*chunk])
		if bytes.Equal(data[i*chunk:(i+1)*chunk], make([]byte, chunk)) {
			continue
		}
		loc := tr.BestCopy(t, d, id)
		switch {
		case a < 0:
			a = i
		case loc.Pack != tr.BestCopy(t, d, tr.ChunkID(data[a*chunk:(a+1)*chunk])).Pack:
			b = i
		}
	}
	if b < 0 {
		t.Fatal("test data: no two chunks in different packs")
	}
	dr := newReader(t, tr, d, repo.ReaderOptions{ReadAhead: -1})
	if _, err := dr.Data(0, 1); err != nil { // the chunk list, loaded
		t.Fatal(err)
	}
	var inflight atomic.Int32
	both := make(chan struct{})
	var once sync.Once
	tr.CountLoads(func(op string, h backend.Handle) error {
		if op != "load" || h.Type != backend.PackFile {
			return nil
		}
		if inflight.Add(1) == 2 {
			once.Do(func() { close(both) })
		}
		select {
		case <-both:
			return nil
		case <-time.After(5 * time.Second):
			return errors.New("fetches are serialized: no other fetch started")
		}
	})
	var wg sync.WaitGroup
	for _, i := range []int64{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			checkRead(t, dr, data, i*chunk, chunk)
		}()
	}
	wg.Wait()
}

// TestDiskReaderReadEach: the pieces cover the range in order, hold the
// disk's bytes, and nil pieces are zeros.
func TestDiskReaderReadEach(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(14, 80, 333)
	d := backupDisk(t, tr, data, nil)
	dr := newReader(t, tr, d, repo.ReaderOptions{})
	rng := mrand.New(mrand.NewPCG(14, 14))
	for range 300 {
		off := rng.Int64N(int64(len(data)))
		n := rng.Int64N(int64(len(data)) - off + 1)
		pos := off
		err := dr.ReadEach(off, n, func(at, k int64, b []byte) error {
			want := data[at : at+k]
			switch {
			case at != pos || k <= 0:
				return fmt.Errorf("piece of %d at %d, expected offset %d", k, at, pos)
			case b == nil && !bytes.Equal(want, make([]byte, k)), b != nil && !bytes.Equal(b, want):
				return fmt.Errorf("wrong piece of %d at %d (nil %v)", k, at, b == nil)
			}
			pos += k
			return nil
		})
		if err != nil || pos != off+n {
			t.Fatalf("ReadEach(%d, %d): %v, stopped at %d", off, n, err, pos)
		}
	}
	if err := dr.ReadEach(int64(len(data))-10, 11, func(int64, int64, []byte) error { return nil }); err == nil {
		t.Error("ReadEach past the end of the disk")
	}
}

// TestDiskReaderDropBehind: a sequential pass does not fill the cache
// with what it read (only read-ahead is held); random reads do.
func TestDiskReaderDropBehind(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(15, 300, 0)
	d := backupDisk(t, tr, data, nil)
	limit := int64(64 * (chunk + repo.DecodeSlack))
	dr := newReader(t, tr, d, repo.ReaderOptions{CacheSize: limit, ReadAhead: 8 * chunk})
	for off := int64(0); off < int64(len(data)); off += chunk / 2 {
		checkRead(t, dr, data, off, chunk/2)
	}
	if st := dr.Stats(); st.Cached > 2*(chunk+repo.DecodeSlack) || st.PeakCached > 24*(chunk+repo.DecodeSlack) {
		t.Errorf("after a pass in order the cache holds %d bytes (peak %d)", st.Cached, st.PeakCached)
	}
	rng := mrand.New(mrand.NewPCG(15, 15))
	for range 300 {
		checkRead(t, dr, data, rng.Int64N(int64(len(data))-chunk), 100)
	}
	if st := dr.Stats(); st.Cached < limit/2 {
		t.Errorf("random reads leave %d bytes cached of %d", st.Cached, limit)
	}
}

func TestDiskReaderDataMap(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(8, 60, 555)
	d := backupDisk(t, tr, data, nil)
	dr := newReader(t, tr, d, repo.ReaderOptions{})
	size := int64(len(data))
	// What the map must say: the chunks that are not all zeros.
	var want []extent.Range
	for off := int64(0); off < size; off += chunk {
		end := min(off+chunk, size)
		if bytes.Equal(data[off:end], make([]byte, end-off)) {
			continue
		}
		if k := len(want) - 1; k >= 0 && want[k].End == off {
			want[k].End = end
		} else {
			want = append(want, extent.Range{Start: off, End: end})
		}
	}
	clip := func(off, n int64) []extent.Range {
		var out []extent.Range
		for _, r := range want {
			s, e := max(r.Start, off), min(r.End, off+n)
			if s < e {
				out = append(out, extent.Range{Start: s, End: e})
			}
		}
		return out
	}
	rng := mrand.New(mrand.NewPCG(8, 8))
	windows := [][2]int64{{0, size}, {0, size + 10*chunk}, {size - 10, 100}, {size, 10}, {chunk + 1, 1}, {0, 0}}
	for range 200 {
		windows = append(windows, [2]int64{rng.Int64N(size), rng.Int64N(8 * chunk)})
	}
	for _, w := range windows {
		got, err := dr.Data(w[0], w[1])
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != fmt.Sprint(clip(w[0], w[1])) {
			t.Fatalf("Data(%d, %d) = %v, want %v", w[0], w[1], got, clip(w[0], w[1]))
		}
	}
	if _, err := dr.Data(-1, 10); err == nil {
		t.Error("a negative offset maps")
	}
}

// TestDiskReaderReadAhead: reading in order, a chunk at a time, fetches
// runs, not chunks: a few pack reads per pack, against one per chunk
// without read-ahead.
func TestDiskReaderReadAhead(t *testing.T) {
	// More chunks than read-ahead plans at once (a run's worth of
	// plaintext), and packs larger than a run, so that runs cross
	// where read-ahead plans.
	tr := repotest.New(t, repotest.Options{PackSize: 4 << 20})
	const n = 2500
	data := make([]byte, n*chunk)
	rng := mrand.New(mrand.NewPCG(9, 9))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	d := backuptest.InOrder(t, tr, data)
	read := func(opts repo.ReaderOptions) int64 {
		dr := newReader(t, tr, d, opts)
		if _, err := dr.Data(0, 1); err != nil { // the chunk list, loaded
			t.Fatal(err)
		}
		loads := tr.CountLoads(nil)
		buf := make([]byte, chunk)
		for off := int64(0); off < int64(len(data)); off += chunk {
			if _, err := dr.ReadAt(buf, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, data[off:off+chunk]) {
				t.Fatalf("wrong bytes at %d", off)
			}
		}
		dr.Close()
		return loads.Load()
	}
	without := read(repo.ReaderOptions{ReadAhead: -1})
	with := read(repo.ReaderOptions{})
	runs := plannedRuns(t, tr, d)
	t.Logf("pack reads: %d without read-ahead, %d with; %d runs as restore plans them", without, with, runs)
	if without != n {
		t.Errorf("without read-ahead: %d pack reads for %d chunks", without, n)
	}
	// Read-ahead runs ahead of the reader run by run, as restore plans
	// them, from the first read on.
	if with > runs+1 || with >= without {
		t.Errorf("read-ahead does not batch: %d pack reads for %d runs", with, runs)
	}
}

// plannedRuns counts the runs that a restore of d fetches.
func plannedRuns(t *testing.T, tr *repotest.Repo, d *repo.Disk) int64 {
	list := tr.ChunkList(d)
	p := repo.NewRunPlanner(d.ChunkSize)
	var n int64
	for i := int64(0); i < list.Len(); i++ {
		id, err := list.At(context.Background(), i)
		if err != nil {
			t.Fatal(err)
		}
		if id.IsZero() {
			if p.Flush() != nil {
				n++
			}
			continue
		}
		if p.Add(repo.RunChunk{ID: id, Loc: tr.BestCopy(t, d, id), Off: i * int64(d.ChunkSize), N: d.ChunkSize}) != nil {
			n++
		}
	}
	if p.Flush() != nil {
		n++
	}
	return n
}

// TestDiskReaderCacheBound: however the disk is read, the cache stays
// within its budget, and a chunk read again comes from it.
func TestDiskReaderCacheBound(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(10, 300, 0)
	d := backupDisk(t, tr, data, nil)
	limit := int64(10 * chunk)
	dr := newReader(t, tr, d, repo.ReaderOptions{CacheSize: limit})
	rng := mrand.New(mrand.NewPCG(10, 10))
	for range 500 {
		checkRead(t, dr, data, rng.Int64N(int64(len(data))), 1+rng.IntN(2*chunk))
	}
	for off := int64(0); off < int64(len(data)); off += 512 {
		checkRead(t, dr, data, off, 512)
	}
	st := dr.Stats()
	if st.PeakCached > limit || st.PeakCached == 0 {
		t.Fatalf("cache peaked at %d bytes, budget %d", st.PeakCached, limit)
	}
	// A hot chunk is not fetched again.
	off := int64(-1)
	for i := int64(0); i < d.Chunks() && off < 0; i++ {
		if !bytes.Equal(data[i*chunk:(i+1)*chunk], make([]byte, chunk)) {
			off = i * chunk
		}
	}
	checkRead(t, dr, data, off, 10)
	loads := tr.CountLoads(nil)
	for range 20 {
		checkRead(t, dr, data, off, 10)
	}
	if n := loads.Load(); n != 0 {
		t.Fatalf("a cached chunk read again made %d pack reads", n)
	}
}

// TestDiskReaderDamage: a damaged chunk with no other copy fails the
// reads that need it, naming the disk and the offset, and only those; a
// damaged copy with another copy is read from the other one.
func TestDiskReaderDamage(t *testing.T) {
	var warns atomic.Int32
	tr := repotest.New(t, repotest.Options{})
	data := diskData(11, 48, 0)
	for i := range data {
		data[i] = byte(i*13/7 + i>>12)
	}
	d := backupDisk(t, tr, data, nil)
	const bad, healed = 17, 30
	id := func(i int64) repo.ID { return tr.ChunkID(data[i*chunk : (i+1)*chunk]) }
	tr.Duplicate(t, id(healed))
	for _, i := range []int64{bad, healed} {
		loc := tr.BestCopy(t, d, id(i))
		tr.Backend.Damage(repotest.PackHandle(loc.Pack), int64(loc.Offset)+int64(loc.Length)/2)
	}
	dr := newReader(t, tr, d, repo.ReaderOptions{Warn: func(string, ...any) { warns.Add(1) }})
	buf := make([]byte, 3*chunk)
	for range 2 { // the failure is not cached as a success
		_, err := dr.ReadAt(buf, (bad-1)*chunk)
		if err == nil || !strings.Contains(err.Error(), "disk vda") || !strings.Contains(err.Error(), fmt.Sprintf("offset %d", bad*chunk)) {
			t.Fatalf("read of a damaged chunk: %v; want an error naming disk vda and offset %d", err, bad*chunk)
		}
	}
	checkRead(t, dr, data, (bad-1)*chunk, chunk)
	checkRead(t, dr, data, (bad+1)*chunk, 2*chunk)
	checkRead(t, dr, data, healed*chunk-5, chunk+10)
	if warns.Load() == 0 {
		t.Error("no warning of the damaged copies")
	}
}

// TestDiskReaderClose: Close stops read-ahead and every goroutine the
// reader started; reads after it fail.
func TestDiskReaderClose(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(12, 200, 0)
	d := backupDisk(t, tr, data, nil)
	before := runtime.NumGoroutine()
	dr, err := tr.NewDiskReader(context.Background(), d, repo.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tr.CountLoads(func(string, backend.Handle) error {
		time.Sleep(time.Millisecond)
		return nil
	})
	buf := make([]byte, chunk)
	for off := int64(0); off < 20*chunk; off += chunk {
		if _, err := dr.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	dr.Close()
	if _, err := dr.ReadAt(buf, 150*chunk); !errors.Is(err, context.Canceled) {
		t.Errorf("read after Close: %v", err)
	}
	repotest.WaitGoroutines(t, before)
}

// TestDiskReaderCloseWhileReading: Close while readers read in order and
// at random: every read ends, with its bytes or the context's error, and
// no goroutine is left.
func TestDiskReaderCloseWhileReading(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := diskData(13, 300, 0)
	d := backupDisk(t, tr, data, nil)
	before := runtime.NumGoroutine()
	dr, err := tr.NewDiskReader(context.Background(), d, repo.ReaderOptions{CacheSize: 20 * chunk})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var reads atomic.Int64
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(g), 13))
			buf := make([]byte, 2*chunk)
			off := int64(g) * 30 * chunk
			for {
				if g%2 == 0 {
					off = rng.Int64N(int64(len(data)) - 2*chunk)
				}
				n, err := dr.ReadAt(buf, off)
				if errors.Is(err, context.Canceled) {
					return
				}
				if err != nil || !bytes.Equal(buf[:n], data[off:off+int64(n)]) {
					t.Errorf("ReadAt(%d) = %d, %v", off, n, err)
					return
				}
				reads.Add(1)
				off = (off + 2*chunk) % (int64(len(data)) - 2*chunk)
			}
		}()
	}
	for reads.Load() < 200 {
		time.Sleep(100 * time.Microsecond)
	}
	dr.Close()
	wg.Wait()
	repotest.WaitGoroutines(t, before)
}

// With Want, read-ahead fetches only the chunks wanted: a reader that
// skips most chunks (one in ten read, in order) fetches those alone,
// while without Want read-ahead fetches what lies between.
func TestDiskReaderReadAheadWant(t *testing.T) {
	tr := repotest.New(t, repotest.Options{PackSize: 4 << 20})
	const n = 400
	data := make([]byte, n*chunk)
	rng := mrand.New(mrand.NewPCG(9, 10))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	d := backupDisk(t, tr, data, nil)
	want := func(i int64) bool { return i%10 == 3 || i%10 == 4 }
	read := func(opts repo.ReaderOptions) int64 {
		dr := newReader(t, tr, d, opts)
		buf := make([]byte, chunk)
		for i := int64(0); i < n; i++ {
			if !want(i) {
				continue
			}
			if _, err := dr.ReadAt(buf, i*chunk); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, data[i*chunk:(i+1)*chunk]) {
				t.Fatalf("wrong bytes of chunk %d", i)
			}
		}
		dr.Close() // the read-ahead in flight ends: Stats are final
		return dr.Stats().BytesFetched
	}
	wanted := int64(n / 5 * chunk)
	with := read(repo.ReaderOptions{Want: want})
	without := read(repo.ReaderOptions{})
	t.Logf("fetched %d with Want, %d without, %d wanted", with, without, wanted)
	if with < wanted || with > wanted+wanted/32 {
		t.Errorf("with Want: fetched %d bytes for %d wanted", with, wanted)
	}
	if without < 2*wanted {
		t.Errorf("without Want read-ahead fetched only %d bytes: the test shows nothing", without)
	}
}
