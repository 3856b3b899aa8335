package cli

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A read map left half written by a killed backup is removed once stale;
// one being written now, and the read maps kept, stay.
func TestRemoveStaleReadMaps(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-2 * staleReadMap)
	files := map[string]bool{ // name: whether it stays
		readMapTemp + "killed": false,
		readMapTemp + "now":    true,
		"0123-abcd":            true, // a kept map, however old
	}
	for name := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if name != readMapTemp+"now" {
			os.Chtimes(p, old, old)
		}
	}
	removeStaleReadMaps(dir, time.Now().Add(-staleReadMap))
	for name, stays := range files {
		_, err := os.Stat(filepath.Join(dir, name))
		if stays != (err == nil) {
			t.Errorf("%s: stays %v, want %v", name, err == nil, stays)
		}
	}
}
