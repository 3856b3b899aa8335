package repo_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

// removeSpy calls onRemove before each removal it passes on.
type removeSpy struct {
	backend.Backend
	onRemove func(h backend.Handle)
}

func (s removeSpy) Remove(ctx context.Context, h backend.Handle) error {
	s.onRemove(h)
	return s.Backend.Remove(ctx, h)
}

// openCached opens be as keys with a cache in dir, collecting warnings.
func openCached(t *testing.T, be backend.Backend, keys *crypto.Keys, dir string, warns *[]string) *repo.Repository {
	t.Helper()
	var mu sync.Mutex
	r, err := repo.Open(context.Background(), be, keys, repo.Options{CacheDir: dir, Warn: func(f string, a ...any) {
		mu.Lock()
		*warns = append(*warns, fmt.Sprintf(f, a...))
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func snapshotIDs(t *testing.T, r *repo.Repository) []repo.ID {
	t.Helper()
	all, err := r.Snapshots(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []repo.ID
	for _, sn := range all {
		ids = append(ids, sn.ID)
	}
	return ids
}

// Forget stores its ledger record before it removes any manifest, and
// the snapshots it forgot vanish without being reported as lost, while
// the one kept still restores.
func TestForgetRecordsBeforeRemoving(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	d1, d2, d3 := disk(1, 6), disk(2, 6), disk(3, 6)
	s1, _ := w.backup(w.owner, "web1", d1)
	s2, _ := w.backup(w.owner, "web1", d2)
	s3, _ := w.backup(w.owner, "web1", d3)

	cache := t.TempDir()
	var warns []string
	// The cache learns every snapshot, so that a vanished one would be
	// reported.
	if got := snapshotIDs(t, openCached(t, w.be, w.owner, cache, &warns)); len(got) != 3 {
		t.Fatalf("%d snapshots before forget, want 3", len(got))
	}

	var removed []string
	spy := removeSpy{Backend: w.be, onRemove: func(h backend.Handle) {
		if h.Type != backend.SnapshotFile {
			t.Errorf("forget removed %s/%s, not a manifest", h.Type, h.Name)
			return
		}
		fresh, err := repo.Open(ctx, w.be, w.owner, repo.Options{})
		if err != nil {
			t.Fatal(err)
		}
		led, err := fresh.Ledger(ctx)
		if err != nil {
			t.Fatal(err)
		}
		id, _ := repo.ParseID(h.Name)
		if !led.Forgotten[id] {
			t.Errorf("manifest %s removed before the ledger recorded it forgotten", id.Short())
		}
		removed = append(removed, h.Name)
	}}
	r := openCached(t, spy, w.owner, cache, &warns)
	if err := r.Forget(ctx, []repo.ID{s1.ID, s2.ID, s1.ID}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	want := []string{s1.ID.String(), s2.ID.String()}
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Fatalf("removed %v, want %v", removed, want)
	}
	if got := w.be.Names(backend.SnapshotFile); !slices.Equal(got, []string{s3.ID.String()}) {
		t.Fatalf("stored manifests after forget: %v, want only %s", got, s3.ID.Short())
	}
	got := snapshotIDs(t, openCached(t, w.be, w.owner, cache, &warns))
	if !slices.Equal(got, []repo.ID{s3.ID}) {
		t.Fatalf("snapshots after forget: %v", got)
	}
	for _, m := range warns {
		if strings.Contains(m, "no longer in the repository") {
			t.Fatalf("a forgotten snapshot was reported lost: %s", m)
		}
	}
	w.mustRestore(s3.ID, d3, "kept snapshot")
	if rep := w.check(true); !rep.OK() || rep.Snapshots != 1 {
		t.Fatalf("check after forget: %d snapshots, errors %v", rep.Snapshots, rep.Errors)
	}
	// Forgetting again what is gone is no error.
	if err := r.Forget(ctx, []repo.ID{s1.ID}); err != nil {
		t.Fatalf("forget of a forgotten snapshot: %v", err)
	}
}

// A forget killed between its ledger record and its removals: the
// snapshot is gone for every reader (listing, check, FindSnapshot), and
// RemoveForgotten deletes its manifest and nothing else.
func TestForgottenManifestIsHiddenAndRemoved(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	d1, d2 := disk(4, 5), disk(5, 5)
	s1, _ := w.backup(w.owner, "web1", d1)
	s2, _ := w.backup(w.owner, "web1", d2)
	r := w.open(w.owner)
	if err := r.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventSnapshotForgotten, Snapshot: &s1.ID}}); err != nil {
		t.Fatal(err)
	}
	if n := len(w.be.Names(backend.SnapshotFile)); n != 2 {
		t.Fatalf("%d manifests stored, want both still there", n)
	}
	all, err := w.open(w.owner).Snapshots(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].ID != s2.ID {
		t.Fatalf("listing shows %d snapshots, want only %s", len(all), s2.ID.Short())
	}
	if _, err := repo.FindSnapshot(all, s1.ID.String(), repo.Filter{}); err == nil {
		t.Fatal("a forgotten snapshot was found by its ID")
	}
	if rep := w.check(false); rep.Snapshots != 1 {
		t.Fatalf("check counts %d snapshots, want 1", rep.Snapshots)
	}
	// A write-only key sees the owner's ledger too.
	if got := snapshotIDs(t, w.open(w.web1)); !slices.Equal(got, []repo.ID{s2.ID}) {
		t.Fatalf("a writer lists %v", got)
	}
	n, err := w.open(w.owner).RemoveForgotten(ctx)
	if err != nil || n != 1 {
		t.Fatalf("RemoveForgotten = %d, %v; want 1", n, err)
	}
	if got := w.be.Names(backend.SnapshotFile); !slices.Equal(got, []string{s2.ID.String()}) {
		t.Fatalf("manifests after RemoveForgotten: %v", got)
	}
	if n, err := w.open(w.owner).RemoveForgotten(ctx); err != nil || n != 0 {
		t.Fatalf("second RemoveForgotten = %d, %v; want 0", n, err)
	}
	w.mustRestore(s2.ID, d2, "kept snapshot")
}

// A write-only key can neither forget nor remove manifests: the error
// names the owner key, and nothing is written or removed.
func TestForgetNeedsTheOwner(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	s1, _ := w.backup(w.web1, "web1", disk(6, 3))
	r := w.open(w.web1)
	err := r.Forget(ctx, []repo.ID{s1.ID})
	if err == nil || !strings.Contains(err.Error(), "owner's key") {
		t.Fatalf("forget with a write-only key: %v", err)
	}
	if _, err := r.RemoveForgotten(ctx); err == nil || !strings.Contains(err.Error(), "owner's key") {
		t.Fatalf("RemoveForgotten with a write-only key: %v", err)
	}
	if n := len(w.be.Names(backend.LedgerFile)); n != 0 {
		t.Fatalf("%d ledger records written", n)
	}
	if n := len(w.be.Names(backend.SnapshotFile)); n != 1 {
		t.Fatalf("%d manifests left, want 1", n)
	}
}

// check --read-data records the snapshots it verified whole, and not one
// that lost a pack; damage recorded later takes the verification back.
func TestCheckRecordsVerifiedSnapshots(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	s1, _ := w.backup(w.owner, "web1", disk(7, 4))
	before := w.be.Names(backend.PackFile)
	s2, _ := w.backup(w.owner, "web1", disk(8, 4))

	// Without reading data, nothing is verified.
	w.check(false)
	led, err := w.open(w.owner).Ledger(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(led.Verified) != 0 {
		t.Fatalf("check without --read-data verified %d snapshots", len(led.Verified))
	}

	start := time.Now().Add(-time.Second)
	if rep := w.check(true); !rep.OK() || !rep.Recorded {
		t.Fatalf("check --read-data: ok %v, recorded %v, errors %v", rep.OK(), rep.Recorded, rep.Errors)
	}
	led, err = w.open(w.owner).Ledger(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []repo.ID{s1.ID, s2.ID} {
		if at, ok := led.Verified[id]; !ok || at.Before(start) {
			t.Fatalf("snapshot %s not recorded verified (at %v)", id.Short(), at)
		}
	}

	first1, first2 := led.Verified[s1.ID], led.Verified[s2.ID]

	// s1's packs are lost: a new check does not verify it again (s2 is),
	// but the old record stands until damage is recorded.
	for _, p := range before {
		w.be.Remove(ctx, backend.Handle{Type: backend.PackFile, Name: p})
	}
	if len(w.be.Names(backend.PackFile)) == 0 {
		t.Fatal("no pack of the second backup left")
	}
	if rep := w.check(true); rep.OK() {
		t.Fatal("check passed with the first backup's packs gone")
	}
	led, err = w.open(w.owner).Ledger(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !led.Verified[s1.ID].Equal(first1) || !led.Verified[s2.ID].After(first2) {
		t.Fatalf("second check: s1 verified at %v (first %v), s2 at %v (first %v)", led.Verified[s1.ID], first1, led.Verified[s2.ID], first2)
	}
	if err := w.open(w.owner).SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventSnapshotDamaged, Snapshot: &s1.ID, Disk: "vda", Ranges: []repo.Span{{Offset: 0, Length: chunk}}}}); err != nil {
		t.Fatal(err)
	}
	led, err = w.open(w.owner).Ledger(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := led.Verified[s1.ID]; ok {
		t.Fatal("a snapshot recorded damaged after its verification is still verified")
	}
	if _, ok := led.Verified[s2.ID]; !ok {
		t.Fatal("the whole snapshot lost its verification")
	}
}

// Before is strict, After inclusive; 'latest' is the newest that matches.
func TestFilterDates(t *testing.T) {
	day := func(d int) time.Time { return time.Date(2026, 11, d, 2, 0, 0, 0, time.UTC) }
	var all []*repo.Snapshot
	for d := 1; d <= 5; d++ {
		sn := &repo.Snapshot{Time: day(d), Host: "web1", Disks: []repo.Disk{{Source: "/dev/vda"}}}
		sn.ID[0] = byte(d)
		all = append(all, sn)
	}
	for _, c := range []struct {
		name   string
		f      repo.Filter
		want   []int
		latest int // 0: none
	}{
		{"none", repo.Filter{}, []int{1, 2, 3, 4, 5}, 5},
		{"before", repo.Filter{Before: day(3)}, []int{1, 2}, 2},
		{"after", repo.Filter{After: day(3)}, []int{3, 4, 5}, 5},
		{"between", repo.Filter{After: day(2), Before: day(4)}, []int{2, 3}, 3},
		{"before a second later", repo.Filter{Before: day(3).Add(time.Second)}, []int{1, 2, 3}, 3},
		{"nothing", repo.Filter{Before: day(1)}, nil, 0},
		{"with host", repo.Filter{Host: "db1", After: day(1)}, nil, 0},
	} {
		var got []int
		for _, sn := range all {
			if c.f.Match(sn) {
				got = append(got, int(sn.ID[0]))
			}
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: matched %v, want %v", c.name, got, c.want)
		}
		sn, err := repo.FindSnapshot(all, "latest", c.f)
		switch {
		case c.latest == 0 && err == nil:
			t.Errorf("%s: latest found %v", c.name, sn.Time)
		case c.latest != 0 && (err != nil || int(sn.ID[0]) != c.latest):
			t.Errorf("%s: latest = %v, %v; want day %d", c.name, sn, err, c.latest)
		}
	}
}
