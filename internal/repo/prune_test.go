package repo_test

// Prune on the in-memory backend: what it deletes and repacks, that every
// kept snapshot stays whole, and the races with backups running at the
// same time under write-only keys, forced with prune's pause points. The
// storage clock ticks a second per object, so that storage times order
// the steps as they would on an object store with whole-second times.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// tickingClock advances a second every time it is read.
type tickingClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *tickingClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(time.Second)
	return c.now
}

func newPruneRepo(t *testing.T) *repotest.Repo {
	tr := repotest.New(t, repotest.Options{})
	tr.Backend.SetClock((&tickingClock{now: time.Date(2030, 1, 2, 3, 0, 0, 0, time.UTC)}).Now)
	return tr
}

// backupChunks stores a snapshot of the chunks of seeds [from, to) with r
// and returns its ID.
func backupChunks(t *testing.T, r *repo.Repository, from, to uint64) repo.ID {
	t.Helper()
	var id repo.ID
	_, err := r.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		ids := saveChunks(t, r, w, from, int(to-from))
		var err error
		id, err = w.SaveSnapshot(context.Background(), snapshotOf(t, w, ids))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// forget removes a manifest as 'sauve forget' does, leaving its chunks.
func forget(t *testing.T, tr *repotest.Repo, id repo.ID) {
	t.Helper()
	ctx := context.Background()
	if err := tr.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventSnapshotForgotten, Snapshot: &id}}); err != nil {
		t.Fatal(err)
	}
	if err := tr.Backend.Remove(ctx, backend.Handle{Type: backend.SnapshotFile, Name: id.String()}); err != nil {
		t.Fatal(err)
	}
}

// mustHold fails unless snapshot id restores as the chunks of seeds
// [from, to), read through a freshly opened repository.
func mustHold(t *testing.T, tr *repotest.Repo, id repo.ID, from, to uint64) {
	t.Helper()
	ctx := context.Background()
	r := tr.Open(t, tr.Keys)
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatalf("snapshot %s: %v", id.Short(), err)
	}
	list := r.ChunkList(&sn.Disks[0])
	if list.Len() != int64(to-from) {
		t.Fatalf("snapshot %s has %d chunks, want %d", id.Short(), list.Len(), to-from)
	}
	for i := range list.Len() {
		cid, err := list.At(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadBlobFor(ctx, repo.DataBlob, cid, nil, sn.Disks[0].Writer())
		if err != nil {
			t.Fatalf("snapshot %s chunk %d: %v", id.Short(), i, err)
		}
		if !bytes.Equal(got, chunkOf(from+uint64(i))) {
			t.Fatalf("snapshot %s chunk %d differs", id.Short(), i)
		}
	}
}

func mustCheck(t *testing.T, tr *repotest.Repo) {
	t.Helper()
	rep, err := tr.Open(t, tr.Keys).Check(context.Background(), repo.CheckOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("check --read-data after prune: errors %v, damaged %v", rep.Errors, rep.Damaged)
	}
}

func storedBytes(tr *repotest.Repo) (n int, size int64) {
	for _, name := range tr.Backend.Names(backend.PackFile) {
		data, _ := tr.Backend.Get(backend.Handle{Type: backend.PackFile, Name: name})
		n++
		size += int64(len(data))
	}
	return n, size
}

func prune(t *testing.T, r *repo.Repository, opts repo.PruneOptions) *repo.PruneReport {
	t.Helper()
	if opts.MaxUnused == 0 {
		opts.MaxUnused = 0.05
	}
	rep, err := r.Prune(context.Background(), opts)
	if err != nil {
		t.Fatalf("prune: %v", err)
	}
	return rep
}

