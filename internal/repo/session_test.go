package repo_test

// Write sessions on the in-memory backend: flush and abort, concurrent
// saves, announcements and their renewal, and the refusal to write a
// snapshot once a prune may have stopped waiting. The writer's clock and
// the storage's clock are both fake, so hours of a session take
// milliseconds.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []fakeWaiter
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2030, 1, 2, 3, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, fakeWaiter{c.now.Add(d), ch})
	return ch
}

// Advance moves the clock and wakes whoever waits for a time now past.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
			continue
		}
		w.ch <- c.now
	}
	c.waiters = kept
}

func (c *fakeClock) waiting() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}

// eventually polls cond for a few seconds: what the session's renewal
// goroutine does after the clock moved.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

const (
	testLifetime = time.Hour
	testRenew    = 20 * time.Minute
)

// timed is a test repository whose sessions and storage run on clocks
// the test moves: writer is the writer's monotonic clock, storage the
// storage's (equal unless a test makes them part).
type timed struct {
	*repotest.Repo
	writer, storage *fakeClock
}

func newTimed(t *testing.T) *timed {
	tr := repotest.New(t, repotest.Options{})
	tm := &timed{Repo: tr, writer: newFakeClock(), storage: newFakeClock()}
	tr.Backend.SetClock(tm.storage.Now)
	repo.SetSessionTiming(tr.Repository, testLifetime, testRenew, tm.writer)
	return tm
}

// advance moves both clocks, as time passes for a writer that runs.
func (tm *timed) advance(d time.Duration) {
	tm.storage.Advance(d)
	tm.writer.Advance(d)
}

