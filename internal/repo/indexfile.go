package repo

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/crypto"
)

// Index objects (docs/FORMAT.md), version 2: sealed with the metadata key
// (associated data "sauve index v2"), the plaintext is
//
//	"SVIDX002" | signed object of:
//	  u16 ncerts | ncerts × (u16 len | certificate JSON) |
//	  u32 npacks | npacks × (pack id 32 | ephemeral 32 | writer 32 | flags u8 | u32 nblobs |
//	                          nblobs × (type u8 | id 32 | offset u32 | length u32))
//
// A writer's index object states only its own packs (writer = its key,
// flags 0, no certificates). The owner's may state any pack: its own
// (writer = owner, flags 0), one it verified blob by blob (recEndorsed), or
// one it copied from the pack's trailer without verifying (recClaimed:
// anyone can copy a signed trailer onto other bytes), attributed to the
// trailer's signer, whose certificate it carries.
//
// Version 1 ("SVIDX001", associated data "sauve index v1") has no
// signature, writer or flags: "SVIDX001" | u32 npacks | npacks × (pack id |
// ephemeral | u32 nblobs | nblobs × (type | id | offset | length)).
const (
	indexMagicV1   = "SVIDX001"
	indexMagic     = "SVIDX002"
	indexBlobEntry = 1 + 32 + 4 + 4
	indexPackHead  = 32 + 32 + 4
	indexRecHead   = 32 + 32 + 32 + 1 + 4
	// maxIndexObject bounds an index object's size: writers write one
	// every indexBatch packs, far below this even at the smallest chunk
	// size.
	maxIndexObject = 256 << 20
	// minSealedBlob is the smallest sealed blob: a nonce, a tag and the
	// coding byte (data blobs; meta blobs take more).
	minSealedBlob = 12 + 16 + 1
)

var (
	indexADV1 = []byte("sauve index v1")
	indexAD   = []byte("sauve index v2")
)

// Flags of a pack record in an owner's index object.
const (
	recEndorsed = 1 << 0 // the owner verified every blob stated
	recClaimed  = 1 << 1 // copied from the trailer, not verified
)

// indexRecord is one pack as an index object states it.
type indexRecord struct {
	PackInfo
	Writer [32]byte
	Flags  uint8
}

// indexObject is a decoded index object.
type indexObject struct {
	version int
	signer  crypto.SignerBlock
	certs   map[[32]byte]*crypto.Cert
	records []indexRecord
}

// encodeIndex seals records, signed by keys. certs are the certificates
// of the writers records are attributed to (owner's objects only).
func encodeIndex(meta *crypto.MetaSealer, keys *crypto.Keys, records []indexRecord, certs []*crypto.Cert) []byte {
	n := 2 + 4
	for _, r := range records {
		n += indexRecHead + len(r.Blobs)*indexBlobEntry
	}
	b := make([]byte, 0, n)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(certs)))
	for _, c := range certs {
		cj, _ := json.Marshal(c)
		b = binary.LittleEndian.AppendUint16(b, uint16(len(cj)))
		b = append(b, cj...)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(records)))
	for _, r := range records {
		b = append(b, r.ID[:]...)
		b = append(b, r.Ephemeral[:]...)
		b = append(b, r.Writer[:]...)
		b = append(b, r.Flags)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(r.Blobs)))
		for _, bl := range r.Blobs {
			b = append(b, byte(bl.Type))
			b = append(b, bl.ID[:]...)
			b = binary.LittleEndian.AppendUint32(b, bl.Offset)
			b = binary.LittleEndian.AppendUint32(b, bl.Length)
		}
	}
	plain := append([]byte(indexMagic), keys.SignObject(b, crypto.DomainIndex)...)
	return meta.Seal(nil, plain, indexAD)
}

