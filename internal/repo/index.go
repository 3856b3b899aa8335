package repo

import (
	"bytes"
	"cmp"
	"slices"
	"sync"
)

// Location is where a blob is stored.
type Location struct {
	Pack      ID
	Ephemeral [32]byte // the pack's session key, needed to open data blobs
	Type      BlobType
	Offset    uint32
	Length    uint32
}

// Copy is one stored copy of a blob, with what is known of who stored it
// and whether it can be used.
type Copy struct {
	Location
	// Writer is the writer the copy is attributed to (see Writers).
	Writer WriterNum
	// Trust says what vouches for the copy.
	Trust Trust
	// Damaged is why the pack is known to be unusable: missing, too short
	// for the copy, or recorded as damaged. Empty for a usable copy.
	Damaged string
	// Missing is set when the copy cannot even be read (its pack is not
	// stored, or ends before it). A copy in a pack recorded as damaged
	// may still be intact: a restore tries it last.
	Missing bool
}

// Trust is what vouches for an index entry.
type Trust uint8

const (
	// TrustOwner: the owner wrote the pack, or verified the blob in it.
	TrustOwner Trust = 1 << iota
	// TrustSigned: the writer the entry is attributed to signed this very
	// claim (its own index object), so the entry is that writer's word.
	TrustSigned
	// TrustLegacy: a version-1 index object, which nobody signed.
	TrustLegacy
)

type indexEntry struct {
	id ID
	// pack numbers a pack with the ephemeral key its statement gave
	// (see packKey), not the pack alone.
	pack   uint32
	offset uint32
	length uint32
	typ    BlobType
	trust  Trust
	writer WriterNum
}

type packRecord struct {
	id ID
	// size is the pack's size as listed, or -1 when the pack was not in
	// the listing (or no listing was made: unknown).
	size int64
	// damaged is why the pack must not be used: empty when it may be.
	damaged string
	// indexed is set once an index object (or trailer) described it.
	indexed bool
	// condemned is set when prune will delete the pack: its blobs can
	// still be read, but no writer may reuse them.
	condemned bool
	// gone is set, with a local index file (base), when the ledger
	// records the pack deleted: the file keeps what the index objects
	// state, and the ledger decides per run that the pack's entries are
	// ignored (without a file, LoadIndex skips them instead).
	gone bool
}

// Index maps blob IDs to every copy of them in packs. It is held in memory
// as a sorted array of 48-byte entries with a table of where each 16-bit
// ID prefix starts (a Go map costs over twice as much per blob; figures in
// docs/BENCHMARKS.md), plus a small map of the entries added since the
// array was last rebuilt. A blob may have several entries: copies in
// several packs (concurrent backups), or claims by several writers about
// one place; none hides another, and which one a reader uses is decided
// per query, by trust and then by pack ID, so the answer never depends on
// the order index objects were loaded in.
//
// With a local index file (indexdb.go), the entries the file holds are
// read where a lookup needs them; Len, Each and PackStates, which walk
// every entry, then read the whole file (about a second per 50 M
// entries): the backup path must not call them.
type Index struct {
	mu      sync.RWMutex
	packs   []packRecord
	packNum map[ID]uint32
	// keys number the (pack, ephemeral key) pairs entries name: the key
	// is part of a statement about a pack, so one index object cannot
	// give another's entries a wrong key (a forged key makes only the
	// forger's entries unreadable).
	keys    []packKey
	keyNum  map[packKey]uint32
	sorted  []indexEntry
	buckets []uint32 // buckets[p] is the first entry in sorted whose ID starts with prefix p
	fresh   map[ID][]indexEntry
	bulk    bool // sorted is being filled unsorted by a bulk load

	// base is the local index file, or nil. Its packs
	// are packs[:len(base.packs)] (packNum holds only the others) and its
	// keys are key numbers below len(base.keys) (keys holds the others);
	// sorted and fresh then hold only what the file does not.
	base *indexDB
	// upgrade adds trust to base entries (by position) that a later
	// statement of the same place vouched for more: the file is read-only.
	upgrade map[uint32]Trust
	// ngone counts packs marked gone.
	ngone int
	// spilled are the runs of sorted entries a build of the local index
	// file wrote out (indexdb_runs.go); merged reads them with the rest.
	spilled []spilledRun

	// listed is set once pack sizes come from a listing: a pack that was
	// not listed is then missing, and its entries unusable.
	listed bool

	// Writers attributes entries; shared with the repository.
	Writers *Writers
}

