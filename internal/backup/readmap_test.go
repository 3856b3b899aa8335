package backup_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

type rg = extent.Range

// recorder keeps a backup's read map in memory.
type recorder struct {
	buf bytes.Buffer
	w   *backup.ReadMapWriter
}

func record(src *backup.Source) *recorder {
	r := &recorder{}
	r.w = backup.NewReadMapWriter(&r.buf, src.Size)
	src.Record = r.w.Chunk
	return r
}

func (r *recorder) open(t *testing.T, size int64) *backup.ReadMap {
	t.Helper()
	if err := r.w.Close(); err != nil {
		t.Fatalf("close read map: %v", err)
	}
	m, err := backup.OpenReadMap(bytes.NewReader(r.buf.Bytes()), size)
	if err != nil {
		t.Fatalf("open read map: %v", err)
	}
	return m
}

// Day 2 frees blocks (a deleted file) without writing them: a chunk whose
// used blocks did not change is read with the blocks the day-1 backup
// read, and so is the chunk stored on day 1, not a new one. A chunk that
// changed is stored as the data map alone says (freed blocks as zeros).
func TestPriorKeepsChunksOfFreedBlocks(t *testing.T) {
	day1 := disk("rrrrrr", 0)
	size := int64(len(day1))
	half := int64(cs / 2)
	map1 := mapOf{{Start: 0, End: 4 * cs}, {Start: 5 * cs, End: 6 * cs}} // chunk 4 free
	day2 := bytes.Clone(day1)
	for i := 2 * cs; i < 2*cs+cs/4; i++ { // chunk 2 written in its used half
		day2[i] ^= 0x5a
	}
	map2 := mapOf{{Start: 0, End: cs + half}, {Start: 2 * cs, End: 2*cs + half}, {Start: 5 * cs, End: 6 * cs}} // halves of 1 and 2, and 3, freed

	for _, withPrior := range []bool{false, true} {
		tr := repotest.New(t, repotest.Options{})
		src1 := source(day1)
		src1.Map = map1
		rec1 := record(&src1)
		if _, err := backup.Run(context.Background(), tr, src1, backup.Options{}); err != nil {
			t.Fatal(err)
		}
		src2 := source(day2)
		src2.Map = map2
		if withPrior {
			src2.Prior = rec1.open(t, size)
		}
		rec2 := record(&src2)
		res, err := backup.Run(context.Background(), tr.Reopen(t), src2, backup.Options{})
		if err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(day2)
		clear(want[4*cs : 5*cs])
		if withPrior {
			// Chunks 1 and 3 as on day 1; chunk 2 changed: as map 2 says.
			clear(want[2*cs+half : 3*cs])
			if res.Stats.ChunksNew != 1 || res.Stats.ChunksReused != 4 {
				t.Errorf("with prior: %d new, %d reused chunks, want 1 and 4", res.Stats.ChunksNew, res.Stats.ChunksReused)
			}
		} else {
			clear(want[cs+half : 2*cs])
			clear(want[2*cs+half : 4*cs])
			if res.Stats.ChunksNew != 2 {
				t.Errorf("without prior: %d new chunks, want 2", res.Stats.ChunksNew)
			}
		}
		if got, _ := contents(t, tr, res.Snapshot.ID); !bytes.Equal(got, want) {
			t.Errorf("prior %v: day 2 does not restore as expected", withPrior)
		}
		// Day 2's read map says what each chunk was stored as.
		m := rec2.open(t, size)
		wantMap := [][]rg{{{Start: 0, End: cs}}, {{Start: cs, End: cs + half}}, {{Start: 2 * cs, End: 2*cs + half}}, nil, nil, {{Start: 5 * cs, End: 6 * cs}}}
		if withPrior {
			wantMap[1], wantMap[3] = []rg{{Start: cs, End: 2 * cs}}, []rg{{Start: 3 * cs, End: 4 * cs}}
		}
		for i, w := range wantMap {
			got, err := m.Data(int64(i)*cs, cs)
			if err != nil || !slices.Equal(got, w) {
				t.Errorf("prior %v: read map of chunk %d: %v, %v; want %v", withPrior, i, got, err, w)
			}
		}
	}
}

