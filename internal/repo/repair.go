package repo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// StrayAge is how old a temporary file must be before repair removes it:
// older than any write still in progress.
const StrayAge = 24 * time.Hour

// RepairOptions tune RepairIndex.
type RepairOptions struct {
	// DryRun reports what would be done and changes nothing.
	DryRun bool
	// ReadData downloads each pack it indexes and verifies it blob by
	// blob, so its chunks are vouched for by the owner (every writer may
	// then reuse them). Without it, packs indexed from their trailers are
	// readable but no writer deduplicates against them.
	ReadData bool
	// Progress is called with packs done and total.
	Progress func(done, total int)
}

// RepairReport says what RepairIndex did (or, with DryRun, would do).
type RepairReport struct {
	DryRun bool `json:"dry_run"`
	// Indexed are the packs written into new index objects, Endorsed
	// those of them verified blob by blob.
	Indexed  int `json:"packs_indexed"`
	Endorsed int `json:"packs_verified"`
	Blobs    int `json:"blobs_indexed"`
	// Unreadable packs could not be indexed: their trailer (or, with
	// ReadData, their content) is damaged.
	Unreadable []PackProblem `json:"unreadable_packs"`
	// RemovedIndex are the damaged index objects removed.
	RemovedIndex []string `json:"removed_index_objects"`
	// KeptIndex are index objects that could not be read (perhaps for a
	// while) and were left alone.
	KeptIndex   []string `json:"unreadable_index_objects"`
	TempRemoved int      `json:"temp_files_removed"`
	TempBytes   int64    `json:"temp_bytes_removed"`
	// damaged are the unreadable packs found damaged (not merely
	// unreadable for now): recorded in the ledger.
	damaged []PackProblem
}

// RepairIndex rebuilds the index from the packs: every stored pack that no
// usable index object names is indexed from its trailer in a new index
// object signed by the owner, damaged index objects are removed once
// their packs are indexed again, and temporary files older than StrayAge
// are removed. It needs the owner's key.
func (r *Repository) RepairIndex(ctx context.Context, opts RepairOptions) (*RepairReport, error) {
	if !r.keys.IsOwner() {
		return nil, errors.New("repair needs the repository owner's key (a write-only key cannot vouch for other writers' packs)")
	}
	if r.ReadOnly() {
		return nil, r.errReadOnly()
	}
	rep := &RepairReport{DryRun: opts.DryRun, Unreadable: []PackProblem{}, RemovedIndex: []string{}, KeptIndex: []string{}}
	idx := r.newIndex()
	st, err := r.loadInto(ctx, idx, nil, -1, r.Ledger, false)
	if err != nil {
		return nil, err
	}
	for id, err := range st.orphanErrs {
		rep.Unreadable = append(rep.Unreadable, PackProblem{Pack: id, Why: err.Error()})
		if errors.Is(err, ErrPackFormat) {
			rep.damaged = append(rep.damaged, PackProblem{Pack: id, Why: err.Error()})
		}
	}
	records, certs, err := r.repairRecords(ctx, st, opts, rep)
	if err != nil {
		return nil, err
	}
	if !opts.DryRun {
		for start := 0; start < len(records); start += indexBatch {
			batch := records[start:min(start+indexBatch, len(records))]
			if err := r.saveIndex(ctx, batch, certsFor(batch, certs)); err != nil {
				return nil, err
			}
		}
	}
	if err := r.removeDamagedIndex(ctx, st, opts.DryRun, rep); err != nil {
		return nil, err
	}
	if !opts.DryRun {
		if err := r.recordUnreadable(ctx, st, rep); err != nil {
			return nil, err
		}
	}
	if err := r.removeStray(ctx, opts.DryRun, rep); err != nil {
		return nil, err
	}
	sort.Slice(rep.Unreadable, func(i, j int) bool { return rep.Unreadable[i].Pack.String() < rep.Unreadable[j].Pack.String() })
	return rep, nil
}

