package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/sauve-backup/sauve/internal/source"
)

// The O_DIRECT reader of migrate's device sources reads any range as a
// buffered read does, the end of the disk included.
func TestMigrateDirectReader(t *testing.T) {
	data := make([]byte, 3<<20+1536) // not a multiple of the alignment
	rand.Read(data)
	path := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := source.Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	r, err := openDirectReader(src)
	if err != nil {
		t.Skipf("no O_DIRECT here: %v", err)
	}
	defer r.f.Close()
	rng := mrand.New(mrand.NewPCG(1, 2))
	ref := bytes.NewReader(data)
	size := int64(len(data))
	for i := 0; i < 300; i++ {
		off := rng.Int64N(size + 100)
		n := rng.IntN(1 << 20)
		if i%3 == 0 {
			off = size - int64(rng.IntN(5000)) // around the end
		}
		got, want := make([]byte, n), make([]byte, n)
		gn, gerr := r.ReadAt(got, off)
		wn, werr := ref.ReadAt(want, max(off, 0))
		if gn != wn || !bytes.Equal(got[:gn], want[:wn]) || (gerr == nil) != (werr == nil) || gerr != nil && !errors.Is(gerr, io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d): %d, %v; want %d, %v", n, off, gn, gerr, wn, werr)
		}
	}
}
