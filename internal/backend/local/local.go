// Package local stores a repository in a folder of the local file system
// (or any mounted network file system).
//
// Objects are written to a temporary file beside their final name, synced,
// and renamed into place, so a crash leaves at most a stray temporary file
// (names starting with ".tmp-"), never a partial object.
package local

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	pathpkg "path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sauve-backup/sauve/internal/backend"
)

const tmpPrefix = ".tmp-"

// Local is a repository in a directory.
type Local struct {
	root string
}

// Open returns a backend for the directory root, which need not exist yet.
func Open(root string) (*Local, error) {
	root = strings.TrimPrefix(root, "file://")
	if root == "" {
		return nil, errors.New("empty repository path")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("repository path %q: %w", root, err)
	}
	return &Local{root: abs}, nil
}

// Location implements backend.Backend.
func (l *Local) Location() string { return l.root }

func (l *Local) path(h backend.Handle) string {
	return filepath.Join(l.root, filepath.FromSlash(h.Path()))
}

func wrapErr(err error, what string) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS):
		return fmt.Errorf("%s: %w (%v)", what, backend.ErrPermission, err)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return &backend.Permanent{Err: fmt.Errorf("%s: %w", what, err)}
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Save implements backend.Backend.
func (l *Local) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	final := l.path(h)
	dir := filepath.Dir(final)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return wrapErr(err, "create directory "+dir)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, tmpPrefix+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return wrapErr(err, "create "+tmp)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	var n int64
	if br, ok := rd.(interface{ Bytes() []byte }); ok {
		n, err = writeDirect(f, br.Bytes())
	} else {
		n, err = io.Copy(f, rd)
	}
	if err != nil {
		return wrapErr(err, "write "+h.String())
	}
	if n != size {
		return fmt.Errorf("write %s: wrote %d bytes, expected %d", h, n, size)
	}
	if err = f.Sync(); err != nil {
		return wrapErr(err, "sync "+h.String())
	}
	if err = f.Close(); err != nil {
		return wrapErr(err, "close "+h.String())
	}
	if h.Type == backend.ConfigFile {
		// Create-only: link fails if the name exists, where rename would replace it.
		if err = os.Link(tmp, final); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("%s in %s: %w", h, l.root, backend.ErrExists)
			}
			return wrapErr(err, "link "+h.String())
		}
		os.Remove(tmp)
	} else if err = os.Rename(tmp, final); err != nil {
		return wrapErr(err, "rename "+h.String())
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return wrapErr(err, "open "+dir)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return wrapErr(err, "sync "+dir)
	}
	return nil
}

type limitedFile struct {
	io.Reader
	f *os.File
}

func (l limitedFile) Close() error { return l.f.Close() }

// Load implements backend.Backend.
func (l *Local) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := os.Open(l.path(h))
	if err != nil {
		return nil, wrapErr(err, "open "+h.String())
	}
	if off > 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return nil, wrapErr(err, "seek "+h.String())
		}
	}
	if length > 0 {
		return limitedFile{io.LimitReader(f, length), f}, nil
	}
	return f, nil
}

// Stat implements backend.Backend.
func (l *Local) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	fi, err := os.Stat(l.path(h))
	if err != nil {
		return backend.Info{}, wrapErr(err, "stat "+h.String())
	}
	return backend.Info{Name: h.Name, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

// List implements backend.Backend.
func (l *Local) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	dir := filepath.Join(l.root, string(t))
	var dirs []string
	if t == backend.PackFile {
		ents, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return wrapErr(err, "list "+dir)
		}
		for _, e := range ents {
			if e.IsDir() {
				dirs = append(dirs, filepath.Join(dir, e.Name()))
			}
		}
	} else {
		dirs = []string{dir}
	}
	for _, d := range dirs {
		if err := ctx.Err(); err != nil {
			return err
		}
		ents, err := os.ReadDir(d)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return wrapErr(err, "list "+d)
		}
		for _, e := range ents {
			if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue
				}
				return wrapErr(err, "stat "+e.Name())
			}
			if err := fn(backend.Info{Name: e.Name(), Size: fi.Size(), ModTime: fi.ModTime()}); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove implements backend.Backend.
func (l *Local) Remove(ctx context.Context, h backend.Handle) error {
	return wrapErr(os.Remove(l.path(h)), "remove "+h.String())
}

// Close implements backend.Backend.
func (l *Local) Close() error { return nil }

// ListStray implements backend.StrayLister.
func (l *Local) ListStray(ctx context.Context, fn func(backend.Stray) error) error {
	dirs := append([]string(nil), backend.StrayDirs...)
	if ents, err := os.ReadDir(filepath.Join(l.root, string(backend.PackFile))); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				dirs = append(dirs, string(backend.PackFile)+"/"+e.Name())
			}
		}
	}
	for _, d := range dirs {
		if err := ctx.Err(); err != nil {
			return err
		}
		ents, err := os.ReadDir(filepath.Join(l.root, filepath.FromSlash(d)))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return wrapErr(err, "list "+d)
		}
		for _, e := range ents {
			if e.IsDir() || !strings.HasPrefix(e.Name(), tmpPrefix) {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue // removed meanwhile
			}
			if err := fn(backend.Stray{Path: pathpkg.Join(d, e.Name()), Size: fi.Size(), ModTime: fi.ModTime()}); err != nil {
				return err
			}
		}
	}
	return nil
}

// RemoveStray implements backend.StrayLister.
func (l *Local) RemoveStray(ctx context.Context, p string) error {
	if !strings.HasPrefix(pathpkg.Base(p), tmpPrefix) || strings.Contains(p, "..") {
		return fmt.Errorf("%q is not a temporary file of the repository", p)
	}
	return wrapErr(os.Remove(filepath.Join(l.root, filepath.FromSlash(p))), "remove "+p)
}
