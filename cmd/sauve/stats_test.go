package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type statsOut struct {
	StoredBytes       int64   `json:"stored_bytes"`
	Packs             int     `json:"packs"`
	PackBytes         int64   `json:"pack_bytes"`
	Snapshots         int     `json:"snapshots"`
	DataBlobs         int     `json:"data_blobs"`
	SelectedSnapshots int     `json:"selected_snapshots"`
	LogicalBytes      int64   `json:"logical_bytes"`
	UniqueChunks      int64   `json:"unique_chunks"`
	UniqueBytes       int64   `json:"unique_bytes"`
	UniqueStoredBytes int64   `json:"unique_stored_bytes"`
	DedupRatio        float64 `json:"dedup_ratio"`
	UnreferencedBytes int64   `json:"unreferenced_bytes"`
	UnreferencedPacks int     `json:"unreferenced_packs"`
	PerSnapshot       []struct {
		ID              string `json:"id"`
		AddedChunks     int64  `json:"added_chunks"`
		AddedBytes      int64  `json:"added_bytes"`
		ExclusiveChunks int64  `json:"exclusive_chunks"`
		ExclusiveBytes  int64  `json:"exclusive_bytes"`
	} `json:"per_snapshot"`
	PerHost []struct {
		Host           string `json:"host"`
		Snapshots      int    `json:"snapshots"`
		ExclusiveBytes int64  `json:"exclusive_bytes"`
	} `json:"per_host"`
}

// filesIn returns the number and total size of the files under dir.
func filesIn(t *testing.T, dir string) (int, int64) {
	t.Helper()
	n, size := 0, int64(0)
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if os.IsNotExist(err) && p == dir {
			return filepath.SkipDir
		}
		if err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			n++
			size += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n, size
}

// Two backups of an image of 8 chunks (one of zeros) with one chunk
// changed between them: the second adds exactly what its backup stored,
// the first alone holds the old version of the changed chunk, and the
// totals are the repository folder's files.
func TestStats(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	img := randomBytes(8 * chunk)
	clear(img[4*chunk : 5*chunk])
	writeFile(t, src, img)
	first := e.backup(src)
	writeAt(t, src, 2*chunk, randomBytes(chunk))
	second := e.backup(src)
	if first.ChunksNew != 7 || first.ChunksZero != 1 || second.ChunksNew != 1 || first.BytesStoredRaw%7 != 0 {
		t.Fatalf("backups: %+v, %+v", first, second)
	}
	// Random chunks do not compress: each is stored in as many bytes.
	perChunk := first.BytesStoredRaw / 7

	var st statsOut
	e.okJSON(&st, "stats")
	packs, packBytes := filesIn(t, filepath.Join(e.repo, "data"))
	others := int64(0)
	for _, d := range []string{"index", "snapshots", "ledger", "sessions"} {
		_, n := filesIn(t, filepath.Join(e.repo, d))
		others += n
	}
	if st.Packs != packs || st.PackBytes != packBytes || st.StoredBytes != packBytes+others || st.Snapshots != 2 || st.DataBlobs != 8 {
		t.Errorf("totals: %d packs of %d bytes, %d stored, %d snapshots, %d data blobs; the folder holds %d packs of %d bytes and %d other bytes",
			st.Packs, st.PackBytes, st.StoredBytes, st.Snapshots, st.DataBlobs, packs, packBytes, others)
	}
	if st.SelectedSnapshots != 2 || st.LogicalBytes != 16*chunk || st.UniqueChunks != 8 || st.UniqueBytes != 8*chunk ||
		st.UniqueStoredBytes != first.BytesStoredRaw+second.BytesStoredRaw || st.UnreferencedBytes != 0 || st.UnreferencedPacks != 0 {
		t.Errorf("figures: %+v", st)
	}
	if want := float64(16*chunk) / float64(first.BytesStoredRaw+second.BytesStoredRaw); st.DedupRatio != want {
		t.Errorf("dedup ratio %v, want %v", st.DedupRatio, want)
	}
	if len(st.PerSnapshot) != 2 {
		t.Fatalf("per snapshot: %+v", st.PerSnapshot)
	}
	s1, s2 := st.PerSnapshot[0], st.PerSnapshot[1]
	if s1.ID != first.Snapshot || s1.AddedChunks != 7 || s1.AddedBytes != first.BytesStoredRaw || s1.ExclusiveChunks != 1 || s1.ExclusiveBytes != perChunk {
		t.Errorf("first snapshot: %+v; want 7 chunks (%d bytes) added, the old chunk 2 (%d bytes) its own", s1, first.BytesStoredRaw, perChunk)
	}
	if s2.ID != second.Snapshot || s2.AddedChunks != 1 || s2.AddedBytes != second.BytesStoredRaw || s2.ExclusiveChunks != 1 || s2.ExclusiveBytes != second.BytesStoredRaw {
		t.Errorf("second snapshot: %+v; want the changed chunk (%d bytes) added and its own", s2, second.BytesStoredRaw)
	}
	if len(st.PerHost) != 1 || st.PerHost[0].Snapshots != 2 || st.PerHost[0].ExclusiveBytes != st.UniqueStoredBytes {
		t.Errorf("per host: %+v", st.PerHost)
	}

	// One snapshot named: figures still relative to the other one.
	var one statsOut
	e.okJSON(&one, "stats", second.ShortID)
	if one.SelectedSnapshots != 1 || one.UniqueChunks != 7 || len(one.PerSnapshot) != 1 || one.PerSnapshot[0].AddedBytes != second.BytesStoredRaw ||
		one.StoredBytes != st.StoredBytes || len(one.PerHost) != 1 || one.PerHost[0].ExclusiveBytes != second.BytesStoredRaw {
		t.Errorf("stats %s: %+v", second.ShortID, one)
	}

	// A write-only key reads the same figures.
	key := e.path("web1.key")
	e.ok("key", "export", "--write-only", "--name", "web1", key)
	var wo statsOut
	e.as(key).okJSON(&wo, "stats")
	if wo.UniqueStoredBytes != st.UniqueStoredBytes || wo.StoredBytes != st.StoredBytes || len(wo.PerSnapshot) != 2 || wo.PerSnapshot[1] != s2 {
		t.Errorf("write-only key: %+v", wo)
	}

	out := e.ok("stats")
	for _, want := range []string{"deduplication", first.ShortID, second.ShortID, "Added", "Exclusive"} {
		if !strings.Contains(out, want) {
			t.Errorf("stats output lacks %q:\n%s", want, out)
		}
	}
}
