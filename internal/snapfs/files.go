package snapfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// viewShift places each files view's inode numbers in a range of their
// own, so that hard links within a filesystem share an inode and two
// filesystems never do; numbers that do not fit get automatic ones
// (from 2^63, above every view's range).
const viewShift = 40

// maxWarnings bounds the read errors one files view reports: a damaged
// filesystem must not flood the terminal.
const maxWarnings = 20

// view is the files of one partition, its filesystem opened on first
// need.
type view struct {
	d     *disk
	p     Partition
	open  func(r *io.SectionReader, p Partition, what string) (FileSystem, error)
	attrs attrs
	base  uint64
	root  *fsNode // the view's folder

	mu     sync.Mutex
	fsys   FileSystem
	warned int
}

// what names the view's filesystem in messages.
func (v *view) what() string {
	if v.p.Number == 0 {
		return v.d.What
	}
	return fmt.Sprintf("partition %d of %s", v.p.Number, v.d.What)
}

// get returns the filesystem, opening it on first use.
func (v *view) get() (FileSystem, syscall.Errno) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.fsys != nil {
		return v.fsys, 0
	}
	fsys, err := v.openFS()
	if err != nil {
		v.warnLocked("%s: %v", v.what(), err)
		return nil, syscall.EIO
	}
	v.fsys = fsys
	// The kernel holds the folder's attributes from before: have it ask
	// again, for those of the filesystem's root. Not from within this
	// request.
	go v.root.NotifyContent(-1, 0)
	return fsys, 0
}

// openFS opens the filesystem, which holds its disk's reader until the
// unmount.
func (v *view) openFS() (FileSystem, error) {
	r, err := v.d.acquire()
	if err != nil {
		return nil, err
	}
	fsys, err := v.open(io.NewSectionReader(r, v.p.Start, v.p.Size), v.p, v.what())
	if err != nil {
		v.d.release()
		return nil, err
	}
	return fsys, nil
}

// opened returns the filesystem if it is open already.
func (v *view) opened() FileSystem {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.fsys
}