const bucketBits = 16

// NewIndex returns an empty index.
func NewIndex() *Index {
	return &Index{packNum: map[ID]uint32{}, keyNum: map[packKey]uint32{}, fresh: map[ID][]indexEntry{}, Writers: NewWriters()}
}

// packKey is a pack with the ephemeral key an entry opens its blobs with.
type packKey struct {
	pack uint32 // in packs
	eph  [32]byte
}

// packOf returns the pack record of an entry.
func (x *Index) packOf(e indexEntry) *packRecord { return &x.packs[x.keyAt(e.pack).pack] }

// keyAt returns key number n.
func (x *Index) keyAt(n uint32) packKey {
	if x.base != nil {
		if nb := uint32(len(x.base.keys)); n < nb {
			k := &x.base.keys[n]
			return packKey{pack: k.pack, eph: k.eph}
		}
		return x.keys[n-uint32(len(x.base.keys))]
	}
	return x.keys[n]
}

// keyCount is the number of keys, in the file and in memory.
func (x *Index) keyCount() uint32 {
	n := uint32(len(x.keys))
	if x.base != nil {
		n += uint32(len(x.base.keys))
	}
	return n
}

// live reports whether an entry counts: not in a pack marked gone.
func (x *Index) live(e indexEntry) bool {
	return x.ngone == 0 || !x.packOf(e).gone
}

// packIndex returns the number of a known pack.
func (x *Index) packIndex(id ID) (uint32, bool) {
	if x.base != nil {
		if n, ok := x.findPack(id); ok {
			return n, true
		}
	}
	n, ok := x.packNum[id]
	return n, ok
}

// fromBase returns entry i of the file, read as raw, as the index holds
// it: with the writer numbered as this process numbers it, and any trust
// added. An entry that names no key or writer of the file is reported
// not ok: only a file written by another program (that passed the MAC)
// has one, and it is ignored rather than trusted or indexed out of range.
func (x *Index) fromBase(i uint32, e indexEntry) (indexEntry, bool) {
	w, ok := x.base.writer(e.writer)
	if !ok || e.pack >= uint32(len(x.base.keys)) {
		return indexEntry{}, false
	}
	e.writer = w
	if x.upgrade != nil {
		e.trust |= x.upgrade[i]
	}
	return e, true
}

func prefix(id ID) int { return int(id[0])<<8 | int(id[1]) }

// entries appends every entry of id to dst.
func (x *Index) entries(dst []indexEntry, id ID) []indexEntry {
	x.each(id, func(e indexEntry) { dst = append(dst, e) })
	return dst
}

// unusable says why the entry's pack cannot be used, or "" if it can, and
// whether the copy cannot be read at all.
func (x *Index) unusable(e indexEntry) (string, bool) {
	p := x.packOf(e)
	if x.listed && p.size < 0 {
		return "pack " + p.id.Short() + " is missing", true
	}
	if p.size >= 0 && int64(e.offset)+int64(e.length)+packFooterSize > p.size {
		return "pack " + p.id.Short() + " is too short for it (truncated)", true
	}
	if p.damaged != "" {
		return "pack " + p.id.Short() + ": " + p.damaged, false
	}
	return "", false
}

