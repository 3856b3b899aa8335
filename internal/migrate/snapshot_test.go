package migrate

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

// DiffChunks marks the chunks whose IDs differ, and ChunkChanges gives
// their bytes, merged and clipped to the window asked and to the disk.
func TestDiffChunks(t *testing.T) {
	const c = 4 << 10
	for _, tc := range []struct {
		name   string
		size   int64
		a, b   []int
		window [2]int64 // off, n
		want   []extent.Range
	}{
		{"same", 4 * c, []int{1, 2, 3, 4}, []int{1, 2, 3, 4}, [2]int64{0, 4 * c}, nil},
		{"one", 4 * c, []int{1, 2, 3, 4}, []int{1, 9, 3, 4}, [2]int64{0, 4 * c}, []extent.Range{{Start: c, End: 2 * c}}},
		{"merged", 4 * c, []int{1, 2, 3, 4}, []int{1, 9, 9, 4}, [2]int64{0, 4 * c}, []extent.Range{{Start: c, End: 3 * c}}},
		{"apart", 4 * c, []int{1, 2, 3, 4}, []int{9, 2, 3, 9}, [2]int64{0, 4 * c}, []extent.Range{{Start: 0, End: c}, {Start: 3 * c, End: 4 * c}}},
		{"zeroed", 3 * c, []int{1, 2, 3}, []int{1, 0, 3}, [2]int64{0, 3 * c}, []extent.Range{{Start: c, End: 2 * c}}},
		{"short last", 2*c + 100, []int{1, 2, 3}, []int{1, 2, 9}, [2]int64{0, 3 * c}, []extent.Range{{Start: 2 * c, End: 2*c + 100}}},
		{"window", 4 * c, []int{1, 2, 3, 4}, []int{9, 9, 9, 9}, [2]int64{c + 10, c}, []extent.Range{{Start: c + 10, End: 2*c + 10}}},
		{"window unchanged", 4 * c, []int{1, 2, 3, 4}, []int{9, 2, 3, 9}, [2]int64{c, 2 * c}, nil},
		{"many", 130 * c, seq(130, 0), append(seq(64, 0), seq(66, 1000)...), [2]int64{0, 130 * c}, []extent.Range{{Start: 64 * c, End: 130 * c}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch := NewChunkChanges(tc.size, c)
			at := func(ids []int) func(context.Context, int64) (int, error) {
				return func(_ context.Context, i int64) (int, error) { return ids[i], nil }
			}
			if err := DiffChunks(context.Background(), ch, int64(len(tc.a)), at(tc.a), at(tc.b)); err != nil {
				t.Fatal(err)
			}
			got, err := ch.Data(tc.window[0], tc.window[1])
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("changes %v, want %v", got, tc.want)
			}
		})
	}
	// A list that fails to load fails the comparison; so does a count of
	// chunks that is not the set's.
	ch := NewChunkChanges(4*c, c)
	bad := errors.New("chunk list 0: not found")
	err := DiffChunks(context.Background(), ch, 4, func(context.Context, int64) (int, error) { return 0, bad },
		func(context.Context, int64) (int, error) { return 0, nil })
	if !errors.Is(err, bad) {
		t.Errorf("a failing list: %v", err)
	}
	if err := DiffChunks(context.Background(), ch, 70, func(context.Context, int64) (int, error) { return 0, nil },
		func(context.Context, int64) (int, error) { return 0, nil }); err == nil {
		t.Error("70 chunks compared into a set of 4")
	}
}

func seq(n, from int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = from + i
	}
	return s
}

