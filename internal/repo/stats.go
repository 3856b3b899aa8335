package repo

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/sauve-backup/sauve/internal/backend"
)

// StatsReport is what a repository holds and what each snapshot costs
// (sauve stats). Stored sizes are of the sealed, compressed copies, one
// copy per blob (the one a restore reads); logical sizes are of the
// plaintext.
type StatsReport struct {
	// Objects are the stored objects of each kind: count and bytes.
	Objects map[string]PackCount `json:"objects"`
	// StoredBytes is the sum of every object's size.
	StoredBytes int64 `json:"stored_bytes"`
	Snapshots   int   `json:"snapshots"`
	DataBlobs   int   `json:"data_blobs"`
	MetaBlobs   int   `json:"meta_blobs"`
	// LogicalBytes sums the sizes of every disk of every snapshot.
	LogicalBytes int64 `json:"logical_bytes"`
	// UniqueBytes is the plaintext of the distinct chunks the snapshots
	// refer to (chunks of zeros are free); UniqueStoredBytes their
	// stored size.
	UniqueBytes       int64 `json:"unique_bytes"`
	UniqueStoredBytes int64 `json:"unique_stored_bytes"`
	// DedupRatio is LogicalBytes / UniqueStoredBytes.
	DedupRatio float64 `json:"dedup_ratio"`
	// UnreferencedBytes are the stored blobs no snapshot refers to (what
	// prune frees, by deleting and repacking); UnusedPacks the packs that
	// hold nothing else.
	UnreferencedBytes int64 `json:"unreferenced_bytes"`
	UnusedPacks       int   `json:"unused_packs"`
	// PerSnapshot is in time order.
	PerSnapshot []SnapshotCost `json:"snapshots_cost"`
	// PerGroup is by host and source.
	PerGroup []GroupCost `json:"groups"`
}

// SnapshotCost is what one snapshot adds and holds alone.
type SnapshotCost struct {
	ID      ID     `json:"id"`
	Time    string `json:"time"`
	Host    string `json:"host"`
	Sources string `json:"sources"`
	Logical int64  `json:"logical_bytes"`
	// Added is the stored size of its chunks (and chunk lists) that no
	// earlier snapshot refers to: what its backup added.
	Added int64 `json:"added_bytes"`
	// Exclusive is the stored size of those no other snapshot refers to:
	// what forgetting only it would free (after repacking).
	Exclusive int64 `json:"exclusive_bytes"`
}

// GroupCost sums the snapshots of one host and source.
type GroupCost struct {
	Host      string `json:"host"`
	Source    string `json:"source"`
	Snapshots int    `json:"snapshots"`
	Logical   int64  `json:"logical_bytes"`
	Added     int64  `json:"added_bytes"`
	Exclusive int64  `json:"exclusive_bytes"`
}

// blobUse is what stats knows of one referenced blob: the first snapshot
// (in time order) that refers to it, and whether another one does too.
// About 40 bytes a distinct chunk, held while stats runs.
type blobUse struct {
	first  int32
	shared bool
	plain  int64
}

// Stats walks every snapshot's chunk lists (each distinct list once) and
// the index. The index must be loaded. A chunk list that cannot be read
// fails it, naming the snapshot and disk.
func (r *Repository) Stats(ctx context.Context, progress func(done, total int)) (*StatsReport, error) {
	rep := &StatsReport{Objects: map[string]PackCount{}}
	for _, t := range backend.AllTypes {
		var c PackCount
		if err := r.be.List(ctx, t, func(fi backend.Info) error {
			c.add(fi.Size)
			return nil
		}); err != nil {
			return nil, fmt.Errorf("list %s: %w", t, err)
		}
		rep.Objects[string(t)] = c
		rep.StoredBytes += c.Bytes
	}
	snaps, err := r.Snapshots(ctx, nil)
	if err != nil {
		return nil, err
	}
	rep.Snapshots = len(snaps)
	uses := map[ID]*blobUse{}
	walked := map[ID]bool{}
	var lists, done int
	for _, sn := range snaps {
		for _, d := range sn.Disks {
			lists += len(d.ChunkLists)
		}
	}
	for si, sn := range snaps {
		for di := range sn.Disks {
			d := &sn.Disks[di]
			rep.LogicalBytes += d.Size
			if err := r.statDisk(ctx, int32(si), d, uses, walked, func() {
				done++
				if progress != nil {
					progress(done, lists)
				}
			}); err != nil {
				return nil, fmt.Errorf("snapshot %s, disk %s: %w", sn.ID.Short(), d.Name, err)
			}
		}
	}
	r.statCosts(rep, snaps, uses)
	return rep, nil
}

