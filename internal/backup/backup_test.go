package backup_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

const cs = repo.MinChunkSize

// disk builds test contents chunk by chunk: 'z' zero, 'r' random, 'a'/'b'
// fixed patterns (repeats deduplicate), 'h' half zero, half random.
func disk(layout string, tail int) []byte {
	rng := rand.New(rand.NewPCG(1, uint64(len(layout))))
	var out []byte
	for _, c := range layout {
		b := make([]byte, cs)
		switch c {
		case 'r':
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
		case 'a', 'b':
			for i := range b {
				b[i] = byte(c) + byte(i%7)
			}
		case 'h':
			for i := cs / 2; i < cs; i++ {
				b[i] = byte(rng.Uint32())
			}
		}
		out = append(out, b...)
	}
	if tail > 0 {
		out = append(out, bytes.Repeat([]byte{'t'}, tail)...)
	}
	return out
}

// contents reads a snapshot's disk back from a freshly opened repository,
// so that only what was durably stored and indexed counts.
func contents(t *testing.T, tr *repotest.Repo, id repo.ID) ([]byte, *repo.Disk) {
	t.Helper()
	return diskContents(t, tr, id, 0)
}

// diskContents reads disk di of a snapshot back, as contents does.
func diskContents(t *testing.T, tr *repotest.Repo, id repo.ID, di int) ([]byte, *repo.Disk) {
	t.Helper()
	r := tr.Open(t, tr.Keys)
	ctx := context.Background()
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatalf("load snapshot: %v", err)
	}
	d := &sn.Disks[di]
	list := r.ChunkList(d)
	var out []byte
	for i := int64(0); i < list.Len(); i++ {
		cid, err := list.At(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		n := min(int64(d.ChunkSize), d.Size-i*int64(d.ChunkSize))
		if cid.IsZero() {
			out = append(out, make([]byte, n)...)
			continue
		}
		b, err := r.ReadBlob(ctx, repo.DataBlob, cid, nil)
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		out = append(out, b...)
	}
	return out, d
}

func source(data []byte) backup.Source {
	return backup.Source{Name: "disk", Path: "/test/disk.img", Kind: "file", Size: int64(len(data)), At: bytes.NewReader(data)}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name                string
		layout              string
		tail                int
		workers             int
		zero, newc, reusedc int64
	}{
		{"empty", "", 0, 0, 0, 0, 0},
		{"one byte", "", 1, 0, 0, 1, 0},
		{"zeros", "zzzz", 0, 0, 4, 0, 0},
		{"mixed", "rzarbhaz", 0, 3, 2, 5, 1},
		{"short last chunk", "rrz", 100, 2, 1, 3, 0},
		{"repeats", "aaaaaaaabbbb", 0, 8, 0, 2, 10},
		{"many chunks, one worker", strings.Repeat("rzah", 64), 17, 1, 64, 130, 63},
		{"many chunks, many workers", strings.Repeat("rzah", 64), 17, 16, 64, 130, 63},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			data := disk(tc.layout, tc.tail)
			res, err := backup.Run(context.Background(), tr, source(data), backup.Options{Workers: tc.workers, Host: "h1", Tags: []string{"x"}})
			if err != nil {
				t.Fatal(err)
			}
			st := res.Stats
			if st.ChunksZero != tc.zero || st.ChunksNew != tc.newc || st.ChunksReused != tc.reusedc {
				t.Errorf("chunks zero/new/reused = %d/%d/%d, want %d/%d/%d", st.ChunksZero, st.ChunksNew, st.ChunksReused, tc.zero, tc.newc, tc.reusedc)
			}
			got, d := contents(t, tr, res.Snapshot.ID)
			if !bytes.Equal(got, data) {
				t.Fatalf("restored %d bytes differ from the %d backed up", len(got), len(data))
			}
			if d.Size != int64(len(data)) || d.Name != "disk" || d.Source != "/test/disk.img" {
				t.Errorf("disk entry %+v", d)
			}
			if res.Snapshot.Host != "h1" || len(res.Snapshot.Tags) != 1 {
				t.Errorf("snapshot host %q tags %v", res.Snapshot.Host, res.Snapshot.Tags)
			}
			if st.BytesRead != int64(len(data)) {
				t.Errorf("read %d bytes, want %d", st.BytesRead, len(data))
			}
		})
	}
}