// decodeIndex opens and verifies an index object of a repository of the
// given format version.
func decodeIndex(meta *crypto.MetaSealer, keys *crypto.Keys, version int, sealed []byte) (*indexObject, error) {
	if version == 1 {
		plain, err := meta.Open(nil, sealed, indexADV1)
		if err != nil {
			return nil, fmt.Errorf("index: %w", err)
		}
		packs, err := decodeIndexV1(plain)
		if err != nil {
			return nil, err
		}
		o := &indexObject{version: 1}
		for _, p := range packs {
			o.records = append(o.records, indexRecord{PackInfo: p})
		}
		return o, nil
	}
	plain, err := meta.Open(nil, sealed, indexAD)
	if err != nil {
		return nil, fmt.Errorf("index: %w", err)
	}
	if len(plain) < 8 || string(plain[:8]) != indexMagic {
		return nil, errors.New("index: bad header")
	}
	body, who, err := keys.OpenSigned(plain[8:], crypto.DomainIndex)
	if err != nil {
		return nil, fmt.Errorf("index: %w", err)
	}
	o, err := decodeIndexBody(body)
	if err != nil {
		return nil, err
	}
	o.version, o.signer = 2, who
	return o, o.checkAuthority(keys)
}

// checkAuthority enforces what each signer may state: a writer only its
// own packs, plainly; the owner anything, with certificates for the
// writers it attributes packs to.
func (o *indexObject) checkAuthority(keys *crypto.Keys) error {
	owner := o.signer.Cert == nil
	for i, r := range o.records {
		switch {
		case !owner:
			if r.Writer != o.signer.Key || r.Flags != 0 {
				return fmt.Errorf("index: pack %d is attributed to another writer, which only the owner may do", i)
			}
		case r.Writer == [32]byte(keys.OwnerPublic):
			if r.Flags != 0 && r.Flags != recClaimed {
				return fmt.Errorf("index: pack %d of the owner has flags %#x", i, r.Flags)
			}
		default:
			if r.Flags != recEndorsed && r.Flags != recClaimed {
				return fmt.Errorf("index: pack %d has flags %#x", i, r.Flags)
			}
			c := o.certs[r.Writer]
			if c == nil {
				return fmt.Errorf("index: pack %d is attributed to a writer without certificate", i)
			}
		}
	}
	if !owner && len(o.certs) > 0 {
		return errors.New("index: a writer's index object carries certificates")
	}
	for key, c := range o.certs {
		if err := keys.VerifyCert(c); err != nil || !bytes.Equal(c.Signer, key[:]) {
			return fmt.Errorf("index: certificate of writer %x does not verify", key[:4])
		}
	}
	return nil
}

func decodeIndexBody(b []byte) (*indexObject, error) {
	o := &indexObject{certs: map[[32]byte]*crypto.Cert{}}
	if len(b) < 2 {
		return nil, errors.New("index: truncated")
	}
	nc := int(binary.LittleEndian.Uint16(b))
	b = b[2:]
	for i := 0; i < nc; i++ {
		if len(b) < 2 {
			return nil, errors.New("index: certificates truncated")
		}
		l := int(binary.LittleEndian.Uint16(b))
		if len(b) < 2+l {
			return nil, errors.New("index: certificate truncated")
		}
		var c crypto.Cert
		if err := json.Unmarshal(b[2:2+l], &c); err != nil || len(c.Signer) != 32 {
			return nil, fmt.Errorf("index: certificate %d is malformed", i)
		}
		o.certs[[32]byte(c.Signer)] = &c
		b = b[2+l:]
	}
	if len(b) < 4 {
		return nil, errors.New("index: truncated")
	}
	np := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if uint64(np)*indexRecHead > uint64(len(b)) {
		return nil, fmt.Errorf("index: %d packs cannot fit in %d bytes", np, len(b))
	}
	o.records = make([]indexRecord, 0, np)
	for i := uint32(0); i < np; i++ {
		if len(b) < indexRecHead {
			return nil, fmt.Errorf("index: pack %d truncated", i)
		}
		var r indexRecord
		copy(r.ID[:], b[:32])
		copy(r.Ephemeral[:], b[32:64])
		copy(r.Writer[:], b[64:96])
		r.Flags = b[96]
		nb := binary.LittleEndian.Uint32(b[97:101])
		b = b[indexRecHead:]
		blobs, err := decodeBlobEntries(b, nb, int(i))
		if err != nil {
			return nil, err
		}
		r.Blobs = blobs
		b = b[int(nb)*indexBlobEntry:]
		o.records = append(o.records, r)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("index: %d trailing bytes", len(b))
	}
	return o, nil
}

