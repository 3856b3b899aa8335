package local

import (
	"errors"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directAlign is the alignment O_DIRECT needs of offsets, lengths and
// buffers on the file systems we write to.
const directAlign = 4096

// writeDirect writes b to the new, empty file f, bypassing the page cache
// for the aligned bulk of it when the file system allows. Measured on the
// reference machine, buffered writes of packs cost more CPU in the kernel
// than compressing them (docs/BENCHMARKS.md); O_DIRECT costs almost none, and
// a backup has no use for its packs in the page cache.
func writeDirect(f *os.File, b []byte) (int64, error) {
	bulk := len(b) &^ (directAlign - 1)
	if bulk >= 1<<20 && uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign == 0 {
		fd := int(f.Fd())
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err == nil {
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags|unix.O_DIRECT)
		}
		if err == nil {
			n, werr := f.Write(b[:bulk])
			_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
			if werr == nil {
				m, err := f.Write(b[bulk:])
				return int64(n + m), err
			}
			if !errors.Is(werr, syscall.EINVAL) || n != 0 {
				return int64(n), werr
			}
			// EINVAL before anything was written: this file system
			// does not do O_DIRECT after all; fall through.
		}
	}
	n, err := f.Write(b)
	return int64(n), err
}
