package repotest

import (
	"sync/atomic"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
)

// PackHandle is the backend handle of a pack.
func PackHandle(id repo.ID) backend.Handle {
	return backend.Handle{Type: backend.PackFile, Name: id.String()}
}

// BestCopy returns the copy of data chunk id that a reader of d fetches
// first, failing the test when there is none.
func (tr *Repo) BestCopy(t testing.TB, d *repo.Disk, id repo.ID) repo.Location {
	t.Helper()
	loc, err := tr.Repository.BestCopy(id, d.Writer())
	if err != nil {
		t.Fatalf("chunk %s: %v", id.Short(), err)
	}
	return loc
}

// Duplicate stores a second copy of data blob id, alone in a new pack
// the owner signs and indexes, as a second backup of the same chunk
// would, and reopens the repository so that its index holds both copies.
func (tr *Repo) Duplicate(t testing.TB, id repo.ID) repo.ID {
	t.Helper()
	copies := tr.Index().Copies(id, repo.NoWriter)
	if len(copies) == 0 {
		t.Fatalf("chunk %s is not stored", id.Short())
	}
	loc := copies[0].Location
	pack, ok := tr.Backend.Get(PackHandle(loc.Pack))
	if !ok || int64(loc.Offset)+int64(loc.Length) > int64(len(pack)) {
		t.Fatalf("pack %s of chunk %s is not stored whole", loc.Pack.Short(), id.Short())
	}
	sealed := pack[loc.Offset : loc.Offset+loc.Length]
	data, info := repo.BuildPack(tr.Keys, loc.Ephemeral, []repo.RawBlob{{Type: repo.DataBlob, ID: id, Sealed: sealed}})
	tr.Backend.Put(PackHandle(info.ID), data)
	idx := repo.BuildIndex(tr.Keys, []repo.PackInfo{info})
	tr.Backend.Put(backend.Handle{Type: backend.IndexFile, Name: repo.Hash(idx).String()}, idx)
	tr.Reopen(t)
	return info.ID
}

// CountLoads counts the ranged reads of packs (and only those) from now
// on, passing on to fail, if not nil, what it says of each.
func (tr *Repo) CountLoads(fail func(op string, h backend.Handle) error) *atomic.Int64 {
	var n atomic.Int64
	tr.Backend.Fail = func(op string, h backend.Handle) error {
		if op == "load" && h.Type == backend.PackFile {
			n.Add(1)
		}
		if fail != nil {
			return fail(op, h)
		}
		return nil
	}
	return &n
}
