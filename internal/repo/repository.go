// Package repo implements sauve's repository format (docs/FORMAT.md): the
// config, packs of sealed blobs, signed index objects, chunk lists, signed
// snapshot manifests, the owner's ledger, the local cache, check and
// repair. It knows nothing of disks or files: callers hand it chunks and
// get chunks back.
//
// Nothing read from storage is trusted: every object is checked against
// its name, every blob against its ID, every index object, pack trailer,
// manifest and ledger record against its signer, and a writer's word
// counts only for itself (see Index.Reusable). Damage costs only what is
// damaged: a bad index object is skipped and its packs read from their
// trailers, and every copy of a blob is tried before a read fails.
package repo

import (
	"bytes"
	"context"
	"crypto/hmac"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/zstdenc"
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
	// Compression is the zstd level new blobs are compressed at
	// (zstdenc.MinLevel to MaxLevel; 0: zstdenc.DefaultLevel). It is the
	// writer's choice: every level reads back the same way.
	Compression int
	// Program is recorded in ledger records.
	Program string
	// MaxOrphanReads bounds how many packs in no index LoadIndex reads
	// the trailers of (0: 1000; -1: all).
	MaxOrphanReads int
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
	// writers numbers every signer seen; every index view of the
	// repository shares it, so a writer has one number throughout.
	writers *Writers
	// self is this key's writer number.
	self WriterNum

	openerOnce sync.Once
	opener     *crypto.DataOpener
	openerErr  error

	// parityK is the size of the parity groups write sessions store (0:
	// none; SetParity).
	parityK    int
	parityPool mapPool

	// timing is how write sessions announce themselves (tests shorten
	// it and drive its clock).
	timing sessionTiming

	ledgerMu sync.Mutex
	ledger   *Ledger
	// ledgerRecs are the ledger records verified so far, by name.
	recsMu     sync.Mutex
	ledgerRecs map[string]*LedgerRecord

	// load is what the last LoadIndex found.
	load *loadState
	// listingAge is how old a record of this machine's last listing of
	// packs LoadIndex may use instead of listing (0: none; ReuseListing).
	listingAge time.Duration
	listingMin int
	// dbBuildEntries bounds the entries a build of the local index file
	// holds in memory (tests lower it).
	dbBuildEntries int
	// metaOK remembers chunk lists whose stored copy a backup verified.
	metaOK sync.Map

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
	if opts.MaxOrphanReads == 0 {
		opts.MaxOrphanReads = 1000
	}
	if opts.Compression == 0 {
		opts.Compression = zstdenc.DefaultLevel
	}
	if err := zstdenc.CheckLevel(opts.Compression); err != nil {
		return nil, err
	}
	r := &Repository{
		be: be, cfg: cfg, keys: keys, opts: opts,
		ids:            crypto.NewHasher(keys.IDKey),
		metaIDs:        crypto.NewHasher(crypto.NewHasher(keys.IDKey).Sum([]byte("sauve meta blob ids"))),
		meta:           crypto.NewMetaSealer(keys.MetaKey),
		comp:           newCompressor(max(cfg.ChunkSize, maxMetaBlob), opts.Compression),
		timing:         defaultSessionTiming(),
		dbBuildEntries: dbBuildEntries,
	}
	r.writers = NewWriters()
	r.writers.SetOwner([32]byte(keys.OwnerPublic))
	r.idx = r.newIndex()
	r.self = r.writers.Number(keys.SignerPublic(), keys.Cert)
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

// newIndex returns an empty index that shares the repository's writers.
func (r *Repository) newIndex() *Index {
	x := NewIndex()
	x.Writers = r.writers
	return x
}

// Writers returns the table of signers the repository has seen.
func (r *Repository) Writers() *Writers { return r.writers }

// Config returns the repository's config.
func (r *Repository) Config() Config { return r.cfg }

// Keys returns the key the repository was opened with.
func (r *Repository) Keys() *crypto.Keys { return r.keys }

// Backend returns the backend.
func (r *Repository) Backend() backend.Backend { return r.be }

// Index returns the in-memory index (filled by LoadIndex).
func (r *Repository) Index() *Index { return r.idx }

// Self is the writer number of the key the repository was opened with.
func (r *Repository) Self() WriterNum { return r.self }

// ReadOnly reports whether this sauve only reads the repository: one of
// format version 1, whose objects nobody signed.
func (r *Repository) ReadOnly() bool { return r.cfg.Version < FormatVersion }

func (r *Repository) errReadOnly() error {
	return fmt.Errorf("repository %s has format version %d, which this sauve reads but does not write to (its index objects are unsigned): restore from it, and back up into a new repository", r.be.Location(), r.cfg.Version)
}

// ChunkID returns the ID of a data chunk.
func (r *Repository) ChunkID(data []byte) ID { return r.ids.Sum(data) }

func (r *Repository) blobID(t BlobType, data []byte) ID {
	if t == MetaBlob {
		return r.metaIDs.Sum(data)
	}
	return r.ids.Sum(data)
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
	if loc.Type == DataBlob {
		if _, err := r.dataOpener(); err != nil {
			return nil, err // the key's, not the blob's
		}
	}
	coded, err := r.decrypt(id, loc, sealed, inPlace)
	if err == nil {
		var plain []byte
		if plain, err = r.decode(dst, id, loc.Type, coded); err == nil {
			return plain, nil
		}
	}
	return nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset, Err: err}
}