// A pass given a snapshot delta as Changes reads only the chunks marked
// (and those the state does not know), and leaves the target exact.
func TestDiffChunksDrivesAPass(t *testing.T) {
	const size = 16 * cs
	d := newDisk(size, 7)
	tg := newTarget(t, size)
	st := newState(t, size, true)
	src := d.source()
	src.Map = nil
	if _, err := Run(context.Background(), src, tg, st, Options{}); err != nil {
		t.Fatal(err)
	}
	// Chunks 3 and 9 change, as two snapshots' IDs would say.
	for _, i := range []int64{3, 9} {
		copy(d.data[i*cs:], []byte("changed in snapshot 2"))
	}
	ch := NewChunkChanges(size, cs)
	ch.Mark(3)
	ch.Mark(9)
	src = d.source()
	src.Map, src.Changes = nil, ch
	p, err := Run(context.Background(), src, tg, st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if p.BytesRead != 2*cs || p.ChunksUnread != 14 || p.ChunksChanged != 2 {
		t.Fatalf("delta pass: %+v", p)
	}
	if string(tg.durable[9*cs:9*cs+21]) != "changed in snapshot 2" || !slices.Equal(tg.durable, d.data) {
		t.Fatal("the target is not the source")
	}
}

// A snapshot's identity matches a device's or file's by size, disk ID
// and filesystem UUIDs, either way round, with nothing to compare when
// neither has any; two snapshots' and two devices' as before.
func TestIdentitySnapshotMismatch(t *testing.T) {
	live := Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "x", FSUUIDs: []string{"u1", "u2"}}
	file := Identity{Path: "/srv/a.img", Size: 100, FileDev: 2049, Inode: 12, DiskID: "x", FSUUIDs: []string{"u1", "u2"}}
	snap := Identity{Path: "web1:/dev/sda", Size: 100, DiskID: "x", FSUUIDs: []string{"u1", "u2"}, Snapshot: true}
	bare := Identity{Path: "web1:/dev/sdb", Size: 100, Snapshot: true}
	for _, c := range []struct {
		name string
		a, b Identity
		want string // in the mismatch; "" for none
	}{
		{"snapshot after live", live, snap, ""},
		{"live after snapshot", snap, live, ""},
		{"file after snapshot", snap, file, ""},
		{"snapshot of a live disk elsewhere", snap, Identity{Path: "/dev/vdb", Size: 100, Device: "252:16", DiskID: "x", FSUUIDs: []string{"u1", "u2"}}, ""},
		{"other disk ID", snap, Identity{Path: "/dev/sda", Size: 100, Device: "8:0", DiskID: "y", FSUUIDs: []string{"u1", "u2"}}, "disk ID"},
		{"other filesystem", live, Identity{Path: "h:/dev/sda", Size: 100, DiskID: "x", FSUUIDs: []string{"u1", "u3"}, Snapshot: true}, "filesystem UUIDs"},
		{"other size", live, Identity{Path: "h:/dev/sda", Size: 200, DiskID: "x", FSUUIDs: []string{"u1", "u2"}, Snapshot: true}, "size 200"},
		{"nothing to compare", bare, Identity{Path: "/dev/sdb", Size: 100, Device: "8:16"}, "nothing tells"},
		{"nothing to compare either way", Identity{Path: "/dev/sdb", Size: 100, Device: "8:16"}, bare, "nothing tells"},
		{"one has IDs", bare, live, "disk ID"},
		{"VM drive", Identity{Path: "qemu:u/d", Size: 100, VM: "u", Drive: "d", DiskID: "x", FSUUIDs: []string{"u1", "u2"}}, snap, "VM"},
		{"snapshot after snapshot", snap, Identity{Path: "web1:/dev/sda", Size: 100, DiskID: "x", FSUUIDs: []string{"u1", "u2"}, Snapshot: true}, ""},
		{"snapshot of another disk", snap, Identity{Path: "web2:/dev/sda", Size: 100, DiskID: "z", FSUUIDs: []string{"u9"}, Snapshot: true}, "disk ID"},
		{"bare snapshots of one source", bare, bare, ""},
		{"bare snapshots of two", bare, Identity{Path: "web2:/dev/sdb", Size: 100, Snapshot: true}, "web2:/dev/sdb"},
		{"live of another device still refused", live, Identity{Path: "/dev/sdb", Size: 100, Device: "8:16", DiskID: "x", FSUUIDs: []string{"u1", "u2"}}, "device"},
	} {
		got := c.a.Mismatch(c.b)
		if c.want == "" && got != "" || c.want != "" && !strings.Contains(got, c.want) {
			t.Errorf("%s: mismatch %q, want %q", c.name, got, c.want)
		}
	}
}

// The snapshots a state records are kept across a compaction and a
// reload.
func TestStateSnapshotRefs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	h := Header{ChunkSize: cs, Source: Identity{Path: "web1:/dev/sda", Size: 4 * cs, DiskID: "x", Snapshot: true}, Target: Identity{Path: "/t", Size: 4 * cs}}
	st, err := Create(path, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := SnapshotRef{Repository: "r1", Snapshot: "aa", Disk: "sda", Time: time.Unix(1.7e9, 0).UTC()}
	b := SnapshotRef{Repository: "r1", Snapshot: "bb", Disk: "sda"}
	st.Header.Snapshot, st.Header.Begun = &a, []SnapshotRef{b}
	if err := st.Compact(); err != nil {
		t.Fatal(err)
	}
	st.Close()
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	g := got.Header
	if g.Snapshot == nil || !g.Snapshot.Same(a) || !g.Snapshot.Time.Equal(a.Time) || len(g.Begun) != 1 || !g.Begun[0].Same(b) || !g.Source.Snapshot {
		t.Fatalf("reloaded header %+v", g)
	}
	if a.Same(SnapshotRef{Repository: "r2", Snapshot: "aa", Disk: "sda"}) || a.Same(SnapshotRef{Repository: "r1", Snapshot: "aa", Disk: "sdb"}) {
		t.Error("snapshots of another repository or disk taken for the same")
	}
}
