// Package snapfs presents snapshots as a read-only FUSE filesystem: a
// folder per snapshot holding each disk as a raw image file and each
// partition as a file of its own, so that the kernel's loop mounts read
// any filesystem of a backup in place, without a restore; and, on
// request, a folder per partition presenting its files through a
// filesystem reader.
//
// The FUSE protocol and the kernel's caches are go-fuse's (its fs
// package); what is written here is the tree, its names and attributes.
// It knows nothing of repositories: the caller describes the snapshots
// and hands it functions that open disks and filesystems, which are
// called only when something is read.
package snapfs

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// FileSystem is what the files view needs of a filesystem reader; paths
// are absolute and slash-separated. It must be safe for concurrent use.
type FileSystem interface {
	Lstat(p string) (fsread.Stat, error)
	ReadDir(p string) ([]fsread.DirEntry, error)
	Readlink(p string) (string, error)
	Open(p string) (fsread.File, error)
	Xattrs(p string) ([]fsread.Xattr, error)
}

// Snapshot is one snapshot as the tree shows it.
type Snapshot struct {
	ID   string // short ID
	Time time.Time
	Host string
	// Source names what was backed up (its disks' names), for the
	// folder's name.
	Source string
	Disks  []Disk
}

// Disk is one disk of a snapshot.
type Disk struct {
	Name string
	Size int64
	// Partitions are the disk's partitions as its backup found them;
	// those outside the disk, empty or extended are left out.
	Partitions []Partition
	// Open opens the disk for reading; it is called on first need, and
	// again after a failure. The reader must be safe for concurrent use.
	Open func() (io.ReaderAt, error)
	// What names the disk in messages ("disk vda of snapshot 1a2b3c4d").
	What string
}

// Partition is a byte range of a disk holding a filesystem.
type Partition struct {
	// Number is the partition's number; 0 is a filesystem that fills a
	// disk without a partition table.
	Number      int
	Start, Size int64
	Extended    bool
	// Filesystem is the filesystem the backup found there, for OpenFS.
	Filesystem string
	// Files asks for a folder presenting the partition's files (with
	// Options.OpenFS).
	Files bool
}

// Options are what New needs besides the snapshots.
type Options struct {
	// OpenFS opens the filesystem in r, partition p of a disk (described
	// by what, for messages); nil: no files view.
	OpenFS func(r *io.SectionReader, p Partition, what string) (FileSystem, error)
	// Warn hears of read errors, which readers only see as EIO.
	Warn func(format string, args ...any)
	// UID and GID own the folders and image files.
	UID, GID uint32
}

// attrTTL is how long the kernel may cache names and attributes: a
// snapshot never changes.
const attrTTL = time.Hour

// root is the top folder: a folder per snapshot.
type root struct {
	fs.Inode
	snaps []Snapshot
	opts  Options
	views int // files views made so far, numbering their inodes
}

// New returns the root of the tree of snaps.
func New(snaps []Snapshot, opts Options) fs.InodeEmbedder {
	if opts.Warn == nil {
		opts.Warn = func(string, ...any) {}
	}
	return &root{snaps: snaps, opts: opts}
}

var _ fs.NodeOnAdder = (*root)(nil)

// OnAdd builds the static part of the tree: snapshot folders and image
// files. Files views add their nodes as they are looked up.
func (r *root) OnAdd(ctx context.Context) {
	names := map[string]bool{}
	for i := range r.snaps {
		sn := &r.snaps[i]
		dir := r.NewPersistentInode(ctx, &synthDir{attrs: r.attrs(sn.Time)}, fs.StableAttr{Mode: syscall.S_IFDIR})
		r.AddChild(uniqueName(names, FolderName(sn)), dir, false)
		r.fillSnapshot(ctx, dir, sn)
	}
}

func (r *root) fillSnapshot(ctx context.Context, dir *fs.Inode, sn *Snapshot) {
	names := map[string]bool{}
	add := func(name string, node fs.InodeEmbedder, mode uint32) {
		dir.AddChild(uniqueName(names, name), dir.NewPersistentInode(ctx, node, fs.StableAttr{Mode: mode}), false)
	}
	for i := range sn.Disks {
		d := &disk{Disk: sn.Disks[i], warn: r.opts.Warn}
		base := diskBase(d.Name)
		a := r.attrs(sn.Time)
		add(base+".img", &image{d: d, size: max(d.Size, 0), attrs: a}, syscall.S_IFREG)
		for _, p := range d.Partitions {
			if !validPartition(p, d.Size) {
				continue
			}
			if p.Number > 0 {
				add(fmt.Sprintf("%s-part%d.img", base, p.Number), &image{d: d, start: p.Start, size: p.Size, attrs: a}, syscall.S_IFREG)
			}
			if p.Files && r.opts.OpenFS != nil {
				r.views++
				v := &view{d: d, p: p, open: r.opts.OpenFS, attrs: a, base: uint64(r.views) << viewShift}
				v.root = &fsNode{v: v, path: "/"}
				add(viewName(base, p.Number), v.root, syscall.S_IFDIR)
			}
		}
	}
}

