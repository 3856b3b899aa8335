package repo

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"

	"github.com/sauve-backup/sauve/internal/crypto"
)

// Location is where a blob is stored.
type Location struct {
	Pack      ID
	Ephemeral [32]byte // the pack's session key, needed to open data blobs
	Type      BlobType
	Offset    uint32
	Length    uint32
}

type indexEntry struct {
	id     ID
	pack   uint32
	offset uint32
	length uint32
	typ    BlobType
}

type packRecord struct {
	id  ID
	eph [32]byte
}

// Index maps blob IDs to their place in packs. It is held in memory as a
// sorted array of 48-byte entries with a table of where each 16-bit ID
// prefix starts (a Go map costs over twice as much per blob; figures in
// docs/BENCHMARKS.md), plus a small map of the blobs added since the array
// was last rebuilt.
type Index struct {
	mu      sync.RWMutex
	packs   []packRecord
	packNum map[ID]uint32
	sorted  []indexEntry
	buckets []uint32 // buckets[p] is the first entry in sorted whose ID starts with prefix p
	fresh   map[ID]indexEntry
	bulk    bool // sorted is being filled unsorted by a bulk load
}

const bucketBits = 16

// NewIndex returns an empty index.
func NewIndex() *Index {
	return &Index{packNum: map[ID]uint32{}, fresh: map[ID]indexEntry{}}
}

func prefix(id ID) int { return int(id[0])<<8 | int(id[1]) }

func (x *Index) find(id ID) (indexEntry, bool) {
	if e, ok := x.fresh[id]; ok {
		return e, true
	}
	if len(x.sorted) == 0 || x.bulk {
		return indexEntry{}, false
	}
	p := prefix(id)
	lo, hi := int(x.buckets[p]), int(x.buckets[p+1])
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if bytes.Compare(x.sorted[m].id[:], id[:]) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < len(x.sorted) && x.sorted[lo].id == id {
		return x.sorted[lo], true
	}
	return indexEntry{}, false
}

// Has reports whether a blob of type t with this ID is stored.
func (x *Index) Has(t BlobType, id ID) bool {
	x.mu.RLock()
	e, ok := x.find(id)
	x.mu.RUnlock()
	return ok && e.typ == t
}

// Lookup returns a blob's location.
func (x *Index) Lookup(id ID) (Location, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	e, ok := x.find(id)
	if !ok {
		return Location{}, false
	}
	return x.location(e), true
}

func (x *Index) location(e indexEntry) Location {
	p := x.packs[e.pack]
	return Location{Pack: p.id, Ephemeral: p.eph, Type: e.typ, Offset: e.offset, Length: e.length}
}

// HasPack reports whether the pack is indexed.
func (x *Index) HasPack(id ID) bool {
	x.mu.RLock()
	_, ok := x.packNum[id]
	x.mu.RUnlock()
	return ok
}

func (x *Index) packNumber(id ID, eph [32]byte) uint32 {
	n, ok := x.packNum[id]
	if !ok {
		n = uint32(len(x.packs))
		x.packs = append(x.packs, packRecord{id: id, eph: eph})
		x.packNum[id] = n
	}
	return n
}

// Add records a pack and its blobs. Adding a pack twice is harmless.
func (x *Index) Add(p PackInfo) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.packNumber(p.ID, p.Ephemeral)
	for _, b := range p.Blobs {
		if _, dup := x.find(b.ID); dup {
			continue // the first copy wins; the others are garbage for prune
		}
		x.fresh[b.ID] = indexEntry{id: b.ID, pack: n, offset: b.Offset, length: b.Length, typ: b.Type}
	}
	if len(x.fresh) > max(1<<16, len(x.sorted)/8) {
		x.compact()
	}
}

// reserve makes room for n more blobs.
func (x *Index) reserve(n int) {
	x.mu.Lock()
	x.sorted = slices.Grow(x.sorted, n)
	x.mu.Unlock()
}

// addBulk appends a pack's blobs without lookups; finishBulk must follow
// before the index is used.
func (x *Index) addBulk(p PackInfo) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bulk = true
	n := x.packNumber(p.ID, p.Ephemeral)
	for _, b := range p.Blobs {
		x.sorted = append(x.sorted, indexEntry{id: b.ID, pack: n, offset: b.Offset, length: b.Length, typ: b.Type})
	}
}

// finishBulk sorts what addBulk added and folds in fresh entries.
func (x *Index) finishBulk() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bulk = false
	x.compact()
}

