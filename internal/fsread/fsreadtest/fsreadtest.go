// Package fsreadtest holds what the tests of the filesystem readers
// (fsread/ext, fat, ntfs, xfs) share, as net/http/httptest does for
// net/http: Explore, the walk their fuzz targets run on every image.
// It exists for the tests only.
package fsreadtest

import (
	"path"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// FS is what Explore asks of a reader.
type FS interface {
	Lstat(p string) (fsread.Stat, error)
	ReadDir(p string) ([]fsread.DirEntry, error)
	Readlink(p string) (string, error)
	Open(p string) (fsread.File, error)
	Xattrs(p string) ([]fsread.Xattr, error)
}

// Explore reads everything a user could ask of fs, within bounds (400
// files, 8 levels, 64 KiB of each file and its end): a damaged image
// must give errors, never a panic, a hang or a huge allocation. Errors
// are ignored: what is tested is that every call returns.
func Explore(fs FS) {
	budget := 400
	var walk func(p string, depth int)
	walk = func(p string, depth int) {
		if budget--; budget < 0 || depth > 8 {
			return
		}
		st, err := fs.Lstat(p)
		if err != nil {
			return
		}
		fs.Xattrs(p)
		switch st.Type() {
		case fsread.TypeSymlink:
			fs.Readlink(p)
		case fsread.TypeRegular:
			if fl, err := fs.Open(p); err == nil {
				fl.Data()
				buf := make([]byte, 64<<10)
				fl.ReadAt(buf, 0)
				fl.ReadAt(buf[:100], max(fl.Size()-50, 0))
			}
		case fsread.TypeDir:
			ents, _ := fs.ReadDir(p)
			for _, e := range ents {
				walk(path.Join(p, e.Name), depth+1)
			}
		}
	}
	walk("/", 0)
}
