package repo_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// TestIndexFileLoad: a repository opened with the local index file
// answers every query as one that loads the index objects into memory,
// after the ledger records packs deleted and damaged, after the file is
// damaged (rebuilt, with a warning) and after an index object is removed
// (the file is stale: rebuilt).
func TestIndexFileLoad(t *testing.T) {
	ctx := context.Background()
	cacheDir := t.TempDir()
	var mu sync.Mutex
	var warnings []string
	warn := func(f string, a ...any) {
		mu.Lock()
		warnings = append(warnings, fmt.Sprintf(f, a...))
		mu.Unlock()
	}
	tr := repotest.New(t, repotest.Options{CacheDir: cacheDir, Warn: warn})
	web := tr.Open(t, tr.WriteOnly(t, "web1"))
	var ids []repo.ID
	for i, r := range []*repo.Repository{tr.Repository, web} {
		if _, err := r.WithWriter(ctx, "backup", func(w *repo.Writer) error {
			got := saveChunks(t, r, w, uint64(1000*i), 48)
			ids = append(ids, got...)
			_, err := w.SaveSnapshot(ctx, snapshotOf(t, w, got))
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := filepath.Glob(filepath.Join(cacheDir, "*", "index.db"))
	if len(files) != 1 {
		t.Fatalf("%d index files in the cache, want 1", len(files))
	}
	db := files[0]
	inMemory := func() string {
		r, err := repo.Open(ctx, tr.Backend, tr.Keys, repo.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.LoadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		return answers(t, r, ids)
	}
	mapped := func(what string) {
		t.Helper()
		before, _ := os.Stat(db)
		r := tr.Reopen(t)
		if got, want := answers(t, r, ids), inMemory(); got != want {
			t.Fatalf("%s: with the index file:\n%s\nin memory:\n%s", what, got, want)
		}
		if after, err := os.Stat(db); err != nil || os.SameFile(before, after) != strings.HasPrefix(what, "kept") {
			t.Fatalf("%s: index file rewritten: %v", what, !os.SameFile(before, after))
		}
	}
	// The backups' index objects are not in the file yet (a few are
	// loaded into memory); without a file, the next open covers them all.
	mapped("kept: new objects loaded into memory")
	os.Remove(db)
	tr.Reopen(t)
	mapped("kept: every object in the file")

	packs := tr.Backend.Names(backend.PackFile)
	p0, err := repo.ParseID(packs[0])
	if err != nil {
		t.Fatal(err)
	}
	p1, _ := repo.ParseID(packs[1])
	if err := tr.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventPackDeleted, Pack: &p0}, {Kind: repo.EventPackDamaged, Pack: &p1, Reason: "test"}}); err != nil {
		t.Fatal(err)
	}
	mapped("kept: ledger applied per run")

	b, _ := os.ReadFile(db)
	b[len(b)/2] ^= 1
	os.WriteFile(db, b, 0o600)
	mu.Lock()
	warnings = nil
	mu.Unlock()
	mapped("rebuilt: damaged file")
	if !strings.Contains(strings.Join(warnings, "\n"), "local index file") {
		t.Fatalf("a damaged index file was rebuilt without a warning: %q", warnings)
	}

	objs := tr.Backend.Names(backend.IndexFile)
	if err := tr.Backend.Remove(ctx, backend.Handle{Type: backend.IndexFile, Name: objs[0]}); err != nil {
		t.Fatal(err)
	}
	mapped("rebuilt: an index object removed")
}
