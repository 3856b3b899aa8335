package fat

import (
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fsread"
)

// dirIno marks the inode numbers of directories (their first cluster);
// those of files (the byte offset of their entry / 32) stay below it.
const dirIno = 1 << 48

// root stands for the root directory, which has no entry.
var root = entry{attr: attrDir, cluster: rootDirCluster}

// rootLabel finds the volume label entry of the root directory.
func (f *FS) rootLabel() (string, bool) {
	b, _, err := f.dirBytes(rootDirCluster)
	if err != nil {
		return "", false
	}
	for i := 0; i+32 <= len(b) && b[i] != 0; i += 32 {
		d := b[i : i+32]
		if d[0] != 0xE5 && d[11]&0x3F != attrLFN && d[11]&(attrVolume|attrDir) == attrVolume {
			return strings.TrimRight(shortChars(d[:11]), " "), true
		}
	}
	return "", false
}

// dirCluster is the first cluster of directory e, as the caches name it.
func (f *FS) dirCluster(e *entry) uint32 {
	if f.bits == 32 && e.cluster == f.rootCluster {
		return rootDirCluster
	}
	return e.cluster
}

// lookup finds name in the directory whose first cluster is c, without
// regard to ASCII case, by its long or its short name (as Linux does).
func (f *FS) lookup(c uint32, name string) (entry, bool, error) {
	es, err := f.readDir(c)
	if err != nil {
		return entry{}, false, err
	}
	f.mu.Lock()
	m, ok := f.dirs[c]
	f.mu.Unlock()
	if !ok {
		m = make(map[string]int, 2*len(es))
		// Long names first: a short name never hides another file's
		// long name.
		for i := len(es) - 1; i >= 0; i-- {
			m[fold(es[i].short)] = i
		}
		for i := len(es) - 1; i >= 0; i-- {
			m[fold(es[i].name)] = i
		}
		f.mu.Lock()
		f.dirs[c] = m
		f.mu.Unlock()
	}
	i, ok := m[fold(name)]
	if !ok {
		return entry{}, false, nil
	}
	return es[i], true, nil
}

// resolve finds the entry of the absolute slash-separated path p.
func (f *FS) resolve(p string) (entry, error) {
	e := root
	var up []entry // the directories walked through, for ".."
	for _, name := range strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/") {
		switch name {
		case "", ".":
			continue
		case "..":
			if len(up) > 0 {
				e, up = up[len(up)-1], up[:len(up)-1]
			}
			continue
		}
		if !e.isDir() {
			return entry{}, fmt.Errorf("%s: a component of the path is not a directory", p)
		}
		c := f.dirCluster(&e)
		next, ok, err := f.lookup(c, name)
		if err != nil {
			return entry{}, fmt.Errorf("%s: %w", p, err)
		}
		if !ok {
			return entry{}, fmt.Errorf("%s: %w", p, fsread.ErrNotExist)
		}
		if next.isDir() && (f.dirCluster(&next) == rootDirCluster || !f.validCluster(next.cluster)) {
			return entry{}, fmt.Errorf("%s: directory %q starts at cluster %d (damaged entry)", p, name, next.cluster)
		}
		up = append(up, e)
		e = next
	}
	return e, nil
}

// at runs fn on the entry at path p; its errors name p.
func at[T any](f *FS, p string, fn func(*entry) (T, error)) (T, error) {
	var zero T
	e, err := f.resolve(p)
	if err != nil {
		return zero, err
	}
	v, err := fn(&e)
	if err != nil {
		return zero, fmt.Errorf("%s: %w", p, err)
	}
	return v, nil
}

// stat is the metadata of entry e, as Linux's vfat shows it with the
// default mount options.
func (f *FS) stat(e *entry) fsread.Stat {
	if e.pos == 0 { // the root
		return fsread.Stat{Ino: dirIno | uint64(rootDirCluster), Mode: fsread.TypeDir | 0o755, Nlink: 2,
			Atime: time.Unix(0, 0).UTC(), Mtime: time.Unix(0, 0).UTC(), Ctime: time.Unix(0, 0).UTC()}
	}
	st := fsread.Stat{Ino: uint64(e.pos / 32), Mode: fsread.TypeRegular | 0o644, Nlink: 1, Size: int64(e.size),
		Mtime: e.mtime(), Atime: e.atime(), Ctime: e.ctime()}
	if e.attr&attrReadOnly != 0 {
		st.Mode &^= 0o222
	}
	if e.isDir() {
		// Linux ignores the read-only attribute of directories (it
		// marks customised folders in Windows).
		st = fsread.Stat{Ino: dirIno | uint64(f.dirCluster(e)), Mode: fsread.TypeDir | 0o755, Nlink: 2,
			Mtime: st.Mtime, Atime: st.Atime, Ctime: st.Ctime}
	}
	return st
}

