//go:build !cgo

package zstdenc

import (
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// Implementation names the library that compresses.
const Implementation = "klauspost/compress zstd (built without cgo)"

// Encoder compresses with klauspost/compress. It is not safe for
// concurrent use: keep one per goroutine (a pool).
type Encoder struct {
	enc *zstd.Encoder
}

// New returns an encoder at level for inputs of at most maxSize bytes,
// the size its window is made for.
func New(level, maxSize int) (*Encoder, error) {
	if err := CheckLevel(level); err != nil {
		return nil, err
	}
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(speedOf(level)), zstd.WithEncoderConcurrency(1),
		zstd.WithLowerEncoderMem(true), zstd.WithWindowSize(windowFor(maxSize)), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, fmt.Errorf("zstd level %d: %w", level, err)
	}
	return &Encoder{enc: e}, nil
}

// speedOf maps a libzstd level to the nearest of klauspost's four.
func speedOf(level int) zstd.EncoderLevel {
	switch {
	case level <= 1:
		return zstd.SpeedFastest
	case level <= 4:
		return zstd.SpeedDefault
	case level <= 8:
		return zstd.SpeedBetterCompression
	}
	return zstd.SpeedBestCompression
}

func windowFor(n int) int {
	w := zstd.MinWindowSize
	for w < n && w < zstd.MaxWindowSize {
		w <<= 1
	}
	return w
}

// Encode appends one zstd frame of src to dst.
func (e *Encoder) Encode(dst, src []byte) ([]byte, error) {
	return e.enc.EncodeAll(src, dst), nil
}