// decrypt opens a sealed blob into its coded form (coding byte and
// body); a data blob in place over sealed when inPlace.
func (r *Repository) decrypt(id ID, loc Location, sealed []byte, inPlace bool) ([]byte, error) {
	switch loc.Type {
	case DataBlob:
		o, err := r.dataOpener()
		if err != nil {
			return nil, err
		}
		if inPlace {
			return o.OpenInPlace(loc.Ephemeral, sealed, id[:])
		}
		return o.Open(nil, loc.Ephemeral, sealed, id[:])
	case MetaBlob:
		return r.meta.Open(nil, sealed, id[:])
	}
	return nil, fmt.Errorf("unknown blob type %d", loc.Type)
}

// decode decompresses a coded blob, appending it to dst, bounded by what
// a blob of its type may hold, and verifies it against its ID.
func (r *Repository) decode(dst []byte, id ID, t BlobType, coded []byte) ([]byte, error) {
	limit := r.cfg.ChunkSize
	if t == MetaBlob {
		limit = maxMetaBlob
	}
	plain, err := r.comp.decode(dst, coded, limit)
	if err != nil {
		return nil, err
	}
	if r.blobID(t, plain[len(dst):]) != id {
		return nil, errors.New("content does not match its ID (damaged)")
	}
	return plain, nil
}

// openCoded decrypts a sealed blob (a data blob over sealed's own
// storage) and verifies it, decoding it into *scratch, and returns its
// coded form (coding byte and body), as a writer stores it again without
// compressing it again.
func (r *Repository) openCoded(id ID, loc Location, sealed []byte, scratch *[]byte) ([]byte, error) {
	coded, err := r.decrypt(id, loc, sealed, true)
	if err == nil {
		*scratch, err = r.decode((*scratch)[:0], id, loc.Type, coded)
	}
	if err != nil {
		return nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset, Err: err}
	}
	return coded, nil
}

// ReadBlob reads one blob (chunk lists come from the cache when present),
// trying every copy of it, best first, until one verifies.
func (r *Repository) ReadBlob(ctx context.Context, t BlobType, id ID, dst []byte) ([]byte, error) {
	return r.readBlob(ctx, r.idx, r.cache, t, id, dst, NoWriter)
}

// ReadBlobFor is ReadBlob for a reader of a snapshot signed by writer
// prefer, whose own copies are tried first.
func (r *Repository) ReadBlobFor(ctx context.Context, t BlobType, id ID, dst []byte, prefer WriterNum) ([]byte, error) {
	return r.readBlob(ctx, r.idx, r.cache, t, id, dst, prefer)
}

func (r *Repository) readBlob(ctx context.Context, idx *Index, cache *Cache, t BlobType, id ID, dst []byte, prefer WriterNum) ([]byte, error) {
	if t == MetaBlob {
		if sealed, ok := cache.Get(cacheBlobs, id.String()); ok {
			if plain, err := r.OpenBlob(dst, id, Location{Type: MetaBlob}, sealed); err == nil {
				return plain, nil
			}
			cache.Remove(cacheBlobs, id.String())
		}
	}
	copies := idx.Copies(id, prefer)
	var errs []error
	for _, c := range copies {
		if c.Type != t {
			continue
		}
		if c.Missing {
			errs = append(errs, fmt.Errorf("%s blob %s: %s", t, id.Short(), c.Damaged))
			continue
		}
		plain, sealed, err := r.readCopy(ctx, id, c.Location, dst)
		if err == nil {
			if t == MetaBlob {
				cache.Put(cacheBlobs, id.String(), sealed)
			}
			return plain, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("%s blob %s: %w", t, id.Short(), ErrBlobMissing)
	}
	if len(errs) == 1 {
		return nil, errs[0]
	}
	return nil, fmt.Errorf("%s blob %s: all %d copies failed: %w", t, id.Short(), len(errs), errors.Join(errs...))
}

// ReadCopy reads and verifies one copy of a blob.
func (r *Repository) ReadCopy(ctx context.Context, id ID, loc Location, dst []byte) ([]byte, error) {
	plain, _, err := r.readCopy(ctx, id, loc, dst)
	return plain, err
}

// readCopy is ReadCopy that also returns the sealed bytes (intact for a
// meta blob, whose opening does not decrypt in place).
func (r *Repository) readCopy(ctx context.Context, id ID, loc Location, dst []byte) (plain, sealed []byte, err error) {
	// The length comes from an index entry, which a hostile writer can
	// forge: never allocate more than the largest blob can take.
	if int64(loc.Length) > r.maxSealed() {
		return nil, nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset,
			Err: fmt.Errorf("its index entry claims %d bytes, more than any blob of this repository takes (%d)", loc.Length, r.maxSealed())}
	}
	sealed, err = backend.ReadRange(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: loc.Pack.String()}, int64(loc.Offset), int64(loc.Length))
	if err != nil {
		return nil, nil, &BlobError{ID: id, Pack: loc.Pack, Offset: loc.Offset, Err: err}
	}
	plain, err = r.OpenBlobInPlace(dst, id, loc, sealed)
	return plain, sealed, err
}

// maxSealed is the largest a stored blob can be: the largest plaintext
// (a chunk, or a chunk list blob), one byte of coding, and what sealing
// adds (less than 128 bytes).
func (r *Repository) maxSealed() int64 {
	return int64(max(r.cfg.ChunkSize, maxMetaBlob)) + 1 + 128
}

// ReadPackRange reads length bytes at off of a pack: the sealed blobs of
// a run, which the caller opens with OpenBlob.
func (r *Repository) ReadPackRange(ctx context.Context, pack ID, off int64, dst []byte) error {
	return backend.ReadRangeInto(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: pack.String()}, off, dst)
}

// ErrBlobMissing is returned for a blob that no index knows.
var ErrBlobMissing = errors.New("not in any index (missing)")
