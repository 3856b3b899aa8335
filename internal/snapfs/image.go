package snapfs

import (
	"context"
	"io"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// image is a disk, or a partition of it, as a raw image file.
type image struct {
	fs.Inode
	d           *disk
	start, size int64
	attrs       attrs
}

var (
	_ fs.NodeGetattrer = (*image)(nil)
	_ fs.NodeOpener    = (*image)(nil)
)

func (m *image) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	m.attrs.fill(&out.Attr, syscall.S_IFREG|0o444, m.size)
	return 0
}

// Open lets the kernel keep what it read in its page cache across opens:
// the content never changes.
func (m *image) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	r, err := m.d.acquire()
	if err != nil {
		m.d.warn("%v", err)
		return nil, 0, syscall.EIO
	}
	return &imageHandle{m: m, r: r}, fuse.FOPEN_KEEP_CACHE, 0
}

// imageHandle is an open image file. The kernel reads through one (a
// mapping or a loop device holds it open), so the disk's reader lives as
// long as one does.
type imageHandle struct {
	m *image
	r io.ReaderAt
}

var (
	_ fs.FileReader   = (*imageHandle)(nil)
	_ fs.FileReleaser = (*imageHandle)(nil)
)

func (h *imageHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, errno := readWindow(h.m.d, h.r, h.m.start, h.m.size, dest, off)
	if errno != 0 {
		return nil, errno
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (h *imageHandle) Release(ctx context.Context) syscall.Errno {
	h.m.d.release()
	return 0
}

// readWindow reads into dest at off of the size bytes of d (read with
// r) from start.
func readWindow(d *disk, r io.ReaderAt, start, size int64, dest []byte, off int64) (int, syscall.Errno) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, 0
	}
	want := int(min(int64(len(dest)), size-off))
	// Never a short read: the kernel takes one for the end of the file,
	// and shrinks the size it caches.
	n, err := r.ReadAt(dest[:want], start+off)
	if n == want {
		return n, 0
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	d.warn("read %s at %d: %v", d.What, start+off+int64(n), err)
	return n, syscall.EIO
}
