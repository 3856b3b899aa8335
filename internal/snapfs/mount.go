package snapfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// MountOptions tune Mount.
type MountOptions struct {
	// AllowOther lets other users than the one mounting read the tree
	// (FUSE's allow_other; for a user other than root, /etc/fuse.conf
	// must have user_allow_other). The kernel checks the files view's
	// modes and owners either way.
	AllowOther bool
	// Debug logs every FUSE request on stderr.
	Debug bool
}

// Mount mounts the tree under root on dir, read-only, and serves it
// until it is unmounted.
func Mount(dir string, root fs.InodeEmbedder, o MountOptions) (*fuse.Server, error) {
	ttl := attrTTL
	opts := &fs.Options{
		EntryTimeout: &ttl, AttrTimeout: &ttl, NegativeTimeout: &ttl,
		MountOptions: fuse.MountOptions{
			AllowOther: o.AllowOther,
			FsName:     "sauve",
			Name:       "sauve",
			// default_permissions: the kernel checks modes and owners as
			// a filesystem's own (a backup of /etc/shadow stays root's).
			Options:          []string{"ro", "default_permissions"},
			DirectMount:      true, // as root; fusermount3 otherwise
			DirectMountFlags: syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV,
			MaxWrite:         1 << 20,
			Debug:            o.Debug,
		},
	}
	srv, err := fs.Mount(dir, root, opts)
	if err != nil {
		return nil, fmt.Errorf("mount on %s: %w", dir, explainMount(err))
	}
	return srv, nil
}

// explainMount says what to do about a failed mount.
func explainMount(err error) error {
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT) || strings.Contains(err.Error(), "executable file not found") {
		return fmt.Errorf("%w (as a user other than root, mounting needs fusermount3, from the package fuse3)", err)
	}
	return err
}

// ErrBusy is Unmount's error while programs use the mount.
var ErrBusy = errors.New("the mount is busy")

// Unmount unmounts dir, served by srv, and waits until srv stops. It
// returns ErrBusy, and srv keeps serving, while a program has a file open
// or its working folder in the mount, or a loop device reads an image.
func Unmount(srv *fuse.Server, dir string) error {
	err := syscall.Unmount(dir, 0)
	switch {
	case errors.Is(err, syscall.EBUSY):
		return ErrBusy
	case err != nil:
		// Not root: fusermount3 may unmount what its user mounted.
		if err = srv.Unmount(); err != nil {
			if strings.Contains(err.Error(), "busy") {
				return ErrBusy
			}
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
	}
	srv.Wait()
	return nil
}

// CheckMountPoint says why dir cannot be mounted on, if it cannot: FUSE
// missing, or dir not an empty folder.
func CheckMountPoint(dir string) error {
	if err := checkDevice("/dev/fuse"); err != nil {
		return err
	}
	stale := fmt.Errorf("%s is a mount whose server is gone: unmount it first (fusermount3 -u %s)", dir, dir)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, syscall.ENOTCONN):
		return stale
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("mount point %s does not exist: create an empty folder to mount on", dir)
	case err != nil:
		return fmt.Errorf("mount point: %w", err)
	case !fi.IsDir():
		return fmt.Errorf("mount point %s is not a folder", dir)
	}
	f, err := os.Open(dir)
	if errors.Is(err, syscall.ENOTCONN) {
		return stale
	}
	if err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	defer f.Close()
	if _, err := f.Readdirnames(1); err != io.EOF {
		if err == nil {
			return fmt.Errorf("mount point %s is not empty: mount on an empty folder", dir)
		}
		return fmt.Errorf("mount point: %w", err)
	}
	return nil
}

// checkDevice says why the FUSE device dev cannot be opened, if it
// cannot.
func checkDevice(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("FUSE is not available: %s is missing (load the module with 'modprobe fuse'; in a container, pass the device %s)", dev, dev)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("FUSE is not available to this user: %s cannot be opened (it is normally mode 0666; or mount as root)", dev)
	case err != nil:
		return fmt.Errorf("FUSE is not available: %w", err)
	}
	return f.Close()
}
