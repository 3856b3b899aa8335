package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/vdisk"
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

func addMigrateSubformatFlag(cmd *cobra.Command, o *migrateOptions) {
	cmd.Flags().StringVar(&o.subformat, "subformat", "", "a new .vhd or .vdi TARGET's subformat: dynamic (default) or fixed (Azure takes fixed VHDs only); .vmdk: monolithicSparse; an existing TARGET must be of it")
}

// migrationTargetKindFor is the kind of the target at path whose new
// images are of subformat sub ("": the format's default), checked as
// export checks it; an existing image of another subformat is refused
// when opened, before anything is written.
func migrationTargetKindFor(path, sub string) (targetKind, error) {
	k := migrationTargetKind(path)
	if sub == "" {
		return k, nil
	}
	if k.name == "raw" || k.remote() {
		return k, usageError{fmt.Errorf("--subformat %s: target %s is a raw image, a device or a remote disk, which have no subformats (it applies to .vhd, .vdi and .vmdk targets)", sub, path)}
	}
	_, s, err := vdisk.ParseFormat(k.name, sub)
	if err != nil {
		return k, usageError{fmt.Errorf("--subformat: %w", err)}
	}
	switch {
	case k.name == vdisk.VMDK && s != "monolithicSparse":
		return k, usageError{fmt.Errorf("--subformat %s: a streamOptimized VMDK is compressed and written once, it cannot be updated in place: migrate into a monolithicSparse one, then 'sauve convert' it", s)}
	case k.name == vdisk.VHD:
		k = vhdTargetKindOf(s == "fixed")
	case k.name == vdisk.VDI:
		k = vdiTargetKindOf(s == "fixed")
	}
	open := k.open
	k.open = func(p string) (migrationTarget, error) {
		t, err := open(p)
		if err != nil {
			return nil, err
		}
		if got := targetSubformat(t); got != s {
			t.Close()
			return nil, fmt.Errorf("target %s is a %s %s image, not --subformat %s: a migration updates it as it is (give --subformat %s, or remove it to make a new one)", p, got, k.name, s, got)
		}
		return t, nil
	}
	return k, nil
}

// targetSubformat is the subformat of an image target as vdisk names
// them: fixed or dynamic for VHD and VDI, monolithicSparse for a VMDK
// (the only one updated in place).
func targetSubformat(t migrationTarget) string {
	it, ok := t.(*imageTarget)
	if !ok {
		return ""
	}
	if f, ok := it.imageUpdater.(interface{ Fixed() bool }); ok {
		if f.Fixed() {
			return "fixed"
		}
		return "dynamic"
	}
	if migrationTargetKind(it.path).name == vdisk.VMDK {
		return "monolithicSparse"
	}
	return ""
}
