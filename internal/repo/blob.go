package repo

import (
	"errors"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/sauve-backup/sauve/internal/zstdenc"
)

// BlobType says how a blob in a pack is sealed.
type BlobType uint8

// Blob types.
const (
	// DataBlob is a disk chunk, sealed to the repository's public key.
	DataBlob BlobType = 1
	// MetaBlob is a chunk list, sealed with the metadata key.
	MetaBlob BlobType = 2
)

func (t BlobType) String() string {
	switch t {
	case DataBlob:
		return "data"
	case MetaBlob:
		return "meta"
	}
	return fmt.Sprintf("blob type %d", uint8(t))
}

// A blob's plaintext starts with one byte that says how the rest is coded.
const (
	codingRaw  = 0
	codingZstd = 1
)

// compressor codes blob plaintexts. Encoders and decoders are pooled:
// they hold window buffers worth reusing.
type compressor struct {
	encoders sync.Pool
	decoders sync.Pool
}

// newCompressor returns a compressor for blobs of at most maxSize bytes
// that compresses at level (zstdenc's levels; the caller checked it).
func newCompressor(maxSize, level int) *compressor {
	c := &compressor{}
	c.encoders.New = func() any {
		// No frame checksum: every blob is verified against its keyed
		// hash, and the XXH64 of each frame cost 2% of a restore's CPU.
		e, err := zstdenc.New(level, maxSize)
		if err != nil {
			panic(err)
		}
		return e
	}
	c.decoders.New = func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderMaxMemory(uint64(maxSize)+1))
		if err != nil {
			panic(err)
		}
		return d
	}
	return c
}

// encode appends the coded form of plain to dst: zstd when it saves at
// least 1/32 of the size, raw otherwise (random data, already compressed
// files), so that incompressible chunks cost nothing to read back. A
// failure of the encoder, which only bad parameters cause, stores the blob
// raw: larger, never wrong.
func (c *compressor) encode(dst, plain []byte) []byte {
	start := len(dst)
	dst = append(dst, codingZstd)
	e := c.encoders.Get().(*zstdenc.Encoder)
	out, err := e.Encode(dst, plain)
	c.encoders.Put(e)
	if err == nil && len(out)-start-1 < len(plain)-len(plain)/32 {
		return out
	}
	if err == nil {
		dst = out // the encoder may have grown the buffer: the raw copy reuses it
	}
	dst = append(dst[:start], codingRaw)
	return append(dst, plain...)
}

var errCoding = errors.New("unknown blob coding")

// DecodeSlack is the room beyond the largest plaintext that decoding
// wants in its output buffer: with less, the zstd decoder takes its slower
// bounds-checked path for the last block of every chunk (a fifth of a
// restore's decompression time).
const DecodeSlack = 64

// decode appends the plaintext of coded to dst; the result never exceeds
// maxSize bytes, whatever the input claims. dst with room for the
// plaintext (the size its frame states, else maxSize) and DecodeSlack
// more is decoded into in place.
func (c *compressor) decode(dst, coded []byte, maxSize int) ([]byte, error) {
	if len(coded) == 0 {
		return nil, errCoding
	}
	switch coded[0] {
	case codingRaw:
		if len(coded)-1 > maxSize {
			return nil, fmt.Errorf("blob of %d bytes exceeds limit %d", len(coded)-1, maxSize)
		}
		return append(dst, coded[1:]...), nil
	case codingZstd:
		d := c.decoders.Get().(*zstd.Decoder)
		defer c.decoders.Put(d)
		// The output is capped at the size the frame states, when it
		// states one, so that a caller's buffer of that size decodes in
		// place and new memory is no larger (a chunk list is a quarter
		// of the limit); a frame that lies about its size fails.
		room := maxSize
		var h zstd.Header
		if h.Decode(coded[1:]) == nil && h.HasFCS && h.FrameContentSize < uint64(maxSize) {
			room = int(h.FrameContentSize)
		}
		if cap(dst)-len(dst) < room+DecodeSlack {
			n := make([]byte, len(dst), len(dst)+room+DecodeSlack)
			copy(n, dst)
			dst = n
		}
		out, err := d.DecodeAll(coded[1:], dst[:len(dst):len(dst)+room+DecodeSlack])
		if err != nil {
			return nil, fmt.Errorf("decompress: %w", err)
		}
		if len(out)-len(dst) > maxSize {
			return nil, fmt.Errorf("decompressed blob exceeds limit %d", maxSize)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w %d", errCoding, coded[0])
}
