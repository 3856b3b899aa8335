//go:build cgo

package zstdenc

import (
	"fmt"

	"github.com/DataDog/zstd"
)

// Implementation names the library that compresses.
const Implementation = "libzstd (cgo)"

// Encoder compresses with libzstd. It is not safe for concurrent use:
// keep one per goroutine (a pool).
type Encoder struct {
	ctx   zstd.Ctx
	level int
}

// New returns an encoder at level; maxSize, the largest input it will be
// given, matters only without cgo.
func New(level, maxSize int) (*Encoder, error) {
	if err := CheckLevel(level); err != nil {
		return nil, err
	}
	return &Encoder{ctx: zstd.NewCtx(), level: level}, nil
}

// Encode appends one zstd frame of src to dst. libzstd sizes the frame's
// window from src, so it never exceeds the content size.
func (e *Encoder) Encode(dst, src []byte) ([]byte, error) {
	bound := zstd.CompressBound(len(src))
	if cap(dst)-len(dst) < bound {
		n := make([]byte, len(dst), len(dst)+bound)
		copy(n, dst)
		dst = n
	}
	out, err := e.ctx.CompressLevel(dst[len(dst):cap(dst)], src, e.level)
	if err != nil {
		return nil, fmt.Errorf("zstd level %d: %w", e.level, err)
	}
	return dst[:len(dst)+len(out)], nil
}
