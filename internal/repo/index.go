package repo

import (
	"encoding/binary"
	"fmt"
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
	pack   uint32
	offset uint32
	length uint32
	typ    BlobType
}

type packRecord struct {
	id  ID
	eph [32]byte
}

// Index maps blob IDs to their place in packs. It is held in memory: about
// 64 bytes per blob (docs/BENCHMARKS.md has the per-TiB figures).
type Index struct {
	mu      sync.RWMutex
	packs   []packRecord
	packNum map[ID]uint32
	blobs   map[ID]indexEntry
}

// NewIndex returns an empty index.
func NewIndex() *Index {
	return &Index{packNum: map[ID]uint32{}, blobs: map[ID]indexEntry{}}
}

// Has reports whether a blob of type t with this ID is stored.
func (x *Index) Has(t BlobType, id ID) bool {
	x.mu.RLock()
	e, ok := x.blobs[id]
	x.mu.RUnlock()
	return ok && e.typ == t
}

// Lookup returns a blob's location.
func (x *Index) Lookup(id ID) (Location, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	e, ok := x.blobs[id]
	if !ok {
		return Location{}, false
	}
	p := x.packs[e.pack]
	return Location{Pack: p.id, Ephemeral: p.eph, Type: e.typ, Offset: e.offset, Length: e.length}, true
}

// HasPack reports whether the pack is indexed.
func (x *Index) HasPack(id ID) bool {
	x.mu.RLock()
	_, ok := x.packNum[id]
	x.mu.RUnlock()
	return ok
}

// Add records a pack and its blobs. Adding a pack twice is harmless.
func (x *Index) Add(p PackInfo) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n, ok := x.packNum[p.ID]
	if !ok {
		n = uint32(len(x.packs))
		x.packs = append(x.packs, packRecord{id: p.ID, eph: p.Ephemeral})
		x.packNum[p.ID] = n
	}
	for _, b := range p.Blobs {
		if _, dup := x.blobs[b.ID]; dup {
			continue // the first copy wins; the others are garbage for prune
		}
		x.blobs[b.ID] = indexEntry{pack: n, offset: b.Offset, length: b.Length, typ: b.Type}
	}
}

// Len returns the number of blobs and packs.
func (x *Index) Len() (blobs, packs int) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.blobs), len(x.packs)
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
	for id, e := range x.blobs {
		p := x.packs[e.pack]
		fn(id, Location{Pack: p.id, Ephemeral: p.eph, Type: e.typ, Offset: e.offset, Length: e.length})
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
