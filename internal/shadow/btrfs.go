package shadow

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

// snapMark begins the name of every btrfs snapshot sauve takes:
// .sauve-snap-PID-RANDOM at the top of the subvolume, so that a leftover
// is found by its name and its maker's PID tells whether it is in use.
const snapMark = ".sauve-snap-"

// From linux/btrfs.h. The top folder of every subvolume is inode 256
// (BTRFS_FIRST_FREE_OBJECTID), and every subvolume has a st_dev of its
// own.
const (
	btrfsTopIno         = 256
	btrfsIocSnapCreate2 = 0x50009417 // _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)
	btrfsIocSnapDestroy = 0x5000940f // _IOW(0x94, 15, struct btrfs_ioctl_vol_args)
	btrfsSubvolRdonly   = 1 << 1
)

// btrfsVolArgs2 is struct btrfs_ioctl_vol_args_v2 (4096 bytes).
type btrfsVolArgs2 struct {
	Fd      int64
	Transid uint64
	Flags   uint64
	Unused  [4]uint64
	Name    [4040]byte
}

// btrfsVolArgs is struct btrfs_ioctl_vol_args (4096 bytes).
type btrfsVolArgs struct {
	Fd   int64
	Name [4088]byte
}

// Both structures are 4096 bytes, as the ioctl numbers say: a constant
// that overflows stops the build if they are not.
const (
	_ = uint(4096 - unsafe.Sizeof(btrfsVolArgs2{}))
	_ = uint(unsafe.Sizeof(btrfsVolArgs2{}) - 4096)
	_ = uint(4096 - unsafe.Sizeof(btrfsVolArgs{}))
	_ = uint(unsafe.Sizeof(btrfsVolArgs{}) - 4096)
)

// subvolume is where an image file lives on btrfs.
type subvolume struct {
	top string // the subvolume's top folder (inode 256)
	rel string // the image's path below top
	dev uint64 // the subvolume's st_dev
	ino uint64 // the image's inode number, which a snapshot keeps
}

// planBtrfs plans a read-only snapshot of the btrfs subvolume holding the
// image file of src; the view reads the image inside the snapshot. What
// keeps a snapshot from being taken (another filesystem, a read-only
// mount, no permission, a subvolume whose top is not mounted) is
// errUnsupported, so that auto tries a reflink copy next.
func planBtrfs(src *source.Source, o Options) (*plan, error) {
	f := src.File()
	if f == nil {
		return nil, errUnsupported{fmt.Errorf("%s is not an open file", src.Path)}
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &sfs); err != nil {
		return nil, errUnsupported{fmt.Errorf("statfs %s: %w", src.Path, err)}
	}
	if uint32(sfs.Type) != btrfsMagic {
		return nil, errUnsupported{errors.New("its filesystem is not btrfs")}
	}
	if holder, err := qemuLocked(f); err != nil {
		return nil, fmt.Errorf("check the image locks of %s: %w", src.Path, err)
	} else if holder != "" {
		return nil, fmt.Errorf("%s is held open by a running QEMU (%s): a snapshot of its file is not one instant of the VM's disk; back the VM up through QEMU instead (sauve backup qemu:/path/to/qmp.sock)", src.Path, holder)
	}
	sv, err := findSubvolume(f, src.Path)
	if err != nil {
		return nil, errUnsupported{err}
	}
	if err := canSnapshot(sv.top); err != nil {
		return nil, errUnsupported{err}
	}
	removeSnapLeftovers(sv.top, o.Warn)
	// The snapshot writes back the subvolume's dirty data before its
	// instant: flushing the image now leaves little to write while the
	// filesystems inside it are frozen.
	_ = unix.Fdatasync(int(f.Fd()))
	return &plan{src: src, mode: Btrfs, take: func(context.Context) (*source.View, error) {
		return sv.snapshot(src)
	}}, nil
}