func TestSecondBackupStoresNothing(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk(strings.Repeat("rzr", 20), 0)
	if _, err := backup.Run(context.Background(), tr, source(data), backup.Options{}); err != nil {
		t.Fatal(err)
	}
	packs := len(tr.Backend.Names(backend.PackFile))
	r2 := tr.Reopen(t)
	res, err := backup.Run(context.Background(), r2, source(data), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.ChunksNew != 0 || res.Stats.ChunksReused != 40 {
		t.Errorf("second backup: %d new, %d reused chunks", res.Stats.ChunksNew, res.Stats.ChunksReused)
	}
	// The chunk list blobs are the same too: no pack at all is added.
	if n := len(tr.Backend.Names(backend.PackFile)); n != packs {
		t.Errorf("second backup added %d packs", n-packs)
	}
}

// countingReader records which bytes a backup read.
type countingReader struct {
	r    io.ReaderAt
	mu   sync.Mutex
	read []extent.Range
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.read = append(c.read, extent.Range{Start: off, End: off + int64(len(p))})
	c.mu.Unlock()
	return c.r.ReadAt(p, off)
}

// mapOf is a data map made of fixed ranges.
type mapOf []extent.Range

func (m mapOf) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	for _, r := range m {
		s, e := max(r.Start, off), min(r.End, off+n)
		if s < e {
			out = append(out, extent.Range{Start: s, End: e})
		}
	}
	return out, nil
}

func TestMapSkipsUnmapped(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk("rrrrrrrr", 0)
	// Chunk 1 is mapped in part, chunks 3..5 not at all.
	m := mapOf{{Start: 0, End: cs + 100}, {Start: 2 * cs, End: 3 * cs}, {Start: 6 * cs, End: 8 * cs}}
	cr := &countingReader{r: bytes.NewReader(data)}
	src := source(data)
	src.At, src.Map = cr, m
	res, err := backup.Run(context.Background(), tr, src, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, rg := range cr.read {
		if rg.Start < cs+100 || (rg.Start >= 2*cs && rg.End <= 3*cs) || rg.Start >= 6*cs {
			continue
		}
		t.Errorf("read unmapped bytes [%d, %d)", rg.Start, rg.End)
	}
	want := bytes.Clone(data)
	clear(want[cs+100 : 2*cs])
	clear(want[3*cs : 6*cs])
	got, _ := contents(t, tr, res.Snapshot.ID)
	if !bytes.Equal(got, want) {
		t.Fatal("unmapped bytes did not restore as zeros, or mapped ones changed")
	}
	if res.Stats.ChunksZero != 3 || res.Stats.BytesRead != 4*cs+100 {
		t.Errorf("zero chunks %d, bytes read %d", res.Stats.ChunksZero, res.Stats.BytesRead)
	}
}

func TestStream(t *testing.T) {
	data := disk("rzrhab", 333)
	for _, tc := range []struct {
		name string
		wrap func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one byte at a time", iotest.OneByteReader},
		{"half reads", iotest.HalfReader},
		{"data with EOF", iotest.DataErrReader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			prog := new(backup.Progress)
			src := backup.Source{Name: "stdin", Path: "-", Kind: "stdin", Size: -1, SizeHint: 1 << 20,
				Stream: tc.wrap(bytes.NewReader(data))}
			res, err := backup.Run(context.Background(), tr, src, backup.Options{Progress: prog})
			if err != nil {
				t.Fatal(err)
			}
			got, d := contents(t, tr, res.Snapshot.ID)
			if !bytes.Equal(got, data) || d.Size != int64(len(data)) {
				t.Fatalf("stream of %d bytes restored as %d", len(data), len(got))
			}
			if !prog.Finished.Load() || prog.Done.Load() != int64(len(data)) || prog.Total.Load() != 1<<20 {
				t.Errorf("progress done %d total %d finished %v", prog.Done.Load(), prog.Total.Load(), prog.Finished.Load())
			}
		})
	}
}

func TestStreamError(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	bad := errors.New("device gone")
	src := backup.Source{Name: "s", Path: "/dev/fifo", Kind: "stdin", Size: -1,
		Stream: io.MultiReader(bytes.NewReader(disk("rr", 0)), iotest.ErrReader(bad))}
	_, err := backup.Run(context.Background(), tr, src, backup.Options{})
	if !errors.Is(err, bad) || !strings.Contains(err.Error(), "/dev/fifo") || !strings.Contains(err.Error(), fmt.Sprint(2*cs)) {
		t.Fatalf("error %v: want the cause, the path and the offset %d", err, 2*cs)
	}
	assertNoSnapshot(t, tr)
}

// shortReader ends the source early, as a disk that shrank.
type shortReader struct {
	r   io.ReaderAt
	end int64
}

func (s shortReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) <= s.end {
		return s.r.ReadAt(p, off)
	}
	if off >= s.end {
		return 0, io.EOF
	}
	n, _ := s.r.ReadAt(p[:s.end-off], off)
	return n, io.EOF
}

func TestSourceShrinks(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk("rrrrr", 0)
	src := source(data)
	src.At = shortReader{bytes.NewReader(data), 3*cs + 10}
	_, err := backup.Run(context.Background(), tr, src, backup.Options{})
	if err == nil || !strings.Contains(err.Error(), "ended early") || !strings.Contains(err.Error(), fmt.Sprint(3*cs)) {
		t.Fatalf("error %v: want 'source ended early' at offset %d", err, 3*cs)
	}
	assertNoSnapshot(t, tr)
}

