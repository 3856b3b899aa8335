package migrate

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/zeebo/blake3"
)

// FuzzLoadState feeds the state file's and the journal's parsers damaged
// input: a state or an error, never a panic or an allocation beyond the
// input.
func FuzzLoadState(f *testing.F) {
	dir := f.TempDir()
	st, err := Create(filepath.Join(dir, "s"), Header{ChunkSize: minChunkSize, Source: Identity{Path: "a", Size: 5 * minChunkSize, DiskID: "x"}}, nil)
	if err != nil {
		f.Fatal(err)
	}
	if err := st.Set([]int64{0, 3}, []Hash{{1}, {2}}); err != nil {
		f.Fatal(err)
	}
	st.Close()
	base, _ := os.ReadFile(st.Path())
	journal, _ := os.ReadFile(st.Path() + ".journal")
	f.Add(base, journal)
	f.Add(base, []byte(nil))
	f.Add(base[:40], journal[:50])
	f.Fuzz(func(t *testing.T, base, journal []byte) {
		// As given, and with its checksum made right, so that the fuzzer
		// gets past it to the header.
		if len(base) > HashSize {
			body := base[:len(base)-HashSize]
			sum := blake3.Sum256(body)
			check(t, append(append([]byte(nil), body...), sum[:]...), journal)
		}
		check(t, base, journal)
	})
}

func check(t *testing.T, base, journal []byte) {
	s, err := decodeState(base)
	if err != nil {
		return
	}
	if int64(len(s.Hashes())) != s.Header.Chunks() {
		t.Fatalf("%d hashes for %d chunks", len(s.Hashes()), s.Header.Chunks())
	}
	_ = s.applyJournal(journal)
}
