package repo_test

import (
	"context"
	"runtime"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// An index entry can be forged by a writer: a copy it claims to be 2 GiB
// long is refused before anything is allocated or read.
func TestReadCopyRefusesForgedLength(t *testing.T) {
	tr := repotest.New(t, repotest.Options{})
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := tr.ReadCopy(context.Background(), repo.ID{1}, repo.Location{Pack: repo.ID{2}, Type: repo.DataBlob, Length: 1 << 31}, nil)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "claims 2147483648 bytes") {
		t.Fatalf("error %v, want the forged length refused", err)
	}
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 16<<20 {
		t.Fatalf("refusing the copy allocated %d bytes", grown)
	}
}
