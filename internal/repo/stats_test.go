package repo_test

import (
	"context"
	"crypto/rand"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// statsRepo is a repository of three snapshots whose figures are known
// by hand (chunks of 4 KiB, chunk lists of 2 entries, so that disks share
// list blobs):
//
//	s1 host h1 /dev/a: [c1 c2] [0 c3] [c4]   (c4 is 100 bytes, the disk's tail)
//	s2 host h1 /dev/a: [c1 c2] [c5 c3] [c4]  (lists A and C shared with s1)
//	s3 host h2 /dev/b: [c6 c1]
//
// and c7, stored alone in a pack of its own, that no snapshot references.
type statsRepo struct {
	tr     *repotest.Repo
	c      [8]repo.ID // c[1]..c[7]
	lists  map[string]repo.ID
	snaps  [4]repo.ID // snaps[1]..snaps[3]
	c7Pack repo.ID
}

const statsCS = repo.MinChunkSize

func makeStatsRepo(t *testing.T) *statsRepo {
	t.Helper()
	ctx := context.Background()
	sr := &statsRepo{tr: repotest.New(t, repotest.Options{}), lists: map[string]repo.ID{}}
	tr := sr.tr
	t0 := time.Date(2024, 3, 1, 12, 0, 0, 0, time.UTC)
	if _, err := tr.WithWriter(ctx, "test", func(w *repo.Writer) error {
		for i := 1; i <= 6; i++ {
			n := statsCS
			if i == 4 {
				n = 100
			}
			data := make([]byte, n)
			rand.Read(data) // incompressible: every chunk costs about its size
			sr.c[i] = tr.ChunkID(data)
			if _, err := w.SaveBlob(ctx, repo.DataBlob, sr.c[i], data); err != nil {
				return err
			}
		}
		list := func(name string, ids ...repo.ID) repo.ID {
			id, _, err := w.SaveMeta(ctx, repo.EncodeChunkList(ids))
			if err != nil {
				t.Fatal(err)
			}
			sr.lists[name] = id
			return id
		}
		c := sr.c
		a, b, cc := list("A", c[1], c[2]), list("B", repo.ZeroID, c[3]), list("C", c[4])
		d, e := list("D", c[5], c[3]), list("E", c[6], c[1])
		disk := func(name, src string, size int64, lists ...repo.ID) repo.Disk {
			return repo.Disk{Name: name, Source: src, Kind: "file", Size: size, ChunkSize: statsCS, ListEntries: 2, ChunkLists: lists}
		}
		for i, sn := range []*repo.Snapshot{
			{Time: t0, Host: "h1", Disks: []repo.Disk{disk("a", "/dev/a", 4*statsCS+100, a, b, cc)}},
			{Time: t0.Add(time.Hour), Host: "h1", Disks: []repo.Disk{disk("a", "/dev/a", 4*statsCS+100, a, d, cc)}},
			{Time: t0.Add(2 * time.Hour), Host: "h2", Disks: []repo.Disk{disk("b", "/dev/b", 2*statsCS, e)}},
		} {
			sn.Program = "test"
			id, err := w.SaveSnapshot(ctx, sn)
			if err != nil {
				return err
			}
			sr.snaps[i+1] = id
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// A session of its own flushes c7 into a pack of its own.
	if _, err := tr.WithWriter(ctx, "test", func(w *repo.Writer) error {
		data := make([]byte, statsCS)
		rand.Read(data)
		sr.c[7] = tr.ChunkID(data)
		_, err := w.SaveBlob(ctx, repo.DataBlob, sr.c[7], data)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	tr.Reopen(t)
	copies := tr.Index().Copies(sr.c[7], repo.NoWriter)
	if len(copies) != 1 {
		t.Fatalf("c7 has %d copies", len(copies))
	}
	sr.c7Pack = copies[0].Pack
	for _, cp := range tr.Index().Copies(sr.c[1], repo.NoWriter) {
		if cp.Pack == sr.c7Pack {
			t.Fatal("c7 shares a pack with c1: the test cannot tell an unreferenced pack")
		}
	}
	return sr
}

// stored returns the stored (sealed) length of a blob, as the index has it.
func (sr *statsRepo) stored(t *testing.T, id repo.ID) int64 {
	t.Helper()
	copies := sr.tr.Index().Copies(id, repo.NoWriter)
	if len(copies) != 1 {
		t.Fatalf("blob %s has %d copies, want 1", id.Short(), len(copies))
	}
	return int64(copies[0].Length)
}

func (sr *statsRepo) stats(t *testing.T, r *repo.Repository, sel func(*repo.Snapshot) bool) *repo.Stats {
	t.Helper()
	ctx := context.Background()
	snaps, err := r.Snapshots(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 {
		t.Fatalf("%d snapshots", len(snaps))
	}
	calls := 0
	st, err := r.Stats(ctx, snaps, repo.StatsOptions{Select: sel, Progress: func(done, total int) {
		calls++
		if done != calls || total != 5 {
			t.Errorf("progress %d/%d at call %d, want %d/5", done, total, calls, calls)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if calls != 5 {
		t.Errorf("%d progress calls: each of the 5 distinct chunk lists must be walked once", calls)
	}
	return st
}

func TestStatsFigures(t *testing.T) {
	sr := makeStatsRepo(t)
	L := func(i int) int64 { return sr.stored(t, sr.c[i]) }
	LL := func(name string) int64 { return sr.stored(t, sr.lists[name]) }
	st := sr.stats(t, sr.tr.Repository, nil)

	// Repository totals: against the backend's own listing.
	var packBytes, otherBytes int64
	packs := 0
	for _, ft := range []backend.FileType{backend.PackFile, backend.IndexFile, backend.SnapshotFile, backend.LedgerFile, backend.SessionFile} {
		for _, name := range sr.tr.Backend.Names(ft) {
			data, _ := sr.tr.Backend.Get(backend.Handle{Type: ft, Name: name})
			if ft == backend.PackFile {
				packs++
				packBytes += int64(len(data))
			} else {
				otherBytes += int64(len(data))
			}
		}
	}
	if st.Packs != packs || st.PackBytes != packBytes || st.StoredBytes != packBytes+otherBytes || st.Snapshots != 3 {
		t.Errorf("totals: %d packs, %d pack bytes, %d stored, %d snapshots; want %d, %d, %d, 3",
			st.Packs, st.PackBytes, st.StoredBytes, st.Snapshots, packs, packBytes, packBytes+otherBytes)
	}
	be := sr.tr.Backend
	if st.SessionObjects != len(be.Names(backend.SessionFile)) || st.IndexObjects != len(be.Names(backend.IndexFile)) || st.SessionObjects == 0 {
		t.Errorf("%d session objects, %d index objects; the backend holds %d and %d", st.SessionObjects, st.IndexObjects,
			len(be.Names(backend.SessionFile)), len(be.Names(backend.IndexFile)))
	}
	if st.DataBlobs != 7 || st.MetaBlobs != 5 {
		t.Errorf("%d data and %d meta blobs, want 7 and 5", st.DataBlobs, st.MetaBlobs)
	}

	// The zero chunk is free, c4 is short, c7 is referenced by nobody.
	const logical = 2*(4*statsCS+100) + 2*statsCS
	uniqueStored := L(1) + L(2) + L(3) + L(4) + L(5) + L(6)
	if st.SelectedSnapshots != 3 || st.LogicalBytes != logical || st.UniqueChunks != 6 || st.UniqueBytes != 5*statsCS+100 ||
		st.UniqueStoredBytes != uniqueStored || st.MissingChunks != 0 {
		t.Errorf("unique: %d selected, %d logical, %d chunks, %d bytes, %d stored, %d missing; want 3, %d, 6, %d, %d, 0",
			st.SelectedSnapshots, st.LogicalBytes, st.UniqueChunks, st.UniqueBytes, st.UniqueStoredBytes, st.MissingChunks,
			logical, 5*statsCS+100, uniqueStored)
	}
	if want := float64(logical) / float64(uniqueStored); st.DedupRatio != want {
		t.Errorf("dedup ratio %v, want %v", st.DedupRatio, want)
	}
	if want := LL("A") + LL("B") + LL("C") + LL("D") + LL("E"); st.ListStoredBytes != want {
		t.Errorf("list bytes %d, want %d", st.ListStoredBytes, want)
	}

	want := []repo.SnapshotStats{
		{ID: sr.snaps[1], Host: "h1", Sources: []string{"/dev/a"}, LogicalBytes: 4*statsCS + 100, AddedChunks: 4, AddedBytes: L(1) + L(2) + L(3) + L(4),
			ListAddedBytes: LL("A") + LL("B") + LL("C"), ListExclusiveBytes: LL("B")},
		{ID: sr.snaps[2], Host: "h1", Sources: []string{"/dev/a"}, LogicalBytes: 4*statsCS + 100, AddedChunks: 1, AddedBytes: L(5), ExclusiveChunks: 1, ExclusiveBytes: L(5),
			ListAddedBytes: LL("D"), ListExclusiveBytes: LL("D")},
		{ID: sr.snaps[3], Host: "h2", Sources: []string{"/dev/b"}, LogicalBytes: 2 * statsCS, AddedChunks: 1, AddedBytes: L(6), ExclusiveChunks: 1, ExclusiveBytes: L(6),
			ListAddedBytes: LL("E"), ListExclusiveBytes: LL("E")},
	}
	checkPer(t, st.PerSnapshot, want)
	checkGroups(t, "host", st.PerHost, []repo.GroupStats{
		// c1 is h2's too: h1 alone holds c2 to c5.
		{Host: "h1", Snapshots: 2, LogicalBytes: 2 * (4*statsCS + 100), ExclusiveChunks: 4, ExclusiveBytes: L(2) + L(3) + L(4) + L(5)},
		{Host: "h2", Snapshots: 1, LogicalBytes: 2 * statsCS, ExclusiveChunks: 1, ExclusiveBytes: L(6)},
	})
	checkGroups(t, "source", st.PerSource, []repo.GroupStats{
		{Host: "h1", Source: "/dev/a", Snapshots: 2, LogicalBytes: 2 * (4*statsCS + 100), ExclusiveChunks: 4, ExclusiveBytes: L(2) + L(3) + L(4) + L(5)},
		{Host: "h2", Source: "/dev/b", Snapshots: 1, LogicalBytes: 2 * statsCS, ExclusiveChunks: 1, ExclusiveBytes: L(6)},
	})

	c7pack, _ := sr.tr.Backend.Get(repotest.PackHandle(sr.c7Pack))
	if st.UnreferencedBlobs != 1 || st.UnreferencedBytes != L(7) || st.UnreferencedPacks != 1 ||
		st.UnreferencedPackBytes != int64(len(c7pack)) || st.DuplicateBytes != 0 || st.UnindexedPacks != 0 {
		t.Errorf("unreferenced: %d blobs, %d bytes, %d packs of %d bytes, %d duplicate, %d unindexed; want 1, %d, 1 of %d, 0, 0",
			st.UnreferencedBlobs, st.UnreferencedBytes, st.UnreferencedPacks, st.UnreferencedPackBytes, st.DuplicateBytes, st.UnindexedPacks,
			L(7), len(c7pack))
	}

	// A write-only key holds the metadata key: it sees the same figures.
	wo := sr.tr.Open(t, sr.tr.WriteOnly(t, "web1"))
	if got := sr.stats(t, wo, nil); got.UniqueStoredBytes != st.UniqueStoredBytes || got.StoredBytes != st.StoredBytes ||
		got.PerSnapshot[1].AddedBytes != st.PerSnapshot[1].AddedBytes || got.UnreferencedBytes != st.UnreferencedBytes {
		t.Errorf("write-only key: %+v\nowner: %+v", got, st)
	}
}

// Selecting s2 alone: its figures are still relative to every snapshot
// (s1, older, holds all but c5), and its host's exclusive chunks are
// those no unselected snapshot shares.
func TestStatsSelection(t *testing.T) {
	sr := makeStatsRepo(t)
	L := func(i int) int64 { return sr.stored(t, sr.c[i]) }
	st := sr.stats(t, sr.tr.Repository, func(sn *repo.Snapshot) bool { return sn.ID == sr.snaps[2] })
	if st.SelectedSnapshots != 1 || st.UniqueChunks != 5 || st.UniqueBytes != 4*statsCS+100 ||
		st.UniqueStoredBytes != L(1)+L(2)+L(3)+L(4)+L(5) || st.LogicalBytes != 4*statsCS+100 {
		t.Errorf("selection: %d snapshots, %d chunks, %d bytes, %d stored, %d logical", st.SelectedSnapshots, st.UniqueChunks, st.UniqueBytes, st.UniqueStoredBytes, st.LogicalBytes)
	}
	if len(st.PerSnapshot) != 1 || st.PerSnapshot[0].ID != sr.snaps[2] || st.PerSnapshot[0].AddedBytes != L(5) || st.PerSnapshot[0].ExclusiveBytes != L(5) {
		t.Errorf("per snapshot: %+v", st.PerSnapshot)
	}
	checkGroups(t, "host", st.PerHost, []repo.GroupStats{{Host: "h1", Snapshots: 1, LogicalBytes: 4*statsCS + 100, ExclusiveChunks: 1, ExclusiveBytes: L(5)}})
	// What no snapshot references does not depend on the selection.
	if st.UnreferencedBlobs != 1 || st.UnreferencedPacks != 1 {
		t.Errorf("unreferenced: %d blobs, %d packs", st.UnreferencedBlobs, st.UnreferencedPacks)
	}
}

// A damaged chunk list fails the walk, naming a snapshot and disk that
// reference it.
func TestStatsDamagedList(t *testing.T) {
	sr := makeStatsRepo(t)
	loc := sr.tr.Index().Copies(sr.lists["E"], repo.NoWriter)[0]
	sr.tr.Backend.Damage(repotest.PackHandle(loc.Pack), int64(loc.Offset)+int64(loc.Length)/2)
	ctx := context.Background()
	snaps, err := sr.tr.Snapshots(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = sr.tr.Stats(ctx, snaps, repo.StatsOptions{})
	if err == nil || !strings.Contains(err.Error(), "snapshot "+sr.snaps[3].Short()+" disk b") {
		t.Fatalf("stats over a damaged chunk list: %v, want an error naming snapshot %s disk b", err, sr.snaps[3].Short())
	}
}

func checkPer(t *testing.T, got, want []repo.SnapshotStats) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d snapshots, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		g := got[i]
		g.Time = time.Time{}
		if !reflect.DeepEqual(g, want[i]) {
			t.Errorf("snapshot %d:\n got %+v\nwant %+v", i+1, g, want[i])
		}
	}
}

func checkGroups(t *testing.T, what string, got, want []repo.GroupStats) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("per %s: %d groups, want %d: %+v", what, len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("per %s %d:\n got %+v\nwant %+v", what, i, got[i], want[i])
		}
	}
}
