package backup_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

func named(name string, data []byte) backup.Source {
	src := source(data)
	src.Name, src.Path = name, "/dev/"+name
	return src
}

func TestSeveralDisksOneSnapshot(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	a, b := disk("rzar", 10), disk("bbrr", 0)
	res, err := backup.RunDisks(context.Background(), tr, []backup.Source{named("vda", a), named("vdb", b)}, backup.Options{Host: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	sn := res.Snapshot
	if len(sn.Disks) != 2 || sn.Disks[0].Name != "vda" || sn.Disks[1].Name != "vdb" || len(res.Disks) != 2 {
		t.Fatalf("disks %+v", sn.Disks)
	}
	if got := res.Disks[0].BytesRead + res.Disks[1].BytesRead; got != res.Stats.BytesRead || got == 0 {
		t.Errorf("bytes read: disks %d, total %d", got, res.Stats.BytesRead)
	}
	for i, want := range [][]byte{a, b} {
		got, _ := diskContents(t, tr, sn.ID, i)
		if !bytes.Equal(got, want) {
			t.Errorf("disk %d does not restore byte-exact", i)
		}
	}
}

func TestSeveralDisksRefused(t *testing.T) {
	stream := backup.Source{Name: "s", Path: "-", Kind: "stdin", Size: -1, Stream: strings.NewReader("x")}
	for _, tc := range []struct {
		name string
		srcs []backup.Source
		want string
	}{
		{"same name", []backup.Source{named("vda", disk("r", 0)), named("vda", disk("a", 0))}, `two disks named "vda"`},
		{"stream with a disk", []backup.Source{named("vda", disk("r", 0)), stream}, "a stream is backed up alone"},
		{"none", nil, "no disk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			_, err := backup.RunDisks(context.Background(), tr, tc.srcs, backup.Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
			if n := snapshotCount(t, tr); n != 0 {
				t.Errorf("%d snapshots stored", n)
			}
		})
	}
}

func snapshotCount(t *testing.T, tr *repotest.Repo) int {
	t.Helper()
	all, err := tr.Open(t, tr.Keys).Snapshots(context.Background(), func(string, error) {})
	if err != nil {
		t.Fatal(err)
	}
	return len(all)
}

// A copy that did not hold (its COW space ran out) stores no snapshot,
// whichever disk it was.
func TestVerifyFailureStoresNothing(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	good, bad := named("vda", disk("rr", 0)), named("vdb", disk("ar", 0))
	good.Verify = func() error { return nil }
	bad.Verify = func() error { return errors.New("COW space filled") }
	_, err := backup.RunDisks(context.Background(), tr, []backup.Source{good, bad}, backup.Options{})
	if err == nil || !strings.Contains(err.Error(), "COW space filled") || !strings.Contains(err.Error(), "/dev/vdb") {
		t.Fatalf("err %v", err)
	}
	if n := snapshotCount(t, tr); n != 0 {
		t.Errorf("%d snapshots stored from a copy that did not hold", n)
	}
}

// chunkReads counts the bytes read at each chunk.
type chunkReads struct {
	data []byte
	read map[int64]int
}

func (c *chunkReads) ReadAt(p []byte, off int64) (int, error) {
	c.read[off/cs] += len(p)
	return bytes.NewReader(c.data).ReadAt(p, off)
}

// ranges is a change tracker's record for the test.
type ranges []extent.Range

func (rs ranges) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	for _, r := range rs {
		if r.End > off && r.Start < off+n {
			out = append(out, extent.Range{Start: max(r.Start, off), End: min(r.End, off+n)})
		}
	}
	return out, nil
}