func TestPruneFreesWhatForgottenSnapshotsAloneHeld(t *testing.T) {
	tr := newPruneRepo(t)
	a := backupChunks(t, tr.Repository, 0, 40)
	b := backupChunks(t, tr.Repository, 20, 60) // shares chunks 20..39 with a
	_, before := storedBytes(tr)
	forget(t, tr, a)

	dry := prune(t, tr.Reopen(t), repo.PruneOptions{DryRun: true})
	if n, size := storedBytes(tr); size != before || dry.Condemned.Packs == 0 {
		t.Fatalf("dry run: %d packs %d bytes stored (was %d), report %+v", n, size, before, dry)
	}

	rep := prune(t, tr.Reopen(t), repo.PruneOptions{})
	if rep.Deleted.Packs == 0 || rep.Waiting.Packs != 0 {
		t.Fatalf("nothing deleted with no backup running: %+v", rep)
	}
	// The dry run's estimate is the run's figures but for pack overhead.
	if dry.RepackedBlobs != rep.RepackedBlobs || dry.Condemned != rep.Condemned ||
		dry.After.Bytes < rep.After.Bytes*9/10 || dry.After.Bytes > rep.After.Bytes*11/10 {
		t.Fatalf("dry run estimated %+v, the run did %+v", dry, rep)
	}
	_, after := storedBytes(tr)
	// What a alone held: 20 chunks of random data and its chunk list.
	alone := int64(20 * chunk)
	if freed := before - after; freed < alone*9/10 || freed > alone*12/10 {
		t.Fatalf("prune freed %d bytes, a alone held about %d", freed, alone)
	}
	mustHold(t, tr, b, 20, 60)
	mustCheck(t, tr)

	again := prune(t, tr.Reopen(t), repo.PruneOptions{})
	if again.Deleted.Packs != 0 || again.Condemned.Packs != 0 || again.Repacked.Packs != 0 {
		t.Fatalf("second prune still found work: %+v", again)
	}
	// Only the last prune's own announcements stay (start, renewal, end).
	if len(tr.Backend.Names(backend.SessionFile)) > 3 {
		t.Fatalf("announcements of ended sessions left: %v", tr.Backend.Names(backend.SessionFile))
	}
}

// The race the issue names: a backup has deduplicated against a chunk of
// a forgotten snapshot when prune condemns its pack; the backup then
// writes its manifest. The pack must not be deleted under it.
func TestPruneWaitsForBackupThatReusedCondemnedChunks(t *testing.T) {
	tr := newPruneRepo(t)
	old := backupChunks(t, tr.Repository, 0, 16)
	forget(t, tr, old)
	wr := tr.Open(t, tr.WriteOnly(t, "web1"))

	deduped, resume := make(chan struct{}), make(chan struct{})
	var snap repo.ID
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, err := wr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
			var ids []repo.ID
			for i := range uint64(16) {
				data := chunkOf(i)
				res, err := w.SaveBlob(context.Background(), repo.DataBlob, wr.ChunkID(data), data)
				if err != nil {
					return err
				}
				if res.New {
					return errors.New("the owner's stored chunk was not reused: the race is not set up")
				}
				ids = append(ids, wr.ChunkID(data))
			}
			close(deduped)
			<-resume
			var err error
			snap, err = w.SaveSnapshot(context.Background(), snapshotOf(t, w, ids))
			return err
		})
		if err != nil {
			t.Error(err)
		}
	}()
	<-deduped
	rep := prune(t, tr.Reopen(t), repo.PruneOptions{})
	if rep.Deleted.Packs != 0 || rep.Condemned.Packs == 0 || rep.Waiting.Packs != rep.Condemned.Packs || len(rep.WaitingFor) != 1 {
		t.Fatalf("prune did not wait for the running backup: %+v", rep)
	}
	close(resume)
	wg.Wait()
	if t.Failed() {
		return
	}
	mustHold(t, tr, snap, 0, 16)

	// Once the backup has ended, the next prune deletes the condemned
	// packs, after copying out what the new snapshot needs.
	rep = prune(t, tr.Reopen(t), repo.PruneOptions{})
	if rep.Deleted.Packs == 0 || rep.RepackedBlobs == 0 {
		t.Fatalf("second prune: %+v", rep)
	}
	mustHold(t, tr, snap, 0, 16)
	mustCheck(t, tr)
}

