package repo

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
)

type dbStatement struct {
	info  PackInfo
	w     WriterNum
	trust Trust
}

// dbStatements makes statements of packs about ids, then states a fifth of
// them again with more trust, as an endorsement in a later index object.
func dbStatements(rng *rand.Rand, ids []ID, packs int) []dbStatement {
	var out []dbStatement
	for p := 0; p < packs; p++ {
		info := PackInfo{ID: rngID(rng), Ephemeral: rngID(rng)}
		for j := 0; j < 1+rng.IntN(20); j++ {
			info.Blobs = append(info.Blobs, PackBlob{Type: BlobType(rng.IntN(2)), ID: ids[rng.IntN(len(ids))], Offset: uint32(32 + j*64), Length: 40})
		}
		out = append(out, dbStatement{info, WriterNum(rng.IntN(3)), Trust(1 << rng.IntN(3))})
	}
	for _, s := range out[:len(out)/5] {
		out = append(out, dbStatement{s.info, s.w, TrustOwner})
	}
	return out
}

// TestIndexFileFromRuns builds a local index file as a cold cache does,
// through batches spilled to run files, over an older file, and checks
// that it answers every query as the index held wholly in memory does,
// with the statements repeated across batches folded into one entry.
func TestIndexFileFromRuns(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	ids := make([]ID, 2000)
	for i := range ids {
		ids[i] = rngID(rng)
	}
	stmts := dbStatements(rng, ids, 300)
	mem := NewIndex()
	for len(mem.Writers.snapshot()) < 3 {
		mem.Writers.Number(rngID(rng), nil)
	}
	for _, s := range stmts {
		mem.Add(s.info, s.w, s.trust)
	}
	dir := t.TempDir()
	key := [32]byte{9}
	// The older file holds the first 50 statements.
	old := NewIndex()
	old.Writers = mem.Writers
	for _, s := range stmts[:50] {
		old.Add(s.info, s.w, s.trust)
	}
	oldPath := filepath.Join(dir, "old.db")
	if err := writeIndexDB(oldPath, key, old, nil); err != nil {
		t.Fatal(err)
	}
	base, err := openIndexDB(oldPath, key)
	if err != nil {
		t.Fatal(err)
	}
	scratch := NewIndex()
	scratch.Writers = mem.Writers
	scratch.setBase(base)
	defer scratch.dropSpilled()
	for i, s := range stmts[50:] {
		if i > 0 && i%37 == 0 {
			scratch.finishBulk()
			if err := scratch.spill(dir); err != nil {
				t.Fatal(err)
			}
		}
		scratch.addBulk(s.info, s.w, s.trust)
	}
	scratch.finishBulk()
	if len(scratch.spilled) < 5 {
		t.Fatalf("%d runs spilled", len(scratch.spilled))
	}
	path := filepath.Join(dir, indexDBName)
	if err := writeIndexDB(path, key, scratch, nil); err != nil {
		t.Fatal(err)
	}
	db, err := openIndexDB(path, key)
	if err != nil {
		t.Fatal(err)
	}
	built := NewIndex()
	built.Writers = mem.Writers
	built.setBase(db)
	if got, want := allCopies(built, ids), allCopies(mem, ids); !reflect.DeepEqual(got, want) {
		t.Fatal("the file built from runs answers differently")
	}
	nb, pb := built.Len()
	nm, pm := mem.Len()
	if nb != nm || pb != pm || int(db.nent) != nm {
		t.Fatalf("built from runs: %d entries (%d in the file), %d packs; in memory %d, %d", nb, db.nent, pb, nm, pm)
	}
	for _, id := range ids {
		for self := WriterNum(0); self < 3; self++ {
			c1, ok1 := mem.Reusable(DataBlob, id, self)
			c2, ok2 := built.Reusable(DataBlob, id, self)
			if ok1 != ok2 || c1 != c2 {
				t.Fatalf("Reusable(%v, %d) differs", id.Short(), self)
			}
		}
	}
	// The run files were unlinked at once: nothing is left in dir.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != "old.db" && e.Name() != indexDBName {
			t.Errorf("left in the cache: %s", e.Name())
		}
	}
}

func TestBuildBatches(t *testing.T) {
	obj := func(entries int64) backend.Info { return backend.Info{Size: entries * indexBlobEntry} }
	got := buildBatches([]backend.Info{obj(3), obj(3), obj(5), obj(20), obj(1)}, 8)
	var sizes []int
	for _, b := range got {
		sizes = append(sizes, len(b))
	}
	if !reflect.DeepEqual(sizes, []int{2, 1, 1, 1}) {
		t.Fatalf("batches of %v objects", sizes)
	}
	if buildBatches(nil, 8) != nil {
		t.Fatal("batches of nothing")
	}
}