func (x *Index) copyOf(e indexEntry) Copy {
	k := x.keyAt(e.pack)
	why, missing := x.unusable(e)
	return Copy{
		Location: Location{Pack: x.packs[k.pack].id, Ephemeral: k.eph, Type: e.typ, Offset: e.offset, Length: e.length},
		Writer:   e.writer, Trust: e.trust, Damaged: why, Missing: missing,
	}
}

// rank orders copies for a reader that prefers the copies of writer
// prefer (the signer of the snapshot being read): its own signed word
// first, then what the owner vouches for, then other signed entries, then
// unsigned ones; known-damaged copies last.
func rank(c Copy, prefer WriterNum) int {
	switch {
	case c.Missing:
		return 6
	case c.Damaged != "":
		return 5
	case prefer != NoWriter && c.Writer == prefer && c.Trust&TrustSigned != 0:
		return 0
	case c.Trust&TrustOwner != 0:
		return 1
	case c.Trust&TrustSigned != 0:
		return 2
	case c.Trust&TrustLegacy != 0:
		return 3
	}
	return 4
}

// Copies returns every copy of blob id, best first for a reader that
// prefers writer prefer (NoWriter for none), the same on every run.
func (x *Index) Copies(id ID, prefer WriterNum) []Copy {
	x.mu.RLock()
	es := x.entries(nil, id)
	out := make([]Copy, len(es))
	for i, e := range es {
		out[i] = x.copyOf(e)
	}
	x.mu.RUnlock()
	slices.SortFunc(out, func(a, b Copy) int { return compareCopies(a, b, prefer) })
	return out
}

// Best returns the copy of blob id a reader preferring writer prefer
// tries first (the first of Copies), of type t, and how many copies of
// that type there are; it walks the entries in place, for the restore's
// hot path.
func (x *Index) Best(t BlobType, id ID, prefer WriterNum) (Copy, int) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var best Copy
	n := 0
	consider := func(e indexEntry) {
		if e.typ != t {
			return
		}
		c := x.copyOf(e)
		if n == 0 || copyLess(c, best, prefer) {
			best = c
		}
		n++
	}
	x.each(id, consider)
	return best, n
}

// each calls fn for every entry of id; x.mu is held.
func (x *Index) each(id ID, fn func(indexEntry)) {
	for _, e := range x.fresh[id] {
		if x.live(e) {
			fn(e)
		}
	}
	if len(x.sorted) > 0 && !x.bulk {
		p := prefix(id)
		lo, hi := int(x.buckets[p]), int(x.buckets[p+1])
		i, _ := slices.BinarySearchFunc(x.sorted[lo:hi], id, func(a indexEntry, id ID) int { return bytes.Compare(a.id[:], id[:]) })
		for i += lo; i < len(x.sorted) && x.sorted[i].id == id; i++ {
			if x.live(x.sorted[i]) {
				fn(x.sorted[i])
			}
		}
	}
	if x.base != nil {
		x.base.lookup(id, func(i uint32, raw indexEntry) {
			if e, ok := x.fromBase(i, raw); ok && x.live(e) {
				fn(e)
			}
		})
	}
}

// copyLess orders copies as Copies does.
func copyLess(a, b Copy, prefer WriterNum) bool {
	return compareCopies(a, b, prefer) < 0
}

func compareCopies(a, b Copy, prefer WriterNum) int {
	if c := cmp.Compare(rank(a, prefer), rank(b, prefer)); c != 0 {
		return c
	}
	if c := bytes.Compare(a.Pack[:], b.Pack[:]); c != 0 {
		return c
	}
	return cmp.Or(cmp.Compare(a.Offset, b.Offset), cmp.Compare(a.Length, b.Length), cmp.Compare(a.Writer, b.Writer))
}

// Lookup returns the best usable copy of a blob (for a reader with no
// preferred writer).
func (x *Index) Lookup(id ID) (Location, bool) {
	for _, c := range x.Copies(id, NoWriter) {
		if c.Damaged == "" {
			return c.Location, true
		}
	}
	return Location{}, false
}