// The other order: a backup that starts after the condemnation reads it
// and stores the chunks again instead of reusing them.
func TestBackupAfterCondemnationStoresChunksAgain(t *testing.T) {
	tr := newPruneRepo(t)
	old := backupChunks(t, tr.Repository, 0, 16)
	forget(t, tr, old)
	// A session that stays live keeps the condemned packs from being
	// deleted at once.
	holder := tr.Open(t, tr.WriteOnly(t, "slow"))
	hold, release := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, err := holder.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
			close(hold)
			<-release
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}()
	<-hold
	wr := tr.Open(t, tr.WriteOnly(t, "web1")) // loaded before the condemnation
	rep := prune(t, tr.Reopen(t), repo.PruneOptions{})
	if rep.Condemned.Packs == 0 || rep.Deleted.Packs != 0 {
		t.Fatalf("first prune: %+v", rep)
	}
	var snap repo.ID
	_, err := wr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		var ids []repo.ID
		for i := range uint64(16) {
			data := chunkOf(i)
			res, err := w.SaveBlob(context.Background(), repo.DataBlob, wr.ChunkID(data), data)
			if err != nil {
				return err
			}
			if !res.New {
				return errors.New("a chunk of a condemned pack was reused")
			}
			ids = append(ids, wr.ChunkID(data))
		}
		var err error
		snap, err = w.SaveSnapshot(context.Background(), snapshotOf(t, w, ids))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	close(release)
	wg.Wait()
	// The condemned packs go. (The only copies the owner vouches for
	// are in them, so prune copies them out, verified, rather than keep
	// the writer's unverified ones.)
	rep = prune(t, tr.Reopen(t), repo.PruneOptions{})
	if rep.Deleted.Packs == 0 || rep.Waiting.Packs != 0 {
		t.Fatalf("second prune: %+v", rep)
	}
	mustHold(t, tr, snap, 0, 16)
	mustCheck(t, tr)
}

// A prune killed at any point leaves a repository that checks clean and
// restores, and the next prune finishes the work.
func TestPruneInterruptedAtEachPoint(t *testing.T) {
	for _, point := range []string{"planned", "repacked", "condemned", "deleting"} {
		t.Run(point, func(t *testing.T) {
			tr := newPruneRepo(t)
			a := backupChunks(t, tr.Repository, 0, 40)
			b := backupChunks(t, tr.Repository, 20, 60)
			forget(t, tr, a)
			ctx, cancel := context.WithCancel(context.Background())
			_, err := tr.Reopen(t).Prune(ctx, repo.PruneOptions{MaxUnused: 0.05, Pause: func(p string) {
				if p == point {
					cancel()
				}
			}})
			if err == nil {
				t.Fatalf("prune stopped at %s returned no error", point)
			}
			mustHold(t, tr, b, 20, 60)
			mustCheck(t, tr)
			_, before := storedBytes(tr)
			rep := prune(t, tr.Reopen(t), repo.PruneOptions{})
			_, after := storedBytes(tr)
			if rep.Waiting.Packs != 0 || after >= before && point != "deleting" {
				t.Fatalf("next prune did not finish: %+v (%d → %d bytes)", rep, before, after)
			}
			mustHold(t, tr, b, 20, 60)
			mustCheck(t, tr)
			if again := prune(t, tr.Reopen(t), repo.PruneOptions{}); again.Deleted.Packs+again.Condemned.Packs != 0 {
				t.Fatalf("work left after two prunes: %+v", again)
			}
		})
	}
}

