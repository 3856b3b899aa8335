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
)

// Stats is what a repository holds and what its snapshots cost.
//
// Stored sizes are of sealed blobs as the index places them (after
// compression and encryption, without pack headers and trailers);
// logical sizes are of plaintext. A data chunk stored twice (two backups
// at once) costs its first copy in the figures of snapshots and groups;
// the other copies are DuplicateBytes. Chunks of zeros are stored as the
// all-zero ID and cost nothing.
type Stats struct {
	// StoredBytes is every object of the repository: the packs as listed
	// plus the index objects, manifests, ledger records and session
	// announcements (not the config, nor isolated namespaces, which have
	// statistics of their own).
	StoredBytes    int64 `json:"stored_bytes"`
	Packs          int   `json:"packs"`
	PackBytes      int64 `json:"pack_bytes"`
	IndexObjects   int   `json:"index_objects"`
	IndexBytes     int64 `json:"index_bytes"`
	Snapshots      int   `json:"snapshots"`
	SnapshotBytes  int64 `json:"snapshot_bytes"`
	LedgerRecords  int   `json:"ledger_records"`
	LedgerBytes    int64 `json:"ledger_bytes"`
	SessionObjects int   `json:"session_objects"`
	SessionBytes   int64 `json:"session_bytes"`
	// ParityObjects and ParityBytes are the parity stored (backup --parity).
	ParityObjects int   `json:"parity_objects"`
	ParityBytes   int64 `json:"parity_bytes"`
	// DataBlobs and MetaBlobs count the distinct blobs the index holds
	// (chunks, and chunk lists).
	DataBlobs int `json:"data_blobs"`
	MetaBlobs int `json:"meta_blobs"`

	// The selected snapshots: LogicalBytes is the sum of their disks'
	// sizes; UniqueChunks the distinct data chunks they reference,
	// UniqueBytes their plaintext and UniqueStoredBytes their stored
	// size; ListStoredBytes the stored size of their distinct chunk
	// lists. DedupRatio is LogicalBytes / UniqueStoredBytes (zeros,
	// deduplication and compression together), CompressionRatio
	// UniqueBytes / UniqueStoredBytes; both 0 when nothing is stored.
	SelectedSnapshots int     `json:"selected_snapshots"`
	LogicalBytes      int64   `json:"logical_bytes"`
	UniqueChunks      int64   `json:"unique_chunks"`
	UniqueBytes       int64   `json:"unique_bytes"`
	UniqueStoredBytes int64   `json:"unique_stored_bytes"`
	ListStoredBytes   int64   `json:"list_stored_bytes"`
	DedupRatio        float64 `json:"dedup_ratio"`
	CompressionRatio  float64 `json:"compression_ratio"`
	// MissingChunks counts the distinct chunks the selected snapshots
	// reference that have no copy in a stored pack ('sauve check' says
	// which snapshots that costs); they count as 0 stored bytes.
	MissingChunks int64 `json:"missing_chunks"`

	// PerSnapshot holds the selected snapshots, oldest first; PerHost
	// and PerSource their hosts and (host, disk source) pairs, sorted.
	PerSnapshot []SnapshotStats `json:"per_snapshot"`
	PerHost     []GroupStats    `json:"per_host"`
	PerSource   []GroupStats    `json:"per_source"`

	// Over all snapshots, whatever the selection: UnreferencedBlobs
	// and UnreferencedBytes are the blobs (data and chunk lists) that
	// no snapshot references, every stored copy counted: what a prune
	// could free, unless a backup still running references them.
	// UnreferencedPacks (UnreferencedPackBytes as listed) hold only
	// such blobs: a prune would delete them whole. DuplicateBytes are
	// the copies of referenced blobs beyond the one counted.
	// UnindexedPacks are stored packs no index names (left by an
	// interrupted or running backup; 'sauve repair index').
	UnreferencedBlobs     int64 `json:"unreferenced_blobs"`
	UnreferencedBytes     int64 `json:"unreferenced_bytes"`
	UnreferencedPacks     int   `json:"unreferenced_packs"`
	UnreferencedPackBytes int64 `json:"unreferenced_pack_bytes"`
	DuplicateBytes        int64 `json:"duplicate_bytes"`
	UnindexedPacks        int   `json:"unindexed_packs"`
	UnindexedPackBytes    int64 `json:"unindexed_pack_bytes"`
}