// Has reports whether a usable copy of a blob of type t is indexed,
// whoever stored it.
func (x *Index) Has(t BlobType, id ID) bool {
	for _, c := range x.Copies(id, NoWriter) {
		if c.Damaged == "" && c.Type == t {
			return true
		}
	}
	return false
}

// Reusable returns a copy of blob id that writer self may deduplicate
// against, and whether there is one: a usable copy the owner vouches for,
// or one that self signed itself. Entries of other writers are never
// trusted for this, so a writer cannot make another one skip storing data
// by claiming it is stored; nor are those of revoked writers. Of several,
// the one in the lowest pack ID is returned. It is on the backup's hot
// path: it walks the entries in place, without allocating.
func (x *Index) Reusable(t BlobType, id ID, self WriterNum) (Copy, bool) {
	selfOK := !x.Writers.Revoked(self)
	x.mu.RLock()
	defer x.mu.RUnlock()
	var best indexEntry
	found := false
	consider := func(e indexEntry) {
		if e.typ != t {
			return
		}
		if e.trust&TrustOwner == 0 && (e.trust&TrustSigned == 0 || e.writer != self || !selfOK) {
			return
		}
		if why, _ := x.unusable(e); why != "" || x.packOf(e).condemned {
			return
		}
		if !found || bytes.Compare(x.packOf(e).id[:], x.packOf(best).id[:]) < 0 {
			best, found = e, true
		}
	}
	x.each(id, consider)
	if !found {
		return Copy{}, false
	}
	return x.copyOf(best), true
}

// HasPack reports whether the pack is indexed.
func (x *Index) HasPack(id ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packIndex(id)
	return ok && x.packs[n].indexed && !x.packs[n].gone
}

func (x *Index) packNumber(id ID) uint32 {
	n, ok := x.packIndex(id)
	if !ok {
		n = uint32(len(x.packs))
		x.packs = append(x.packs, packRecord{id: id, size: -1})
		x.packNum[id] = n
	}
	return n
}

// SetListing records the stored packs and their sizes. From then on, a
// pack that was not listed is missing.
func (x *Index) SetListing(sizes map[ID]int64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.listed = true
	for id, size := range sizes {
		n := x.packNumber(id)
		x.packs[n].size = size
	}
}

// SetPackSize records the size of a pack written while the index is in
// use (by this process).
func (x *Index) SetPackSize(id ID, size int64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.packNumber(id)
	x.packs[n].size = size
}

// MarkDamaged records that a pack must not be used, and why.
func (x *Index) MarkDamaged(id ID, why string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.packNumber(id)
	if x.packs[n].damaged == "" {
		x.packs[n].damaged = why
	}
}

// MarkCondemned records that prune condemned (or deleted) a pack: no
// writer may reuse its blobs any more (docs/FORMAT.md, "Prune"). A pack
// the index does not know needs no mark: nothing can reuse it.
func (x *Index) MarkCondemned(id ID) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if n, ok := x.packIndex(id); ok {
		x.packs[n].condemned = true
	}
}

// markGone records, with a local index file, that the ledger records the
// pack deleted: its entries are ignored, as LoadIndex skips them without
// a file.
func (x *Index) markGone(id ID) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if n, ok := x.packIndex(id); ok && !x.packs[n].gone {
		x.packs[n].gone = true
		x.ngone++
	}
}

// Condemned reports whether the pack is marked condemned.
func (x *Index) Condemned(id ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packIndex(id)
	return ok && x.packs[n].condemned
}

// accept returns the number entries of p name their pack and key by.
func (x *Index) accept(p *PackInfo) uint32 {
	n := x.packNumber(p.ID)
	x.packs[n].indexed = true
	k := packKey{pack: n, eph: p.Ephemeral}
	if x.base != nil {
		if kn, ok := x.base.findKey(k); ok {
			return kn
		}
	}
	kn, ok := x.keyNum[k]
	if !ok {
		kn = x.keyCount()
		x.keys = append(x.keys, k)
		x.keyNum[k] = kn
	}
	return kn
}

