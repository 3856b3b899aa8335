// Package repo implements sauve's repository format (docs/FORMAT.md): the
// config, packs of sealed blobs, index objects, chunk lists and signed
// snapshot manifests, the local cache, and check. It knows nothing of disks
// or files: callers hand it chunks and get chunks back.
package repo

import (
	"bytes"
	"context"
	"crypto/hmac"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// Options tune an open repository.
type Options struct {
	// CacheDir is the base directory of the local cache; empty disables it.
	CacheDir string
	// Connections bounds concurrent backend requests (uploads of packs,
	// downloads of index objects). Zero means 2.
	Connections int
	// Warn receives non-fatal problems; nil discards them.
	Warn func(format string, args ...any)
}

// Repository is an open repository, safe for concurrent use.
type Repository struct {
	be      backend.Backend
	cfg     Config
	keys    *crypto.Keys
	ids     *crypto.Hasher
	metaIDs *crypto.Hasher
	meta    *crypto.MetaSealer
	comp    *compressor
	idx     *Index
	cache   *Cache
	opts    Options

	openerOnce sync.Once
	opener     *crypto.DataOpener
	openerErr  error

	pkMu sync.Mutex
	pk   *packer

	codedBufs sync.Pool // *[]byte for compressed blobs
}

// Init writes the config of a new repository, whose ID must be keys.RepoID.
func Init(ctx context.Context, be backend.Backend, keys *crypto.Keys, cfg Config) error {
	if cfg.ID != keys.RepoID {
		return errors.New("config and key belong to different repositories")
	}
	if _, err := be.Stat(ctx, backend.Handle{Type: backend.ConfigFile}); err == nil {
		return fmt.Errorf("%s already holds a repository", be.Location())
	}
	cfg.MAC = cfg.mac(keys.MetaKey[:])
	data, err := jsonIndent(cfg)
	if err != nil {
		return err
	}
	if err := be.Save(ctx, backend.Handle{Type: backend.ConfigFile}, bytes.NewReader(data), int64(len(data))); err != nil {
		if errors.Is(err, backend.ErrExists) {
			return fmt.Errorf("%s already holds a repository", be.Location())
		}
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// Open opens the repository in be with keys.
func Open(ctx context.Context, be backend.Backend, keys *crypto.Keys, opts Options) (*Repository, error) {
	cfg, err := ReadConfig(ctx, be)
	if err != nil {
		return nil, err
	}
	if cfg.ID != keys.RepoID {
		return nil, fmt.Errorf("the key belongs to repository %s, but %s holds repository %s", keys.RepoID, be.Location(), cfg.ID)
	}
	if !hmac.Equal(cfg.mac(keys.MetaKey[:]), cfg.MAC) {
		return nil, errors.New("repository config fails authentication: wrong key, or the config was tampered with")
	}
	if opts.Connections <= 0 {
		opts.Connections = 2
	}
	if opts.Warn == nil {
		opts.Warn = func(string, ...any) {}
	}
	r := &Repository{
		be: be, cfg: cfg, keys: keys, opts: opts,
		ids:     crypto.NewHasher(keys.IDKey),
		metaIDs: crypto.NewHasher(crypto.NewHasher(keys.IDKey).Sum([]byte("sauve meta blob ids"))),
		meta:    crypto.NewMetaSealer(keys.MetaKey),
		comp:    newCompressor(max(cfg.ChunkSize, maxMetaBlob)),
		idx:     NewIndex(),
	}
	r.codedBufs.New = func() any {
		b := make([]byte, 0, cfg.ChunkSize+cfg.ChunkSize/16+64)
		return &b
	}
	if opts.CacheDir != "" {
		c, err := OpenCache(opts.CacheDir, cfg.ID)
		if err != nil {
			opts.Warn("cache disabled: %v", err)
		} else {
			r.cache = c
		}
	}
	return r, nil
}

// Config returns the repository's config.
func (r *Repository) Config() Config { return r.cfg }

// Keys returns the key the repository was opened with.
func (r *Repository) Keys() *crypto.Keys { return r.keys }

// Backend returns the backend.
func (r *Repository) Backend() backend.Backend { return r.be }

// Index returns the in-memory index (filled by LoadIndex).
func (r *Repository) Index() *Index { return r.idx }

// ChunkID returns the ID of a data chunk.
func (r *Repository) ChunkID(data []byte) ID { return r.ids.Sum(data) }

func (r *Repository) blobID(t BlobType, data []byte) ID {
	if t == MetaBlob {
		return r.metaIDs.Sum(data)
	}
	return r.ids.Sum(data)
}

// LoadIndex reads every index object (from the cache where it can) into
// the in-memory index.
func (r *Repository) LoadIndex(ctx context.Context) error { return r.loadIndex(ctx, nil) }

// loadIndex is LoadIndex; a damaged index object goes to bad when bad is
// not nil, and fails the call otherwise.
func (r *Repository) loadIndex(ctx context.Context, bad func(name string, err error)) error {
	var names []string
	var total int64
	err := r.be.List(ctx, backend.IndexFile, func(fi backend.Info) error {
		names = append(names, fi.Name)
		total += fi.Size
		return nil
	})
	if err != nil {
		return fmt.Errorf("list index: %w", err)
	}
	// Size the in-memory index once from the objects' sizes (each blob
	// takes indexBlobEntry bytes there) instead of growing it by copies.
	r.idx.reserve(int(total / indexBlobEntry))
	listed := make(map[string]bool, len(names))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, name := range names {
		listed[name] = true
		g.Go(func() error {
			packs, err := r.loadIndexObject(gctx, name)
			if err != nil {
				if bad != nil && gctx.Err() == nil {
					bad(name, err)
					return nil
				}
				return err
			}
			for _, p := range packs {
				r.idx.addBulk(p)
			}
			return nil
		})
	}
	err = g.Wait()
	r.idx.finishBulk()
	if err != nil {
		return err
	}
	for _, name := range r.cache.List(cacheIndex) {
		if !listed[name] {
			r.cache.Remove(cacheIndex, name)
		}
	}
	return nil
}

func (r *Repository) loadIndexObject(ctx context.Context, name string) ([]PackInfo, error) {
	id, err := ParseID(name)
	if err != nil {
		return nil, fmt.Errorf("index object %q: bad name", name)
	}
	data, ok := r.cache.Get(cacheIndex, name)
	if !ok || Hash(data) != id {
		data, err = backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.IndexFile, Name: name})
		if err != nil {
			return nil, fmt.Errorf("load index %s: %w", id.Short(), err)
		}
		if Hash(data) != id {
			return nil, fmt.Errorf("index %s: content does not match its name (damaged)", name)
		}
		r.cache.Put(cacheIndex, name, data)
	}
	packs, err := decodeIndex(r.meta, data)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", name, err)
	}
	return packs, nil
}

