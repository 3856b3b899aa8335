package main

import (
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
)

// A backup within --pack-listing-max-age of this machine's last listing
// of packs, in a repository of more packs than --pack-listing-min-packs
// (100000; lowered here), does not list data/ again: a pack deleted outside sauve in
// between is reused (the documented window, docs/FORMAT.md "Backups
// without a listing of packs"); check --read-data finds what that spoils
// and records the pack missing, after which backups store its chunks
// again; --pack-listing-max-age 0 lists at once.
func TestBackupPackListingRecord(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(6<<20))
	e.backup(src, "--json", "--pack-listing-min-packs", "0")
	s := e.store()
	removeAllPacks := func() {
		for _, name := range s.names(backend.PackFile) {
			s.remove(pack(name))
		}
	}
	removeAllPacks()
	if b := e.backup(src, "--json", "--pack-listing-min-packs", "0"); b.ChunksNew != 0 {
		t.Fatalf("a backup within the listing's age stored %d chunks: it listed the packs", b.ChunksNew)
	}
	r := e.run("check", "--read-data", "--json")
	if r.code == 0 {
		t.Fatalf("check --read-data passes with a pack deleted: %s", r.stdout)
	}
	b := e.backup(src, "--json", "--pack-listing-min-packs", "0")
	if b.ChunksNew == 0 {
		t.Fatal("a backup after check recorded a pack missing reused its chunks")
	}
	e.restored(b.Snapshot, src)
	removeAllPacks()
	b = e.backup(src, "--json", "--pack-listing-min-packs", "0", "--pack-listing-max-age", "0")
	if b.ChunksNew == 0 {
		t.Fatal("backup --pack-listing-max-age 0 reused the chunks of a deleted pack")
	}
	e.restored(b.Snapshot, src)
}
