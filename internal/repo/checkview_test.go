package repo_test

import (
	"context"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// answers describes what an open repository's view says: every copy of
// each blob and whether this key may reuse it, the packs' states, the
// writers and their revocations, the snapshots and their marks.
func answers(t *testing.T, r *repo.Repository, ids []repo.ID) string {
	t.Helper()
	var b strings.Builder
	x := r.Index()
	blobs, packs := x.Len()
	fmt.Fprintf(&b, "%d blobs in %d packs\n", blobs, packs)
	for _, id := range ids {
		c, ok := x.Reusable(repo.DataBlob, id, r.Self())
		fmt.Fprintf(&b, "%s reusable %v %v:", id.Short(), ok, c.Location)
		for _, cp := range x.Copies(id, repo.NoWriter) {
			fmt.Fprintf(&b, " [%v %q %v %d]", cp.Location, cp.Damaged, cp.Missing, cp.Writer)
		}
		b.WriteString("\n")
	}
	for _, ps := range x.PackStates() {
		fmt.Fprintf(&b, "%+v\n", ps)
	}
	for n := repo.WriterNum(0); ; n++ {
		w, ok := r.Writers().Get(n)
		if !ok {
			break
		}
		fmt.Fprintf(&b, "writer %d %s revoked %v\n", n, w.Name(), r.Writers().Revoked(n))
	}
	led, err := r.Ledger(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "ledger: %d records, %d damaged packs\n", led.Records, len(led.Packs))
	return b.String()
}

// files lists a folder's files with their sizes and times.
func files(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		out = append(out, fmt.Sprintf("%s %d %v", p, fi.Size(), fi.ModTime()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// check builds a view of its own: checking a repository whose packs were
// damaged, truncated and lost meanwhile, and whose writer the owner
// revoked meanwhile, finds all of it, records it, and leaves the open
// repository's index, writers, ledger and cache as they were.
func TestCheckLeavesTheRepositoryAlone(t *testing.T) {
	ctx := context.Background()
	cacheDir := t.TempDir()
	tr := repotest.New(t, repotest.Options{CacheDir: cacheDir})
	webKeys := tr.WriteOnly(t, "web1")
	web := tr.Open(t, webKeys)
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
	r := tr.Reopen(t)
	before := answers(t, r, ids)

	// Meanwhile: storage damages one pack, truncates another and loses a
	// third; the owner (another process) revokes web1.
	packs := tr.Backend.Names(backend.PackFile)
	if len(packs) < 4 {
		t.Fatalf("%d packs, want at least 4", len(packs))
	}
	pack := func(i int) backend.Handle { return backend.Handle{Type: backend.PackFile, Name: packs[i]} }
	tr.Backend.Damage(pack(0), 100)
	tr.Backend.Truncate(pack(1), 200)
	if err := tr.Backend.Remove(ctx, pack(2)); err != nil {
		t.Fatal(err)
	}
	other := tr.Open(t, tr.Keys)
	signer := webKeys.SignerPublic()
	if err := other.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventWriterRevoked, Signer: signer[:], Name: "web1"}}); err != nil {
		t.Fatal(err)
	}
	cacheBefore := files(t, cacheDir)

	rep, err := r.Check(ctx, repo.CheckOptions{ReadData: true, Record: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || len(rep.DamagedPacks) < 3 || !rep.Recorded {
		t.Fatalf("check missed what happened meanwhile: %d damaged packs, recorded %v, errors %v", len(rep.DamagedPacks), rep.Recorded, rep.Errors)
	}
	if after := answers(t, r, ids); after != before {
		t.Fatalf("check changed the open repository's view:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if cacheAfter := files(t, cacheDir); !slices.Equal(cacheBefore, cacheAfter) {
		t.Fatalf("check changed the local cache:\nbefore %v\nafter  %v", cacheBefore, cacheAfter)
	}
	// What check recorded is there for a repository opened afterwards.
	fresh := tr.Reopen(t)
	if now := answers(t, fresh, ids); now == before {
		t.Fatal("a repository opened after check sees nothing of what it recorded")
	}
}
