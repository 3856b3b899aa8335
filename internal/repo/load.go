package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// errUnreadable marks an object that could not be read (perhaps for a
// while), as opposed to one read and found damaged.
var errUnreadable = errors.New("cannot be read")

// loadState is what loading the index found besides the index itself.
type loadState struct {
	// stored is the listing of packs: name → size.
	stored map[ID]int64
	// storedAt is the listing's storage time of each pack.
	storedAt map[ID]time.Time
	// indexObjects counts the index objects listed.
	indexObjects int
	// damagedIndex maps the index objects that could not be used to why.
	damagedIndex map[string]error
	// orphans are the trailers of packs that no usable index object
	// names, read so their blobs can be used (not deduplicated against).
	orphans []packTrailer
	// orphanErrs are orphan packs whose trailer could not be read.
	orphanErrs map[ID]error
	// orphansUnread counts orphans not read (over the bound).
	orphansUnread int
	ledger        *Ledger
}

// LoadIndex builds the in-memory index: it lists the index objects and
// the packs, reads the owner's ledger, loads every index object (from the
// cache where it can) keeping only entries of packs that are stored, skips
// (with a warning) index objects that are damaged, and reads the trailers
// of stored packs that no usable index object names, so that their blobs
// can still be read.
//
// With a cache, the entries of the index objects are kept in a local
// index file (indexdb.go) that LoadIndex maps instead of loading them;
// it loads only the index objects the file does not cover yet, and
// rebuilds the file when those are many.
func (r *Repository) LoadIndex(ctx context.Context) error {
	st, err := r.loadInto(ctx, r.idx, r.cache, r.opts.MaxOrphanReads, r.Ledger, true)
	if err != nil {
		return err
	}
	r.load = st
	names := make([]string, 0, len(st.damagedIndex))
	for name := range st.damagedIndex {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		r.opts.Warn("index object %s skipped: %v; the packs it named are read from their trailers ('sauve repair index' rewrites it)", shortName(name), st.damagedIndex[name])
	}
	for id, err := range st.orphanErrs {
		r.opts.Warn("pack %s is in no index and its trailer cannot be read: %v", id.Short(), err)
	}
	if st.orphansUnread > 0 {
		r.opts.Warn("%d packs are in no index and were not read (at most %d are): run 'sauve repair index'", st.orphansUnread, r.opts.MaxOrphanReads)
	}
	return nil
}

func shortName(name string) string {
	if id, err := ParseID(name); err == nil {
		return id.Short()
	}
	return fmt.Sprintf("%q", name)
}