// validPartition says whether p is a range of a disk of size bytes.
func validPartition(p Partition, size int64) bool {
	return !p.Extended && p.Size > 0 && p.Start >= 0 && p.Start <= size-p.Size
}

// diskBase is what a disk's files are named after: its name, safe, less
// an image file's extension (disk.raw gives disk.img, not disk.raw.img).
func diskBase(name string) string {
	base := safeName(name, "disk")
	for _, ext := range []string{".img", ".raw", ".bin", ".iso"} {
		if len(base) > len(ext) && strings.EqualFold(base[len(base)-len(ext):], ext) {
			return base[:len(base)-len(ext)]
		}
	}
	return base
}

// viewName is the folder of the files of partition n of a disk (0: of
// the whole disk).
func viewName(disk string, n int) string {
	if n == 0 {
		return disk + "-files"
	}
	return fmt.Sprintf("%s-part%d", disk, n)
}

// attrs are what the synthetic nodes share: owner and times.
type attrs struct {
	uid, gid uint32
	time     time.Time
}

func (r *root) attrs(t time.Time) attrs { return attrs{uid: r.opts.UID, gid: r.opts.GID, time: t} }

func (a attrs) fill(out *fuse.Attr, mode uint32, size int64) {
	out.Mode = mode
	out.Size = uint64(size)
	out.Blocks = (uint64(size) + 511) / 512
	out.Blksize = 4096
	out.Nlink = 1
	out.Owner = fuse.Owner{Uid: a.uid, Gid: a.gid}
	if !a.time.IsZero() {
		out.SetTimes(&a.time, &a.time, &a.time)
	}
}

var _ fs.NodeGetattrer = (*root)(nil)

func (r *root) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.attrs(time.Time{}).fill(&out.Attr, syscall.S_IFDIR|0o555, 0)
	out.Nlink = 2
	return 0
}

// synthDir is a snapshot's folder.
type synthDir struct {
	fs.Inode
	attrs attrs
}

var _ fs.NodeGetattrer = (*synthDir)(nil)

func (d *synthDir) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.attrs.fill(&out.Attr, syscall.S_IFDIR|0o555, 0)
	out.Nlink = 2
	return 0
}

// disk is a Disk opened on first need, and closed when nothing uses it:
// a mount of every snapshot must not hold a reader, and its cache, for
// each disk ever read.
type disk struct {
	Disk
	warn func(format string, args ...any)

	mu   sync.Mutex
	r    io.ReaderAt
	refs int // open image files, and files views
}

// acquire returns the disk's reader, opening it if need be; release it
// when done.
func (d *disk) acquire() (io.ReaderAt, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.r == nil {
		r, err := d.Open()
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", d.What, err)
		}
		d.r = r
	}
	d.refs++
	return d.r, nil
}

// release closes the reader (if it is an io.Closer) once unused.
func (d *disk) release() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.refs--; d.refs > 0 || d.r == nil {
		return
	}
	if c, ok := d.r.(io.Closer); ok {
		c.Close()
	}
	d.r = nil
}

// FolderName is the name of a snapshot's folder: its time in UTC, host,
// source and short ID, so that a listing is in time order and a name
// completes from its date, or is found by its ID (ls *1a2b3c4d). No
// colons: shells split words at them when completing.
func FolderName(sn *Snapshot) string {
	parts := []string{sn.Time.UTC().Format("2006-01-02T150405Z")}
	if h := safeName(sn.Host, ""); h != "" {
		parts = append(parts, clip(h, 64))
	}
	if s := safeName(sn.Source, ""); s != "" {
		parts = append(parts, clip(s, 64))
	}
	return strings.Join(append(parts, safeName(sn.ID, "snapshot")), "_")
}

// safeName makes s a name a shell user can type: letters, digits and
// ".-+,@_" stay, anything else (slashes, spaces, controls, colons)
// becomes "-"; leading dots go (no hidden names), and a name left empty
// is def.
func safeName(s, def string) string {
	b := []byte(s)
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(".-+,@_", c) >= 0
		if !ok {
			b[i] = '-'
		}
	}
	out := strings.Trim(string(b), "-.") // no hidden names
	if out == "" || out == "." || out == ".." {
		return def
	}
	return clip(out, 200)
}

// clip cuts s to n bytes (names are ASCII by then).
func clip(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// uniqueName returns name, or name with a suffix when seen has it, and
// records it.
func uniqueName(seen map[string]bool, name string) string {
	out := name
	for i := 2; seen[out]; i++ {
		out = fmt.Sprintf("%s~%d", name, i)
	}
	seen[out] = true
	return out
}
