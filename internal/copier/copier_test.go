package copier_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/copier"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

const cs = repo.MinChunkSize

// content builds a disk chunk by chunk: 'z' zeros, 'r' random, 'a' a
// pattern that repeats (deduplicated), 'h' half zeros; tail bytes of 't'
// end it on a short chunk.
func content(seed uint64, layout string, tail int) []byte {
	rng := rand.New(rand.NewPCG(seed, uint64(len(layout))))
	var out []byte
	for _, c := range layout {
		b := make([]byte, cs)
		switch c {
		case 'r':
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
		case 'a':
			for i := range b {
				b[i] = byte('a' + i%7)
			}
		case 'h':
			for i := cs / 2; i < cs; i++ {
				b[i] = byte(rng.Uint32())
			}
		}
		out = append(out, b...)
	}
	return append(out, bytes.Repeat([]byte{'t'}, tail)...)
}

// newRepo makes a repository with a cache (the own-packs journal that
// lets an interrupted copy resume).
func newRepo(t *testing.T, chunkSize int, idKey *[crypto.KeySize]byte) *repotest.Repo {
	t.Helper()
	return repotest.New(t, repotest.Options{ChunkSize: chunkSize, CacheDir: t.TempDir(), IDKey: idKey})
}

// backUp stores disks (name → content) as one snapshot.
func backUp(t *testing.T, tr *repotest.Repo, host string, disks map[string][]byte, names ...string) *repo.Snapshot {
	t.Helper()
	var srcs []backup.Source
	for _, n := range names {
		data := disks[n]
		srcs = append(srcs, backup.Source{Name: n, Path: "/dev/" + n, Kind: "file", Size: int64(len(data)), At: bytes.NewReader(data)})
	}
	res, err := backup.RunDisks(context.Background(), tr.Repository, srcs, backup.Options{Host: host, Tags: []string{"nightly"}, Program: "test"})
	if err != nil {
		t.Fatal(err)
	}
	return res.Snapshot
}

