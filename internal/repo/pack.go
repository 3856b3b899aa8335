package repo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/zeebo/blake3"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// Pack layout (docs/FORMAT.md), version 2:
//
//	header  "SVPACK02" | ephemeral X25519 public key (32)
//	blobs   sealed blobs, back to back
//	trailer sealed with the metadata key: "SVPTRL02" | signed object of
//	        (content hash 32 | u32 n | n × (type u8 | id 32 | length u32))
//	footer  u32 trailer length | "SVPKEND1"
//
// The trailer makes a pack self-describing, so an index can be rebuilt from
// packs alone (after an interrupted backup, or by a repair). Its writer
// signs it together with the BLAKE3 of the header and blobs, so a reader
// that holds the whole pack knows who wrote exactly these bytes; a reader
// that holds only the trailer knows only who claims to have.
//
// Version 1 packs ("SVPACK01") have an unsigned trailer ("SVPTRL01",
// associated data "sauve pack trailer v1") without the content hash.
const (
	packMagicV1    = "SVPACK01"
	packMagic      = "SVPACK02"
	packEndMagic   = "SVPKEND1"
	trailerMagicV1 = "SVPTRL01"
	trailerMagic   = "SVPTRL02"
	packHeaderSize = 8 + 32
	packFooterSize = 4 + 8
	trailerEntry   = 1 + 32 + 4
	maxPackBlobs   = 1 << 20
	// maxTrailer bounds the sealed trailer: its entries, the signature
	// and a certificate.
	maxTrailer = maxPackBlobs*trailerEntry + 16<<10
)

var (
	trailerADV1 = []byte("sauve pack trailer v1")
	trailerAD   = []byte("sauve pack trailer v2")
)

// PackBlob is a blob's place in a pack.
type PackBlob struct {
	Type   BlobType
	ID     ID
	Offset uint32
	Length uint32
}

// PackInfo describes a pack's contents.
type PackInfo struct {
	ID        ID
	Ephemeral [32]byte
	Blobs     []PackBlob
}

// packTrailer is what a pack's trailer states.
type packTrailer struct {
	PackInfo
	Version int // 1 or 2
	// Content is the BLAKE3 of the header and blobs that the signer
	// signed (version 2).
	Content ID
	Signer  crypto.SignerBlock
}

// packBuilder accumulates one pack in memory.
type packBuilder struct {
	buf   []byte
	blobs []PackBlob
	eph   [32]byte
}

func newPackBuilder(buf []byte, eph [32]byte) *packBuilder {
	buf = append(buf[:0], packMagic...)
	buf = append(buf, eph[:]...)
	return &packBuilder{buf: buf, eph: eph}
}

func (p *packBuilder) add(t BlobType, id ID, sealed []byte) {
	p.blobs = append(p.blobs, PackBlob{Type: t, ID: id, Offset: uint32(len(p.buf)), Length: uint32(len(sealed))})
	p.buf = append(p.buf, sealed...)
}

// finish appends the signed trailer and the footer and returns the pack's
// bytes and ID. The content hash and the pack's name come from one pass
// of BLAKE3 over the pack.
func (p *packBuilder) finish(meta *crypto.MetaSealer, keys *crypto.Keys) ([]byte, ID) {
	h := blake3.New()
	_, _ = h.Write(p.buf)
	var content ID
	h.Sum(content[:0])
	body := make([]byte, 0, 32+4+len(p.blobs)*trailerEntry)
	body = append(body, content[:]...)
	body = binary.LittleEndian.AppendUint32(body, uint32(len(p.blobs)))
	for _, b := range p.blobs {
		body = append(body, byte(b.Type))
		body = append(body, b.ID[:]...)
		body = binary.LittleEndian.AppendUint32(body, b.Length)
	}
	plain := append([]byte(trailerMagic), keys.SignObject(body, crypto.DomainTrailer)...)
	start := len(p.buf)
	p.buf = meta.Seal(p.buf, plain, trailerAD)
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(len(p.buf)-start))
	p.buf = append(p.buf, packEndMagic...)
	_, _ = h.Write(p.buf[start:])
	var id ID
	h.Sum(id[:0])
	return p.buf, id
}