// SnapshotStats is what one snapshot costs.
//
// Added is what its backup added: the data chunks that no earlier
// snapshot of the repository references (selected or not; earlier in
// time, ties by ID). Exclusive is what forgetting it alone would free
// before any repacking: the chunks no other snapshot references. Both
// count data chunks; ListAdded and ListExclusive the chunk list blobs
// alike.
type SnapshotStats struct {
	ID                 ID        `json:"id"`
	Time               time.Time `json:"time"`
	Host               string    `json:"host"`
	Sources            []string  `json:"sources"`
	LogicalBytes       int64     `json:"logical_bytes"`
	AddedChunks        int64     `json:"added_chunks"`
	AddedBytes         int64     `json:"added_bytes"`
	ExclusiveChunks    int64     `json:"exclusive_chunks"`
	ExclusiveBytes     int64     `json:"exclusive_bytes"`
	ListAddedBytes     int64     `json:"list_added_bytes"`
	ListExclusiveBytes int64     `json:"list_exclusive_bytes"`
}

// GroupStats is what the selected snapshots of one host, or of one
// source of a host, cost: Exclusive counts the data chunks that only
// they reference (no snapshot of another host or source, and no
// snapshot outside the selection): what forgetting all of them would
// free.
type GroupStats struct {
	Host            string `json:"host"`
	Source          string `json:"source,omitempty"`
	Snapshots       int    `json:"snapshots"`
	LogicalBytes    int64  `json:"logical_bytes"`
	ExclusiveChunks int64  `json:"exclusive_chunks"`
	ExclusiveBytes  int64  `json:"exclusive_bytes"`
}

// StatsOptions say which snapshots Stats describes.
type StatsOptions struct {
	// Select picks the snapshots whose figures are wanted; nil picks
	// all. The others still count as references (what a snapshot adds
	// or holds alone is relative to every snapshot).
	Select func(*Snapshot) bool
	// Progress is called with chunk lists walked and their total, one
	// call at a time; it must be quick.
	Progress func(done, total int)
}

// Who references a chunk (or a list), per dimension: nobody yet, exactly
// one (its number), or several.
const (
	refNone int32 = -1
	refMany int32 = -2
)

func joinRef(a, b int32) int32 {
	switch {
	case a == refNone:
		return b
	case b == refNone || a == b:
		return a
	}
	return refMany
}

// refs says who references a chunk: the earliest snapshot (by index in
// time order), the only snapshot, host group and source group (group 0
// stands for every snapshot outside the selection, so that a chunk they
// share is nobody's own), and whether a selected snapshot does.
type refs struct {
	first, snap, host, source int32
	sel                       bool
}

var noRefs = refs{first: refNone, snap: refNone, host: refNone, source: refNone}

func (r *refs) join(o refs) {
	if r.first == refNone || o.first != refNone && o.first < r.first {
		r.first = o.first
	}
	r.snap = joinRef(r.snap, o.snap)
	r.host = joinRef(r.host, o.host)
	r.source = joinRef(r.source, o.source)
	r.sel = r.sel || o.sel
}

// chunkRef is what Stats keeps per distinct data chunk: 32 bytes of key
// and 28 of value, plus the map's overhead, so about 100 bytes per chunk
// (25 MiB per 64 GiB of unique data at 256 KiB chunks). That is fine for
// the repositories of today; a repository of tens of TiB would want the
// walk sharded by ID prefix (several passes) or spilled to disk.
type chunkRef struct {
	refs
	plain  uint32 // plaintext length
	stored uint32 // sealed length of the copy counted
	found  bool   // a stored copy is indexed
}