// loadInto fills idx, applying the ledger that ledger reads (the
// repository's, or check's own); cache may be nil (check never uses it).
// With useFile and a cache, idx is backed by the local index file.
func (r *Repository) loadInto(ctx context.Context, idx *Index, cache *Cache, maxOrphans int, ledger func(context.Context) (*Ledger, error), useFile bool) (*loadState, error) {
	st := &loadState{damagedIndex: map[string]error{}, orphanErrs: map[ID]error{}}
	// Index objects are listed before packs: an honest index object names
	// packs stored before it was, so they are in the pack listing.
	var objs []backend.Info
	var total int64
	if err := r.be.List(ctx, backend.IndexFile, func(fi backend.Info) error {
		objs = append(objs, fi)
		total += fi.Size
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list index: %w", err)
	}
	st.indexObjects = len(objs)
	key := indexDBKey(r.keys.MetaKey)
	var rec *listingRecord
	if useFile {
		rec = cache.recentListing(key, r.listingAge, r.listingMin, time.Now())
	}
	// Storage times are for prune, which reads the whole index anyway;
	// a command with the index file keeps its memory for the disk.
	stored, at, listedAt := map[ID]int64{}, map[ID]time.Time{}, time.Now()
	var err error
	if rec == nil {
		if stored, at, err = r.listPacks(ctx, !useFile); err != nil {
			return nil, err
		}
	}
	st.stored, st.storedAt = stored, at
	todo, mapped := objs, false
	if useFile && cache != nil && idx.empty() {
		if todo, mapped, err = r.openIndexFile(ctx, idx, cache, objs, st); err != nil {
			return nil, err
		}
		if mapped {
			total = 0
			for _, fi := range todo {
				total += fi.Size
			}
		}
	}
	if rec == nil {
		idx.SetListing(stored)
	}
	led, err := ledger(ctx)
	if err != nil {
		return nil, err
	}
	st.ledger = led
	r.applyLedger(idx, led)

	idx.reserve(int(total / indexBlobEntry))
	// With the file, entries of packs the ledger records deleted are kept
	// like the file keeps them, and marked gone: the same per-run rule.
	if err := r.loadObjects(ctx, idx, cache, todo, st, !mapped); err != nil {
		return nil, err
	}
	if mapped {
		for id := range led.Deleted {
			idx.markGone(id)
		}
	}
	switch {
	case rec != nil:
		if err := r.useListingRecord(ctx, idx, cache, rec, st); err != nil {
			return nil, err
		}
	case useFile:
		cache.saveListing(key, listingRecord{at: listedAt, listed: uint64(len(stored)), missing: idx.missingPacks()})
	}
	listed := make(map[string]bool, len(objs))
	for _, fi := range objs {
		listed[fi.Name] = true
	}
	for _, name := range cache.List(cacheIndex) {
		if !listed[name] {
			cache.Remove(cacheIndex, name)
		}
	}
	if err := r.readOrphans(ctx, idx, st, maxOrphans); err != nil {
		return nil, err
	}
	return st, nil
}

// listPacks lists the stored packs, their sizes and (with times) their
// storage times.
func (r *Repository) listPacks(ctx context.Context, times bool) (map[ID]int64, map[ID]time.Time, error) {
	stored := map[ID]int64{}
	at := map[ID]time.Time{}
	err := r.be.List(ctx, backend.PackFile, func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil {
			stored[id] = fi.Size
			if times {
				at[id] = fi.ModTime
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list packs: %w", err)
	}
	return stored, at, nil
}

// applyLedger marks the packs the owner recorded as damaged and the
// writers it revoked.
func (r *Repository) applyLedger(idx *Index, led *Ledger) {
	for id := range led.Packs {
		if why := led.Damaged(id); why != "" {
			idx.MarkDamaged(id, why)
		}
	}
	for key, t := range led.Revoked {
		idx.Writers.Revoke(key, t)
	}
	markCondemned(idx, led)
}

// markCondemned marks the packs prune condemned or deleted, whose blobs
// no writer may reuse.
func markCondemned(idx *Index, led *Ledger) {
	for id := range led.Condemned {
		idx.MarkCondemned(id)
	}
	for id := range led.Deleted {
		idx.MarkCondemned(id)
	}
}

// refreshCondemned reads the ledger again, after the write session's first
// announcement is stored, and marks what prune condemned meanwhile: a
// prune deletes a condemned pack only once every session announced before
// the condemnation has ended, so a writer that reads the ledger after its
// announcement never reuses a blob a prune is about to delete
// (docs/FORMAT.md, "Prune").
func (r *Repository) refreshCondemned(ctx context.Context) error {
	// r.load first: with the local index file, Len reads the whole file.
	if r.load == nil && r.idxEmpty() {
		// No index loaded (credentials that cannot list): nothing stored
		// before can be reused, so no condemnation matters.
		return nil
	}
	led, err := r.readLedgerWith(ctx, true)
	if err != nil {
		return fmt.Errorf("read the ledger after announcing the write session: %w", err)
	}
	markCondemned(r.idx, led)
	return nil
}

// loadObjects adds the entries of index objects objs to idx, skipping
// the records of packs the ledger records deleted when skipDeleted is set.
func (r *Repository) loadObjects(ctx context.Context, idx *Index, cache *Cache, objs []backend.Info, st *loadState, skipDeleted bool) error {
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, fi := range objs {
		g.Go(func() error {
			o, err := r.loadIndexObject(gctx, cache, fi)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				mu.Lock()
				st.damagedIndex[fi.Name] = err
				mu.Unlock()
				return nil
			}
			owner := [32]byte(r.keys.OwnerPublic)
			for i := range o.records {
				rec := &o.records[i]
				if skipDeleted && st.ledger.Deleted[rec.ID] {
					continue // pruned: a leftover copy is deleted again
				}
				w, t := o.entriesOf(rec, idx.Writers, owner)
				idx.addBulk(rec.PackInfo, w, t)
			}
			return nil
		})
	}
	err := g.Wait()
	idx.finishBulk()
	return err
}

func (r *Repository) loadIndexObject(ctx context.Context, cache *Cache, fi backend.Info) (*indexObject, error) {
	id, err := ParseID(fi.Name)
	if err != nil {
		return nil, errors.New("not an index object name")
	}
	if fi.Size > maxIndexObject {
		return nil, fmt.Errorf("%d bytes is larger than any index object sauve writes", fi.Size)
	}
	data, ok := cache.Get(cacheIndex, fi.Name)
	if !ok || Hash(data) != id {
		data, err = backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.IndexFile, Name: fi.Name})
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errUnreadable, err)
		}
		if Hash(data) != id {
			return nil, errors.New("content does not match its name (damaged)")
		}
		cache.Put(cacheIndex, fi.Name, data)
	}
	return decodeIndex(r.meta, r.keys, r.cfg.Version, data)
}