// statDisk notes the blobs of one disk, list blobs included.
func (r *Repository) statDisk(ctx context.Context, si int32, d *Disk, uses map[ID]*blobUse, walked map[ID]bool, tick func()) error {
	note := func(id ID, plain int64) {
		if u, ok := uses[id]; ok {
			u.shared = u.shared || u.first != si
			return
		}
		uses[id] = &blobUse{first: si, plain: plain}
	}
	list := r.ChunkList(d)
	for li, lid := range d.ChunkLists {
		tick()
		note(lid, 0)
		ids, err := list.readList(ctx, li)
		if err != nil {
			return err
		}
		if walked[lid] {
			// The same list blob means the same chunks: only who refers
			// to them changes.
			for _, id := range ids {
				if id != ZeroID {
					note(id, 0)
				}
			}
			continue
		}
		walked[lid] = true
		base := int64(li) * int64(d.ListEntries)
		for i, id := range ids {
			if id == ZeroID {
				continue
			}
			off := (base + int64(i)) * int64(d.ChunkSize)
			note(id, min(int64(d.ChunkSize), d.Size-off))
		}
	}
	return nil
}

// statCosts turns the uses into the report's figures.
func (r *Repository) statCosts(rep *StatsReport, snaps []*Snapshot, uses map[ID]*blobUse) {
	costs := make([]SnapshotCost, len(snaps))
	for i, sn := range snaps {
		costs[i] = SnapshotCost{ID: sn.ID, Time: sn.Time.UTC().Format("2006-01-02T15:04:05Z"), Host: sn.Host, Sources: strings.TrimPrefix(sn.Sources(), sn.Host+" ")}
		for _, d := range sn.Disks {
			costs[i].Logical += d.Size
		}
	}
	for id, u := range uses {
		t := DataBlob
		if u.plain == 0 {
			t = MetaBlob
		}
		c, n := r.idx.Best(t, id, NoWriter)
		if n == 0 {
			continue // lost: check says which
		}
		size := int64(c.Length)
		rep.UniqueBytes += u.plain
		rep.UniqueStoredBytes += size
		costs[u.first].Added += size
		if !u.shared {
			costs[u.first].Exclusive += size
		}
	}
	if rep.UniqueStoredBytes > 0 {
		rep.DedupRatio = float64(rep.LogicalBytes) / float64(rep.UniqueStoredBytes)
	}
	rep.PerSnapshot = costs
	groups := map[[2]string]*GroupCost{}
	for _, c := range costs {
		k := [2]string{c.Host, c.Sources}
		g := groups[k]
		if g == nil {
			g = &GroupCost{Host: c.Host, Source: c.Sources}
			groups[k] = g
		}
		g.Snapshots++
		g.Logical += c.Logical
		g.Added += c.Added
		g.Exclusive += c.Exclusive
	}
	for _, g := range groups {
		rep.PerGroup = append(rep.PerGroup, *g)
	}
	sort.Slice(rep.PerGroup, func(i, j int) bool {
		a, b := rep.PerGroup[i], rep.PerGroup[j]
		return a.Host < b.Host || a.Host == b.Host && a.Source < b.Source
	})
	used := map[ID]bool{}
	r.idx.Each(func(id ID, c Copy) {
		if c.Missing {
			return
		}
		switch c.Type {
		case DataBlob:
			rep.DataBlobs++
		case MetaBlob:
			rep.MetaBlobs++
		}
		if _, ok := uses[id]; ok {
			used[c.Pack] = true
		} else {
			rep.UnreferencedBytes += int64(c.Length)
		}
	})
	for _, ps := range r.idx.PackStates() {
		if ps.Size >= 0 && !used[ps.ID] {
			rep.UnusedPacks++
		}
	}
}
