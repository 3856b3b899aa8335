package repo

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/local"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// TestSyntheticIndex fills the repository made by 'sauve init' at
// $SAUVE_SYNTH_REPO (key $SAUVE_SYNTH_KEY, no passphrase) with
// $SAUVE_SYNTH_CHUNKS random chunk IDs: owner-signed index objects of 64
// packs of 128 chunks, as backups write them, and each pack as a sparse
// file of the size its entries need, so the listing shows it. It is the
// synthetic repository of bench/index-memory.sh; skipped otherwise.
func TestSyntheticIndex(t *testing.T) {
	dir, keyPath := os.Getenv("SAUVE_SYNTH_REPO"), os.Getenv("SAUVE_SYNTH_KEY")
	n, _ := strconv.Atoi(os.Getenv("SAUVE_SYNTH_CHUNKS"))
	if dir == "" || keyPath == "" || n <= 0 {
		t.Skip("set SAUVE_SYNTH_REPO, SAUVE_SYNTH_KEY and SAUVE_SYNTH_CHUNKS")
	}
	ctx := context.Background()
	be, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	kf, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := crypto.DecodeKeyFile(kf, func() ([]byte, error) { return nil, nil })
	if err != nil {
		t.Fatal(err)
	}
	r, err := Open(ctx, be, keys, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const perPack, perObject = 128, indexBatch
	// A stored 256 KiB chunk of incompressible data: sealed, with its
	// coding byte.
	blobLen := uint32(r.cfg.ChunkSize + minSealedBlob)
	packSize := int64(packHeaderSize) + perPack*int64(blobLen) + 8<<10 + packFooterSize
	packs := (n + perPack - 1) / perPack
	objects := (packs + perObject - 1) / perObject
	g, _ := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for o := 0; o < objects; o++ {
		g.Go(func() error {
			rng := rand.New(rand.NewPCG(uint64(o), 0x5ee0))
			id := func() (id ID) {
				for i := 0; i < 32; i += 8 {
					v := rng.Uint64()
					for j := 0; j < 8; j++ {
						id[i+j] = byte(v >> (8 * j))
					}
				}
				return id
			}
			var recs []indexRecord
			for p := o * perObject; p < min((o+1)*perObject, packs); p++ {
				info := PackInfo{ID: id(), Ephemeral: id()}
				for j := 0; j < perPack && p*perPack+j < n; j++ {
					info.Blobs = append(info.Blobs, PackBlob{Type: DataBlob, ID: id(), Offset: uint32(packHeaderSize) + uint32(j)*blobLen, Length: blobLen})
				}
				h := backend.Handle{Type: backend.PackFile, Name: info.ID.String()}
				path := filepath.Join(dir, filepath.FromSlash(h.Path()))
				if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
					return err
				}
				f, err := os.Create(path)
				if err != nil {
					return err
				}
				if err := f.Truncate(packSize); err != nil {
					return err
				}
				f.Close()
				recs = append(recs, indexRecord{PackInfo: info, Writer: [32]byte(keys.OwnerPublic)})
			}
			data := encodeIndex(r.meta, r.keys, recs, nil)
			h := backend.Handle{Type: backend.IndexFile, Name: Hash(data).String()}
			return be.Save(ctx, h, bytes.NewReader(data), int64(len(data)))
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d chunks in %d packs, %d index objects", n, packs, objects)
}

// TestSyntheticStartup times the steps of LoadIndex on the synthetic
// repository ($SAUVE_SYNTH_REPO, $SAUVE_SYNTH_KEY, cache $SAUVE_SYNTH_CACHE
// as the backups left it): listing index objects and packs, checking and
// mapping the index file, and the whole load.
func TestSyntheticStartup(t *testing.T) {
	dir, keyPath, cacheDir := os.Getenv("SAUVE_SYNTH_REPO"), os.Getenv("SAUVE_SYNTH_KEY"), os.Getenv("SAUVE_SYNTH_CACHE")
	if dir == "" || keyPath == "" || cacheDir == "" {
		t.Skip("set SAUVE_SYNTH_REPO, SAUVE_SYNTH_KEY and SAUVE_SYNTH_CACHE")
	}
	ctx := context.Background()
	be, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	kf, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := crypto.DecodeKeyFile(kf, func() ([]byte, error) { return nil, nil })
	if err != nil {
		t.Fatal(err)
	}
	r, err := Open(ctx, be, keys, Options{CacheDir: cacheDir})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n := 0
	if err := be.List(ctx, backend.IndexFile, func(backend.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	t.Logf("list %d index objects: %v", n, time.Since(start))
	start = time.Now()
	stored, _, err := r.listPacks(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("list %d packs: %v (%d LIST requests of 1000 on an object store)", len(stored), time.Since(start), (len(stored)+999)/1000)
	start = time.Now()
	db, err := openIndexDB(filepath.Join(r.cache.dir, indexDBName), indexDBKey(keys.MetaKey))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check (MAC) and open the index file, %d MiB: %v", db.size>>20, time.Since(start))
	start = time.Now()
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("whole LoadIndex: %v", time.Since(start))
}
