package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// imageUpdater is a VM disk format's in-place updater (qcow2, vmdk,
// vhd, vhdx, vdi).
type imageUpdater interface {
	migrate.Target
	Size() int64
	Close() error
}

// imageTarget is a VM disk image file as a migration's target.
type imageTarget struct {
	imageUpdater
	f    *os.File
	path string
}

// imageTargetKind is the target kind of an image format whose files end
// in exts: open updates an image that exists, create makes a new empty
// one, durably (file and directory entry synced).
func imageTargetKind(name string, exts []string,
	open func(f *os.File, path string) (imageUpdater, error),
	create func(f *os.File, path string, size int64) (imageUpdater, error)) targetKind {
	return targetKind{
		name:  name,
		match: func(p string) bool { return hasExt(p, exts...) },
		open: func(path string) (migrationTarget, error) {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				return nil, fmt.Errorf("open target: %w", err)
			}
			u, err := open(f, path)
			if err != nil {
				f.Close()
				if errors.Is(err, vdio.ErrUnsupported) {
					return nil, fmt.Errorf("target %s cannot be updated in place: %w", path, err)
				}
				return nil, fmt.Errorf("target: %w", err)
			}
			return &imageTarget{imageUpdater: u, f: f, path: path}, nil
		},
		create: func(path string, size int64) (migrationTarget, error) {
			f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return nil, fmt.Errorf("create target: %w", err)
			}
			u, err := create(f, path, size)
			if err == nil {
				err = syncDir(path)
			}
			if err != nil {
				f.Close()
				os.Remove(path)
				return nil, fmt.Errorf("create target %s: %w", path, err)
			}
			return &imageTarget{imageUpdater: u, f: f, path: path}, nil
		},
	}
}

func (t *imageTarget) Path() string { return t.path }

func (t *imageTarget) Identity() (migrate.Identity, error) { return fileIdentity(t.path, t.Size()) }

// Close syncs the image's tables and closes the file.
func (t *imageTarget) Close() error {
	err := t.imageUpdater.Close()
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes a new file's directory entry durable.
func syncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