func TestBaseReadsOnlyChanges(t *testing.T) {
	ctx := context.Background()
	tr := repotest.New(t, repotest.Options{})
	day1 := disk("rrrrzrrr", 0)
	res1, err := backup.Run(ctx, tr, named("vda", day1), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := tr.Open(t, tr.Keys)
	parent, err := r.LoadSnapshot(ctx, res1.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	// Day 2: chunk 1 rewritten in its middle, chunk 4 (zeros) written,
	// chunk 6 rewritten with what it held (the tracker still marks it).
	day2 := bytes.Clone(day1)
	copy(day2[cs+100:], "changed")
	copy(day2[4*cs:], "new data")
	changed := ranges{{Start: cs + 100, End: cs + 107}, {Start: 4 * cs, End: 4*cs + 8}, {Start: 6 * cs, End: 6*cs + 1}}
	cr := &chunkReads{data: day2, read: map[int64]int{}}
	src := named("vda", day2)
	src.At = cr
	src.Base = &backup.Base{Snapshot: parent, Disk: &parent.Disks[0], Changed: changed}
	res2, err := backup.Run(ctx, tr, src, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 8; i++ {
		want := 0
		if i == 1 || i == 4 || i == 6 {
			want = cs
		}
		if cr.read[i] != want {
			t.Errorf("chunk %d: read %d bytes, want %d", i, cr.read[i], want)
		}
	}
	if st := res2.Stats; st.ChunksUnchanged != 5 || st.BytesUnchanged != 5*cs || st.BytesRead != 3*cs || st.ChunksZero != 0 {
		t.Errorf("stats %+v", st)
	}
	d := res2.Snapshot.Disks[0]
	if d.Base == nil || *d.Base != parent.ID {
		t.Errorf("disk base %v, want %s", d.Base, parent.ID.Short())
	}
	if got, _ := contents(t, tr, res2.Snapshot.ID); !bytes.Equal(got, day2) {
		t.Error("incremental snapshot does not restore byte-exact")
	}
}

// A base whose chunk list is damaged in the repository does not fail the
// backup (every later one would pick the same base): the disk is read in
// full from the source, the user is told, and the snapshot restores.
func TestDamagedBaseChunkListReadsInFull(t *testing.T) {
	ctx := context.Background()
	tr := repotest.New(t, repotest.Options{})
	day1 := disk("rrrrzrrr", 0)
	res1, err := backup.Run(ctx, tr, named("vda", day1), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	list := res1.Snapshot.Disks[0].ChunkLists[0]
	copies := tr.Index().Copies(list, repo.NoWriter)
	if len(copies) == 0 {
		t.Fatalf("chunk list %s is not indexed", list.Short())
	}
	loc := copies[0].Location
	pack, ok := tr.Backend.Get(repotest.PackHandle(loc.Pack))
	if !ok {
		t.Fatalf("pack %s is missing", loc.Pack.Short())
	}
	pack = bytes.Clone(pack)
	pack[loc.Offset+loc.Length/2] ^= 0x40
	tr.Backend.Put(repotest.PackHandle(loc.Pack), pack)
	r := tr.Reopen(t)
	parent, err := r.LoadSnapshot(ctx, res1.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}

	day2 := bytes.Clone(day1)
	copy(day2[2*cs:], "changed")
	cr := &chunkReads{data: day2, read: map[int64]int{}}
	src := named("vda", day2)
	src.At = cr
	src.Base = &backup.Base{Snapshot: parent, Disk: &parent.Disks[0], Changed: ranges{{Start: 2 * cs, End: 2*cs + 7}}}
	var warned []string
	res2, err := backup.Run(ctx, tr, src, backup.Options{Warn: func(s string) { warned = append(warned, s) }})
	if err != nil {
		t.Fatalf("backup over a damaged base: %v", err)
	}
	if len(warned) != 1 || !strings.Contains(warned[0], "cannot be read") || !strings.Contains(warned[0], res1.Snapshot.ID.Short()) {
		t.Errorf("warnings %q, want one naming the base's unreadable chunk list", warned)
	}
	for i := int64(0); i < 8; i++ {
		if i != 4 && cr.read[i] != cs {
			t.Errorf("chunk %d: read %d bytes, want the whole chunk", i, cr.read[i])
		}
	}
	d := res2.Snapshot.Disks[0]
	if d.Base != nil || d.Stats.ChunksUnchanged != 0 {
		t.Errorf("disk base %v with %d unchanged chunks: nothing was taken from the damaged base", d.Base, d.Stats.ChunksUnchanged)
	}
	if got, _ := contents(t, tr, res2.Snapshot.ID); !bytes.Equal(got, day2) {
		t.Error("snapshot does not restore byte-exact")
	}
}

// A base snapshot another writer signed is refused: its chunk list could
// name any stored chunk anywhere.
func TestBaseOfAnotherWriterRefused(t *testing.T) {
	ctx := context.Background()
	tr := repotest.New(t, repotest.Options{})
	data := disk("rrar", 0)
	other := tr.Open(t, tr.WriteOnly(t, "other"))
	if err := other.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	res1, err := backup.Run(ctx, other, named("vda", data), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := tr.Open(t, tr.Keys)
	parent, err := r.LoadSnapshot(ctx, res1.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	src := named("vda", data)
	src.Base = &backup.Base{Snapshot: parent, Disk: &parent.Disks[0], Changed: ranges{}}
	self := tr.Open(t, tr.WriteOnly(t, "self"))
	if err := self.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = backup.Run(ctx, self, src, backup.Options{})
	if err == nil || !strings.Contains(err.Error(), "only a snapshot of the owner or of this writer") {
		t.Fatalf("err %v", err)
	}
}

// A base whose size differs (the disk grew) is refused by the pipeline;
// the caller reads in full instead.
func TestBaseOfAnotherSizeRefused(t *testing.T) {
	ctx := context.Background()
	tr := repotest.New(t, repotest.Options{})
	res1, err := backup.Run(ctx, tr, named("vda", disk("rr", 0)), backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	parent, err := tr.Open(t, tr.Keys).LoadSnapshot(ctx, res1.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	src := named("vda", disk("rrr", 0))
	src.Base = &backup.Base{Snapshot: parent, Disk: &parent.Disks[0], Changed: ranges{}}
	if _, err := backup.Run(ctx, tr, src, backup.Options{}); err == nil || !strings.Contains(err.Error(), "cannot be the base") {
		t.Fatalf("err %v", err)
	}
}

// A read that fails because the copy stopped holding reports why.
func TestVerifyExplainsReadError(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	src := named("vda", disk("rrrr", 0))
	src.At = failingReader{}
	src.Verify = func() error { return errors.New("the LVM snapshot filled its COW space") }
	_, err := backup.Run(context.Background(), tr, src, backup.Options{})
	if err == nil || !strings.Contains(err.Error(), "filled its COW space") || !strings.Contains(err.Error(), "input/output error") {
		t.Fatalf("err %v", err)
	}
}

type failingReader struct{}

func (failingReader) ReadAt([]byte, int64) (int, error) { return 0, errors.New("input/output error") }
