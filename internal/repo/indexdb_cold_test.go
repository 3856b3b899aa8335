package repo_test

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
)

// A cold cache builds the local index file through runs of a few index
// objects each (the bound lowered so that a small repository takes many):
// the index it gives answers as the one loaded into memory, every
// snapshot restores, no temporary file stays; a cancelled build leaves
// no index file.
func TestColdIndexBuildThroughRuns(t *testing.T) {
	w := newListingWorld(t)
	var snaps []*repo.Snapshot
	var datas [][]byte
	for i := byte(0); i < 12; i++ {
		data := listingData(10 + i)
		sn, _, _ := w.backup(t, 0, data)
		snaps, datas = append(snaps, sn), append(datas, data)
	}
	if n := len(w.Backend.Names(backend.IndexFile)); n < 10 {
		t.Fatalf("%d index objects", n)
	}
	dbs, _ := filepath.Glob(filepath.Join(w.cache, "*", "index.db"))
	if len(dbs) != 1 {
		t.Fatalf("index files: %v", dbs)
	}
	cacheDir := filepath.Dir(dbs[0])

	// A cancelled cold build writes no file.
	os.Remove(dbs[0])
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r, err := repo.Open(context.Background(), w.Backend, w.Keys, repo.Options{CacheDir: w.cache, Warn: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	repo.SetIndexBuildBatch(r, 1)
	if err := r.LoadIndex(ctx); err == nil {
		t.Fatal("a cancelled load succeeded")
	}
	if _, err := os.Stat(dbs[0]); err == nil {
		t.Fatal("a cancelled build left an index file")
	}

	r, err = repo.Open(context.Background(), w.Backend, w.Keys, repo.Options{CacheDir: w.cache, Warn: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	repo.SetIndexBuildBatch(r, 100) // a few index objects a run
	if err := r.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dbs[0]); err != nil {
		t.Fatalf("no index file after a cold build: %v", err)
	}
	inMem, err := repo.Open(context.Background(), w.Backend, w.Keys, repo.Options{Warn: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	if err := inMem.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	b1, p1 := r.Index().Len()
	b2, p2 := inMem.Index().Len()
	if b1 != b2 || p1 != p2 {
		t.Fatalf("built through runs: %d entries in %d packs; in memory %d in %d", b1, p1, b2, p2)
	}
	var built, mem []string
	r.Index().Each(func(id repo.ID, c repo.Copy) { built = append(built, id.String()+c.Pack.String()) })
	inMem.Index().Each(func(id repo.ID, c repo.Copy) { mem = append(mem, id.String()+c.Pack.String()) })
	if !reflect.DeepEqual(built, mem) {
		t.Fatal("the index built through runs holds other copies")
	}
	for i, sn := range snaps {
		w.mustRestore(t, sn.ID, datas[i])
	}
	ents, _ := os.ReadDir(cacheDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp") {
			t.Errorf("left in the cache: %s", e.Name())
		}
	}
}
