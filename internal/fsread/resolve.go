package fsread

import (
	"fmt"
	"path"
	"strings"
	"sync"
)

// Tree is a filesystem's directories and symlinks as Resolve walks them,
// each file named by an ID (an inode or MFT record number).
type Tree interface {
	// Names returns the names in directory id and their IDs; isDir is
	// false when id is not a directory.
	Names(id uint64) (names map[string]uint64, isDir bool, err error)
	// Link returns id's target when id is a symbolic link.
	Link(id uint64) (target string, isLink bool, err error)
}

// maxHops bounds the symlinks followed in one path (Linux's limit).
const maxHops = 40

// Resolve finds the ID of the absolute slash-separated path p, from the
// root directory root. Like lstat(2), it follows symlinks in the
// directories of the path (an absolute target starts again from this
// filesystem's root, whatever the snapshot's machine mounted there) but
// not in its last component. Errors name p; a missing name wraps
// ErrNotExist.
func Resolve(t Tree, root uint64, p string) (uint64, error) {
	comps := strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/")
	id := root
	var up []uint64 // the directories walked through, for ".."
	hops := 0
	for i := 0; i < len(comps); i++ {
		name := comps[i]
		switch name {
		case "", ".":
			continue
		case "..":
			if len(up) > 0 {
				id, up = up[len(up)-1], up[:len(up)-1]
			}
			continue
		}
		names, isDir, err := t.Names(id)
		if err != nil {
			return 0, err
		}
		if !isDir {
			return 0, fmt.Errorf("%s: a component of the path is not a directory", p)
		}
		next, ok := names[name]
		if !ok {
			return 0, fmt.Errorf("%s: %w", p, ErrNotExist)
		}
		if i < len(comps)-1 {
			target, isLink, err := t.Link(next)
			if err != nil {
				return 0, err
			}
			if isLink {
				if hops++; hops > maxHops {
					return 0, fmt.Errorf("%s: too many levels of symbolic links", p)
				}
				if strings.HasPrefix(target, "/") {
					id, up = root, nil
				}
				comps = append(strings.Split(target, "/"), comps[i+1:]...)
				i = -1
				continue
			}
		}
		up = append(up, id)
		id = next
	}
	return id, nil
}

// DirCache keeps the names of the last few directories searched, so that
// extracting a tree does not read each directory once per file. The zero
// value is ready; it is safe for concurrent use.
type DirCache struct {
	mu sync.Mutex
	m  map[uint64]map[string]uint64
}

// dirCacheLen is how many directories a DirCache holds.
const dirCacheLen = 16

// Names returns the names in directory id, calling read to list them
// (add for each entry) when they are not cached.
func (c *DirCache) Names(id uint64, read func(add func(name string, id uint64) error) error) (map[string]uint64, error) {
	c.mu.Lock()
	m, ok := c.m[id]
	c.mu.Unlock()
	if ok {
		return m, nil
	}
	m = map[string]uint64{}
	err := read(func(name string, child uint64) error {
		m[name] = child
		return nil
	})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= dirCacheLen {
		c.m = map[uint64]map[string]uint64{}
	}
	c.m[id] = m
	c.mu.Unlock()
	return m, nil
}
