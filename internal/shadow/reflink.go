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
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

// copyMark is in the name of every reflink copy: .NAME.sauve-copy-PID-RANDOM
// beside the image, so that a leftover is found by its name and its
// maker's PID tells whether it is still in use.
const copyMark = ".sauve-copy-"

// errUnsupported marks a filesystem or file that cannot be reflinked.
type errUnsupported struct{ err error }

func (e errUnsupported) Error() string { return e.err.Error() }
func (e errUnsupported) Unwrap() error { return e.err }

func isUnsupported(err error) bool {
	var u errUnsupported
	return errors.As(err, &u)
}

// planReflink checks that the image file of src can be cloned beside it
// and returns the plan whose take clones it. The clone is unlinked as
// soon as it is open: it lives as long as the view's file.
func planReflink(src *source.Source, warn func(string)) (*plan, error) {
	f := src.File()
	if f == nil {
		return nil, errUnsupported{fmt.Errorf("%s is not an open file", src.Path)}
	}
	if err := canReflink(f); err != nil {
		return nil, err
	}
	if holder, err := qemuLocked(f); err != nil {
		return nil, fmt.Errorf("check the image locks of %s: %w", src.Path, err)
	} else if holder != "" {
		return nil, fmt.Errorf("%s is held open by a running QEMU (%s): a copy of its file is not one instant of the VM's disk; back the VM up through QEMU instead (sauve backup qemu:/path/to/qmp.sock)", src.Path, holder)
	}
	removeLeftovers(src.Path, warn)
	return &plan{src: src, mode: Reflink, take: func(context.Context) (*source.View, error) {
		clone, err := cloneBeside(f, src.Path)
		if err != nil {
			return nil, err
		}
		return &source.View{Of: src, At: clone, Size: src.Size, Holes: clone, Copy: string(Reflink), Release: clone.Close}, nil
	}}, nil
}

// cloneBeside makes a reflink copy of f, the file at path, in the same
// folder, opens it read-only and unlinks it.
func cloneBeside(f *os.File, path string) (*os.File, error) {
	var r [6]byte
	if _, err := rand.Read(r[:]); err != nil {
		return nil, err
	}
	name := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+copyMark+strconv.Itoa(os.Getpid())+"-"+hex.EncodeToString(r[:]))
	dst, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		err = fmt.Errorf("create the copy of %s: %w", path, err)
		if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
			// No copy can be made beside the image: not an error for auto.
			return nil, errUnsupported{err}
		}
		return nil, err
	}
	defer os.Remove(name)
	if err := unix.IoctlFileClone(int(dst.Fd()), int(f.Fd())); err != nil {
		dst.Close()
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
			return nil, errUnsupported{fmt.Errorf("its filesystem cannot make reflink copies (%v)", err)}
		}
		return nil, fmt.Errorf("reflink copy of %s: %w", path, err)
	}
	ro, err := os.Open(name)
	dst.Close()
	if err != nil {
		return nil, fmt.Errorf("open the copy of %s: %w", path, err)
	}
	return ro, nil
}

// Filesystems whose files FICLONE copies (statfs f_type).
const (
	xfsMagic   = 0x58465342
	btrfsMagic = 0x9123683e
)

// canReflink tells, without writing anything, whether f lives on a
// filesystem that may make reflink copies: XFS or btrfs. (An XFS made
// without reflink passes, and fails at FICLONE.)
func canReflink(f *os.File) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return errUnsupported{fmt.Errorf("statfs: %w", err)}
	}
	if t := uint32(st.Type); t != xfsMagic && t != btrfsMagic {
		return errUnsupported{fmt.Errorf("its filesystem cannot make reflink copies (only XFS and btrfs can)")}
	}
	return nil
}

// removeLeftovers deletes the copies of path that a process no longer
// running left (killed between making a copy and unlinking it).
func removeLeftovers(path string, warn func(string)) {
	pattern := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+copyMark+"*")
	names, _ := filepath.Glob(pattern)
	for _, n := range names {
		rest := strings.TrimPrefix(filepath.Base(n), "."+filepath.Base(path)+copyMark)
		pid, err := strconv.Atoi(strings.SplitN(rest, "-", 2)[0])
		if err != nil || pid <= 0 || alive(pid) {
			continue
		}
		if err := os.Remove(n); err != nil {
			warn(fmt.Sprintf("cannot remove %s, the copy an interrupted backup left: %v", n, err))
			continue
		}
		warn(fmt.Sprintf("removed %s, the copy an interrupted backup (process %d) left", n, pid))
	}
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// qemuLocked says which process holds QEMU's image locks on f, if one
// does: QEMU locks bytes 100 to 299 of the images it opens (one byte per
// permission it takes or refuses to share) with open file description
// locks.
func qemuLocked(f *os.File) (string, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 100, Len: 200}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOLCK) {
			return "", nil // no OFD locks on this filesystem
		}
		return "", err
	}
	if lk.Type == unix.F_UNLCK {
		return "", nil
	}
	if lk.Pid > 0 {
		return fmt.Sprintf("a lock at byte %d, process %d", lk.Start, lk.Pid), nil
	}
	return fmt.Sprintf("a lock at byte %d", lk.Start), nil
}