// findSubvolume finds the top of the subvolume holding f, the file at
// path: the nearest folder above it that is inode 256 on the same st_dev.
func findSubvolume(f *os.File, path string) (subvolume, error) {
	var fst, pst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		return subvolume{}, fmt.Errorf("stat %s: %w", path, err)
	}
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err == nil {
		err = unix.Stat(abs, &pst)
	}
	if err != nil {
		return subvolume{}, fmt.Errorf("find the btrfs subvolume of %s: %w", path, err)
	}
	if pst.Dev != fst.Dev || pst.Ino != fst.Ino {
		return subvolume{}, fmt.Errorf("%s no longer names the image being backed up (renamed or replaced)", path)
	}
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			return subvolume{}, fmt.Errorf("find the btrfs subvolume of %s: %w", path, err)
		}
		if st.Dev != fst.Dev {
			return subvolume{}, fmt.Errorf("the top of the btrfs subvolume holding %s is not mounted (above %s is another filesystem)", path, dir)
		}
		if st.Ino == btrfsTopIno {
			rel, err := filepath.Rel(dir, abs)
			if err != nil {
				return subvolume{}, err
			}
			return subvolume{top: dir, rel: rel, dev: fst.Dev, ino: fst.Ino}, nil
		}
		if dir == "/" {
			return subvolume{}, fmt.Errorf("no btrfs subvolume top above %s", path)
		}
	}
}

// canSnapshot checks, without writing, what the kernel asks of a
// snapshot of the subvolume at top: a filesystem mounted read-write, the
// right to create in top, and the subvolume being one's own.
func canSnapshot(top string) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(top, &sfs); err != nil {
		return fmt.Errorf("statfs %s: %w", top, err)
	}
	if sfs.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("the btrfs at %s is mounted read-only", top)
	}
	if err := unix.Faccessat(unix.AT_FDCWD, top, unix.W_OK|unix.X_OK, unix.AT_EACCESS); err != nil {
		return fmt.Errorf("cannot create a snapshot in %s: %w", top, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(top, &st); err != nil {
		return fmt.Errorf("stat %s: %w", top, err)
	}
	if uid := os.Geteuid(); uid != 0 && int(st.Uid) != uid {
		return fmt.Errorf("the btrfs subvolume %s belongs to user %d: only its owner or root may snapshot it", top, st.Uid)
	}
	return nil
}

// snapshot takes the read-only snapshot of sv and opens the image in it.
// Only the ioctl runs while filesystems are frozen; the rest is quick.
func (sv subvolume) snapshot(src *source.Source) (*source.View, error) {
	name, err := snapName(snapMark)
	if err != nil {
		return nil, err
	}
	dir, err := os.Open(sv.top)
	if err != nil {
		return nil, fmt.Errorf("open the btrfs subvolume %s: %w", sv.top, err)
	}
	if err := snapCreate(dir, name); err != nil {
		dir.Close()
		return nil, fmt.Errorf("btrfs snapshot of %s: %w", sv.top, err)
	}
	snap := filepath.Join(sv.top, name)
	drop := func() error {
		err := snapDestroy(dir, name)
		dir.Close()
		if err != nil {
			return fmt.Errorf("remove the btrfs snapshot %s: %w (remove it with btrfs subvolume delete)", snap, err)
		}
		return nil
	}
	f, size, err := openInSnapshot(snap, sv)
	if err != nil {
		drop()
		return nil, err
	}
	return &source.View{
		Of: src, At: f, Size: size, Holes: f, Copy: string(Btrfs),
		Release: sync.OnceValue(func() error {
			f.Close()
			return drop()
		}),
		CopyUsed: func() int64 {
			n, err := unshared(f, size)
			if err != nil {
				return -1
			}
			return n
		},
	}, nil
}

// openInSnapshot opens the image of sv in the snapshot at snap, and
// checks that it is the image (the snapshot keeps inode numbers).
func openInSnapshot(snap string, sv subvolume) (*os.File, int64, error) {
	var top unix.Stat_t
	if err := unix.Stat(snap, &top); err != nil {
		return nil, 0, fmt.Errorf("stat the btrfs snapshot %s: %w", snap, err)
	}
	path := filepath.Join(snap, sv.rel)
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("open the image in the btrfs snapshot: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Dev != top.Dev || st.Ino != sv.ino || st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, 0, fmt.Errorf("%s is not the image being backed up (was it renamed?)", path)
	}
	return f, st.Size, nil
}

// snapName returns mark+PID-RANDOM.
func snapName(mark string) (string, error) {
	var r [6]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", fmt.Errorf("name a snapshot: %w", err)
	}
	return mark + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(r[:]), nil
}

