package repo_test

import (
	"context"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
)

// TestStats: two snapshots sharing half their chunks; what each adds and
// holds alone, against the index's own sizes.
func TestStats(t *testing.T) {
	tr := newPruneRepo(t)
	a := backupChunks(t, tr.Repository, 0, 40)
	b := backupChunks(t, tr.Repository, 20, 60)
	r := tr.Reopen(t)
	ctx := context.Background()
	stored := func(from, to uint64) int64 {
		var n int64
		for i := from; i < to; i++ {
			c, k := r.Index().Best(repo.DataBlob, r.ChunkID(chunkOf(i)), repo.NoWriter)
			if k == 0 {
				t.Fatalf("chunk %d not indexed", i)
			}
			n += int64(c.Length)
		}
		return n
	}
	list := func(id repo.ID) int64 {
		sn, err := r.LoadSnapshot(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := r.Index().Best(repo.MetaBlob, sn.Disks[0].ChunkLists[0], repo.NoWriter)
		return int64(c.Length)
	}
	la, lb := list(a), list(b)
	list = func(id repo.ID) int64 {
		if id == a {
			return la
		}
		return lb
	}
	rep, err := r.Stats(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Snapshots != 2 || rep.LogicalBytes != 80*chunk || rep.UniqueBytes != 60*chunk {
		t.Fatalf("totals: %+v", rep)
	}
	if rep.UniqueStoredBytes != stored(0, 60)+list(a)+list(b) || rep.UnreferencedBytes != 0 {
		t.Fatalf("stored %d, want %d; unreferenced %d", rep.UniqueStoredBytes, stored(0, 60)+list(a)+list(b), rep.UnreferencedBytes)
	}
	ca, cb := rep.PerSnapshot[0], rep.PerSnapshot[1]
	if ca.ID != a || ca.Added != stored(0, 40)+list(a) || ca.Exclusive != stored(0, 20)+list(a) {
		t.Fatalf("first snapshot: %+v (added want %d, exclusive %d)", ca, stored(0, 40)+list(a), stored(0, 20)+list(a))
	}
	if cb.ID != b || cb.Added != stored(40, 60)+list(b) || cb.Exclusive != stored(40, 60)+list(b) {
		t.Fatalf("second snapshot: %+v", cb)
	}
	if len(rep.PerGroup) != 1 || rep.PerGroup[0].Snapshots != 2 {
		t.Fatalf("groups: %+v", rep.PerGroup)
	}
	var packs int64
	for _, name := range tr.Backend.Names(backend.PackFile) {
		d, _ := tr.Backend.Get(backend.Handle{Type: backend.PackFile, Name: name})
		packs += int64(len(d))
	}
	if rep.Objects["data"].Bytes != packs {
		t.Fatalf("packs %d bytes, stats says %d", packs, rep.Objects["data"].Bytes)
	}

	// Forgotten, a's own chunks are what prune would free.
	forget(t, tr, a)
	rep, err = tr.Reopen(t).Stats(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.UnreferencedBytes != stored(0, 20)+list(a) {
		t.Fatalf("unreferenced %d, want %d", rep.UnreferencedBytes, stored(0, 20)+list(a))
	}
}