// repairRecords makes the index records of the orphan packs: verified
// blob by blob with ReadData, else claimed from their trailers.
func (r *Repository) repairRecords(ctx context.Context, st *loadState, opts RepairOptions, rep *RepairReport) ([]indexRecord, map[[32]byte]*crypto.Cert, error) {
	owner := [32]byte(r.keys.OwnerPublic)
	certs := map[[32]byte]*crypto.Cert{}
	var (
		mu      sync.Mutex
		records []indexRecord
		done    int
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections)
	for _, t := range st.orphans {
		g.Go(func() error {
			rec, verified, err := r.repairRecord(gctx, t, st.stored[t.ID], opts.ReadData, owner)
			mu.Lock()
			defer mu.Unlock()
			done++
			if opts.Progress != nil {
				opts.Progress(done, len(st.orphans))
			}
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				rep.Unreadable = append(rep.Unreadable, PackProblem{Pack: t.ID, Why: err.Error()})
				if !errors.Is(err, errUnreadable) {
					rep.damaged = append(rep.damaged, PackProblem{Pack: t.ID, Why: err.Error()})
				}
				return nil
			}
			if t.Signer.Cert != nil {
				certs[t.Signer.Key] = t.Signer.Cert
			}
			records = append(records, rec)
			rep.Indexed++
			rep.Blobs += len(rec.Blobs)
			if verified {
				rep.Endorsed++
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	sort.Slice(records, func(i, j int) bool { return records[i].ID.String() < records[j].ID.String() })
	return records, certs, nil
}

// repairRecord makes the index record of one orphan pack.
func (r *Repository) repairRecord(ctx context.Context, t packTrailer, size int64, readData bool, owner [32]byte) (indexRecord, bool, error) {
	if t.Version != 2 {
		return indexRecord{}, false, errors.New("a version-1 pack in a version-2 repository")
	}
	rec := indexRecord{PackInfo: t.PackInfo, Writer: t.Signer.Key, Flags: recClaimed}
	if !readData {
		return rec, false, nil
	}
	data, err := backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: t.ID.String()})
	if err != nil {
		return rec, false, fmt.Errorf("%w: %w", errUnreadable, err)
	}
	tr := trailerReader{meta: r.meta, keys: r.keys}
	_, whole, err := tr.parseStoredPack(t.ID, data)
	if !whole {
		return rec, false, fmt.Errorf("%w: content does not match its name", ErrPackFormat)
	}
	if err != nil {
		return rec, false, err
	}
	for _, b := range t.Blobs {
		loc := Location{Pack: t.ID, Ephemeral: t.Ephemeral, Type: b.Type, Offset: b.Offset, Length: b.Length}
		if _, err := r.OpenBlob(nil, b.ID, loc, data[b.Offset:b.Offset+b.Length]); err != nil {
			return rec, false, err
		}
	}
	rec.Flags = recEndorsed
	if t.Signer.Key == owner {
		rec.Flags = 0
	}
	return rec, true, nil
}

// removeDamagedIndex removes the index objects found damaged (not those
// that merely could not be read).
func (r *Repository) removeDamagedIndex(ctx context.Context, st *loadState, dry bool, rep *RepairReport) error {
	names := make([]string, 0, len(st.damagedIndex))
	for name := range st.damagedIndex {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if errors.Is(st.damagedIndex[name], errUnreadable) {
			rep.KeptIndex = append(rep.KeptIndex, name)
			continue
		}
		if !dry {
			if err := r.be.Remove(ctx, backend.Handle{Type: backend.IndexFile, Name: name}); err != nil && !errors.Is(err, backend.ErrNotExist) {
				return fmt.Errorf("remove damaged index object %s: %w", shortName(name), err)
			}
			r.cache.Remove(cacheIndex, name)
		}
		rep.RemovedIndex = append(rep.RemovedIndex, name)
	}
	return nil
}

// removeStray removes temporary files older than StrayAge.
func (r *Repository) removeStray(ctx context.Context, dry bool, rep *RepairReport) error {
	sl, ok := backend.StrayListerOf(r.be)
	if !ok {
		return nil
	}
	var old []backend.Stray
	cutoff := time.Now().Add(-StrayAge)
	if err := sl.ListStray(ctx, func(s backend.Stray) error {
		if s.ModTime.Before(cutoff) {
			old = append(old, s)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("list temporary files: %w", err)
	}
	for _, s := range old {
		if !dry {
			if err := sl.RemoveStray(ctx, s.Path); err != nil && !errors.Is(err, backend.ErrNotExist) {
				return fmt.Errorf("remove temporary file %s: %w", s.Path, err)
			}
		}
		rep.TempRemoved++
		rep.TempBytes += s.Size
	}
	return nil
}

// recordUnreadable records in the ledger the packs found damaged (not
// those that merely could not be read now), so that no backup reuses
// their chunks.
func (r *Repository) recordUnreadable(ctx context.Context, st *loadState, rep *RepairReport) error {
	var events []LedgerEvent
	for _, p := range rep.damaged {
		if st.ledger.Damaged(p.Pack) != "" {
			continue
		}
		id := p.Pack
		events = append(events, LedgerEvent{Kind: EventPackDamaged, Pack: &id, Reason: p.Why})
	}
	return r.SaveLedger(ctx, events)
}