// ErrPackFormat marks a pack whose structure is damaged.
var ErrPackFormat = errors.New("damaged pack")

// packVersion reads a pack header's version.
func packVersion(head []byte) (int, error) {
	if len(head) < packHeaderSize {
		return 0, fmt.Errorf("%w: header truncated", ErrPackFormat)
	}
	switch string(head[:8]) {
	case packMagic:
		return 2, nil
	case packMagicV1:
		return 1, nil
	}
	return 0, fmt.Errorf("%w: header missing", ErrPackFormat)
}

// trailerReader decodes trailers: the metadata key opens them, the keys
// check their signatures.
type trailerReader struct {
	meta *crypto.MetaSealer
	keys *crypto.Keys
}

// parseTail decodes a pack's trailer. tail is the last bytes of the pack
// (at least the footer), size the pack's total size. If tail is too short
// to hold the trailer, need reports how many tail bytes are required.
func (tr trailerReader) parseTail(version int, tail []byte, size int64) (t packTrailer, need int, err error) {
	t.Version = version
	if size < packHeaderSize+packFooterSize || len(tail) < packFooterSize {
		return t, 0, fmt.Errorf("%w: %d bytes is too short", ErrPackFormat, size)
	}
	foot := tail[len(tail)-packFooterSize:]
	if string(foot[4:]) != packEndMagic {
		return t, 0, fmt.Errorf("%w: end marker missing (truncated?)", ErrPackFormat)
	}
	tlen := int64(binary.LittleEndian.Uint32(foot[:4]))
	if tlen > size-packHeaderSize-packFooterSize || tlen > maxTrailer {
		return t, 0, fmt.Errorf("%w: trailer length %d out of range", ErrPackFormat, tlen)
	}
	if int64(len(tail)) < tlen+packFooterSize {
		return t, int(tlen + packFooterSize), nil
	}
	sealed := tail[int64(len(tail))-packFooterSize-tlen : len(tail)-packFooterSize]
	end := size - packFooterSize - tlen
	if version == 1 {
		plain, err := tr.meta.Open(nil, sealed, trailerADV1)
		if err != nil {
			return t, 0, fmt.Errorf("%w: trailer: %v", ErrPackFormat, err)
		}
		if len(plain) < 8 || string(plain[:8]) != trailerMagicV1 {
			return t, 0, fmt.Errorf("%w: trailer header", ErrPackFormat)
		}
		t.Blobs, err = decodeTrailerEntries(plain[8:], end)
		return t, 0, err
	}
	plain, err := tr.meta.Open(nil, sealed, trailerAD)
	if err != nil {
		return t, 0, fmt.Errorf("%w: trailer: %v", ErrPackFormat, err)
	}
	if len(plain) < 8 || string(plain[:8]) != trailerMagic {
		return t, 0, fmt.Errorf("%w: trailer header", ErrPackFormat)
	}
	body, who, err := tr.keys.OpenSigned(plain[8:], crypto.DomainTrailer)
	if err != nil {
		return t, 0, fmt.Errorf("%w: trailer: %v", ErrPackFormat, err)
	}
	if len(body) < 32 {
		return t, 0, fmt.Errorf("%w: trailer too short", ErrPackFormat)
	}
	t.Signer = who
	copy(t.Content[:], body[:32])
	t.Blobs, err = decodeTrailerEntries(body[32:], end)
	return t, 0, err
}