// A read map round-trips: ranges that touch across chunks are merged,
// windows clip them, and what lies past its last range is not data.
func TestReadMapRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := backup.NewReadMapWriter(&buf, 400)
	for _, c := range []struct {
		off int64
		r   []rg
	}{{0, []rg{{Start: 10, End: 20}, {Start: 90, End: 100}}}, {100, []rg{{Start: 100, End: 150}}}, {200, nil}, {300, []rg{{Start: 310, End: 400}}}} {
		if err := w.Chunk(c.off, 100, c.r); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	m, err := backup.OpenReadMap(bytes.NewReader(buf.Bytes()), 400)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int64
		want   []rg
	}{{0, 50, []rg{{Start: 10, End: 20}}}, {50, 70, []rg{{Start: 90, End: 120}}}, {120, 80, []rg{{Start: 120, End: 150}}}, {200, 100, nil}, {300, 50, []rg{{Start: 310, End: 350}}}, {350, 50, []rg{{Start: 350, End: 400}}}} {
		got, err := m.Data(c.off, c.n)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("Data(%d, %d) = %v, %v; want %v", c.off, c.n, got, err, c.want)
		}
	}
	if _, err := backup.OpenReadMap(bytes.NewReader(buf.Bytes()), 401); err == nil {
		t.Error("read map of a 400-byte disk opened for 401 bytes")
	}
}

// The writer refuses chunks out of order and a map that does not cover
// the disk: a read map is kept only when complete.
func TestReadMapWriterRefusesGaps(t *testing.T) {
	w := backup.NewReadMapWriter(&bytes.Buffer{}, 300)
	if err := w.Chunk(100, 100, nil); err == nil {
		t.Error("chunk at 100 accepted first")
	}
	w = backup.NewReadMapWriter(&bytes.Buffer{}, 300)
	if err := w.Chunk(0, 100, []rg{{Start: 50, End: 150}}); err == nil {
		t.Error("range past its chunk accepted")
	}
	w = backup.NewReadMapWriter(&bytes.Buffer{}, 300)
	_ = w.Chunk(0, 100, nil)
	if err := w.Close(); err == nil {
		t.Error("read map of 100 bytes of 300 closed without error")
	}
}

// A damaged read map cannot spoil a backup: the backup warns, reads from
// there on as its data map says, and stores what it would without one.
func TestDamagedPriorWarnsAndReadsTheMap(t *testing.T) {
	data := disk("rrrr", 0)
	var buf bytes.Buffer
	w := backup.NewReadMapWriter(&buf, int64(len(data)))
	for i := int64(0); i < 4; i++ {
		_ = w.Chunk(i*cs, cs, []rg{{Start: i * cs, End: (i + 1) * cs}})
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()
	for name, bad := range map[string][]byte{
		"truncated":    good[:len(good)-1],
		"past the end": append(bytes.Clone(good[:len(good)-2]), 0xff, 0x7f),
		"zero-length":  append(bytes.Clone(good), 1, 0),
	} {
		tr := repotest.New(t, repotest.Options{})
		src := source(data)
		src.Map = mapOf{{Start: 0, End: cs}} // only chunk 0 in use
		m, err := backup.OpenReadMap(bytes.NewReader(bad), int64(len(data)))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		src.Prior = m
		var warned []string
		res, err := backup.Run(context.Background(), tr, src, backup.Options{Warn: func(s string) { warned = append(warned, s) }})
		if err != nil {
			t.Fatalf("%s: backup failed: %v", name, err)
		}
		if len(warned) != 1 || !strings.Contains(warned[0], "read map") {
			t.Errorf("%s: warnings %q, want one about the read map", name, warned)
		}
		got, _ := contents(t, tr, res.Snapshot.ID)
		if !bytes.Equal(got[:cs], data[:cs]) {
			t.Errorf("%s: chunk 0 does not restore", name)
		}
	}
}
