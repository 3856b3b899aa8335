package repo_test

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// TestManyWritersSmallPacks saves chunks from many goroutines into packs
// of a few chunks each, with slow uploads: every pack buffer is in use
// most of the time. A writer waiting for a buffer must not keep the
// uploaders from freeing one (they once needed the lock it held).
func TestManyWritersSmallPacks(t *testing.T) {
	tr := repotest.New(t, repotest.Options{PackSize: 3 * repo.MinChunkSize, Connections: 2})
	tr.Backend.Fail = func(op string, h backend.Handle) error {
		if op == "save" && h.Type == backend.PackFile {
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := tr.WithWriter(ctx, "test", func(w *repo.Writer) error {
		g, gctx := errgroup.WithContext(ctx)
		for n := range 16 {
			g.Go(func() error {
				rng := rand.New(rand.NewPCG(uint64(n), 1))
				buf := make([]byte, repo.MinChunkSize)
				for range 40 {
					for i := range buf {
						buf[i] = byte(rng.Uint32())
					}
					if _, err := w.SaveBlob(gctx, repo.DataBlob, tr.ChunkID(buf), buf); err != nil {
						return err
					}
				}
				return nil
			})
		}
		return g.Wait()
	})
	if err != nil {
		t.Fatal(err)
	}
}