// saveIndex writes an index object for packs.
func (r *Repository) saveIndex(ctx context.Context, packs []PackInfo) error {
	if len(packs) == 0 {
		return nil
	}
	data := encodeIndex(r.meta, packs)
	id := Hash(data)
	h := backend.Handle{Type: backend.IndexFile, Name: id.String()}
	if err := r.be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		return fmt.Errorf("save index: %w", err)
	}
	r.cache.Put(cacheIndex, id.String(), data)
	return nil
}

// AdoptOrphanPacks indexes packs that are stored but in no index: the work
// of an interrupted (or still running) backup. Reading their trailers lets
// the next backup reuse them instead of uploading the same data again.
func (r *Repository) AdoptOrphanPacks(ctx context.Context) (int, error) {
	var orphans []backend.Info
	err := r.be.List(ctx, backend.PackFile, func(fi backend.Info) error {
		id, err := ParseID(fi.Name)
		if err != nil {
			return nil // not ours
		}
		if !r.idx.HasPack(id) {
			orphans = append(orphans, fi)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("list packs: %w", err)
	}
	var (
		mu    sync.Mutex
		infos []PackInfo
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, fi := range orphans {
		g.Go(func() error {
			id, _ := ParseID(fi.Name)
			info, err := readPackInfo(gctx, r.be, r.meta, id, fi.Size)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				r.opts.Warn("unindexed pack %s is unreadable, ignoring it: %v", id.Short(), err)
				return nil
			}
			mu.Lock()
			infos = append(infos, info)
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	for start := 0; start < len(infos); start += indexBatch {
		batch := infos[start:min(start+indexBatch, len(infos))]
		if err := r.saveIndex(ctx, batch); err != nil {
			return 0, err
		}
		for _, p := range batch {
			r.idx.Add(p)
		}
	}
	return len(infos), nil
}

func (r *Repository) dataOpener() (*crypto.DataOpener, error) {
	r.openerOnce.Do(func() { r.opener, r.openerErr = r.keys.DataOpener() })
	return r.opener, r.openerErr
}

// CanDecrypt reports whether the key can read chunk data.
func (r *Repository) CanDecrypt() bool { return r.keys.CanDecrypt() }

// BlobError describes a blob that could not be read back correctly.
type BlobError struct {
	ID     ID
	Pack   ID
	Offset uint32
	Err    error
}

func (e *BlobError) Error() string {
	return fmt.Sprintf("chunk %s in pack %s at offset %d: %v", e.ID.Short(), e.Pack, e.Offset, e.Err)
}

func (e *BlobError) Unwrap() error { return e.Err }

// OpenBlob decrypts, decompresses and verifies one sealed blob, appending
// its plaintext to dst.
func (r *Repository) OpenBlob(dst []byte, id ID, loc Location, sealed []byte) ([]byte, error) {
	return r.openBlob(dst, id, loc, sealed, false)
}

// OpenBlobInPlace is OpenBlob for a caller that has no further use for
// sealed: a data blob is decrypted over sealed's own storage, which saves
// an allocation and a copy of every chunk of a restore.
func (r *Repository) OpenBlobInPlace(dst []byte, id ID, loc Location, sealed []byte) ([]byte, error) {
	return r.openBlob(dst, id, loc, sealed, true)
}

func (r *Repository) openBlob(dst []byte, id ID, loc Location, sealed []byte, inPlace bool) ([]byte, error) {
	fail := func(err error) ([]byte, error) {
		return nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset, Err: err}
	}
	var coded []byte
	var err error
	switch loc.Type {
	case DataBlob:
		o, oerr := r.dataOpener()
		if oerr != nil {
			return nil, oerr
		}
		if inPlace {
			coded, err = o.OpenInPlace(loc.Ephemeral, sealed, id[:])
		} else {
			coded, err = o.Open(nil, loc.Ephemeral, sealed, id[:])
		}
	case MetaBlob:
		coded, err = r.meta.Open(nil, sealed, id[:])
	default:
		err = fmt.Errorf("unknown blob type %d", loc.Type)
	}
	if err != nil {
		return fail(err)
	}
	limit := r.cfg.ChunkSize
	if loc.Type == MetaBlob {
		limit = maxMetaBlob
	}
	plain, err := r.comp.decode(dst, coded, limit)
	if err != nil {
		return fail(err)
	}
	if r.blobID(loc.Type, plain[len(dst):]) != id {
		return fail(errors.New("content does not match its ID (damaged)"))
	}
	return plain, nil
}

// ReadBlob reads one blob (chunk lists come from the cache when present).
func (r *Repository) ReadBlob(ctx context.Context, t BlobType, id ID, dst []byte) ([]byte, error) {
	loc, ok := r.idx.Lookup(id)
	if !ok || loc.Type != t {
		return nil, fmt.Errorf("%s blob %s: %w", t, id.Short(), ErrBlobMissing)
	}
	if t == MetaBlob {
		if sealed, ok := r.cache.Get(cacheBlobs, id.String()); ok {
			if plain, err := r.OpenBlob(dst, id, loc, sealed); err == nil {
				return plain, nil
			}
			r.cache.Remove(cacheBlobs, id.String())
		}
	}
	sealed, err := backend.ReadRange(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: loc.Pack.String()}, int64(loc.Offset), int64(loc.Length))
	if err != nil {
		return nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset, Err: err}
	}
	plain, err := r.OpenBlob(dst, id, loc, sealed)
	if err != nil {
		return nil, err
	}
	if t == MetaBlob {
		r.cache.Put(cacheBlobs, id.String(), sealed)
	}
	return plain, nil
}

// ErrBlobMissing is returned for a blob that no index knows.
var ErrBlobMissing = errors.New("not in any index (missing)")