// Add records a pack's blobs as stated by one index object (or trailer),
// attributed to writer w with trust t. Adding the same statement twice is
// harmless.
func (x *Index) Add(p PackInfo, w WriterNum, t Trust) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.accept(&p)
	for _, b := range p.Blobs {
		e := indexEntry{id: b.ID, pack: n, offset: b.Offset, length: b.Length, typ: b.Type, trust: t, writer: w}
		if x.merge(e) {
			continue
		}
		x.fresh[b.ID] = append(x.fresh[b.ID], e)
	}
	if len(x.fresh) > max(1<<16, len(x.sorted)/8) {
		x.compact()
	}
}

// merge folds e into an existing entry for the same place and writer.
func (x *Index) merge(e indexEntry) bool {
	if fs := x.fresh[e.id]; fs != nil {
		for i := range fs {
			if samePlace(fs[i], e) {
				fs[i].trust |= e.trust
				return true
			}
		}
	}
	if len(x.sorted) == 0 || x.bulk {
		return x.mergeBase(e)
	}
	p := prefix(e.id)
	lo, hi := int(x.buckets[p]), int(x.buckets[p+1])
	i, _ := slices.BinarySearchFunc(x.sorted[lo:hi], e.id, func(a indexEntry, id ID) int { return bytes.Compare(a.id[:], id[:]) })
	for i += lo; i < len(x.sorted) && x.sorted[i].id == e.id; i++ {
		if samePlace(x.sorted[i], e) {
			x.sorted[i].trust |= e.trust
			return true
		}
	}
	return x.mergeBase(e)
}

// mergeBase folds e into an entry of the file for the same place and
// writer, recording added trust in upgrade.
func (x *Index) mergeBase(e indexEntry) bool {
	if x.base == nil {
		return false
	}
	found := false
	x.base.lookup(e.id, func(i uint32, raw indexEntry) {
		b, ok := x.fromBase(i, raw)
		if found || !ok || !samePlace(b, e) {
			return
		}
		found = true
		if b.trust|e.trust != b.trust {
			if x.upgrade == nil {
				x.upgrade = map[uint32]Trust{}
			}
			x.upgrade[i] |= e.trust
		}
	})
	return found
}

func samePlace(a, b indexEntry) bool {
	return a.id == b.id && a.pack == b.pack && a.offset == b.offset && a.length == b.length && a.typ == b.typ && a.writer == b.writer
}

// reserve makes room for n more blobs.
func (x *Index) reserve(n int) {
	x.mu.Lock()
	x.sorted = slices.Grow(x.sorted, n)
	x.mu.Unlock()
}

// addBulk appends a pack's blobs without lookups; finishBulk must follow
// before the index is used.
func (x *Index) addBulk(p PackInfo, w WriterNum, t Trust) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bulk = true
	n := x.accept(&p)
	for _, b := range p.Blobs {
		x.sorted = append(x.sorted, indexEntry{id: b.ID, pack: n, offset: b.Offset, length: b.Length, typ: b.Type, trust: t, writer: w})
	}
}

// finishBulk sorts what addBulk added and folds in fresh entries.
func (x *Index) finishBulk() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bulk = false
	x.compact()
}