// decodeTrailerEntries parses "u32 n | n × (type | id | length)"; the
// blobs must exactly fill the pack from the header to end, where the
// trailer starts.
func decodeTrailerEntries(b []byte, end int64) ([]PackBlob, error) {
	if len(b) < 4 {
		return nil, fmt.Errorf("%w: trailer header", ErrPackFormat)
	}
	n := int(binary.LittleEndian.Uint32(b))
	if n > maxPackBlobs || len(b) != 4+n*trailerEntry {
		return nil, fmt.Errorf("%w: trailer holds %d bytes for %d entries", ErrPackFormat, len(b), n)
	}
	blobs := make([]PackBlob, n)
	off := int64(packHeaderSize)
	for i := range blobs {
		e := b[4+i*trailerEntry:]
		bl := &blobs[i]
		bl.Type = BlobType(e[0])
		copy(bl.ID[:], e[1:33])
		bl.Length = binary.LittleEndian.Uint32(e[33:37])
		bl.Offset = uint32(off)
		if bl.Type != DataBlob && bl.Type != MetaBlob {
			return nil, fmt.Errorf("%w: entry %d has unknown type %d", ErrPackFormat, i, e[0])
		}
		off += int64(bl.Length)
		if off > end {
			return nil, fmt.Errorf("%w: entry %d runs past the blob area", ErrPackFormat, i)
		}
	}
	if off != end {
		return nil, fmt.Errorf("%w: blobs end at %d, trailer starts at %d", ErrPackFormat, off, end)
	}
	return blobs, nil
}

// parseStoredPack decodes pack id, held whole in memory, checks for
// version 2 that its content is what the trailer's signer signed, and
// says whether the bytes match the pack's name: the content hash and the
// name come from one pass of BLAKE3, as when the pack was written.
func (tr trailerReader) parseStoredPack(id ID, data []byte) (t packTrailer, whole bool, err error) {
	v, err := packVersion(data)
	if err != nil {
		return t, Hash(data) == id, err
	}
	t, _, err = tr.parseTail(v, data, int64(len(data)))
	if err != nil {
		return t, Hash(data) == id, err
	}
	t.ID = id
	copy(t.Ephemeral[:], data[8:packHeaderSize])
	end := packHeaderSize
	if k := len(t.Blobs); k > 0 {
		end = int(t.Blobs[k-1].Offset) + int(t.Blobs[k-1].Length)
	}
	h := blake3.New()
	_, _ = h.Write(data[:end])
	var content, name ID
	h.Sum(content[:0])
	_, _ = h.Write(data[end:])
	h.Sum(name[:0])
	whole = name == id
	if v == 2 && content != t.Content {
		return t, whole, fmt.Errorf("%w: content differs from what its trailer's signer signed", ErrPackFormat)
	}
	return t, whole, nil
}

// readPackTrailer reads a stored pack's header and trailer with ranged
// reads. It cannot check the content hash (that needs the whole pack).
func (tr trailerReader) readPackTrailer(ctx context.Context, be backend.Backend, id ID, size int64) (packTrailer, error) {
	h := backend.Handle{Type: backend.PackFile, Name: id.String()}
	t := packTrailer{PackInfo: PackInfo{ID: id}}
	if size < packHeaderSize+packFooterSize {
		return t, fmt.Errorf("%w: %d bytes is too short", ErrPackFormat, size)
	}
	head, err := backend.ReadRange(ctx, be, h, 0, packHeaderSize)
	if err != nil {
		return t, err
	}
	v, err := packVersion(head)
	if err != nil {
		return t, err
	}
	want := int64(64 << 10)
	for {
		want = min(want, size)
		tail, err := backend.ReadRange(ctx, be, h, size-want, want)
		if err != nil {
			return t, err
		}
		got, need, err := tr.parseTail(v, tail, size)
		if err != nil {
			return t, err
		}
		if need == 0 {
			got.ID = id
			copy(got.Ephemeral[:], head[8:])
			return got, nil
		}
		if int64(need) <= want {
			return t, fmt.Errorf("%w: trailer does not fit", ErrPackFormat)
		}
		want = int64(need)
	}
}
