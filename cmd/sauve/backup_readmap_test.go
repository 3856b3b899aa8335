package main

import (
	"os"
	"path/filepath"
	"testing"
)

// Files deleted between two backups free their blocks without writing
// them. The second backup reads those blocks again (the first one's read
// map, kept in the local cache), so the chunks that held them are not
// stored again; without the cache (no read map) they are stored anew,
// the freed blocks as zeros. Either way the restored filesystem checks
// clean and holds the files left.
func TestBackupFreedBlocksStoreNothingNew(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck")
	k := fsKinds["ext4"]
	var news [2]int64
	for i, noCache := range []bool{false, true} {
		e := newEnv(t)
		img := e.path("disk.img")
		randomFile(t, img, k.size)
		makeFS(t, "ext4", img)
		var flags []string
		if noCache {
			flags = []string{"--no-cache"}
		}
		e.fsBackup(append(flags, img)...)
		var want map[string]string
		withMount(t, k.mount, img, true, func(dir string) {
			for _, f := range []string{"file00.dat", "file05.dat", "file08.dat"} {
				if err := os.Remove(filepath.Join(dir, f)); err != nil {
					t.Fatal(err)
				}
			}
			want = hashTree(t, dir)
		})
		b, stderr := e.fsBackup(append(flags, img)...)
		news[i] = b.BytesNew
		dst := e.path("restored.img")
		e.ok("restore", b.Snapshot, dst)
		checkFS(t, "ext4", dst, want)
		if stderr != "" && !noCache {
			t.Logf("second backup said: %s", stderr)
		}
	}
	t.Logf("second backup's new bytes: %d with the read map, %d without", news[0], news[1])
	// The deleted files held 300 KiB in chunks of their own; what
	// changes either way is the metadata (bitmaps, inodes, journal).
	if news[0] >= news[1] || news[1]-news[0] < 256<<10 {
		t.Errorf("second backup stored %d new bytes with the read map, %d without: want at least a chunk less", news[0], news[1])
	}
}