func TestReadError(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	bad := errors.New("medium error")
	src := source(disk("rrrr", 0))
	src.At = failAt{bad: bad, off: 2 * cs}
	_, err := backup.Run(context.Background(), tr, src, backup.Options{})
	if !errors.Is(err, bad) || !strings.Contains(err.Error(), "/test/disk.img at offset 8192") {
		t.Fatalf("error %v", err)
	}
	assertNoSnapshot(t, tr)
}

type failAt struct {
	bad error
	off int64
}

func (f failAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= f.off {
		return 0, f.bad
	}
	clear(p)
	p[0] = 1
	return len(p), nil
}

func TestBackendFailure(t *testing.T) {
	for _, op := range []string{"save data", "save index", "save snapshots"} {
		t.Run(op, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			bad := errors.New("storage unavailable")
			tr.Backend.Fail = func(o string, h backend.Handle) error {
				if o+" "+string(h.Type) == op {
					return bad
				}
				return nil
			}
			_, err := backup.Run(context.Background(), tr, source(disk(strings.Repeat("r", 100), 0)), backup.Options{})
			if !errors.Is(err, bad) {
				t.Fatalf("error %v, want the backend's", err)
			}
			tr.Backend.Fail = nil
			assertNoSnapshot(t, tr)
		})
	}
}

func assertNoSnapshot(t *testing.T, tr *repotest.Repo) {
	t.Helper()
	if n := len(tr.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("a failed backup stored %d snapshots", n)
	}
}

// gate is a source whose reads block at a given offset until the test
// lets them go, and counts how far the backup read.
type gate struct {
	r       io.ReaderAt
	at      int64
	reached chan struct{}
	once    sync.Once
	release chan struct{}
	max     atomic.Int64
}

func (g *gate) ReadAt(p []byte, off int64) (int, error) {
	if off >= g.at {
		g.once.Do(func() { close(g.reached) })
		<-g.release
	}
	for {
		m := g.max.Load()
		if off <= m || g.max.CompareAndSwap(m, off) {
			break
		}
	}
	return g.r.ReadAt(p, off)
}

func TestCancelMidRun(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk(strings.Repeat("r", 400), 0)
	g := &gate{r: bytes.NewReader(data), at: 200 * cs, reached: make(chan struct{}), release: make(chan struct{})}
	src := source(data)
	src.At = g
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := backup.Run(ctx, tr, src, backup.Options{Workers: 4})
		done <- err
	}()
	<-g.reached
	cancel()
	close(g.release)
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backup did not stop within 10 s of cancellation")
	}
	assertNoSnapshot(t, tr)
	repotest.WaitGoroutines(t, before)
}

// TestSlowStorageBoundsReadAhead checks that the reader waits for the
// repository: with uploads stalled, it reads a bounded number of chunks
// ahead whatever the disk's size (memory does not grow with it).
func TestSlowStorageBoundsReadAhead(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk(strings.Repeat("r", 2000), 0)
	stall := make(chan struct{})
	tr.Backend.Fail = func(op string, h backend.Handle) error {
		if op == "save" && h.Type == backend.PackFile {
			<-stall
		}
		return nil
	}
	g := &gate{r: bytes.NewReader(data), at: 1 << 62, reached: make(chan struct{}), release: make(chan struct{})}
	src := source(data)
	src.At = g
	done := make(chan error, 1)
	go func() {
		_, err := backup.Run(context.Background(), tr, src, backup.Options{Workers: 2})
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	// Two uploaders, each holding a pack of 16 chunks, one pack being
	// filled, the buffer pool (2 per worker + 2) and the channels.
	if ahead := g.max.Load() / cs; ahead > 100 {
		t.Errorf("with uploads stalled, the reader went %d chunks ahead", ahead)
	}
	close(stall)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if g.max.Load() != int64(len(data))-cs {
		t.Fatalf("backup did not read to the end once uploads resumed")
	}
}

func TestDescribeAndParent(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	data := disk("rz", 0)
	first, err := backup.Run(context.Background(), tr, source(data), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := source(data)
	src.Describe = func(d *repo.Disk) {
		d.PartitionTable = "gpt"
		d.Partitions = append(d.Partitions, repo.Partition{Number: 1, Start: 0, Size: int64(len(data))})
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	res, err := backup.Run(context.Background(), tr, src, backup.Options{Parent: &first.Snapshot.ID, Time: at, Program: "sauve test"})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := tr.Open(t, tr.Keys).LoadSnapshot(context.Background(), res.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	d := sn.Disks[0]
	if d.PartitionTable != "gpt" || len(d.Partitions) != 1 || sn.Parent == nil || *sn.Parent != first.Snapshot.ID ||
		!sn.Time.Equal(at) || sn.Program != "sauve test" {
		t.Fatalf("stored manifest lacks what was described: %+v", sn)
	}
}

func TestWriteOnlyKey(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	w := tr.Open(t, tr.WriteOnly(t, "host1"))
	data := disk("rzra", 0)
	res, err := backup.Run(context.Background(), w, source(data), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := contents(t, tr, res.Snapshot.ID)
	if !bytes.Equal(got, data) {
		t.Fatal("a write-only host's backup does not restore with the owner's key")
	}
}