// compact merges fresh into sorted, folds entries that state the same
// place for the same writer into one, and rebuilds the prefix table.
func (x *Index) compact() {
	for _, es := range x.fresh {
		x.sorted = append(x.sorted, es...)
	}
	clear(x.fresh)
	slices.SortFunc(x.sorted, func(a, b indexEntry) int {
		if c := bytes.Compare(a.id[:], b.id[:]); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.pack, b.pack), cmp.Compare(a.offset, b.offset), cmp.Compare(a.length, b.length),
			cmp.Compare(a.typ, b.typ), cmp.Compare(a.writer, b.writer))
	})
	out := x.sorted[:0]
	for _, e := range x.sorted {
		if k := len(out); k > 0 && samePlace(out[k-1], e) {
			out[k-1].trust |= e.trust
			continue
		}
		out = append(out, e)
	}
	clear(x.sorted[len(out):])
	x.sorted = out
	if x.base != nil {
		// What the file states already is folded into it.
		out = x.sorted[:0]
		for _, e := range x.sorted {
			if !x.mergeBase(e) {
				out = append(out, e)
			}
		}
		clear(x.sorted[len(out):])
		x.sorted = out
	}
	if x.buckets == nil {
		x.buckets = make([]uint32, 1<<bucketBits+1)
	}
	i := 0
	for p := 0; p < 1<<bucketBits; p++ {
		x.buckets[p] = uint32(i)
		for i < len(x.sorted) && prefix(x.sorted[i].id) == p {
			i++
		}
	}
	x.buckets[1<<bucketBits] = uint32(len(x.sorted))
}

// Len returns the number of entries and of indexed packs.
func (x *Index) Len() (blobs, packs int) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n := 0
	x.all(func(e indexEntry) { n++ })
	for _, p := range x.packs {
		if p.indexed && !p.gone {
			packs++
		}
	}
	return n, packs
}

// all calls fn for every live entry, in ID order (fresh entries last);
// x.mu is held.
//
// A read of the local index file that fails stops the walk there (the
// next LoadIndex rebuilds the file).
func (x *Index) all(fn func(e indexEntry)) {
	_ = x.merged(func(e indexEntry) {
		if x.live(e) {
			fn(e)
		}
	})
	for _, es := range x.fresh {
		for _, e := range es {
			if x.live(e) {
				fn(e)
			}
		}
	}
}

// Packs returns the IDs of the indexed packs, sorted.
func (x *Index) Packs() []ID {
	x.mu.RLock()
	var ids []ID
	for _, p := range x.packs {
		if p.indexed && !p.gone {
			ids = append(ids, p.id)
		}
	}
	x.mu.RUnlock()
	slices.SortFunc(ids, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	return ids
}

// PackState is what the index knows of a pack.
type PackState struct {
	ID ID
	// Size is the listed size, -1 when the pack is not stored (or no
	// listing was made).
	Size int64
	// Entries counts the index entries that place blobs in the pack;
	// Beyond those of them that run past its end.
	Entries, Beyond int
	// Damaged is why the pack is known to be unusable.
	Damaged string
}

// PackStates describes every indexed pack, in pack ID order.
func (x *Index) PackStates() []PackState {
	x.mu.RLock()
	defer x.mu.RUnlock()
	states := make([]PackState, len(x.packs))
	x.all(func(e indexEntry) {
		st := &states[x.keyAt(e.pack).pack]
		st.Entries++
		if sz := x.packOf(e).size; sz >= 0 && int64(e.offset)+int64(e.length)+packFooterSize > sz {
			st.Beyond++
		}
	})
	var out []PackState
	for i, p := range x.packs {
		if p.indexed && !p.gone {
			st := states[i]
			st.ID, st.Size, st.Damaged = p.id, p.size, p.damaged
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b PackState) int { return bytes.Compare(a.ID[:], b.ID[:]) })
	return out
}

// Each calls fn for every entry, in ID order (fresh entries last).
func (x *Index) Each(fn func(id ID, c Copy)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	x.all(func(e indexEntry) { fn(e.id, x.copyOf(e)) })
}

// ownerVouches reports whether the owner vouches for every blob of p where
// p places it.
func (x *Index) ownerVouches(p PackInfo) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packIndex(p.ID)
	if !ok {
		return false
	}
	var buf []indexEntry
	for _, b := range p.Blobs {
		found := false
		buf = x.entries(buf[:0], b.ID)
		for _, e := range buf {
			if x.keyAt(e.pack) == (packKey{n, p.Ephemeral}) && e.offset == b.Offset && e.trust&TrustOwner != 0 {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