// listRef is a distinct chunk list blob, walked once however many disks
// name it: who references it, and the first disk that does (its geometry
// gives each chunk's length, and an error names it).
type listRef struct {
	refs
	sn *Snapshot
	d  *Disk
	li int
	n  int64
}

// Stats walks the chunk lists of every snapshot in snaps (all the
// repository's snapshots, as Snapshots returns them) and describes the
// repository and the snapshots opts selects. It needs the index loaded
// (LoadIndex). Only the metadata key is used: a write-only key will do.
func (r *Repository) Stats(ctx context.Context, snaps []*Snapshot, opts StatsOptions) (*Stats, error) {
	if r.load == nil {
		return nil, errors.New("internal error: Stats before LoadIndex")
	}
	st := &Stats{PerSnapshot: []SnapshotStats{}, PerHost: []GroupStats{}, PerSource: []GroupStats{}}
	if err := r.statObjects(ctx, st); err != nil {
		return nil, err
	}
	snaps = slices.Clone(snaps)
	sort.SliceStable(snaps, func(i, j int) bool {
		if !snaps[i].Time.Equal(snaps[j].Time) {
			return snaps[i].Time.Before(snaps[j].Time)
		}
		return bytes.Compare(snaps[i].ID[:], snaps[j].ID[:]) < 0
	})

	// Who references each distinct list, from the manifests alone.
	per := make([]SnapshotStats, len(snaps))
	selected := make([]bool, len(snaps))
	hosts := map[string]int32{}
	sources := map[[2]string]int32{}
	groupHosts := []GroupStats{{}} // group 0: outside the selection
	groupSources := []GroupStats{{}}
	lists := map[listKey]*listRef{}
	var order []listKey
	listByID := map[ID]*chunkRef{}
	for si, sn := range snaps {
		selected[si] = opts.Select == nil || opts.Select(sn)
		ps := &per[si]
		*ps = SnapshotStats{ID: sn.ID, Time: sn.Time, Host: sn.Host, Sources: []string{}}
		var h int32
		if selected[si] {
			st.SelectedSnapshots++
			var ok bool
			if h, ok = hosts[sn.Host]; !ok {
				h = int32(len(groupHosts))
				hosts[sn.Host] = h
				groupHosts = append(groupHosts, GroupStats{Host: sn.Host})
			}
			groupHosts[h].Snapshots++
		}
		counted := map[int32]bool{}
		for di := range sn.Disks {
			d := &sn.Disks[di]
			ps.Sources = append(ps.Sources, d.Source)
			ps.LogicalBytes += d.Size
			var s int32
			if selected[si] {
				k := [2]string{sn.Host, d.Source}
				var ok bool
				if s, ok = sources[k]; !ok {
					s = int32(len(groupSources))
					sources[k] = s
					groupSources = append(groupSources, GroupStats{Host: sn.Host, Source: d.Source})
				}
				if !counted[s] {
					counted[s] = true
					groupSources[s].Snapshots++
				}
				groupSources[s].LogicalBytes += d.Size
				groupHosts[h].LogicalBytes += d.Size
				st.LogicalBytes += d.Size
			}
			ref := refs{first: int32(si), snap: int32(si), host: h, source: s, sel: selected[si]}
			chunks := d.Chunks()
			for li, lid := range d.ChunkLists {
				n := min(int64(d.ListEntries), chunks-int64(li)*int64(d.ListEntries))
				k := listKey{lid, n}
				lr := lists[k]
				if lr == nil {
					lr = &listRef{refs: noRefs, sn: sn, d: d, li: li, n: n}
					lists[k] = lr
					order = append(order, k)
				}
				lr.join(ref)
				m := listByID[lid]
				if m == nil {
					m = &chunkRef{refs: noRefs}
					listByID[lid] = m
				}
				m.join(ref)
			}
		}
	}

	chunks, err := r.walkLists(ctx, lists, order, opts.Progress)
	if err != nil {
		return nil, err
	}
	r.statIndex(st, chunks, listByID)

	for _, c := range chunks {
		if c.sel {
			st.UniqueChunks++
			st.UniqueBytes += int64(c.plain)
			st.UniqueStoredBytes += int64(c.stored)
			if !c.found {
				st.MissingChunks++
			}
		}
		per[c.first].AddedChunks++
		per[c.first].AddedBytes += int64(c.stored)
		if c.snap >= 0 {
			per[c.snap].ExclusiveChunks++
			per[c.snap].ExclusiveBytes += int64(c.stored)
		}
		if c.host > 0 {
			groupHosts[c.host].ExclusiveChunks++
			groupHosts[c.host].ExclusiveBytes += int64(c.stored)
		}
		if c.source > 0 {
			groupSources[c.source].ExclusiveChunks++
			groupSources[c.source].ExclusiveBytes += int64(c.stored)
		}
	}
	for _, m := range listByID {
		if m.sel {
			st.ListStoredBytes += int64(m.stored)
		}
		per[m.first].ListAddedBytes += int64(m.stored)
		if m.snap >= 0 {
			per[m.snap].ListExclusiveBytes += int64(m.stored)
		}
	}
	if st.UniqueStoredBytes > 0 {
		st.DedupRatio = float64(st.LogicalBytes) / float64(st.UniqueStoredBytes)
		st.CompressionRatio = float64(st.UniqueBytes) / float64(st.UniqueStoredBytes)
	}
	for si := range snaps {
		if selected[si] {
			st.PerSnapshot = append(st.PerSnapshot, per[si])
		}
	}
	st.PerHost = append(st.PerHost, groupHosts[1:]...)
	st.PerSource = append(st.PerSource, groupSources[1:]...)
	sort.Slice(st.PerHost, func(i, j int) bool { return st.PerHost[i].Host < st.PerHost[j].Host })
	sort.Slice(st.PerSource, func(i, j int) bool {
		a, b := st.PerSource[i], st.PerSource[j]
		return a.Host < b.Host || a.Host == b.Host && a.Source < b.Source
	})
	return st, nil
}