// readOrphans reads the trailers of stored packs that no usable index
// object names, in pack ID order, at most max of them (-1: all).
func (r *Repository) readOrphans(ctx context.Context, idx *Index, st *loadState, max int) error {
	var orphans []ID
	for id := range st.stored {
		if !idx.HasPack(id) && !st.ledger.Deleted[id] {
			orphans = append(orphans, id)
		}
	}
	slices.SortFunc(orphans, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	if max >= 0 && len(orphans) > max {
		st.orphansUnread = len(orphans) - max
		orphans = orphans[:max]
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	tr := trailerReader{meta: r.meta, keys: r.keys}
	for _, id := range orphans {
		g.Go(func() error {
			t, err := tr.readPackTrailer(gctx, r.be, id, st.stored[id])
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				st.orphanErrs[id] = err
				return nil
			}
			st.orphans = append(st.orphans, t)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	slices.SortFunc(st.orphans, func(a, b packTrailer) int { return bytes.Compare(a.ID[:], b.ID[:]) })
	for _, t := range st.orphans {
		w, trust := r.claimedBy(idx, t)
		idx.Add(t.PackInfo, w, trust)
	}
	return nil
}

// claimedBy attributes the blobs of a trailer read without the pack: to
// its signer, but vouched for by nobody (anyone can copy a signed trailer
// onto other bytes).
func (r *Repository) claimedBy(idx *Index, t packTrailer) (WriterNum, Trust) {
	if t.Version == 1 {
		return NoWriter, TrustLegacy
	}
	return idx.Writers.Number(t.Signer.Key, t.Signer.Cert), 0
}

// AdoptOrphanPacks indexes the packs that this key wrote but that are in no
// index: the work of its own interrupted backups, which the next backup
// then reuses instead of uploading again. A pack counts as its own only
// when the local cache recorded its name before the upload and its
// trailer is signed by this key: a pack is named by the hash of its
// bytes, so it holds exactly what this key wrote. Packs of other writers
// are left alone (their blobs are readable, not deduplicated against).
func (r *Repository) AdoptOrphanPacks(ctx context.Context) (int, error) {
	if r.load == nil {
		return 0, errors.New("internal error: AdoptOrphanPacks before LoadIndex")
	}
	if r.ReadOnly() {
		return 0, nil
	}
	own := r.cache.OwnPacks()
	self := r.keys.SignerPublic()
	var adopt []indexRecord
	for _, t := range r.load.orphans {
		if t.Version == 2 && own[t.ID] && t.Signer.Key == self {
			adopt = append(adopt, indexRecord{PackInfo: t.PackInfo, Writer: self})
		}
	}
	for start := 0; start < len(adopt); start += indexBatch {
		batch := adopt[start:min(start+indexBatch, len(adopt))]
		if err := r.saveIndex(ctx, batch, nil); err != nil {
			return 0, err
		}
		for _, rec := range batch {
			r.idx.Add(rec.PackInfo, r.self, r.selfTrust())
		}
	}
	stored := func(id ID) bool { _, ok := r.load.stored[id]; return ok }
	if err := r.cache.CompactOwnPacks(r.idx.HasPack, stored, time.Now()); err != nil {
		r.opts.Warn("compact the journal of this machine's uploads: %v", err)
	}
	return len(adopt), nil
}

// selfTrust is the trust of entries this key writes about its own packs.
func (r *Repository) selfTrust() Trust {
	if r.keys.IsOwner() {
		return TrustOwner | TrustSigned
	}
	return TrustSigned
}

// saveIndex writes an index object for the packs of records, signed by
// this key. Records of other writers' packs need certs (owner only).
func (r *Repository) saveIndex(ctx context.Context, records []indexRecord, certs []*crypto.Cert) error {
	return r.saveIndexTo(ctx, r.cache, records, certs)
}

// saveIndexTo is saveIndex keeping a copy in cache (nil: none).
func (r *Repository) saveIndexTo(ctx context.Context, cache *Cache, records []indexRecord, certs []*crypto.Cert) error {
	if len(records) == 0 {
		return nil
	}
	data := encodeIndex(r.meta, r.keys, records, certs)
	id := Hash(data)
	h := backend.Handle{Type: backend.IndexFile, Name: id.String()}
	if err := r.be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		return fmt.Errorf("save index: %w", err)
	}
	cache.Put(cacheIndex, id.String(), data)
	return nil
}

// idxEmpty reports whether the index holds no entry.
func (r *Repository) idxEmpty() bool {
	blobs, _ := r.idx.Len()
	return blobs == 0
}
