// Package repotest makes repositories for the unit tests of the packages
// above repo (the pipelines, the snapshot reader): in memory, on the mem
// backend, with small chunks and packs so that a few MiB of test data
// cover many chunks, packs and index batches. It needs no root and no
// server; the end-to-end tests in cmd/sauve cover the real backends.
package repotest

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend/mem"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Options say what repository New makes. Zero values pick small sizes.
type Options struct {
	ChunkSize   int // default repo.MinChunkSize
	PackSize    int // default 16 chunks
	Connections int // default 2
	CacheDir    string
	Warn        func(format string, args ...any)
	// IDKey, when set, is the new repository's ID key, as 'sauve init
	// --from-repo' shares one with another repository (default: fresh).
	IDKey *[crypto.KeySize]byte
	// ListingAge is passed to ReuseListing before the index is loaded.
	ListingAge time.Duration
}

// Repo is a test repository: the open repository, the backend that
// holds it and the owner's keys.
type Repo struct {
	*repo.Repository
	Backend *mem.Backend
	Keys    *crypto.Keys
	opts    Options
}

// New makes and opens an empty repository with its index loaded.
func New(t testing.TB, opts Options) *Repo {
	t.Helper()
	if opts.ChunkSize == 0 {
		opts.ChunkSize = repo.MinChunkSize
	}
	if opts.PackSize == 0 {
		opts.PackSize = 16 * opts.ChunkSize
	}
	cfg, err := repo.NewConfig(opts.ChunkSize, opts.PackSize)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := crypto.Generate(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if opts.IDKey != nil {
		keys.IDKey = *opts.IDKey
	}
	be := mem.New()
	if err := repo.Init(context.Background(), be, keys, cfg); err != nil {
		t.Fatal(err)
	}
	tr := &Repo{Backend: be, Keys: keys, opts: opts}
	tr.Repository = tr.Open(t, keys)
	return tr
}

// Open opens the repository again with keys (the owner's, or a derived
// write-only key), as a new process would, and loads its index.
func (tr *Repo) Open(t testing.TB, keys *crypto.Keys) *repo.Repository {
	t.Helper()
	warn := tr.opts.Warn
	if warn == nil {
		warn = func(format string, args ...any) { t.Logf("warning: "+format, args...) }
	}
	r, err := repo.Open(context.Background(), tr.Backend, keys, repo.Options{
		CacheDir: tr.opts.CacheDir, Connections: tr.opts.Connections, Warn: warn,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.ReuseListing(tr.opts.ListingAge, 0)
	if err := r.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	return r
}

// Reopen replaces the open repository with a fresh one under the owner's
// key and returns it.
func (tr *Repo) Reopen(t testing.TB) *repo.Repository {
	t.Helper()
	tr.Repository = tr.Open(t, tr.Keys)
	return tr.Repository
}

// WriteOnly returns a write-only key for a backup host, as
// `sauve key export --write-only` makes one.
func (tr *Repo) WriteOnly(t testing.TB, name string) *crypto.Keys {
	t.Helper()
	k, err := tr.Keys.DeriveWriteOnly(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// WaitGoroutines fails the test unless the number of goroutines falls
// back to n within 5 seconds: a pipeline that was stopped must leave none
// of its own running.
func WaitGoroutines(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines left running (had %d):\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}