// Lstat returns the metadata of the file at p.
func (f *FS) Lstat(p string) (fsread.Stat, error) {
	return at(f, p, func(e *entry) (fsread.Stat, error) { return f.stat(e), nil })
}

// ReadDir lists the directory at p, without "." and "..", in on-disk
// order.
func (f *FS) ReadDir(p string) ([]fsread.DirEntry, error) {
	return at(f, p, func(e *entry) ([]fsread.DirEntry, error) {
		if !e.isDir() {
			return nil, errors.New("not a directory")
		}
		es, err := f.readDir(f.dirCluster(e))
		if err != nil {
			return nil, err
		}
		out := make([]fsread.DirEntry, len(es))
		for i := range es {
			out[i] = fsread.DirEntry{Name: es[i].name, Stat: f.stat(&es[i])}
		}
		return out, nil
	})
}

// Readlink fails: FAT has no symbolic links.
func (f *FS) Readlink(p string) (string, error) {
	return at(f, p, func(*entry) (string, error) {
		return "", errors.New("not a symbolic link (FAT has none)")
	})
}

// Xattrs returns nothing: FAT has no extended attributes (its
// attribute bits show in the mode).
func (f *FS) Xattrs(p string) ([]fsread.Xattr, error) {
	return at(f, p, func(*entry) ([]fsread.Xattr, error) { return nil, nil })
}

// Open opens the regular file at p.
func (f *FS) Open(p string) (fsread.File, error) {
	return at(f, p, func(e *entry) (fsread.File, error) {
		if e.isDir() || e.pos == 0 {
			return nil, errors.New("not a regular file")
		}
		return f.open(e)
	})
}

// file is a regular file's content: its cluster chain.
type file struct {
	f    *FS
	size int64
	rs   []run
}

func (f *FS) open(e *entry) (*file, error) {
	fl := &file{f: f, size: int64(e.size)}
	if e.size == 0 {
		return fl, nil
	}
	need := (int64(e.size) + f.clusterSize - 1) / f.clusterSize
	if need > int64(f.clusters) {
		return nil, fmt.Errorf("size %d is larger than the filesystem's data area (damaged entry)", e.size)
	}
	if !f.validCluster(e.cluster) {
		return nil, fmt.Errorf("%d bytes starting at cluster %d, outside the data area (damaged entry)", e.size, e.cluster)
	}
	rs, err := f.chain(e.cluster, need)
	if err != nil {
		return nil, err
	}
	if l := rs[len(rs)-1]; int64(l.off)/f.clusterSize+int64(l.n) < need {
		have := l.off + int64(l.n)*f.clusterSize
		return nil, fmt.Errorf("the cluster chain holds %d bytes, less than the file's %d (damaged FAT)", have, e.size)
	}
	fl.rs = rs
	return fl, nil
}

func (fl *file) Size() int64 { return fl.size }

// Data is the whole file: FAT has no holes.
func (fl *file) Data() ([]extent.Range, error) {
	if fl.size == 0 {
		return nil, nil
	}
	return []extent.Range{{Start: 0, End: fl.size}}, nil
}

func (fl *file) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= fl.size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > fl.size-off {
		p = p[:fl.size-off]
	}
	cs := fl.f.clusterSize
	i := sort.Search(len(fl.rs), func(i int) bool { return fl.rs[i].off+int64(fl.rs[i].n)*cs > off })
	n := 0
	for n < len(p) && i < len(fl.rs) {
		r := fl.rs[i]
		in := off - r.off
		k := min(int64(len(p)-n), int64(r.n)*cs-in)
		if err := fl.f.readAt(p[n:n+int(k)], fl.f.clusterOffset(r.first)+in); err != nil {
			return n, err
		}
		n += int(k)
		off += k
		i++
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}
