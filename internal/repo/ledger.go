package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// The ledger holds what the owner found and decided, as immutable records
// signed by the owner key (docs/FORMAT.md, "Ledger"): packs found damaged
// or missing, packs verified since, writers revoked, snapshots whose lost
// chunks could not be recovered. Every command reads it; records signed by
// anyone else are ignored, so a writer cannot mark the owner's packs as
// damaged or lift a revocation.

// Ledger event kinds.
const (
	EventPackDamaged     = "pack-damaged"
	EventPackMissing     = "pack-missing"
	EventPackOK          = "pack-ok"
	EventWriterRevoked   = "writer-revoked"
	EventSnapshotDamaged = "snapshot-damaged"
	// EventSnapshotOK records that a snapshot marked damaged is whole
	// again (its lost chunks were stored again).
	EventSnapshotOK = "snapshot-ok"
	// EventSnapshotForgotten records a snapshot the owner removed, so
	// that its disappearance is not reported as a loss.
	EventSnapshotForgotten = "snapshot-forgotten"
	// EventSnapshotVerified records that check --read-data read and
	// verified every chunk of every disk of a snapshot, so that forget
	// can keep the newest such snapshot of each group.
	EventSnapshotVerified = "snapshot-verified"
	// EventNamespace records an isolated namespace the owner created
	// (docs/FORMAT.md, "Isolated namespaces").
	EventNamespace = "namespace"
	// EventPackCondemned records that prune will delete a pack once no
	// write session that may not know it is still live; from the storage
	// time of the record on, no writer reuses the pack's blobs
	// (docs/FORMAT.md, "Prune").
	EventPackCondemned = "pack-condemned"
	// EventPackDeleted records that prune deletes (or deleted) a pack:
	// its index entries are dropped, and a leftover copy is deleted again.
	EventPackDeleted = "pack-deleted"
)

