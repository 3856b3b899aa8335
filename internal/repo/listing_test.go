package repo_test

// A backup that takes the listing of packs from this machine's record of
// the last one (ReuseListing) instead of listing data/: what it must still
// avoid (packs missing then, packs the owner recorded missing), what it
// still finds (its own interrupted uploads), and when it lists anyway.

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

const listingChunks = 40

// listingWorld is a repository with a cache, as a backup client has one.
type listingWorld struct {
	*repotest.Repo
	cache string
	lists atomic.Int64 // LISTs of data/
	stats atomic.Int64 // Stats of packs
	// minPacks is passed to ReuseListing.
	minPacks int
}

func newListingWorld(t *testing.T) *listingWorld {
	cache := t.TempDir()
	w := &listingWorld{Repo: repotest.New(t, repotest.Options{CacheDir: cache}), cache: cache}
	w.Backend.Fail = func(op string, h backend.Handle) error {
		switch {
		case op == "list" && h.Type == backend.PackFile:
			w.lists.Add(1)
		case op == "stat" && h.Type == backend.PackFile:
			w.stats.Add(1)
		}
		return nil
	}
	return w
}

// open opens the repository as a backup does, allowing a listing record
// of up to age.
func (w *listingWorld) open(t *testing.T, age time.Duration) *repo.Repository {
	t.Helper()
	r, err := repo.Open(context.Background(), w.Backend, w.Keys, repo.Options{CacheDir: w.cache, Warn: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	r.ReuseListing(age, w.minPacks)
	if err := r.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	return r
}

// backup opens the repository allowing a record of up to age, adopts what
// an interrupted backup left, and backs data up.
func (w *listingWorld) backup(t *testing.T, age time.Duration, data []byte) (*repo.Snapshot, repo.DiskStats, int) {
	t.Helper()
	r := w.open(t, age)
	adopted, err := r.AdoptOrphanPacks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	res, err := backup.Run(context.Background(), r, backup.Source{Name: "vda", Path: "/dev/vda", Kind: "device", Size: int64(len(data)), At: bytes.NewReader(data)},
		backup.Options{Host: "web1", Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	return res.Snapshot, res.Stats, adopted
}

// mustRestore fails unless snapshot id reads back as want.
func (w *listingWorld) mustRestore(t *testing.T, id repo.ID, want []byte) {
	t.Helper()
	ctx := context.Background()
	r := w.open(t, 0)
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	dr, err := r.NewDiskReader(ctx, &sn.Disks[0], repo.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close()
	got, err := io.ReadAll(io.NewSectionReader(dr, 0, dr.Size()))
	if err != nil {
		t.Fatalf("restore %s: %v", id.Short(), err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("snapshot %s restores other bytes", id.Short())
	}
}

func listingData(seed byte) []byte {
	b := make([]byte, listingChunks*repo.MinChunkSize)
	x := uint32(seed) + 1
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
	return b
}

// removeOnePack deletes a pack outside sauve and returns its ID.
func (w *listingWorld) removeOnePack(t *testing.T) repo.ID {
	t.Helper()
	name := w.Backend.Names(backend.PackFile)[0]
	if err := w.Backend.Remove(context.Background(), backend.Handle{Type: backend.PackFile, Name: name}); err != nil {
		t.Fatal(err)
	}
	id, _ := repo.ParseID(name)
	return id
}

func TestBackupReusesPackListing(t *testing.T) {
	w := newListingWorld(t)
	data := listingData(1)
	w.backup(t, time.Hour, data)
	w.lists.Store(0)
	sn, st, _ := w.backup(t, time.Hour, data)
	if n := w.lists.Load(); n != 0 {
		t.Fatalf("a backup with a fresh listing record listed data/ %d times", n)
	}
	if st.ChunksNew != 0 {
		t.Fatalf("a backup of unchanged data with a listing record stored %d chunks", st.ChunksNew)
	}
	w.mustRestore(t, sn.ID, data)
	// Too old a record, a damaged one, or none allowed: the backup lists.
	for _, tc := range []struct {
		name  string
		age   time.Duration
		spoil func(path string)
	}{
		{"stale", time.Nanosecond, nil},
		{"damaged", time.Hour, func(path string) {
			b, _ := os.ReadFile(path)
			b[9] ^= 1
			os.WriteFile(path, b, 0o600)
		}},
		{"none", time.Hour, func(path string) { os.Remove(path) }},
		{"not allowed", 0, nil},
		{"small repository", time.Hour, func(string) { w.minPacks = 1000 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.spoil != nil {
				matches, _ := filepath.Glob(filepath.Join(w.cache, "*", "pack-listing"))
				if len(matches) != 1 {
					t.Fatalf("listing records: %v", matches)
				}
				tc.spoil(matches[0])
			}
			w.lists.Store(0)
			w.open(t, tc.age)
			if w.lists.Load() == 0 {
				t.Fatal("the backup used a listing record it must not")
			}
		})
	}
}

// A pack missing at the listing the record was made of stays missing.
func TestListingRecordKeepsMissingPacks(t *testing.T) {
	w := newListingWorld(t)
	data := listingData(2)
	w.backup(t, 0, data)
	w.removeOnePack(t)
	w.open(t, 0) // lists, and records the missing pack
	w.lists.Store(0)
	sn, st, _ := w.backup(t, time.Hour, data)
	if w.lists.Load() != 0 {
		t.Fatal("the backup listed data/ with a fresh record")
	}
	if st.ChunksNew == 0 {
		t.Fatal("the backup reused the chunks of a pack missing at the recorded listing")
	}
	w.mustRestore(t, sn.ID, data)
}

// A pack the owner's check recorded missing is not reused, though the
// record of the listing, older, has it stored.
func TestRecordedMissingPackNotReused(t *testing.T) {
	w := newListingWorld(t)
	data := listingData(3)
	w.backup(t, time.Hour, data)
	w.removeOnePack(t)
	// check, as 'sauve check' does, keeps no cache (nor listing record).
	owner, err := repo.Open(context.Background(), w.Backend, w.Keys, repo.Options{Warn: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := owner.Check(context.Background(), repo.CheckOptions{ReadData: true, Record: true}); err != nil {
		t.Fatal(err)
	}
	w.lists.Store(0)
	sn, st, _ := w.backup(t, time.Hour, data)
	if w.lists.Load() != 0 {
		t.Fatal("the backup listed data/ with a fresh record")
	}
	if st.ChunksNew == 0 {
		t.Fatal("the backup reused the chunks of a pack the owner recorded missing")
	}
	w.mustRestore(t, sn.ID, data)
}

// The packs of a backup interrupted before it indexed them are found from
// the journal of this machine's uploads, without a listing, and adopted.
func TestInterruptedBackupAdoptedWithoutListing(t *testing.T) {
	w := newListingWorld(t)
	data := listingData(4)
	sn, _, _ := w.backup(t, time.Hour, data)
	// What a kill -9 before the index objects and the manifest leaves.
	for _, k := range []backend.FileType{backend.IndexFile, backend.SnapshotFile} {
		for _, name := range w.Backend.Names(k) {
			w.Backend.Remove(context.Background(), backend.Handle{Type: k, Name: name})
		}
	}
	w.lists.Store(0)
	w.stats.Store(0)
	sn2, st, adopted := w.backup(t, time.Hour, data)
	if w.lists.Load() != 0 {
		t.Fatal("the backup listed data/ with a fresh record")
	}
	if adopted == 0 || w.stats.Load() == 0 {
		t.Fatalf("adopted %d packs after %d stats", adopted, w.stats.Load())
	}
	if st.ChunksNew != 0 {
		t.Fatalf("the backup after the interrupted one stored %d chunks again", st.ChunksNew)
	}
	w.mustRestore(t, sn2.ID, data)
	_ = sn
}