func TestPruneRefusals(t *testing.T) {
	tr := newPruneRepo(t)
	a := backupChunks(t, tr.Repository, 0, 40)
	backupChunks(t, tr.Repository, 20, 60)
	forget(t, tr, a)

	_, err := tr.Open(t, tr.WriteOnly(t, "web1")).Prune(context.Background(), repo.PruneOptions{})
	if !errors.Is(err, repo.ErrPruneOwner) {
		t.Fatalf("write-only prune: %v", err)
	}

	// A damaged chunk in a pack that must be repacked (chunk 20 is kept
	// by b, in a pack mostly a's) stops the prune, naming the pack, with
	// nothing condemned or deleted.
	loc, ok := tr.Reopen(t).Index().Lookup(tr.ChunkID(chunkOf(20)))
	if !ok {
		t.Fatal("chunk 20 is not indexed")
	}
	before := tr.Backend.Names(backend.LedgerFile)
	tr.Backend.Damage(backend.Handle{Type: backend.PackFile, Name: loc.Pack.String()}, int64(loc.Offset)+40)
	_, err = tr.Reopen(t).Prune(context.Background(), repo.PruneOptions{MaxUnused: 0.05})
	if err == nil || !strings.Contains(err.Error(), "pack "+loc.Pack.Short()+": blob") || !strings.Contains(err.Error(), "nothing was deleted") {
		t.Fatalf("prune over a damaged chunk: %v", err)
	}
	if len(tr.Backend.Names(backend.LedgerFile)) != len(before) {
		t.Fatal("prune over a damaged chunk recorded something")
	}

	// Damage everywhere (chunk lists too) stops it as well.
	names := tr.Backend.Names(backend.PackFile)
	packs := len(names)
	ledger := len(tr.Backend.Names(backend.LedgerFile))
	for _, name := range names {
		h := backend.Handle{Type: backend.PackFile, Name: name}
		data, _ := tr.Backend.Get(h)
		for off := int64(100); off < int64(len(data))-100; off += 1000 {
			tr.Backend.Damage(h, off) // every blob of every pack
		}
	}
	_, err = tr.Reopen(t).Prune(context.Background(), repo.PruneOptions{MaxUnused: 0.05})
	named := false
	for _, name := range names {
		named = named || err != nil && strings.Contains(err.Error(), "pack "+name[:8])
	}
	if !named || !strings.Contains(err.Error(), "nothing was deleted") {
		t.Fatalf("prune over a damaged pack: %v", err)
	}
	if len(tr.Backend.Names(backend.PackFile)) != packs || len(tr.Backend.Names(backend.LedgerFile)) != ledger {
		t.Fatal("prune over a damaged pack deleted or recorded something")
	}

	// A manifest that cannot be read stops it too: its chunks are unknown.
	tr2 := newPruneRepo(t)
	s := backupChunks(t, tr2.Repository, 0, 8)
	tr2.Backend.Damage(backend.Handle{Type: backend.SnapshotFile, Name: s.String()}, 10)
	_, err = tr2.Reopen(t).Prune(context.Background(), repo.PruneOptions{})
	if err == nil || !strings.Contains(err.Error(), "nothing was deleted") {
		t.Fatalf("prune with an unreadable snapshot: %v", err)
	}
}

// A backup that outlives its session (the machine was suspended past the
// lifetime, so its announcement expired): prune takes it for dead and
// deletes the packs it had reused, and the backup then refuses to write
// its manifest. No snapshot ever names the deleted data.
func TestBackupThatOutlivesItsSessionFailsClearly(t *testing.T) {
	tm := newTimed(t)
	ctx := context.Background()
	old := backupChunks(t, tm.Repository, 0, 16)
	if err := tm.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventSnapshotForgotten, Snapshot: &old}}); err != nil {
		t.Fatal(err)
	}
	tm.Backend.Remove(ctx, backend.Handle{Type: backend.SnapshotFile, Name: old.String()})
	tm.advance(2 * time.Second)

	wr := tm.Open(t, tm.WriteOnly(t, "web1"))
	repo.SetSessionTiming(wr, testLifetime, testRenew, tm.writer)
	var rep *repo.PruneReport
	_, err := wr.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		var ids []repo.ID
		for i := range uint64(16) {
			data := chunkOf(i)
			res, err := w.SaveBlob(ctx, repo.DataBlob, wr.ChunkID(data), data)
			if err != nil || res.New {
				t.Fatalf("the forgotten chunk %d was not reused: %v", i, err)
			}
			ids = append(ids, wr.ChunkID(data))
		}
		sn := snapshotOf(t, w, ids)
		// Suspended: the storage's clock runs on, the writer's stands.
		tm.storage.Advance(testLifetime + time.Minute)
		owner := tm.Reopen(t)
		repo.SetSessionTiming(owner, testLifetime, testRenew, tm.writer)
		var perr error
		rep, perr = owner.Prune(ctx, repo.PruneOptions{MaxUnused: 0.05})
		if perr != nil {
			t.Fatalf("prune: %v", perr)
		}
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if rep.Deleted.Packs == 0 || rep.Waiting.Packs != 0 {
		t.Fatalf("prune kept waiting for an expired session: %+v", rep)
	}
	if !errors.Is(err, repo.ErrSessionExpired) {
		t.Fatalf("the backup that outlived its session: %v, want it refused", err)
	}
	if n := len(tm.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("%d snapshots written, referencing deleted packs", n)
	}
}

