package cli

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
	"github.com/sauve-backup/sauve/internal/source"
)

// snapOf backs data up as disk vda and returns the snapshot as loaded.
func snapOf(t *testing.T, tr *repotest.Repo, data []byte) *repo.Snapshot {
	t.Helper()
	ctx := context.Background()
	res, err := backup.Run(ctx, tr.Repository, backup.Source{Name: "vda", Path: "/dev/vda", Kind: "file", Size: int64(len(data)), At: bytes.NewReader(data)}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := tr.LoadSnapshot(ctx, res.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	return sn
}

// What a pass from a snapshot reads, from what the state records: the
// chunks whose IDs differ from those of the last pass's snapshot and of
// the passes begun since, or every chunk, and why.
func TestSnapshotSourceChanges(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	cs := tr.Config().ChunkSize
	const n = 12
	mk := func(changed ...int) []byte {
		b := bytes.Repeat([]byte{1}, n*cs)
		for i := range n {
			b[i*cs] = byte(i + 1) // every chunk its own
		}
		for _, i := range changed {
			b[i*cs+1] = 0xee
		}
		return b
	}
	s1 := snapOf(t, tr, mk())
	s2 := snapOf(t, tr, mk(2, 3, 7))
	s3 := snapOf(t, tr, mk(2, 10))
	small := snapOf(t, tr, mk()[:6*cs])
	ref := func(sn *repo.Snapshot) migrate.SnapshotRef {
		return migrate.SnapshotRef{Repository: tr.Config().ID, Snapshot: sn.ID.String(), Disk: "vda"}
	}
	r1, r2, r3 := ref(s1), ref(s2), ref(s3)
	gone := r1
	gone.Snapshot = strings.Repeat("ab", 32)
	other := r1
	other.Repository = "another"
	many := make([]migrate.SnapshotRef, maxBegun)
	for i := range many {
		many[i] = r1
	}
	for _, c := range []struct {
		name   string
		h      migrate.Header
		want   []int64 // chunks marked; nil: every chunk read
		reason string  // in why every chunk is read ("" for a first pass)
	}{
		{"first pass", migrate.Header{}, nil, ""},
		{"after a live pass", migrate.Header{Passes: 2}, nil, "did not read a snapshot"},
		{"same snapshot", migrate.Header{Passes: 1, Snapshot: &r3}, []int64{}, ""},
		{"from s1", migrate.Header{Passes: 1, Snapshot: &r1}, []int64{2, 10}, ""},
		{"from s2", migrate.Header{Passes: 1, Snapshot: &r2}, []int64{3, 7, 10}, ""}, // chunk 2 is alike in s2 and s3
		{"s1, a pass from s2 begun", migrate.Header{Passes: 1, Snapshot: &r1, Begun: []migrate.SnapshotRef{r2}}, []int64{2, 3, 7, 10}, ""},
		{"s3 after a pass from s1 begun", migrate.Header{Passes: 1, Snapshot: &r3, Begun: []migrate.SnapshotRef{r1, r3}}, []int64{2, 10}, ""},
		{"forgotten", migrate.Header{Passes: 1, Snapshot: &gone}, nil, "no longer in the repository"},
		{"begun one forgotten", migrate.Header{Passes: 1, Snapshot: &r1, Begun: []migrate.SnapshotRef{gone}}, nil, "no longer in the repository"},
		{"another repository", migrate.Header{Passes: 1, Snapshot: &other}, nil, "another repository"},
		{"another size", migrate.Header{Passes: 1, Snapshot: &migrate.SnapshotRef{Repository: tr.Config().ID, Snapshot: small.ID.String(), Disk: "vda"}}, nil, "holds"},
		{"another disk", migrate.Header{Passes: 1, Snapshot: &migrate.SnapshotRef{Repository: tr.Config().ID, Snapshot: s1.ID.String(), Disk: "vdb"}}, nil, `no disk "vdb"`},
		{"too many begun", migrate.Header{Passes: 1, Snapshot: &r1, Begun: many}, nil, "failed since"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ss := &snapshotSource{r: tr.Repository, sn: s3, d: &s3.Disks[0]}
			h := c.h
			got, why, err := ss.changes(context.Background(), &h)
			if err != nil {
				t.Fatal(err)
			}
			if c.want == nil {
				if got != nil || !strings.Contains(why, c.reason) || (c.reason == "") != (why == "") {
					t.Fatalf("changes %v, why %q; want every chunk read because %q", got, why, c.reason)
				}
				return
			}
			if got == nil || why != "" {
				t.Fatalf("every chunk read: %q", why)
			}
			var marked []int64
			for i := int64(0); i < n; i++ {
				if got.Marked(i) {
					marked = append(marked, i)
				}
			}
			if len(marked) != len(c.want) || got.Count() != int64(len(c.want)) {
				t.Fatalf("marked %v, want %v", marked, c.want)
			}
			for k := range marked {
				if marked[k] != c.want[k] {
					t.Fatalf("marked %v, want %v", marked, c.want)
				}
			}
		})
	}
}

// A pass from a snapshot records its snapshot among those begun, in the
// state on disk, before it writes: also when it reads every chunk, so
// that a kill leaves the next pass knowing every snapshot the target's
// chunks may hold; once the list is full, it reads in full and the list
// stays as it is. It clears the dirty bitmap's tracker.
func TestSnapshotSourceBeginRecords(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	cs := tr.Config().ChunkSize
	s1 := snapOf(t, tr, bytes.Repeat([]byte{1}, 8*cs))
	s2 := snapOf(t, tr, bytes.Repeat([]byte{2}, 8*cs))
	ref := func(sn *repo.Snapshot) migrate.SnapshotRef {
		return migrate.SnapshotRef{Repository: tr.Config().ID, Snapshot: sn.ID.String(), Disk: "vda", Time: sn.Time}
	}
	full := make([]migrate.SnapshotRef, maxBegun)
	for i := range full {
		full[i] = ref(s1)
		full[i].Snapshot = strings.Repeat(string("0123456789"[i]), 64)
	}
	for _, c := range []struct {
		name      string
		begun     []migrate.SnapshotRef
		wantBegun int
		fullRead  bool
	}{
		{"delta", nil, 1, false},
		{"delta after a killed one", []migrate.SnapshotRef{ref(s1)}, 2, false},
		{"again the same", []migrate.SnapshotRef{ref(s2)}, 1, false},
		{"full", full, maxBegun, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			r1 := ref(s1)
			h := migrate.Header{ChunkSize: cs, Source: migrate.Identity{Path: "h:/dev/vda", Size: 8 * int64(cs), Snapshot: true}, Target: migrate.Identity{Path: "/t", Size: 8 * int64(cs)},
				Passes: 1, Snapshot: &r1, Begun: c.begun, Tracker: "qemu-bitmap:x"}
			st, err := migrate.Create(filepath.Join(t.TempDir(), "s"), h, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			m := &migration{state: st, warned: map[string]bool{}, src: &source.Source{Path: "snapshot"}}
			ss := &snapshotSource{g: &globals{quiet: true}, r: tr.Repository, sn: s2, d: &s2.Disks[0]}
			defer ss.close()
			changes, err := ss.begin(context.Background(), m)
			if err != nil {
				t.Fatal(err)
			}
			if (changes == nil) != c.fullRead || (ss.fullRead != "") != c.fullRead {
				t.Fatalf("changes %v, full read %q", changes, ss.fullRead)
			}
			got, err := migrate.Load(st.Path())
			if err != nil {
				t.Fatal(err)
			}
			defer got.Close()
			g := got.Header
			if len(g.Begun) != c.wantBegun || !containsRef(g.Begun, ref(s2)) && !c.fullRead || g.Tracker != "" || g.Snapshot == nil || !g.Snapshot.Same(r1) {
				t.Fatalf("state on disk after begin: %+v", g)
			}
			for _, b := range c.begun {
				if !containsRef(g.Begun, b) {
					t.Fatalf("begun %s dropped: %+v", b.Snapshot, g.Begun)
				}
			}
		})
	}
}
