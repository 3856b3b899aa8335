package repo

import "github.com/sauve-backup/sauve/internal/crypto"

// RawBlob is a blob as a pack holds it: sealed bytes under the ID they
// claim.
type RawBlob struct {
	Type   BlobType
	ID     ID
	Sealed []byte
}

// BuildPack lays out a pack of sealed blobs, with a trailer signed by keys,
// as docs/FORMAT.md specifies, and returns its bytes and what it holds.
// The repository's own writers build packs through SaveBlob; BuildPack is
// for tools, and for the tests of the threat model, which play a hostile
// writer that forges packs (anyone holding a write-only key can write these
// bytes without sauve's help).
func BuildPack(keys *crypto.Keys, eph [32]byte, blobs []RawBlob) ([]byte, PackInfo) {
	pb := newPackBuilder(nil, eph)
	for _, b := range blobs {
		pb.add(b.Type, b.ID, b.Sealed)
	}
	data, id := pb.finish(crypto.NewMetaSealer(keys.MetaKey), keys)
	return data, PackInfo{ID: id, Ephemeral: eph, Blobs: pb.blobs}
}

// BuildIndex seals an index object stating packs, signed by keys, as a
// writer states its own packs. Like BuildPack, it is for tools and tests.
func BuildIndex(keys *crypto.Keys, packs []PackInfo) []byte {
	recs := make([]indexRecord, len(packs))
	for i, p := range packs {
		recs[i] = indexRecord{PackInfo: p, Writer: keys.SignerPublic()}
	}
	return encodeIndex(crypto.NewMetaSealer(keys.MetaKey), keys, recs, nil)
}

// EncodeChunkList returns the plaintext of a chunk list blob holding ids.
func EncodeChunkList(ids []ID) []byte { return encodeChunkList(ids) }

// MetaID returns the ID of a meta blob (a chunk list) with this plaintext.
func (r *Repository) MetaID(plain []byte) ID { return r.metaIDs.Sum(plain) }
