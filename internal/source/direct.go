package source

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// directAlign is the alignment of O_DIRECT reads: a multiple of every
// logical sector size.
const directAlign = 4096

// directReader reads a block device with O_DIRECT. A filesystem mounted
// from the device writes its file data around the device's page cache
// (its bios go to the device, not through the cache), so that a page a
// buffered read cached earlier would be read again stale, long after the
// filesystem rewrote it and synced: a backup of a mounted partition
// would store blocks as they were at an earlier read. An O_DIRECT read
// goes to the device, after writing back what the cache holds dirty in
// its range (the filesystem's metadata buffers).
//
// It is safe for concurrent use: a read whose buffer, offset and length
// are aligned goes straight into the caller's buffer, others through a
// pooled aligned one.
type directReader struct {
	f    *os.File
	size int64
	pool sync.Pool // *[]byte, aligned, of bounceSize bytes
}

// bounceSize is the largest read done through one bounce buffer.
const bounceSize = 1 << 20

func openDirect(f *os.File, size int64) (*directReader, error) {
	d, err := os.OpenFile("/proc/self/fd/"+fmt.Sprint(f.Fd()), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	return &directReader{f: d, size: size}, nil
}

func aligned(p []byte, off int64) bool {
	return off%directAlign == 0 && len(p)%directAlign == 0 && len(p) > 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%directAlign == 0
}

func (r *directReader) bounce() *[]byte {
	if b, ok := r.pool.Get().(*[]byte); ok {
		return b
	}
	raw := make([]byte, bounceSize+directAlign)
	pad := int(-uintptr(unsafe.Pointer(unsafe.SliceData(raw))) & (directAlign - 1))
	b := raw[pad : pad+bounceSize]
	return &b
}

// ReadAt reads len(p) bytes at off; io.EOF at the device's end.
func (r *directReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= r.size {
		return 0, io.EOF
	}
	want := p[:min(int64(len(p)), r.size-off)]
	var done int
	if aligned(want, off) {
		n, err := r.f.ReadAt(want, off)
		done = n
		if err != nil && n < len(want) {
			return n, fmt.Errorf("read %s at %d: %w", r.f.Name(), off+int64(n), err)
		}
	} else {
		b := r.bounce()
		defer r.pool.Put(b)
		for done < len(want) {
			n, err := r.readVia(*b, want[done:], off+int64(done))
			done += n
			if err != nil {
				return done, err
			}
		}
	}
	if done < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// readVia reads at most len(buf) minus the alignment slack of p at off
// through buf, an aligned buffer.
func (r *directReader) readVia(buf, p []byte, off int64) (int, error) {
	from := off &^ (directAlign - 1)
	end := min(off+int64(len(p)), from+int64(len(buf)))
	to := (end + directAlign - 1) &^ (directAlign - 1)
	n, err := r.f.ReadAt(buf[:to-from], from)
	got := min(int64(n), end-from) - (off - from)
	if got <= 0 {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, fmt.Errorf("read %s at %d: %w", r.f.Name(), off, err)
	}
	copy(p, buf[off-from:off-from+got])
	if got < end-off && (err == nil || errors.Is(err, io.EOF)) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil && got < end-off {
		return int(got), fmt.Errorf("read %s at %d: %w", r.f.Name(), off+got, err)
	}
	return int(got), nil
}

func (r *directReader) Close() error { return r.f.Close() }
