package vdio

import (
	"io"
	"os"
)

// RWFile is what the in-place updaters of the formats work on: an image
// file read, written and synced at random offsets (an *os.File).
type RWFile interface {
	io.ReaderAt
	io.WriterAt
	Truncate(size int64) error
	Sync() error
	Stat() (os.FileInfo, error)
}

// zeros is the source of WriteZeros.
var zeros [64 << 10]byte

// WriteZeros writes n zero bytes at off: ranges of an image that must
// read as zeros are written, not punched, so that the updaters' ordering
// of writes and syncs covers them too.
func WriteZeros(w io.WriterAt, off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := w.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}
