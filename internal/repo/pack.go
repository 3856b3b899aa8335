package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// Pack layout (docs/FORMAT.md):
//
//	header  "SVPACK01" | ephemeral X25519 public key (32)
//	blobs   sealed blobs, back to back
//	trailer sealed with the metadata key: "SVPTRL01" | u32 n | n × (type u8 | id 32 | length u32)
//	footer  u32 trailer length | "SVPKEND1"
//
// The trailer makes a pack self-describing, so an index can be rebuilt from
// packs alone (after an interrupted backup, or by a repair).
const (
	packMagic      = "SVPACK01"
	packEndMagic   = "SVPKEND1"
	trailerMagic   = "SVPTRL01"
	packHeaderSize = 8 + 32
	packFooterSize = 4 + 8
	trailerEntry   = 1 + 32 + 4
	maxPackBlobs   = 1 << 20
)

var trailerAD = []byte("sauve pack trailer v1")

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

// finish appends trailer and footer and returns the pack's bytes.
func (p *packBuilder) finish(meta *crypto.MetaSealer) []byte {
	plain := make([]byte, 0, 12+len(p.blobs)*trailerEntry)
	plain = append(plain, trailerMagic...)
	plain = binary.LittleEndian.AppendUint32(plain, uint32(len(p.blobs)))
	for _, b := range p.blobs {
		plain = append(plain, byte(b.Type))
		plain = append(plain, b.ID[:]...)
		plain = binary.LittleEndian.AppendUint32(plain, b.Length)
	}
	start := len(p.buf)
	p.buf = meta.Seal(p.buf, plain, trailerAD)
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(len(p.buf)-start))
	p.buf = append(p.buf, packEndMagic...)
	return p.buf
}

// ErrPackFormat marks a pack whose structure is damaged.
var ErrPackFormat = errors.New("damaged pack")

// parsePackTail decodes a pack's trailer. tail is the last bytes of the pack
// (at least the footer), size the pack's total size. If tail is too short
// to hold the trailer, need reports how many tail bytes are required.
func parsePackTail(meta *crypto.MetaSealer, tail []byte, size int64) (blobs []PackBlob, need int, err error) {
	if size < packHeaderSize+packFooterSize || len(tail) < packFooterSize {
		return nil, 0, fmt.Errorf("%w: %d bytes is too short", ErrPackFormat, size)
	}
	foot := tail[len(tail)-packFooterSize:]
	if string(foot[4:]) != packEndMagic {
		return nil, 0, fmt.Errorf("%w: end marker missing (truncated?)", ErrPackFormat)
	}
	tlen := int64(binary.LittleEndian.Uint32(foot[:4]))
	if tlen > size-packHeaderSize-packFooterSize || tlen > maxPackBlobs*trailerEntry+1024 {
		return nil, 0, fmt.Errorf("%w: trailer length %d out of range", ErrPackFormat, tlen)
	}
	if int64(len(tail)) < tlen+packFooterSize {
		return nil, int(tlen + packFooterSize), nil
	}
	sealed := tail[int64(len(tail))-packFooterSize-tlen : len(tail)-packFooterSize]
	plain, err := meta.Open(nil, sealed, trailerAD)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: trailer: %v", ErrPackFormat, err)
	}
	blobs, err = decodeTrailer(plain, size-packFooterSize-tlen)
	return blobs, 0, err
}

// decodeTrailer parses a trailer's plaintext; blobs must exactly fill the
// pack from the header to end, where the trailer starts.
func decodeTrailer(plain []byte, end int64) ([]PackBlob, error) {
	if len(plain) < 12 || string(plain[:8]) != trailerMagic {
		return nil, fmt.Errorf("%w: trailer header", ErrPackFormat)
	}
	n := int(binary.LittleEndian.Uint32(plain[8:12]))
	if n > maxPackBlobs || len(plain) != 12+n*trailerEntry {
		return nil, fmt.Errorf("%w: trailer holds %d bytes for %d entries", ErrPackFormat, len(plain), n)
	}
	blobs := make([]PackBlob, n)
	off := int64(packHeaderSize)
	for i := range blobs {
		e := plain[12+i*trailerEntry:]
		b := &blobs[i]
		b.Type = BlobType(e[0])
		copy(b.ID[:], e[1:33])
		b.Length = binary.LittleEndian.Uint32(e[33:37])
		b.Offset = uint32(off)
		if b.Type != DataBlob && b.Type != MetaBlob {
			return nil, fmt.Errorf("%w: entry %d has unknown type %d", ErrPackFormat, i, e[0])
		}
		off += int64(b.Length)
		if off > end {
			return nil, fmt.Errorf("%w: entry %d runs past the blob area", ErrPackFormat, i)
		}
	}
	if off != end {
		return nil, fmt.Errorf("%w: blobs end at %d, trailer starts at %d", ErrPackFormat, off, end)
	}
	return blobs, nil
}

// parsePack decodes a whole pack held in memory.
func parsePack(meta *crypto.MetaSealer, data []byte) (PackInfo, error) {
	var info PackInfo
	if len(data) < packHeaderSize+packFooterSize || !bytes.Equal(data[:8], []byte(packMagic)) {
		return info, fmt.Errorf("%w: header missing", ErrPackFormat)
	}
	copy(info.Ephemeral[:], data[8:packHeaderSize])
	blobs, _, err := parsePackTail(meta, data, int64(len(data)))
	if err != nil {
		return info, err
	}
	info.Blobs = blobs
	return info, nil
}

// readPackInfo reads a stored pack's header and trailer with ranged reads.
func readPackInfo(ctx context.Context, be backend.Backend, meta *crypto.MetaSealer, id ID, size int64) (PackInfo, error) {
	h := backend.Handle{Type: backend.PackFile, Name: id.String()}
	info := PackInfo{ID: id}
	if size < packHeaderSize+packFooterSize {
		return info, fmt.Errorf("%w: %d bytes is too short", ErrPackFormat, size)
	}
	head, err := backend.ReadRange(ctx, be, h, 0, packHeaderSize)
	if err != nil {
		return info, err
	}
	if string(head[:8]) != packMagic {
		return info, fmt.Errorf("%w: header missing", ErrPackFormat)
	}
	copy(info.Ephemeral[:], head[8:])
	want := int64(64 << 10)
	for {
		if want > size {
			want = size
		}
		tail, err := backend.ReadRange(ctx, be, h, size-want, want)
		if err != nil {
			return info, err
		}
		blobs, need, err := parsePackTail(meta, tail, size)
		if err != nil {
			return info, err
		}
		if need == 0 {
			info.Blobs = blobs
			return info, nil
		}
		if int64(need) <= want {
			return info, fmt.Errorf("%w: trailer does not fit", ErrPackFormat)
		}
		want = int64(need)
	}
}
