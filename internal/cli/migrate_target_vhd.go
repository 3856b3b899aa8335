package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vhd"
)

// vhdTargetKind is a vhd image as a migration's target, updated in
// place: a dynamic or fixed disk that exists, or a new dynamic one.
func vhdTargetKind() targetKind {
	return imageTargetKind("vhd", []string{".vhd"},
		func(f *os.File) (imageUpdater, error) { return vhd.OpenUpdate(f, f.Name()) },
		func(f *os.File, size int64) (imageUpdater, error) { return vhd.CreateUpdate(f, f.Name(), size, false) })
}

// imageUpdater is a VM disk format's in-place updater.
type imageUpdater interface {
	migrate.Target
	Size() int64
	Close() error
}

// imageTarget is a VM disk image updated in place.
type imageTarget struct {
	path string
	f    *os.File
	u    imageUpdater
}

func (t *imageTarget) WriteAt(p []byte, off int64) (int, error) { return t.u.WriteAt(p, off) }
func (t *imageTarget) Zero(off, n int64) error                  { return t.u.Zero(off, n) }
func (t *imageTarget) Sync() error                              { return t.u.Sync() }
func (t *imageTarget) Path() string                             { return t.path }
func (t *imageTarget) Size() int64                              { return t.u.Size() }
func (t *imageTarget) Identity() (migrate.Identity, error)      { return fileIdentity(t.path, t.u.Size()) }

func (t *imageTarget) Close() error {
	err := t.u.Close()
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// imageTargetKind is the kind of a VM disk format with an in-place
// updater: open updates an image that exists, create makes a new empty
// one, durably (file and directory entry synced).
func imageTargetKind(name string, exts []string,
	open func(*os.File) (imageUpdater, error),
	create func(*os.File, int64) (imageUpdater, error)) targetKind {
	return targetKind{
		name:  name,
		match: func(p string) bool { return hasExt(p, exts...) },
		open: func(path string) (migrationTarget, error) {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				return nil, fmt.Errorf("open target: %w", err)
			}
			u, err := open(f)
			if err != nil {
				f.Close()
				if errors.Is(err, vdio.ErrUnsupported) {
					return nil, fmt.Errorf("target %s cannot be updated in place: %w", path, err)
				}
				return nil, fmt.Errorf("target %s: %w", path, err)
			}
			return &imageTarget{path: path, f: f, u: u}, nil
		},
		create: func(path string, size int64) (migrationTarget, error) {
			f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return nil, fmt.Errorf("create target: %w", err)
			}
			u, err := create(f, size)
			if err == nil {
				err = imageSyncDir(filepath.Dir(path))
			}
			if err != nil {
				f.Close()
				os.Remove(path)
				return nil, fmt.Errorf("create target %s: %w", path, err)
			}
			return &imageTarget{path: path, f: f, u: u}, nil
		},
	}
}

func imageSyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
