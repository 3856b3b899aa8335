package repo

import (
	"bytes"
	"context"
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
)

// A backup need not list data/ (one request per 1000 packs: 33 per TiB)
// each time it starts. What a listing tells a backup is which packs the
// index names that are not stored: it then stores their chunks again
// instead of referring to them. Every pack a writer may reuse is its own
// or vouched for by the owner (Index.Reusable), so a pack named by a
// forger cannot be reused anyway, and the packs prune removes are recorded
// in the ledger before they go (read at every start). What a listing adds
// is packs lost outside sauve (an operator, a storage fault) and the packs
// left by this machine's interrupted backups.
//
// So, when the repository is told to (ReuseListing), a backup that finds
// a record of this machine's last listing younger than the allowed age,
// of a repository large enough that listing costs more than a few
// requests, takes from it which indexed packs were missing then, instead
// of listing again, and finds the packs of its own interrupted backups in the local
// journal of its uploads (Cache.RecordOwnPack) by asking for each one
// (Stat). A pack lost since the record was written is then reused until
// the next listing; check --read-data finds it in any case. The record,
// $cache/<repository>/pack-listing, is a local file like index.db, under a
// keyed MAC:
//
//	"SVPL0001" | i64 listing time (unix ns) | u64 packs listed | u32 n |
//	n × missing pack ID | MAC 32
const (
	listingName  = "pack-listing"
	listingMagic = "SVPL0001"
	// listingMaxMissing bounds the packs one record names (2 GiB of IDs
	// would be a repository mostly lost; such a one is listed every time).
	listingMaxMissing = 1 << 20
	// listingSkew is how far in the future a record's time may be (the
	// machine's clock was set back) before the record is not trusted.
	listingSkew = 5 * time.Minute
)

// ReuseListing lets LoadIndex take the packs' listing from this machine's
// record of the last one when it is younger than maxAge and listed more
// than minPacks packs (maxAge 0: list every time, the default).
func (r *Repository) ReuseListing(maxAge time.Duration, minPacks int) {
	r.listingAge, r.listingMin = maxAge, minPacks
}

// listingRecord is what the record of a listing holds.
type listingRecord struct {
	at      time.Time
	listed  uint64
	missing []ID
}

func encodeListing(key [32]byte, rec listingRecord) []byte {
	b := []byte(listingMagic)
	b = binary.LittleEndian.AppendUint64(b, uint64(rec.at.UnixNano()))
	b = binary.LittleEndian.AppendUint64(b, rec.listed)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(rec.missing)))
	for _, id := range rec.missing {
		b = append(b, id[:]...)
	}
	return append(b, listingMAC(key, b)...)
}

func listingMAC(key [32]byte, b []byte) []byte {
	h, _ := blake3.NewKeyed(key[:]) // a 32-byte key never fails
	h.Write(b)
	return h.Sum(nil)
}

// decodeListing parses a record; it trusts nothing of b before the MAC.
func decodeListing(key [32]byte, b []byte) (listingRecord, error) {
	const head = len(listingMagic) + 8 + 8 + 4
	if len(b) < head+dbMACSize || string(b[:len(listingMagic)]) != listingMagic {
		return listingRecord{}, errors.New("not a listing record")
	}
	body, mac := b[:len(b)-dbMACSize], b[len(b)-dbMACSize:]
	if !hmac.Equal(mac, listingMAC(key, body)) {
		return listingRecord{}, errors.New("listing record fails its MAC")
	}
	n := binary.LittleEndian.Uint32(body[head-4 : head])
	if n > listingMaxMissing || len(body) != head+int(n)*32 {
		return listingRecord{}, errors.New("listing record has the wrong length")
	}
	rec := listingRecord{
		at:      time.Unix(0, int64(binary.LittleEndian.Uint64(body[len(listingMagic):]))),
		listed:  binary.LittleEndian.Uint64(body[len(listingMagic)+8:]),
		missing: make([]ID, n),
	}
	for i := range rec.missing {
		copy(rec.missing[i][:], body[head+32*i:])
	}
	return rec, nil
}

// recentListing returns this machine's record of the last listing when
// it is younger than maxAge and listed more than minPacks, else nil.
func (c *Cache) recentListing(key [32]byte, maxAge time.Duration, minPacks int, now time.Time) *listingRecord {
	if c == nil || maxAge <= 0 {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(c.dir, listingName))
	if err != nil {
		return nil
	}
	rec, err := decodeListing(key, b)
	if err != nil || now.Sub(rec.at) >= maxAge || rec.at.Sub(now) > listingSkew || (minPacks > 0 && rec.listed <= uint64(minPacks)) {
		return nil
	}
	return &rec
}

// saveListing records a listing made at at; failures are ignored (the
// next backup lists again).
func (c *Cache) saveListing(key [32]byte, rec listingRecord) {
	if c == nil {
		return
	}
	if len(rec.missing) > listingMaxMissing {
		c.Remove("", listingName)
		return
	}
	slices.SortFunc(rec.missing, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	c.Put("", listingName, encodeListing(key, rec))
}

// missingPacks returns the indexed packs a listing did not find, and not
// recorded deleted: those a record of the listing must name.
func (x *Index) missingPacks() []ID {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var ids []ID
	for _, p := range x.packs {
		if p.indexed && !p.gone && p.size < 0 {
			ids = append(ids, p.id)
		}
	}
	return ids
}

// useListingRecord applies a record in place of a listing: the packs it
// names missing stay unusable, and the packs of this machine's
// interrupted backups are looked for one by one, to be adopted.
func (r *Repository) useListingRecord(ctx context.Context, idx *Index, cache *Cache, rec *listingRecord, st *loadState) error {
	why := "missing from the listing of packs of " + rec.at.Local().Format(time.RFC3339)
	for _, id := range rec.missing {
		idx.MarkDamaged(id, why)
	}
	// The owner's check records the packs it found missing; a listing
	// would not list them, so neither is a pack recorded so reused.
	for id, e := range st.ledger.Packs {
		if e.Kind == EventPackMissing {
			idx.MarkDamaged(id, "recorded as missing by the owner")
		}
	}
	var cand []ID
	for id := range cache.OwnPacks() {
		if !idx.HasPack(id) && !st.ledger.Deleted[id] {
			cand = append(cand, id)
		}
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, id := range cand {
		g.Go(func() error {
			fi, err := r.be.Stat(gctx, backend.Handle{Type: backend.PackFile, Name: id.String()})
			switch {
			case errors.Is(err, backend.ErrNotExist):
				return nil // never uploaded: killed before, or in flight
			case err != nil:
				if gctx.Err() != nil {
					return gctx.Err()
				}
				r.opts.Warn("pack %s of an interrupted backup: %v: not adopted", id.Short(), err)
				return nil
			}
			mu.Lock()
			st.stored[id] = fi.Size
			mu.Unlock()
			idx.SetPackSize(id, fi.Size)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("look for the packs of interrupted backups: %w", err)
	}
	return nil
}