func (tm *timed) sessions(t *testing.T) *repo.SessionReport {
	t.Helper()
	rep, err := tm.Sessions(context.Background(), tm.storage.Now())
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func chunkOf(seed uint64) []byte { return disk(seed, 1) }

// saveChunks stores n distinct chunks with w and returns their IDs.
func saveChunks(t *testing.T, r *repo.Repository, w *repo.Writer, seed uint64, n int) []repo.ID {
	t.Helper()
	var ids []repo.ID
	for i := range n {
		data := chunkOf(seed + uint64(i))
		id := r.ChunkID(data)
		if _, err := w.SaveBlob(context.Background(), repo.DataBlob, id, data); err != nil {
			t.Fatalf("SaveBlob: %v", err)
		}
		ids = append(ids, id)
	}
	return ids
}

// snapshotOf makes a one-disk manifest of chunks with w.
func snapshotOf(t *testing.T, w *repo.Writer, ids []repo.ID) *repo.Snapshot {
	t.Helper()
	ctx := context.Background()
	lw := w.NewChunkListWriter()
	for _, id := range ids {
		if err := lw.Append(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	lists, err := lw.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &repo.Snapshot{Time: time.Now().UTC(), Host: "h", Disks: []repo.Disk{{
		Name: "vda", Source: "/dev/vda", Kind: "device", Size: int64(len(ids) * chunk), ChunkSize: chunk,
		ChunkLists: lists, ListEntries: repo.ListEntries,
	}}}
}

func TestWithWriterFlushes(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	var ids []repo.ID
	var snap repo.ID
	stats, err := tr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		ids = saveChunks(t, tr.Repository, w, 1, 40)
		var err error
		snap, err = w.SaveSnapshot(context.Background(), snapshotOf(t, w, ids))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if stats.Packs < 2 || stats.Bytes < 40*chunk/2 {
		t.Fatalf("stats %+v for 40 chunks of %d bytes in packs of 16", stats, chunk)
	}
	if n := len(tr.Backend.Names(backend.IndexFile)); n == 0 {
		t.Fatal("no index object written")
	}
	r := tr.Reopen(t)
	for _, id := range ids {
		if _, ok := r.Index().Reusable(repo.DataBlob, id, r.Self()); !ok {
			t.Fatalf("chunk %s not indexed after the session", id.Short())
		}
	}
	if _, err := r.LoadSnapshot(context.Background(), snap); err != nil {
		t.Fatalf("the session's snapshot: %v", err)
	}
	rep, err := r.Sessions(context.Background(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// Announced at the start, before the manifest, and at the end.
	if len(rep.Sessions) != 1 || rep.Live() != 0 {
		t.Fatalf("sessions: %+v", rep)
	}
	s := rep.Sessions[0]
	if s.State != repo.SessionEnded || s.Seq != 2 || len(s.Objects) != 3 || s.Purpose != "backup" || s.Writer != "owner" {
		t.Fatalf("session %+v, want ended at seq 2 by the owner, with 3 announcements", s)
	}
}

func TestWithWriterAborts(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	boom := errors.New("the source failed")
	var leaked *repo.Writer
	var ids []repo.ID
	_, err := tr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		leaked = w
		ids = saveChunks(t, tr.Repository, w, 100, 20)
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("WithWriter: %v, want fn's error", err)
	}
	if n := len(tr.Backend.Names(backend.IndexFile)); n != 0 {
		t.Fatalf("%d index objects written by an aborted session", n)
	}
	if n := len(tr.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("%d snapshots written by an aborted session", n)
	}
	packs := len(tr.Backend.Names(backend.PackFile))
	// A goroutine that outlives its session writes nothing.
	if _, err := leaked.SaveBlob(context.Background(), repo.DataBlob, tr.ChunkID(chunkOf(999)), chunkOf(999)); err == nil {
		t.Fatal("SaveBlob after the session ended succeeded")
	}
	if _, err := leaked.SaveSnapshot(context.Background(), snapshotOf(t, leaked, nil)); err == nil {
		t.Fatal("SaveSnapshot after the session ended succeeded")
	}
	if n := len(tr.Backend.Names(backend.PackFile)); n != packs || len(tr.Backend.Names(backend.SnapshotFile)) != 0 {
		t.Fatalf("writes after the session: %d packs, then %d", packs, n)
	}
	// Owner-vouched copies only: packs of the aborted session are in no
	// index, so nothing can be deduplicated against them but by adoption.
	r := tr.Reopen(t)
	for _, id := range ids {
		if _, ok := r.Index().Reusable(repo.DataBlob, id, r.Self()); ok {
			t.Fatalf("chunk %s of an aborted session is indexed", id.Short())
		}
	}
	rep, err := r.Sessions(context.Background(), time.Now())
	if err != nil || len(rep.Sessions) != 1 || rep.Sessions[0].State != repo.SessionEnded {
		t.Fatalf("an aborted session still announces its end: %+v %v", rep, err)
	}
}

// fn's goroutines save at once, the same chunks among them: each is
// stored once, and all are indexed. Run under -race.
func TestWithWriterConcurrentSaves(t *testing.T) {
	tr := repotest.New(t, repotest.Options{Connections: 3})
	const workers, per = 8, 30
	var mu sync.Mutex
	newCount := 0
	stats, err := tr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		g, ctx := errgroup.WithContext(context.Background())
		for k := range workers {
			g.Go(func() error {
				for i := range per {
					// Half the chunks are shared by every worker.
					seed := uint64(1000 + i)
					if i%2 == 1 {
						seed = uint64(5000 + k*per + i)
					}
					data := chunkOf(seed)
					res, err := w.SaveBlob(ctx, repo.DataBlob, tr.ChunkID(data), data)
					if err != nil {
						return err
					}
					if res.New {
						mu.Lock()
						newCount++
						mu.Unlock()
					}
				}
				return nil
			})
		}
		return g.Wait()
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := per/2 + workers*per/2; newCount != want {
		t.Fatalf("%d chunks stored as new, want %d", newCount, want)
	}
	blobs, packs := tr.Reopen(t).Index().Len()
	if blobs != newCount || packs != stats.Packs {
		t.Fatalf("index holds %d blobs in %d packs, want %d in %d", blobs, packs, newCount, stats.Packs)
	}
}

// The session renews its announcement every renewal interval of the
// writer's clock; a listing sees it live while it runs, ended after.
func TestSessionRenews(t *testing.T) {
	tm := newTimed(t)
	_, err := tm.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
		rep := tm.sessions(t)
		if rep.Live() != 1 || rep.Sessions[0].Seq != 0 {
			return fmt.Errorf("at the start: %+v", rep)
		}
		first := w.StorageTime()
		for want := 2; want <= 4; want++ {
			eventually(t, "the renewal timer", func() bool { return tm.writer.waiting() > 0 })
			tm.advance(testRenew)
			eventually(t, fmt.Sprintf("announcement %d", want), func() bool {
				return len(tm.Backend.Names(backend.SessionFile)) == want
			})
		}
		rep = tm.sessions(t)
		s := rep.Sessions[0]
		if rep.Live() != 1 || s.Seq != 3 || !s.First.Equal(first) || !s.Last.Equal(tm.storage.Now()) || s.Lifetime != testLifetime {
			return fmt.Errorf("after three renewals: %+v", s)
		}
		// An hour after the newest announcement, a prune would call it
		// expired: it is judged by storage times alone.
		late, err := tm.Sessions(context.Background(), tm.storage.Now().Add(testLifetime))
		if err != nil || late.Live() != 0 || late.Sessions[0].State != repo.SessionExpired {
			return fmt.Errorf("a lifetime later: %+v %v", late, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	rep := tm.sessions(t)
	if s := rep.Sessions[0]; s.State != repo.SessionEnded || s.Seq != 4 {
		t.Fatalf("after the session: %+v", s)
	}
}

// A writer whose renewals fail stops once its announcement may have
// expired: its saves fail, and no snapshot is written.
func TestSessionExpiresWithoutRenewal(t *testing.T) {
	tm := newTimed(t)
	var refuse atomic.Bool
	tm.Backend.Fail = func(op string, h backend.Handle) error {
		if refuse.Load() && op == "save" && h.Type == backend.SessionFile {
			return errors.New("connection reset")
		}
		return nil
	}
	ctx := context.Background()
	_, err := tm.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		sn := snapshotOf(t, w, saveChunks(t, tm.Repository, w, 1, 5))
		refuse.Store(true)
		stopped := func() bool {
			_, err := w.SaveBlob(ctx, repo.DataBlob, tm.ChunkID(chunkOf(77)), chunkOf(77))
			return errors.Is(err, repo.ErrSessionExpired)
		}
		// Renewals fail from 20 minutes on and are retried every 2.5
		// minutes, until the lifetime less its margin (5 minutes) has
		// gone by: then the session stops.
		for step := 0; !stopped(); step++ {
			if step > 40 {
				return errors.New("the session outlived its lifetime without renewing")
			}
			eventually(t, "a renewal timer", func() bool { return tm.writer.waiting() > 0 || stopped() })
			tm.advance(testRenew / 8)
		}
		if tm.writer.Now().Sub(tm.storage.Now()) != 0 {
			return errors.New("clocks apart")
		}
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if !errors.Is(err, repo.ErrSessionExpired) || !strings.Contains(err.Error(), "writes no snapshot") {
		t.Fatalf("WithWriter: %v, want the session expired", err)
	}
	if n := len(tm.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("an expired session wrote %d snapshots", n)
	}
}

// The lifetime is measured from just before the announcement's Save
// began: an announcement whose upload stalled for a lifetime is too old
// to write a snapshot on, though the storage stamped it just now.
func TestSnapshotRefusedAfterStalledAnnouncement(t *testing.T) {
	tm := newTimed(t)
	// No renewal of the session's own comes in between.
	repo.SetSessionTiming(tm.Repository, testLifetime, 100*testLifetime, tm.writer)
	var stall atomic.Bool
	tm.Backend.Fail = func(op string, h backend.Handle) error {
		if op == "save" && h.Type == backend.SessionFile && stall.CompareAndSwap(true, false) {
			tm.writer.Advance(testLifetime - testLifetime/12)
		}
		return nil
	}
	ctx := context.Background()
	_, err := tm.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		sn := snapshotOf(t, w, saveChunks(t, tm.Repository, w, 1, 5))
		stall.Store(true)
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if !errors.Is(err, repo.ErrSessionExpired) {
		t.Fatalf("WithWriter: %v, want the session expired", err)
	}
	if n := len(tm.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("%d snapshots written after a stalled announcement", n)
	}
}

// A writer that was suspended (its monotonic clock stood still while the
// storage's ran on) finds out from the storage times of its own
// announcements before it writes the snapshot, and refuses.
func TestSnapshotRefusedAfterSuspend(t *testing.T) {
	tm := newTimed(t)
	ctx := context.Background()
	_, err := tm.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		sn := snapshotOf(t, w, saveChunks(t, tm.Repository, w, 1, 5))
		tm.storage.Advance(testLifetime)
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if !errors.Is(err, repo.ErrSessionExpired) || !strings.Contains(err.Error(), "suspended") {
		t.Fatalf("WithWriter: %v, want the session expired", err)
	}
	if n := len(tm.Backend.Names(backend.SnapshotFile)); n != 0 {
		t.Fatalf("%d snapshots written after a suspend", n)
	}
	// Short of the lifetime (less its margin), the snapshot is written.
	_, err = tm.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		sn := snapshotOf(t, w, saveChunks(t, tm.Repository, w, 1, 5))
		tm.storage.Advance(testLifetime - testLifetime/12 - time.Second)
		_, err := w.SaveSnapshot(ctx, sn)
		return err
	})
	if err != nil || len(tm.Backend.Names(backend.SnapshotFile)) != 1 {
		t.Fatalf("snapshot within the lifetime: %v", err)
	}
}

// A session that cannot announce itself writes nothing, and says which
// object it could not create and which right that needs.
func TestAnnounceFailureFailsSession(t *testing.T) {
	for _, op := range []string{"save", "stat"} {
		t.Run(op, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			tr.Backend.Fail = func(o string, h backend.Handle) error {
				if o == op && h.Type == backend.SessionFile {
					return fmt.Errorf("%s %s: %w", o, h, backend.ErrPermission)
				}
				return nil
			}
			called := false
			_, err := tr.WithWriter(context.Background(), "backup", func(w *repo.Writer) error {
				called = true
				return nil
			})
			want := map[string]string{"save": "create sessions/", "stat": "read the storage time of sessions/"}[op]
			if err == nil || called || !strings.Contains(err.Error(), "announce the write session") || !strings.Contains(err.Error(), want) ||
				!strings.Contains(err.Error(), "PERMISSIONS.md") {
				t.Fatalf("WithWriter with announcements refused (%s): fn called %v, error %v", op, called, err)
			}
			if n := len(tr.Backend.Names(backend.PackFile)) + len(tr.Backend.Names(backend.IndexFile)); n != 0 {
				t.Fatalf("a session that could not announce itself wrote %d objects", n)
			}
		})
	}
}

// Announcements are untrusted input: a writer cannot end another's
// session, an announcement that asks for a lifetime past the bound or
// does not verify counts as unreadable (live for the longest lifetime),
// and objects older than that are not even read.
func TestSessionsUntrusted(t *testing.T) {
	tm := newTimed(t)
	ctx := context.Background()
	evilKeys := tm.WriteOnly(t, "evil")
	evil := tm.Open(t, evilKeys)
	repo.SetSessionTiming(evil, testLifetime, testRenew, tm.writer)
	// A write-only key announces its own sessions.
	if _, err := evil.WithWriter(ctx, "backup", func(w *repo.Writer) error { return nil }); err != nil {
		t.Fatalf("a write-only key's session: %v", err)
	}
	put := func(data []byte) {
		tm.Backend.Put(backend.Handle{Type: backend.SessionFile, Name: repo.Hash(data).String()}, data)
	}
	_, err := tm.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		// evil ends the owner's session in its own name, and asks for
		// a lifetime of a month.
		a := repo.Announcement{Session: w.Session(), Seq: 9, Purpose: "backup", Ended: true, LifetimeSeconds: 3600}
		put(repo.EncodeAnnouncement(evil, evilKeys, &a))
		a = repo.Announcement{Session: strings.Repeat("ab", 16), Purpose: "stall", LifetimeSeconds: 30 * 24 * 3600}
		put(repo.EncodeAnnouncement(evil, evilKeys, &a))
		put([]byte("garbage"))
		rep := tm.sessions(t)
		var owner, evilS []repo.SessionInfo
		for _, s := range rep.Sessions {
			switch s.Writer {
			case "owner":
				owner = append(owner, s)
			case "evil":
				evilS = append(evilS, s)
			}
		}
		if len(owner) != 1 || owner[0].State != repo.SessionLive {
			return fmt.Errorf("the owner's session after evil ended it: %+v", owner)
		}
		if len(evilS) != 2 {
			return fmt.Errorf("evil's sessions: %+v", evilS)
		}
		if len(rep.Unreadable) != 2 || !rep.Unreadable[0].Live || !rep.Unreadable[1].Live || rep.Live() != 3 {
			return fmt.Errorf("unreadable announcements: %+v (live %d)", rep.Unreadable, rep.Live())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tm.storage.Advance(25 * time.Hour)
	rep := tm.sessions(t)
	if rep.Live() != 0 || len(rep.Old) != len(tm.Backend.Names(backend.SessionFile)) || len(rep.Sessions) != 0 {
		t.Fatalf("a day later: %+v", rep)
	}
}

// check counts the sessions running, and a damaged announcement is a
// warning (counted as running), not an error.
func TestCheckCountsLiveSessions(t *testing.T) {
	ctx := context.Background()
	tr := repotest.New(t, repotest.Options{})
	_, err := tr.WithWriter(ctx, "backup", func(w *repo.Writer) error {
		rep, err := tr.Check(ctx, repo.CheckOptions{})
		if err != nil {
			return err
		}
		if rep.LiveSessions != 1 || len(rep.Sessions) != 1 || rep.Sessions[0].ID != w.Session() || !rep.OK() {
			return fmt.Errorf("check during a session: %+v", rep)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := tr.Check(ctx, repo.CheckOptions{})
	if err != nil || rep.LiveSessions != 0 || !rep.OK() {
		t.Fatalf("check after the session: %+v %v", rep, err)
	}
	garbage := []byte("not an announcement")
	tr.Backend.Put(backend.Handle{Type: backend.SessionFile, Name: repo.Hash(garbage).String()}, garbage)
	rep, err = tr.Check(ctx, repo.CheckOptions{})
	if err != nil || rep.LiveSessions != 1 || !rep.OK() || len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0], "cannot be read") {
		t.Fatalf("check with a damaged announcement: %+v %v", rep, err)
	}
}