// compact merges fresh into sorted, drops duplicate IDs and rebuilds the
// prefix table.
func (x *Index) compact() {
	for _, e := range x.fresh {
		x.sorted = append(x.sorted, e)
	}
	clear(x.fresh)
	slices.SortStableFunc(x.sorted, func(a, b indexEntry) int { return bytes.Compare(a.id[:], b.id[:]) })
	x.sorted = slices.CompactFunc(x.sorted, func(a, b indexEntry) bool { return a.id == b.id })
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

// Len returns the number of blobs and packs.
func (x *Index) Len() (blobs, packs int) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.sorted) + len(x.fresh), len(x.packs)
}

// Packs returns the IDs of all indexed packs.
func (x *Index) Packs() []ID {
	x.mu.RLock()
	defer x.mu.RUnlock()
	ids := make([]ID, len(x.packs))
	for i, p := range x.packs {
		ids[i] = p.id
	}
	return ids
}

// Each calls fn for every blob.
func (x *Index) Each(fn func(id ID, loc Location)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for _, e := range x.sorted {
		fn(e.id, x.location(e))
	}
	for _, e := range x.fresh {
		fn(e.id, x.location(e))
	}
}

// Index objects (docs/FORMAT.md), sealed with the metadata key:
//
//	"SVIDX001" | u32 npacks | npacks × (pack id 32 | ephemeral 32 | u32 nblobs |
//	                                    nblobs × (type u8 | id 32 | offset u32 | length u32))
const (
	indexMagic     = "SVIDX001"
	indexBlobEntry = 1 + 32 + 4 + 4
	indexPackHead  = 32 + 32 + 4
)

var indexAD = []byte("sauve index v1")

func encodeIndex(meta *crypto.MetaSealer, packs []PackInfo) []byte {
	n := 12
	for _, p := range packs {
		n += indexPackHead + len(p.Blobs)*indexBlobEntry
	}
	b := make([]byte, 0, n)
	b = append(b, indexMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packs)))
	for _, p := range packs {
		b = append(b, p.ID[:]...)
		b = append(b, p.Ephemeral[:]...)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p.Blobs)))
		for _, bl := range p.Blobs {
			b = append(b, byte(bl.Type))
			b = append(b, bl.ID[:]...)
			b = binary.LittleEndian.AppendUint32(b, bl.Offset)
			b = binary.LittleEndian.AppendUint32(b, bl.Length)
		}
	}
	return meta.Seal(nil, b, indexAD)
}

// decodeIndexPlain parses an index object's plaintext.
func decodeIndexPlain(b []byte) ([]PackInfo, error) {
	if len(b) < 12 || string(b[:8]) != indexMagic {
		return nil, fmt.Errorf("index: bad header")
	}
	np := binary.LittleEndian.Uint32(b[8:12])
	b = b[12:]
	if uint64(np)*indexPackHead > uint64(len(b)) {
		return nil, fmt.Errorf("index: %d packs cannot fit in %d bytes", np, len(b))
	}
	packs := make([]PackInfo, 0, np)
	for i := uint32(0); i < np; i++ {
		if len(b) < indexPackHead {
			return nil, fmt.Errorf("index: pack %d truncated", i)
		}
		var p PackInfo
		copy(p.ID[:], b[:32])
		copy(p.Ephemeral[:], b[32:64])
		nb := binary.LittleEndian.Uint32(b[64:68])
		b = b[indexPackHead:]
		if uint64(nb)*indexBlobEntry > uint64(len(b)) {
			return nil, fmt.Errorf("index: pack %d claims %d blobs, only %d bytes left", i, nb, len(b))
		}
		p.Blobs = make([]PackBlob, nb)
		for j := range p.Blobs {
			e := b[j*indexBlobEntry:]
			bl := &p.Blobs[j]
			bl.Type = BlobType(e[0])
			if bl.Type != DataBlob && bl.Type != MetaBlob {
				return nil, fmt.Errorf("index: pack %d blob %d has unknown type %d", i, j, e[0])
			}
			copy(bl.ID[:], e[1:33])
			bl.Offset = binary.LittleEndian.Uint32(e[33:37])
			bl.Length = binary.LittleEndian.Uint32(e[37:41])
			if bl.Offset < packHeaderSize {
				return nil, fmt.Errorf("index: pack %d blob %d offset %d inside the pack header", i, j, bl.Offset)
			}
		}
		b = b[int(nb)*indexBlobEntry:]
		packs = append(packs, p)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("index: %d trailing bytes", len(b))
	}
	return packs, nil
}

func decodeIndex(meta *crypto.MetaSealer, sealed []byte) ([]PackInfo, error) {
	plain, err := meta.Open(nil, sealed, indexAD)
	if err != nil {
		return nil, fmt.Errorf("index: %w", err)
	}
	return decodeIndexPlain(plain)
}
