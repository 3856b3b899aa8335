package cli

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/repo"
)

// readMaps are the read maps of one backup's disks (backup.ReadMap): the
// parents' read back as Prior, this backup's written as it runs and kept
// once its snapshot is stored. They live in the local cache; without one,
// or with free-space skipping off, a backup has none and reads what the
// data map says, as it always did.
type readMaps struct {
	cache  *repo.Cache
	parent *repo.ID
	open   []*os.File // priors being read
	writes []readMapWrite
	warn   func(string, ...any)
}

type readMapWrite struct {
	disk string
	tmp  *os.File
	w    *backup.ReadMapWriter
}

// attach gives bs the parent's read map of its disk, when the cache has
// one, and a writer for its own.
func (m *readMaps) attach(bs *backup.Source) {
	if m.cache == nil || bs.Size < 0 || bs.Map == nil {
		return
	}
	if m.parent != nil {
		path, _ := m.cache.ReadMapPath(*m.parent, bs.Name)
		if f, err := os.Open(path); err == nil {
			if rm, err := backup.OpenReadMap(f, bs.Size); err == nil {
				bs.Prior = rm
				m.open = append(m.open, f)
			} else {
				f.Close()
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			m.warn("cannot read the read map of the last backup of %s (%v): blocks freed since read as zeros", bs.Name, err)
		}
	}
	_, dir := m.cache.ReadMapPath(repo.ID{}, bs.Name)
	if dir == "" {
		return
	}
	removeStaleReadMaps(dir, time.Now().Add(-staleReadMap))
	tmp, err := os.CreateTemp(dir, readMapTemp+"*")
	if err != nil {
		return
	}
	w := backup.NewReadMapWriter(tmp, bs.Size)
	bs.Record = w.Chunk
	m.writes = append(m.writes, readMapWrite{disk: bs.Name, tmp: tmp, w: w})
}

// finish keeps this backup's read maps under its snapshot sn (nil when
// the backup failed: they are dropped) and drops the parent's, which the
// next backup (of which sn is the parent) does not read.
func (m *readMaps) finish(sn *repo.ID) {
	for _, f := range m.open {
		f.Close()
	}
	for _, wr := range m.writes {
		err := wr.w.Close()
		if cerr := wr.tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil && sn != nil {
			path, _ := m.cache.ReadMapPath(*sn, wr.disk)
			if err = os.Rename(wr.tmp.Name(), path); err == nil {
				if m.parent != nil && *m.parent != *sn {
					old, _ := m.cache.ReadMapPath(*m.parent, wr.disk)
					_ = os.Remove(old)
				}
				continue
			}
		}
		if err != nil && sn != nil {
			m.warn("cannot keep the read map of %s (%v): the next backup reads blocks freed since as zeros", wr.disk, err)
		}
		_ = os.Remove(wr.tmp.Name())
	}
	m.open, m.writes = nil, nil
}

// readMapTemp starts the name of a read map being written; staleReadMap
// is how old one must be to be left by a backup that was killed (one
// still being written by a backup under way is younger: its writes
// touch it), and removed.
const (
	readMapTemp  = ".tmp-"
	staleReadMap = 24 * time.Hour
)

// removeStaleReadMaps removes the read maps being written that were last
// modified before cutoff. Failures are ignored: a map is a hint, and a
// leftover costs a few KiB.
func removeStaleReadMaps(dir string, cutoff time.Time) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), readMapTemp) {
			continue
		}
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() && fi.ModTime().Before(cutoff) {
			_ = os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