// decodeBlobEntries parses nb blob entries of pack i. Blobs must follow
// each other without overlapping, after the pack header: a pack of size
// S then holds at most S/minSealedBlob of them, so a flood of entries
// costs whoever writes it as much storage as it costs readers memory.
func decodeBlobEntries(b []byte, nb uint32, i int) ([]PackBlob, error) {
	if uint64(nb)*indexBlobEntry > uint64(len(b)) {
		return nil, fmt.Errorf("index: pack %d claims %d blobs, only %d bytes left", i, nb, len(b))
	}
	if nb > maxPackBlobs {
		return nil, fmt.Errorf("index: pack %d claims %d blobs", i, nb)
	}
	blobs := make([]PackBlob, nb)
	next := uint64(packHeaderSize)
	for j := range blobs {
		bl := &blobs[j]
		var err error
		if *bl, err = parseBlobEntry(b[j*indexBlobEntry:], i, j); err != nil {
			return nil, err
		}
		if uint64(bl.Offset) < next {
			return nil, fmt.Errorf("index: pack %d blob %d at offset %d overlaps the header or the blob before it", i, j, bl.Offset)
		}
		if bl.Length < minSealedBlob {
			return nil, fmt.Errorf("index: pack %d blob %d is %d bytes, too short to be sealed", i, j, bl.Length)
		}
		next = uint64(bl.Offset) + uint64(bl.Length)
	}
	return blobs, nil
}

// parseBlobEntry parses "type u8 | id 32 | offset u32 | length u32", blob
// j of pack i.
func parseBlobEntry(e []byte, i, j int) (PackBlob, error) {
	bl := PackBlob{Type: BlobType(e[0])}
	if bl.Type != DataBlob && bl.Type != MetaBlob {
		return bl, fmt.Errorf("index: pack %d blob %d has unknown type %d", i, j, e[0])
	}
	copy(bl.ID[:], e[1:33])
	bl.Offset = binary.LittleEndian.Uint32(e[33:37])
	bl.Length = binary.LittleEndian.Uint32(e[37:41])
	return bl, nil
}

// decodeIndexV1 parses a version-1 index object's plaintext.
func decodeIndexV1(b []byte) ([]PackInfo, error) {
	if len(b) < 12 || string(b[:8]) != indexMagicV1 {
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
			bl := &p.Blobs[j]
			var err error
			if *bl, err = parseBlobEntry(b[j*indexBlobEntry:], int(i), j); err != nil {
				return nil, err
			}
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

// entriesOf says how the index holds the blobs of record r of o: which
// writer they are attributed to and what vouches for them.
func (o *indexObject) entriesOf(r *indexRecord, w *Writers, owner [32]byte) (WriterNum, Trust) {
	if o.version == 1 {
		return NoWriter, TrustLegacy
	}
	if o.signer.Cert != nil {
		return w.Number(o.signer.Key, o.signer.Cert), TrustSigned
	}
	if r.Writer == owner {
		if r.Flags&recClaimed != 0 {
			return OwnerWriter, 0
		}
		return OwnerWriter, TrustOwner | TrustSigned
	}
	n := w.Number(r.Writer, o.certs[r.Writer])
	if r.Flags&recEndorsed != 0 {
		return n, TrustOwner | TrustSigned
	}
	return n, 0
}
