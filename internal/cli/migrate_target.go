package cli

import (
	"path/filepath"
	"strings"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/migrate"
)

// migrationTarget is where a migration writes: a raw file or device,
// and, as they come, a VM disk image updated in place or a remote disk.
// It is never read back.
type migrationTarget interface {
	migrate.Target
	// Path names it in messages and in the state file.
	Path() string
	// Size is the disk's size: a VM image's virtual size.
	Size() int64
	// Identity is what the state file records of it, so that a state
	// is never applied to another target.
	Identity() (migrate.Identity, error)
	Close() error
}

// targetKind is one kind of target: match says whether a path is of
// it; open opens one that exists, create makes a new one of a disk of
// size bytes, all zeros.
type targetKind struct {
	name   string
	match  func(path string) bool
	open   func(path string) (migrationTarget, error)
	create func(path string, size int64) (migrationTarget, error)
}

// migrationTargetKinds are the targets migrate writes, tried in order;
// the last, a raw file or device, takes any path. A new kind (a VM disk
// format updated in place, a remote disk) adds an entry before it.
func migrationTargetKinds() []targetKind {
	return []targetKind{
		sshTargetKind(),
		qcow2TargetKind(), vmdkTargetKind(),
		vhdTargetKind(), vhdxTargetKind(), vdiTargetKind(),
		{name: "raw", match: func(string) bool { return true }, open: openRawTarget, create: createRawTarget},
	}
}

// hasExt says whether path ends in one of exts (lower case, with the
// dot), whatever its case.
func hasExt(path string, exts ...string) bool {
	e := strings.ToLower(filepath.Ext(path))
	for _, x := range exts {
		if e == x {
			return true
		}
	}
	return false
}

// migrationTargetKind returns the kind of the target path names.
func migrationTargetKind(path string) targetKind {
	kinds := migrationTargetKinds()
	for _, k := range kinds {
		if k.match(path) {
			return k
		}
	}
	return kinds[len(kinds)-1]
}

// rawTarget is a raw image file or a block device.
type rawTarget struct {
	t     *disk.Target
	zeros []byte
}

func openRawTarget(path string) (migrationTarget, error) {
	t, err := disk.OpenTarget(path, disk.TargetOptions{})
	if err != nil {
		return nil, err
	}
	return &rawTarget{t: t, zeros: make([]byte, 1<<20)}, nil
}

func (r *rawTarget) WriteAt(p []byte, off int64) (int, error) { return r.t.WriteAt(p, off) }
func (r *rawTarget) Zero(off, n int64) error                  { return r.t.Zero(off, n, r.zeros) }
func (r *rawTarget) Sync() error                              { return r.t.Finish(r.t.Size) }
func (r *rawTarget) Path() string                             { return r.t.Path }
func (r *rawTarget) Size() int64                              { return r.t.Size }
func (r *rawTarget) Close() error                             { return r.t.Close() }
func (r *rawTarget) Identity() (migrate.Identity, error)      { return fileIdentity(r.t.Path, r.t.Size) }