// LedgerEvent is one finding or decision.
type LedgerEvent struct {
	Kind   string `json:"kind"`
	Pack   *ID    `json:"pack,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Signer and Name identify a revoked writer.
	Signer []byte `json:"signer,omitempty"`
	Name   string `json:"name,omitempty"`
	// Namespace names an isolated namespace.
	Namespace string `json:"namespace,omitempty"`
	// Snapshot, Disk and Ranges locate what a snapshot lost for good.
	Snapshot *ID    `json:"snapshot,omitempty"`
	Disk     string `json:"disk,omitempty"`
	Ranges   []Span `json:"ranges,omitempty"`
}

// LedgerRecord is one stored ledger object.
type LedgerRecord struct {
	Time    time.Time     `json:"time"`
	Program string        `json:"program,omitempty"`
	Events  []LedgerEvent `json:"events"`
	ID      ID            `json:"-"`
	// Stored is the record's storage time (docs/FORMAT.md, "Write
	// sessions"): when prune's condemnations take effect.
	Stored time.Time `json:"-"`
}

var ledgerAD = []byte("sauve ledger v2")

const (
	ledgerMagic     = "SVLDG001"
	maxLedgerObject = 64 << 20
)

// Ledger is the owner's records, as read.
type Ledger struct {
	// Packs is the latest finding about each pack.
	Packs map[ID]LedgerEvent
	// Revoked lists revoked writers by signing key, with the time.
	Revoked map[[32]byte]time.Time
	// SnapshotDamage lists what each snapshot lost for good.
	SnapshotDamage map[ID][]LedgerEvent
	// Forgotten lists the snapshots the owner removed.
	Forgotten map[ID]bool
	// Verified lists the snapshots check --read-data verified whole, with
	// the time of the record that says so; a snapshot recorded damaged
	// since is no longer listed.
	Verified map[ID]time.Time
	// Namespaces lists the isolated namespaces, in the order created.
	Namespaces []string
	// Condemned maps the packs prune condemned (and did not delete yet)
	// to the storage time of the earliest record condemning them.
	Condemned map[ID]time.Time
	// Deleted lists the packs prune deleted or is deleting.
	Deleted map[ID]bool
	Records int
}

// Damaged reports why a pack is recorded as unusable, or "".
func (l *Ledger) Damaged(pack ID) string {
	if l == nil {
		return ""
	}
	// A pack recorded as missing that is stored again is judged by its
	// name like any other: only damage found in its bytes sticks.
	e, ok := l.Packs[pack]
	if !ok || e.Kind != EventPackDamaged {
		return ""
	}
	return "recorded as damaged by the owner: " + e.Reason
}

// SaveLedger signs and stores a ledger record (owner key only); the
// repository reads the ledger again, with it, when next asked.
func (r *Repository) SaveLedger(ctx context.Context, events []LedgerEvent) error {
	if err := r.writeLedger(ctx, events); err != nil {
		return err
	}
	r.ledgerMu.Lock()
	r.ledger = nil
	r.ledgerMu.Unlock()
	return nil
}

// writeLedger signs and stores a ledger record and leaves the
// repository's view alone (check records what it found that way).
func (r *Repository) writeLedger(ctx context.Context, events []LedgerEvent) error {
	_, err := r.storeLedger(ctx, events)
	return err
}

// storeLedger is writeLedger returning the record's ID.
func (r *Repository) storeLedger(ctx context.Context, events []LedgerEvent) (ID, error) {
	if !r.keys.IsOwner() {
		return ID{}, errors.New("only the owner's key can write ledger records")
	}
	if len(events) == 0 {
		return ID{}, nil
	}
	if r.ReadOnly() {
		return ID{}, r.errReadOnly()
	}
	rec := LedgerRecord{Time: time.Now().UTC(), Program: r.opts.Program, Events: events}
	js, err := json.Marshal(rec)
	if err != nil {
		return ID{}, err
	}
	plain := append([]byte(ledgerMagic), r.keys.SignObject(js, crypto.DomainLedger)...)
	data := r.meta.Seal(nil, plain, ledgerAD)
	id := Hash(data)
	h := backend.Handle{Type: backend.LedgerFile, Name: id.String()}
	if err := r.be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		return ID{}, fmt.Errorf("save ledger record: %w", err)
	}
	return id, nil
}

// decodeLedger opens and verifies one ledger object.
func (r *Repository) decodeLedger(id ID, data []byte) (*LedgerRecord, error) {
	if Hash(data) != id {
		return nil, errors.New("content does not match its name (damaged)")
	}
	plain, err := r.meta.Open(nil, data, ledgerAD)
	if err != nil {
		return nil, err
	}
	if len(plain) < 8 || string(plain[:8]) != ledgerMagic {
		return nil, errors.New("bad header")
	}
	js, who, err := r.keys.OpenSigned(plain[8:], crypto.DomainLedger)
	if err != nil {
		return nil, err
	}
	if who.Cert != nil {
		return nil, fmt.Errorf("signed by writer %s, not by the owner", crypto.DisplayName(who.Cert))
	}
	var rec LedgerRecord
	if err := json.Unmarshal(js, &rec); err != nil {
		return nil, fmt.Errorf("record: %w", err)
	}
	rec.ID = id
	return &rec, nil
}

// Ledger reads the owner's records (once; SaveLedger makes it read again)
// and applies its revocations to the repository's writers. A record that
// fails verification is reported through Warn and ignored.
func (r *Repository) Ledger(ctx context.Context) (*Ledger, error) {
	r.ledgerMu.Lock()
	defer r.ledgerMu.Unlock()
	if r.ledger != nil {
		return r.ledger, nil
	}
	led, err := r.readLedger(ctx)
	if err != nil {
		return nil, err
	}
	r.ledger = led
	for key, t := range led.Revoked {
		r.writers.Revoke(key, t)
	}
	return led, nil
}

// readLedger reads the owner's records from storage, for a view of its
// own: it neither uses nor changes the repository's. A record that cannot
// be read is reported and skipped.
func (r *Repository) readLedger(ctx context.Context) (*Ledger, error) {
	return r.readLedgerWith(ctx, false)
}

// readLedgerWith is readLedger; strict fails on a record that cannot be
// read (rather than was read and found damaged): a writer must not miss
// a condemnation because of a network error. Records already verified
// by this process are not read again (they are immutable and named by
// their hash), so a writer's second reading costs one listing.
func (r *Repository) readLedgerWith(ctx context.Context, strict bool) (*Ledger, error) {
	var infos []backend.Info
	if err := r.be.List(ctx, backend.LedgerFile, func(fi backend.Info) error {
		infos = append(infos, fi)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list ledger: %w", err)
	}
	var (
		mu   sync.Mutex
		recs []*LedgerRecord
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, fi := range infos {
		g.Go(func() error {
			rec, err := r.ledgerRecord(gctx, fi, strict)
			if err != nil || rec == nil {
				return err
			}
			mu.Lock()
			recs = append(recs, rec)
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return buildLedger(recs), nil
}

// ledgerRecord reads one record: nil (reported) when it is to be
// skipped.
func (r *Repository) ledgerRecord(ctx context.Context, fi backend.Info, strict bool) (*LedgerRecord, error) {
	id, err := ParseID(fi.Name)
	if err != nil {
		return nil, nil
	}
	r.recsMu.Lock()
	known := r.ledgerRecs[fi.Name]
	r.recsMu.Unlock()
	if known != nil {
		rec := *known
		rec.Stored = fi.ModTime
		return &rec, nil
	}
	if fi.Size > maxLedgerObject {
		r.opts.Warn("ledger record %s is %d bytes, too large: ignored", id.Short(), fi.Size)
		return nil, nil
	}
	data, err := backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.LedgerFile, Name: fi.Name})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if strict {
			return nil, fmt.Errorf("read ledger record %s: %w", id.Short(), err)
		}
		r.opts.Warn("ledger record %s cannot be read: %v", id.Short(), err)
		return nil, nil
	}
	rec, err := r.decodeLedger(id, data)
	if err != nil {
		r.opts.Warn("ledger record %s ignored: %v", id.Short(), err)
		return nil, nil
	}
	r.recsMu.Lock()
	if r.ledgerRecs == nil {
		r.ledgerRecs = map[string]*LedgerRecord{}
	}
	r.ledgerRecs[fi.Name] = rec
	r.recsMu.Unlock()
	out := *rec
	out.Stored = fi.ModTime
	return &out, nil
}

// buildLedger folds records, oldest first (ties by ID), into the current
// state: for each pack the latest finding counts.
func buildLedger(recs []*LedgerRecord) *Ledger {
	slices.SortFunc(recs, func(a, b *LedgerRecord) int {
		if c := a.Time.Compare(b.Time); c != 0 {
			return c
		}
		return bytes.Compare(a.ID[:], b.ID[:])
	})
	l := &Ledger{Packs: map[ID]LedgerEvent{}, Revoked: map[[32]byte]time.Time{}, SnapshotDamage: map[ID][]LedgerEvent{}, Forgotten: map[ID]bool{},
		Verified: map[ID]time.Time{}, Condemned: map[ID]time.Time{}, Deleted: map[ID]bool{}, Records: len(recs)}
	for _, rec := range recs {
		// A record's findings about a snapshot replace older ones.
		fresh := map[ID]bool{}
		for _, e := range rec.Events {
			switch e.Kind {
			case EventPackDamaged, EventPackMissing, EventPackOK:
				if e.Pack != nil {
					l.Packs[*e.Pack] = e
				}
			case EventWriterRevoked:
				if len(e.Signer) == 32 {
					k := [32]byte(e.Signer)
					if t, ok := l.Revoked[k]; !ok || rec.Time.Before(t) {
						l.Revoked[k] = rec.Time
					}
				}
			case EventSnapshotDamaged:
				if e.Snapshot != nil {
					if !fresh[*e.Snapshot] {
						delete(l.SnapshotDamage, *e.Snapshot)
						fresh[*e.Snapshot] = true
					}
					l.SnapshotDamage[*e.Snapshot] = append(l.SnapshotDamage[*e.Snapshot], e)
					// Damage found after a verification wins: the
					// snapshot is no longer known whole.
					delete(l.Verified, *e.Snapshot)
				}
			case EventSnapshotOK:
				if e.Snapshot != nil {
					delete(l.SnapshotDamage, *e.Snapshot)
				}
			case EventNamespace:
				if crypto.ValidNamespace(e.Namespace) == nil && !slices.Contains(l.Namespaces, e.Namespace) {
					l.Namespaces = append(l.Namespaces, e.Namespace)
				}
			case EventSnapshotForgotten:
				if e.Snapshot != nil {
					l.Forgotten[*e.Snapshot] = true
				}
			case EventPackCondemned:
				// By storage time, not by the record's own: that is what
				// writers' announcements are compared with.
				if e.Pack != nil {
					if t, ok := l.Condemned[*e.Pack]; !ok || rec.Stored.Before(t) {
						l.Condemned[*e.Pack] = rec.Stored
					}
				}
			case EventPackDeleted:
				if e.Pack != nil {
					l.Deleted[*e.Pack] = true
				}
			case EventSnapshotVerified:
				if e.Snapshot != nil {
					l.Verified[*e.Snapshot] = rec.Time
				}
			}
		}
	}
	// A deletion is final whatever the order of the records.
	for id := range l.Deleted {
		delete(l.Condemned, id)
	}
	return l
}

// Condemnation reports when the pack was condemned, and whether it is
// condemned or deleted: no writer may reuse its blobs.
func (l *Ledger) Condemnation(pack ID) (time.Time, bool) {
	if l == nil {
		return time.Time{}, false
	}
	if l.Deleted[pack] {
		return time.Time{}, true
	}
	t, ok := l.Condemned[pack]
	return t, ok
}