// snapPID returns the PID in a name snapName made with mark, or 0 for
// any other name.
func snapPID(name, mark string) int {
	rest, ok := strings.CutPrefix(name, mark)
	if !ok {
		return 0
	}
	digits, random, _ := strings.Cut(rest, "-")
	if _, err := hex.DecodeString(random); err != nil || len(random) != 12 || strings.ToLower(random) != random {
		return 0
	}
	pid, err := strconv.Atoi(digits)
	if err != nil || pid <= 0 || digits[0] == '+' {
		return 0
	}
	return pid
}

// snapCreate makes a read-only snapshot of the subvolume whose top is dir
// at dir/name.
func snapCreate(dir *os.File, name string) error {
	var a btrfsVolArgs2
	a.Fd = int64(dir.Fd())
	a.Flags = btrfsSubvolRdonly
	copy(a.Name[:len(a.Name)-1], name)
	return btrfsIoctl(dir, btrfsIocSnapCreate2, unsafe.Pointer(&a))
}

// snapDestroy deletes the subvolume dir/name. The kernel lets root do it,
// and others on a btrfs mounted with user_subvol_rm_allowed.
func snapDestroy(dir *os.File, name string) error {
	var a btrfsVolArgs
	copy(a.Name[:len(a.Name)-1], name)
	return btrfsIoctl(dir, btrfsIocSnapDestroy, unsafe.Pointer(&a))
}

func btrfsIoctl(f *os.File, req uintptr, arg unsafe.Pointer) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(arg))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}

// removeSnapLeftovers deletes the snapshots at the top of a subvolume
// that a process no longer running left (killed before its Release).
func removeSnapLeftovers(top string, warn func(string)) {
	entries, err := os.ReadDir(top)
	if err != nil {
		return
	}
	var dir *os.File
	defer func() {
		if dir != nil {
			dir.Close()
		}
	}()
	for _, e := range entries {
		pid := snapPID(e.Name(), snapMark)
		if pid == 0 || !e.IsDir() || alive(pid) {
			continue
		}
		path := filepath.Join(top, e.Name())
		var st unix.Stat_t
		if unix.Lstat(path, &st) != nil || st.Ino != btrfsTopIno {
			continue // a folder of that name, not a snapshot
		}
		if dir == nil {
			if dir, err = os.Open(top); err != nil {
				warn(fmt.Sprintf("cannot remove %s, the btrfs snapshot an interrupted backup (process %d) left: %v", path, pid, err))
				return
			}
		}
		if err := snapDestroy(dir, e.Name()); err != nil {
			warn(fmt.Sprintf("cannot remove %s, the btrfs snapshot an interrupted backup (process %d) left: %v", path, pid, err))
			continue
		}
		warn(fmt.Sprintf("removed %s, the btrfs snapshot an interrupted backup (process %d) left", path, pid))
	}
}

// From linux/fiemap.h.
const (
	fsIocFiemap        = 0xc020660b // _IOWR('f', 11, struct fiemap)
	fiemapExtentLast   = 0x1
	fiemapExtentShared = 0x2000
)

type fiemapExtent struct {
	Logical, Physical, Length uint64
	_                         [2]uint64
	Flags                     uint32
	_                         [3]uint32
}

type fiemapRequest struct {
	Start, Length               uint64
	Flags, Mapped, Count, spare uint32
	Extents                     [256]fiemapExtent
}

// unshared counts the bytes of the first size bytes of f, a file in a
// snapshot, whose extents no other file shares: what the snapshot alone
// keeps of the image since the image was rewritten there.
func unshared(f *os.File, size int64) (int64, error) {
	r := new(fiemapRequest)
	var n int64
	for start := uint64(0); start < uint64(size); {
		*r = fiemapRequest{Start: start, Length: uint64(size) - start, Count: uint32(len(r.Extents))}
		if err := btrfsIoctl(f, fsIocFiemap, unsafe.Pointer(r)); err != nil {
			return n, fmt.Errorf("extents of %s: %w", f.Name(), err)
		}
		m := min(int(r.Mapped), len(r.Extents))
		if m == 0 {
			break
		}
		for _, e := range r.Extents[:m] {
			if e.Flags&fiemapExtentShared == 0 {
				n += int64(min(e.Length, uint64(size)))
			}
		}
		last := r.Extents[m-1]
		next := last.Logical + last.Length
		if last.Flags&fiemapExtentLast != 0 || next <= start {
			break
		}
		start = next
	}
	return n, nil
}