// A prune killed on this machine (its session announced, live, and its
// local record naming a process that is gone) does not keep the next
// prune off; one whose process is unknown here does.
func TestPruneAfterAKilledPrune(t *testing.T) {
	cache := t.TempDir()
	tr := repotest.New(t, repotest.Options{CacheDir: cache})
	tr.Backend.SetClock((&tickingClock{now: time.Date(2030, 1, 2, 3, 0, 0, 0, time.UTC)}).Now)
	backupChunks(t, tr.Repository, 0, 8)
	announce := func(session string) {
		a := repo.Announcement{Session: session, Purpose: "prune", Host: "h", LifetimeSeconds: 21600}
		data := repo.EncodeAnnouncement(tr.Repository, tr.Keys, &a)
		tr.Backend.Put(backend.Handle{Type: backend.SessionFile, Name: repo.Hash(data).String()}, data)
	}
	other := strings.Repeat("cd", 16)
	announce(other)
	if _, err := tr.Reopen(t).Prune(context.Background(), repo.PruneOptions{}); err == nil || !strings.Contains(err.Error(), "another prune is running") {
		t.Fatalf("prune beside another live prune: %v", err)
	}
	killed := strings.Repeat("ef", 16)
	announce(killed)
	dir := filepath.Join(cache, tr.Config().ID, "prunes")
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, killed), []byte("1 not-this-boot 0"), 0o600)
	os.WriteFile(filepath.Join(dir, other), []byte("1 not-this-boot 0"), 0o600)
	if _, err := tr.Reopen(t).Prune(context.Background(), repo.PruneOptions{}); err != nil {
		t.Fatalf("prune after prunes killed on this machine: %v", err)
	}
}

// Damage and forgery under prune: a damaged index object (its packs are
// then known only from their trailers, which nobody vouches for) makes
// prune keep every copy they hold; an unreadable session object (it may
// be a running writer's, or planted by a write-only key) holds every
// deletion off.
func TestPruneUnderDamagedIndexAndForgedSession(t *testing.T) {
	tr := newPruneRepo(t)
	a := backupChunks(t, tr.Repository, 0, 40)
	b := backupChunks(t, tr.Repository, 20, 60)
	forget(t, tr, a)
	for _, name := range tr.Backend.Names(backend.IndexFile) {
		tr.Backend.Damage(backend.Handle{Type: backend.IndexFile, Name: name}, 30)
	}
	prune(t, tr.Reopen(t), repo.PruneOptions{})
	mustHold(t, tr, b, 20, 60)

	tr2 := newPruneRepo(t)
	a2 := backupChunks(t, tr2.Repository, 0, 40)
	b2 := backupChunks(t, tr2.Repository, 20, 60)
	forget(t, tr2, a2)
	garbage := []byte("not an announcement")
	tr2.Backend.Put(backend.Handle{Type: backend.SessionFile, Name: repo.Hash(garbage).String()}, garbage)
	rep := prune(t, tr2.Reopen(t), repo.PruneOptions{})
	if rep.Condemned.Packs == 0 || rep.Deleted.Packs != 0 || !strings.Contains(rep.WaitReason, "cannot be read") {
		t.Fatalf("prune beside an unreadable session object: %+v", rep)
	}
	mustHold(t, tr2, b2, 20, 60)
	mustCheck(t, tr2)
}
