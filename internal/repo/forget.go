package repo

import (
	"context"
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Forgetting a snapshot takes two steps: one ledger record names every
// snapshot forgotten, then their manifests are removed. From the moment
// the record is stored the snapshots are gone for every reader
// (Snapshots leaves out what the ledger records forgotten), so a forget
// killed between the two steps, or one whose removals failed, has still
// forgotten them; the manifests it left are deleted by RemoveForgotten,
// which every later forget (and prune) runs. Their chunks stay until a
// prune finds them unreferenced.

// errForgetNeedsOwner is Forget's error for any key but the owner's.
var errForgetNeedsOwner = errors.New("forgetting snapshots needs the repository owner's key: a write-only key can add snapshots but never remove them")

// CanForget says why this repository's key cannot forget snapshots, or
// nil: so that a command refuses before it decides anything.
func (r *Repository) CanForget() error {
	if !r.keys.IsOwner() {
		return errForgetNeedsOwner
	}
	if r.ReadOnly() {
		return r.errReadOnly()
	}
	return nil
}

// Forget forgets the snapshots ids (owner key only): it records them
// forgotten in the ledger, then removes their manifests and any other
// stored manifest of a snapshot recorded forgotten (with no ids, only
// those). A manifest already absent is not an error.
func (r *Repository) Forget(ctx context.Context, ids []ID) error {
	if err := r.CanForget(); err != nil {
		return err
	}
	if len(ids) == 0 {
		_, err := r.RemoveForgotten(ctx)
		return err
	}
	events := make([]LedgerEvent, 0, len(ids))
	seen := map[ID]bool{}
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		events = append(events, LedgerEvent{Kind: EventSnapshotForgotten, Snapshot: &id})
	}
	// The record first: a snapshot whose manifest went before the record
	// was stored would look lost, not forgotten (reportVanished).
	if err := r.SaveLedger(ctx, events); err != nil {
		return fmt.Errorf("forget %d snapshots: record them in the ledger: %w", len(events), err)
	}
	if _, err := r.RemoveForgotten(ctx); err != nil {
		return fmt.Errorf("forget %d snapshots (recorded forgotten, so gone for every reader): %w", len(events), err)
	}
	return nil
}

// RemoveForgotten deletes the stored manifests of snapshots the ledger
// records forgotten (owner key only) and returns how many it deleted:
// what a forget interrupted between its ledger record and its removals
// left. It removes nothing else.
func (r *Repository) RemoveForgotten(ctx context.Context) (int, error) {
	if err := r.CanForget(); err != nil {
		return 0, err
	}
	led, err := r.Ledger(ctx)
	if err != nil {
		return 0, err
	}
	if len(led.Forgotten) == 0 {
		return 0, nil
	}
	names, err := r.listSnapshots(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		id, err := ParseID(name)
		if err != nil || !led.Forgotten[id] {
			continue
		}
		h := backend.Handle{Type: backend.SnapshotFile, Name: name}
		if err := r.be.Remove(ctx, h); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return n, fmt.Errorf("remove manifest of forgotten snapshot %s: %w", id.Short(), err)
		}
		r.cache.Remove(cacheSnapshots, name)
		n++
	}
	return n, nil
}
