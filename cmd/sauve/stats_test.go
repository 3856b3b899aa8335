package main

import (
	"os"
	"testing"
)

// TestStats: two backups of an image with 1 MiB changed between them;
// stats says what each added and holds alone, and its totals are the
// repository's files.
func TestStats(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	img := randomBytes(8 << 20)
	writeFile(t, src, img)
	e.backup(src)
	copy(img[2<<20:], randomBytes(1<<20))
	writeFile(t, src, img)
	e.backup(src)
	var st struct {
		Objects map[string]struct {
			Packs int   `json:"packs"`
			Bytes int64 `json:"bytes"`
		} `json:"objects"`
		Snapshots         int     `json:"snapshots"`
		LogicalBytes      int64   `json:"logical_bytes"`
		UniqueBytes       int64   `json:"unique_bytes"`
		DedupRatio        float64 `json:"dedup_ratio"`
		UnreferencedBytes int64   `json:"unreferenced_bytes"`
		Costs             []struct {
			Added     int64 `json:"added_bytes"`
			Exclusive int64 `json:"exclusive_bytes"`
		} `json:"snapshots_cost"`
	}
	e.okJSON(&st, "stats")
	if st.Snapshots != 2 || st.LogicalBytes != 16<<20 || st.UniqueBytes != 9<<20 || len(st.Costs) != 2 {
		t.Fatalf("stats: %+v", st)
	}
	near := func(got, want int64) bool { return got >= want && got <= want+want/20+64<<10 }
	if !near(st.Costs[1].Added, 1<<20) || !near(st.Costs[1].Exclusive, 1<<20) || !near(st.Costs[0].Exclusive, 1<<20) || !near(st.Costs[0].Added, 8<<20) {
		t.Fatalf("what each snapshot adds and holds alone: %+v", st.Costs)
	}
	var packs int64
	for _, p := range packFiles(t, e.repo) {
		packs += fileSize(t, p)
	}
	if st.Objects["data"].Bytes != packs || st.UnreferencedBytes != 0 || st.DedupRatio < 1.7 {
		t.Fatalf("packs %d bytes on disk, stats %+v", packs, st)
	}
	wkey := e.path("w.key")
	e.ok("key", "export", "--write-only", "--name", "web1", wkey)
	w := newBareEnv(t)
	w.setenv("SAUVE_REPO", e.repo)
	w.setenv("SAUVE_KEY", wkey)
	w.ok("stats")
}

func fileSize(t *testing.T, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