// errno turns a reader's error into what the kernel gets, reporting
// those that are not a plain "no such file".
func (v *view) errno(err error) syscall.Errno {
	if errors.Is(err, fsread.ErrNotExist) {
		return syscall.ENOENT
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.warnLocked("%s: %v", v.what(), err)
	return syscall.EIO
}

func (v *view) warnLocked(format string, args ...any) {
	v.warned++
	switch {
	case v.warned < maxWarnings:
		v.d.warn(format, args...)
	case v.warned == maxWarnings:
		v.d.warn(format+" (further errors of %s not shown)", append(args, v.what())...)
	}
}

// ino is the inode number of a file of the view: the filesystem's,
// offset, for files (hard links are one inode); directories get
// automatic numbers, so that a damaged filesystem linking a directory
// twice does not give the kernel one directory in two places.
func (v *view) ino(st *fsread.Stat) uint64 {
	if st.IsDir() || st.Ino == 0 || st.Ino >= 1<<viewShift {
		return 0
	}
	return v.base | st.Ino
}

// fsNode is a file of a files view (the view's folder itself: path "/").
type fsNode struct {
	fs.Inode
	v    *view
	path string
	st   fsread.Stat // zero for the view's folder
}

var (
	_ fs.NodeGetattrer   = (*fsNode)(nil)
	_ fs.NodeLookuper    = (*fsNode)(nil)
	_ fs.NodeReaddirer   = (*fsNode)(nil)
	_ fs.NodeReadlinker  = (*fsNode)(nil)
	_ fs.NodeOpener      = (*fsNode)(nil)
	_ fs.NodeReader      = (*fsNode)(nil)
	_ fs.NodeGetxattrer  = (*fsNode)(nil)
	_ fs.NodeListxattrer = (*fsNode)(nil)
)

// Getattr gives the file's metadata as the filesystem holds it. The
// view's folder shows the filesystem's root once that is open, and
// until then does not open it: listing a snapshot's folder must not
// fetch every filesystem's metadata.
func (n *fsNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if n.path == "/" {
		fsys := n.v.opened()
		if fsys == nil {
			n.v.attrs.fill(&out.Attr, syscall.S_IFDIR|0o555, 0)
			out.Nlink = 2
			return 0
		}
		st, err := fsys.Lstat("/")
		if err != nil {
			return n.v.errno(err)
		}
		fillStat(&out.Attr, &st)
		return 0
	}
	fillStat(&out.Attr, &n.st)
	return 0
}

func fillStat(out *fuse.Attr, st *fsread.Stat) {
	out.Mode = st.Mode
	out.Size = uint64(max(st.Size, 0))
	out.Blocks = (out.Size + 511) / 512
	out.Blksize = 4096
	out.Nlink = max(st.Nlink, 1)
	out.Owner = fuse.Owner{Uid: st.UID, Gid: st.GID}
	out.Rdev = uint32(unixMkdev(st.Major, st.Minor))
	out.SetTimes(&st.Atime, &st.Mtime, &st.Ctime)
}

// unixMkdev is the kernel's new_encode_dev, what FUSE carries as rdev.
func unixMkdev(major, minor uint32) uint64 {
	return uint64(minor&0xff) | uint64(major&0xfff)<<8 | uint64(minor&^0xff)<<12
}

// validName says whether a name read from a directory may be shown: a
// damaged filesystem may hold any bytes.
func validName(name string) bool {
	return name != "" && name != "." && name != ".." && len(name) <= 255 && !strings.ContainsAny(name, "/\x00")
}

func (n *fsNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !validName(name) {
		return nil, syscall.ENOENT
	}
	fsys, errno := n.v.get()
	if errno != 0 {
		return nil, errno
	}
	p := path.Join(n.path, name)
	st, err := fsys.Lstat(p)
	if err != nil {
		return nil, n.v.errno(err)
	}
	fillStat(&out.Attr, &st)
	child := &fsNode{v: n.v, path: p, st: st}
	return n.NewInode(ctx, child, fs.StableAttr{Mode: st.Type(), Ino: n.v.ino(&st)}), 0
}

func (n *fsNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	fsys, errno := n.v.get()
	if errno != 0 {
		return nil, errno
	}
	ents, err := fsys.ReadDir(n.path)
	if err != nil {
		return nil, n.v.errno(err)
	}
	out := make([]fuse.DirEntry, 0, len(ents))
	for i := range ents {
		if validName(ents[i].Name) {
			st := &ents[i].Stat
			out = append(out, fuse.DirEntry{Name: ents[i].Name, Mode: st.Type(), Ino: n.v.ino(st)})
		}
	}
	return fs.NewListDirStream(out), 0
}

func (n *fsNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	fsys, errno := n.v.get()
	if errno != 0 {
		return nil, errno
	}
	t, err := fsys.Readlink(n.path)
	if err != nil {
		return nil, n.v.errno(err)
	}
	return []byte(t), 0
}

// fileHandle is an open regular file of a files view.
type fileHandle struct{ f fsread.File }

func (n *fsNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.st.Type() != fsread.TypeRegular {
		return nil, 0, syscall.EINVAL
	}
	fsys, errno := n.v.get()
	if errno != 0 {
		return nil, 0, errno
	}
	f, err := fsys.Open(n.path)
	if err != nil {
		return nil, 0, n.v.errno(err)
	}
	return &fileHandle{f: f}, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *fsNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*fileHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	size := h.f.Size()
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	want := int(min(int64(len(dest)), size-off))
	k, err := h.f.ReadAt(dest[:want], off)
	if k == want { // never short: see readWindow
		return fuse.ReadResultData(dest[:k]), 0
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return nil, n.v.errno(fmt.Errorf("%s at %d: %w", n.path, off, err))
}

func (n *fsNode) xattrs() ([]fsread.Xattr, syscall.Errno) {
	fsys, errno := n.v.get()
	if errno != 0 {
		return nil, errno
	}
	xs, err := fsys.Xattrs(n.path)
	if err != nil {
		return nil, n.v.errno(err)
	}
	return xs, 0
}

// Getxattr follows getxattr(2): with dest too small, the size needed
// and ERANGE.
func (n *fsNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	xs, errno := n.xattrs()
	if errno != 0 {
		return 0, errno
	}
	for _, x := range xs {
		if x.Name == attr {
			if len(dest) < len(x.Value) {
				return uint32(len(x.Value)), syscall.ERANGE
			}
			return uint32(copy(dest, x.Value)), 0
		}
	}
	return 0, syscall.ENODATA
}

// Listxattr follows listxattr(2): the names, each ending in a NUL.
func (n *fsNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	xs, errno := n.xattrs()
	if errno != 0 {
		return 0, errno
	}
	var b []byte
	for _, x := range xs {
		if validXattrName(x.Name) {
			b = append(append(b, x.Name...), 0)
		}
	}
	if len(dest) < len(b) {
		return uint32(len(b)), syscall.ERANGE
	}
	return uint32(copy(dest, b)), 0
}

func validXattrName(s string) bool { return s != "" && len(s) <= 255 && !strings.Contains(s, "\x00") }