// snapshots lists a repository's snapshots as a new process would.
func snapshots(t *testing.T, r *repo.Repository) []*repo.Snapshot {
	t.Helper()
	all, err := r.Snapshots(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return all
}

// run copies every snapshot of src into dst, each opened afresh.
func run(t *testing.T, src, dst *repo.Repository) (*copier.Result, error) {
	t.Helper()
	return copier.Run(context.Background(), src, dst, snapshots(t, src), copier.Options{Program: "test", Warn: func(s string) { t.Log(s) }})
}

// readDisk reads a disk back through the repository's disk reader.
func readDisk(t *testing.T, r *repo.Repository, d *repo.Disk) []byte {
	t.Helper()
	dr, err := r.NewDiskReader(context.Background(), d, repo.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close()
	out := make([]byte, d.Size)
	if _, err := dr.ReadAt(out, 0); err != nil {
		t.Fatal(err)
	}
	return out
}

// sameSnapshots checks that every snapshot of src has one copy in dst,
// with its metadata and every disk byte for byte.
func sameSnapshots(t *testing.T, src *repotest.Repo, dst *repotest.Repo, want map[repo.ID]map[string][]byte) {
	t.Helper()
	r := dst.Reopen(t)
	got := snapshots(t, r)
	if len(got) != len(want) {
		t.Fatalf("target holds %d snapshots, want %d", len(got), len(want))
	}
	for _, sn := range got {
		cf := sn.CopiedFrom
		if cf == nil || cf.Repository != src.Config().ID {
			t.Fatalf("snapshot %s: copied_from %+v, want the source repository %s", sn.ID.Short(), cf, src.Config().ID)
		}
		disks, ok := want[cf.Snapshot]
		if !ok {
			t.Fatalf("snapshot %s is a copy of %s, which is not one of the source's", sn.ID.Short(), cf.Snapshot.Short())
		}
		orig, err := src.LoadSnapshot(context.Background(), cf.Snapshot)
		if err != nil {
			t.Fatal(err)
		}
		if !sn.Time.Equal(orig.Time) || sn.Host != orig.Host || len(sn.Tags) != 1 || sn.Tags[0] != "nightly" || len(sn.Disks) != len(orig.Disks) {
			t.Fatalf("copy %s: time %v host %s tags %v %d disks; source: %v %s %v %d", sn.ID.Short(), sn.Time, sn.Host, sn.Tags, len(sn.Disks), orig.Time, orig.Host, orig.Tags, len(orig.Disks))
		}
		if len(sn.Marks) > 0 {
			t.Fatalf("copy %s is marked: %v", sn.ID.Short(), sn.Marks)
		}
		for i := range sn.Disks {
			d := &sn.Disks[i]
			if d.Name != orig.Disks[i].Name || d.Source != orig.Disks[i].Source || d.ChunkSize != dst.Config().ChunkSize {
				t.Fatalf("copy %s disk %d: %s %s chunk %d", sn.ID.Short(), i, d.Name, d.Source, d.ChunkSize)
			}
			if b := readDisk(t, r, d); !bytes.Equal(b, disks[d.Name]) {
				t.Fatalf("copy %s: disk %s differs from what was backed up", sn.ID.Short(), d.Name)
			}
		}
	}
}

// objects counts what a backend holds, by kind.
func objects(t *testing.T, tr *repotest.Repo) map[backend.FileType]int {
	t.Helper()
	n := map[backend.FileType]int{}
	for _, ft := range backend.AllTypes {
		if err := tr.Backend.List(context.Background(), ft, func(backend.Info) error { n[ft]++; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// twoSnapshots backs up two snapshots (the second of two disks) into src
// and returns what each disk holds.
func twoSnapshots(t *testing.T, src *repotest.Repo) map[repo.ID]map[string][]byte {
	t.Helper()
	d1 := map[string][]byte{"vda": content(1, "rrzaarhrzr", 1000)}
	s1 := backUp(t, src, "web1", d1, "vda")
	d2 := map[string][]byte{"vda": content(2, "rrzaarhrzrrr", 1000), "vdb": content(3, "zzzr", 17)}
	copy(d2["vda"], d1["vda"][:4*cs]) // shares chunks with the first
	s2 := backUp(t, src, "web1", d2, "vda", "vdb")
	return map[repo.ID]map[string][]byte{s1.ID: d1, s2.ID: d2}
}

func TestCopySameIDs(t *testing.T) {
	src := newRepo(t, cs, nil)
	want := twoSnapshots(t, src)
	dst := newRepo(t, cs, &src.Keys.IDKey)
	res, err := run(t, src.Reopen(t), dst.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != copier.SameIDs || len(res.Copied) != 2 || len(res.Skipped) != 0 {
		t.Fatalf("mode %s, copied %d, skipped %d; want same-ids, 2, 0", res.Mode, len(res.Copied), len(res.Skipped))
	}
	if res.Stats.ChunksNew == 0 || res.Stats.ChunksReused == 0 || res.Stats.ChunksZero == 0 || res.BytesWritten == 0 {
		t.Fatalf("stats %+v, %d bytes written: want chunks copied, reused (shared by both snapshots) and zero", res.Stats, res.BytesWritten)
	}
	sameSnapshots(t, src, dst, want)

	// The second copy's parent is the first copy.
	got := snapshots(t, dst.Reopen(t))
	if got[1].Parent == nil || *got[1].Parent != got[0].ID {
		t.Fatalf("second copy's parent is %v, want the first copy %s", got[1].Parent, got[0].ID.Short())
	}

	// Copying again adds nothing: not a pack, not a session announcement.
	before := objects(t, dst)
	res, err = run(t, src.Reopen(t), dst.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Copied) != 0 || len(res.Skipped) != 2 || res.BytesWritten != 0 {
		t.Fatalf("second copy: copied %d, skipped %d, wrote %d bytes; want 0, 2, 0", len(res.Copied), len(res.Skipped), res.BytesWritten)
	}
	if after := objects(t, dst); !equalCounts(before, after) {
		t.Fatalf("copying again changed the target: %v, then %v", before, after)
	}
}

func equalCounts(a, b map[backend.FileType]int) bool {
	for _, ft := range backend.AllTypes {
		if a[ft] != b[ft] {
			return false
		}
	}
	return true
}

func TestCopyRehashes(t *testing.T) {
	src := newRepo(t, cs, nil)
	want := twoSnapshots(t, src)
	dst := newRepo(t, cs, nil)
	res, err := run(t, src.Reopen(t), dst.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != copier.Rehash || len(res.Copied) != 2 {
		t.Fatalf("mode %s, copied %d; want rehash, 2", res.Mode, len(res.Copied))
	}
	sameSnapshots(t, src, dst, want)
}

func TestCopyRechunks(t *testing.T) {
	for _, c := range []struct {
		name     string
		from, to int
	}{{"larger", cs, 4 * cs}, {"smaller", 2 * cs, cs}} {
		t.Run(c.name, func(t *testing.T) {
			src := newRepo(t, c.from, nil)
			d := map[string][]byte{"vda": content(7, "rrzaarhrzrrzzzzrar", 333)}
			sn := backUp(t, src, "web1", d, "vda")
			dst := newRepo(t, c.to, &src.Keys.IDKey)
			res, err := run(t, src.Reopen(t), dst.Reopen(t))
			if err != nil {
				t.Fatal(err)
			}
			if res.Mode != copier.Rechunk || len(res.Copied) != 1 {
				t.Fatalf("mode %s, copied %d; want rechunk, 1", res.Mode, len(res.Copied))
			}
			sameSnapshots(t, src, dst, map[repo.ID]map[string][]byte{sn.ID: d})
		})
	}
}

// TestCopyResumes interrupts a copy in its second snapshot: the next run
// skips the first, reuses the packs the first run stored, and uploads
// less than a whole copy does.
func TestCopyResumes(t *testing.T) {
	src := newRepo(t, cs, nil)
	big := make([]byte, 0, 200*cs)
	for i := range 4 {
		big = append(big, content(uint64(10+i), "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr", 0)...)
	}
	d1 := map[string][]byte{"vda": content(9, "rrzr", 5)}
	d2 := map[string][]byte{"vda": big}
	s1 := backUp(t, src, "web1", d1, "vda")
	s2 := backUp(t, src, "web1", d2, "vda")
	want := map[repo.ID]map[string][]byte{s1.ID: d1, s2.ID: d2}

	full := newRepo(t, cs, &src.Keys.IDKey)
	whole, err := run(t, src.Reopen(t), full.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}

	dst := newRepo(t, cs, &src.Keys.IDKey)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var packs atomic.Int64
	dst.Backend.Fail = func(op string, h backend.Handle) error {
		if op == "save" && h.Type == backend.PackFile && packs.Add(1) == 6 {
			cancel() // as Ctrl-C would, in the middle of the second snapshot
		}
		return nil
	}
	s := src.Reopen(t)
	_, err = copier.Run(ctx, s, dst.Reopen(t), snapshots(t, s), copier.Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted copy: %v, want context.Canceled", err)
	}
	dst.Backend.Fail = nil
	if n := len(snapshots(t, dst.Reopen(t))); n != 1 {
		t.Fatalf("the interrupted copy left %d snapshots, want the first one", n)
	}

	res, err := run(t, src.Reopen(t), dst.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Skipped) != 1 || len(res.Copied) != 1 || res.Adopted == 0 {
		t.Fatalf("resumed copy: skipped %d, copied %d, adopted %d packs; want 1, 1, some", len(res.Skipped), len(res.Copied), res.Adopted)
	}
	if res.BytesWritten >= whole.BytesWritten {
		t.Fatalf("resumed copy uploaded %d bytes, a whole copy %d: the interrupted run's packs were not reused", res.BytesWritten, whole.BytesWritten)
	}
	t.Logf("whole copy %d bytes, resumed copy %d bytes, %d packs adopted", whole.BytesWritten, res.BytesWritten, res.Adopted)
	sameSnapshots(t, src, dst, want)
}

func TestCopyKeys(t *testing.T) {
	src := newRepo(t, cs, nil)
	want := twoSnapshots(t, src)
	dst := newRepo(t, cs, &src.Keys.IDKey)

	// A write-only source key cannot open chunk data: refused, target
	// untouched.
	before := objects(t, dst)
	_, err := run(t, src.Open(t, src.WriteOnly(t, "web1")), dst.Reopen(t))
	if !errors.Is(err, copier.ErrWriteOnlySource) {
		t.Fatalf("write-only source key: %v", err)
	}
	if after := objects(t, dst); !equalCounts(before, after) {
		t.Fatalf("a refused copy changed the target: %v, then %v", before, after)
	}

	// A write-only target key is enough: copying only writes. Its
	// copies count for it the next time.
	wo, err := dst.Keys.DeriveWriteOnly("copier", "web1")
	if err != nil {
		t.Fatal(err)
	}
	res, err := run(t, src.Reopen(t), dst.Open(t, wo))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Copied) != 2 {
		t.Fatalf("write-only target: copied %d, want 2", len(res.Copied))
	}
	sameSnapshots(t, src, dst, want)
	res, err = run(t, src.Reopen(t), dst.Open(t, wo))
	if err != nil || len(res.Skipped) != 2 {
		t.Fatalf("again with the write-only target key: %v, skipped %d", err, len(res.Skipped))
	}

	// Same repository on both sides.
	if _, err := run(t, src.Reopen(t), src.Reopen(t)); err == nil {
		t.Fatal("copying a repository into itself succeeded")
	}
}

// TestCopyBack copies a snapshot into a second repository and back: the
// way back finds the original and copies nothing.
func TestCopyBack(t *testing.T) {
	a := newRepo(t, cs, nil)
	backUp(t, a, "web1", map[string][]byte{"vda": content(5, "rzr", 0)}, "vda")
	b := newRepo(t, cs, &a.Keys.IDKey)
	if _, err := run(t, a.Reopen(t), b.Reopen(t)); err != nil {
		t.Fatal(err)
	}
	res, err := run(t, b.Reopen(t), a.Reopen(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Copied) != 0 || len(res.Skipped) != 1 {
		t.Fatalf("copy back: copied %d, skipped %d; want 0, 1", len(res.Copied), len(res.Skipped))
	}
}