// statObjects counts and sizes the stored objects: the packs as the
// index's listing found them (so that the pack figures agree with the
// index), the other kinds as listed now.
func (r *Repository) statObjects(ctx context.Context, st *Stats) error {
	for _, size := range r.load.stored {
		st.Packs++
		st.PackBytes += size
	}
	kinds := []struct {
		t     backend.FileType
		count *int
		bytes *int64
	}{
		{backend.IndexFile, &st.IndexObjects, &st.IndexBytes},
		{backend.SnapshotFile, &st.Snapshots, &st.SnapshotBytes},
		{backend.LedgerFile, &st.LedgerRecords, &st.LedgerBytes},
		{backend.SessionFile, &st.SessionObjects, &st.SessionBytes},
		{backend.ParityFile, &st.ParityObjects, &st.ParityBytes},
	}
	st.StoredBytes = st.PackBytes
	for _, k := range kinds {
		err := r.be.List(ctx, k.t, func(fi backend.Info) error {
			*k.count++
			*k.bytes += fi.Size
			return nil
		})
		if err != nil {
			return fmt.Errorf("list %s: %w", k.t, err)
		}
		st.StoredBytes += *k.bytes
	}
	return nil
}

// walkLists reads each distinct chunk list once and joins, for every
// data chunk it names, the references of the list.
func (r *Repository) walkLists(ctx context.Context, lists map[listKey]*listRef, order []listKey, progress func(int, int)) (map[ID]chunkRef, error) {
	chunks := map[ID]chunkRef{}
	var (
		mu   sync.Mutex
		done int
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections)
	for _, k := range order {
		lr := lists[k]
		g.Go(func() error {
			ids, err := r.chunkList(r.idx, r.cache, lr.d).readList(gctx, lr.li)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				return fmt.Errorf("snapshot %s disk %s: %w", lr.sn.ID.Short(), lr.d.Name, err)
			}
			cs := int64(lr.d.ChunkSize)
			first := int64(lr.li) * int64(lr.d.ListEntries)
			mu.Lock()
			defer mu.Unlock()
			for i, id := range ids[:lr.n] {
				if id.IsZero() {
					continue // not stored: free
				}
				c, ok := chunks[id]
				if !ok {
					off := (first + int64(i)) * cs
					c = chunkRef{refs: noRefs, plain: uint32(min(cs, lr.d.Size-off))}
				}
				c.join(lr.refs)
				chunks[id] = c
			}
			done++
			if progress != nil {
				progress(done, len(order))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return chunks, nil
}

// statIndex goes through the index once: it counts the distinct blobs,
// records the stored length of each referenced chunk and list, and sums
// what no snapshot references, per pack.
func (r *Repository) statIndex(st *Stats, chunks map[ID]chunkRef, lists map[ID]*chunkRef) {
	type packUse struct{ blobs, unref int }
	use := map[ID]*packUse{}
	r.idx.eachBlob(func(id ID, copies []Copy) {
		for _, t := range []BlobType{DataBlob, MetaBlob} {
			var best *Copy
			var sum int64
			n := 0
			for i := range copies {
				c := &copies[i]
				if c.Type != t || c.Missing {
					continue
				}
				n++
				sum += int64(c.Length)
				if best == nil || compareCopies(*c, *best, NoWriter) < 0 {
					best = c
				}
			}
			if n == 0 {
				continue
			}
			if t == DataBlob {
				st.DataBlobs++
			} else {
				st.MetaBlobs++
			}
			referenced := false
			if t == DataBlob {
				if c, ok := chunks[id]; ok {
					c.stored, c.found, referenced = best.Length, true, true
					chunks[id] = c
				}
			} else if m := lists[id]; m != nil {
				m.stored, m.found, referenced = best.Length, true, true
			}
			if referenced {
				st.DuplicateBytes += sum - int64(best.Length)
			} else {
				st.UnreferencedBlobs++
				st.UnreferencedBytes += sum
			}
			for i := range copies {
				c := &copies[i]
				if c.Type != t || c.Missing {
					continue
				}
				u := use[c.Pack]
				if u == nil {
					u = &packUse{}
					use[c.Pack] = u
				}
				u.blobs++
				if !referenced {
					u.unref++
				}
			}
		}
	})
	for p, size := range r.load.stored {
		u := use[p]
		switch {
		case u == nil:
			st.UnindexedPacks++
			st.UnindexedPackBytes += size
		case u.unref == u.blobs:
			st.UnreferencedPacks++
			st.UnreferencedPackBytes += size
		}
	}
}

// eachBlob calls fn once per blob ID the index holds with every distinct
// place it is stated at (a place stated twice, by its writer and by the
// owner's endorsement, is one copy). fn runs under the index's read lock
// and must not call the index.
func (x *Index) eachBlob(fn func(id ID, copies []Copy)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var es []indexEntry
	var copies []Copy
	emit := func(id ID) {
		copies = copies[:0]
	next:
		for _, e := range es {
			c := x.copyOf(e)
			for _, o := range copies {
				if o.Pack == c.Pack && o.Offset == c.Offset && o.Type == c.Type {
					continue next
				}
			}
			copies = append(copies, c)
		}
		fn(id, copies)
	}
	// The file's entries and the sorted ones, merged in ID order (the
	// local index file, when there is one, holds most of them).
	var cur ID
	have := false
	flush := func() {
		if have {
			for _, e := range x.fresh[cur] {
				if x.live(e) {
					es = append(es, e)
				}
			}
			emit(cur)
		}
	}
	if !x.bulk {
		_ = x.merged(func(e indexEntry) {
			if !x.live(e) {
				return
			}
			if have && e.id == cur {
				es = append(es, e)
				return
			}
			flush()
			cur, have = e.id, true
			es = append(es[:0], e)
		})
		flush()
	}
	for id, fresh := range x.fresh {
		es = es[:0]
		for _, e := range fresh {
			if x.live(e) {
				es = append(es, e)
			}
		}
		if all := x.entries(nil, id); len(all) > len(es) || len(es) == 0 {
			continue // emitted with its sorted entries
		}
		emit(id)
	}
}
