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
	_ fs.NodeReader    = (*image)(nil)
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
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (m *image) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, errno := readWindow(m.d, m.start, m.size, dest, off)
	return fuse.ReadResultData(dest[:n]), errno
}

// readWindow reads into dest at off of the size bytes of d from start.
func readWindow(d *disk, start, size int64, dest []byte, off int64) (int, syscall.Errno) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, 0
	}
	want := int(min(int64(len(dest)), size-off))
	r, err := d.reader()
	if err != nil {
		d.warn("%v", err)
		return 0, syscall.EIO
	}
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
