package fsread

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// memTree is a tree of directories (maps) and symlinks (strings) by ID.
type memTree struct {
	dirs  map[uint64]map[string]uint64
	links map[uint64]string
	calls int
}

func (m *memTree) Names(id uint64) (map[string]uint64, bool, error) {
	m.calls++
	d, ok := m.dirs[id]
	return d, ok, nil
}

func (m *memTree) Link(id uint64) (string, bool, error) {
	t, ok := m.links[id]
	return t, ok, nil
}

func TestResolve(t *testing.T) {
	tr := &memTree{
		dirs: map[uint64]map[string]uint64{
			1: {"etc": 2, "abs": 5, "rel": 6, "loop": 7, "file": 8},
			2: {"conf": 3, "sub": 4},
			4: {"x": 10, "self": 9},
		},
		links: map[uint64]string{5: "/etc", 6: "etc/sub", 7: "loop", 9: "../sub"},
	}
	for _, c := range []struct {
		path string
		want uint64
		err  string
	}{
		{"/", 1, ""},
		{"", 1, ""},
		{"/etc/conf", 3, ""},
		{"/etc/./sub/../conf", 3, ""},
		{"/../../etc", 2, ""},
		{"/abs/conf", 3, ""},        // an absolute link from the root
		{"/rel/x", 10, ""},          // a relative link
		{"/etc/sub/self/x", 10, ""}, // ".." in a link target walks up from it
		{"/abs", 5, ""},             // the last component is not followed
		{"/nope", 0, "no such"},     // ErrNotExist
		{"/file/x", 0, "not a directory"},
		{"/loop/x", 0, "too many levels"},
	} {
		got, err := Resolve(tr, 1, c.path)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.HasPrefix(err.Error(), c.path) && c.path != "" {
				t.Errorf("Resolve(%q) = %d, %v; want an error naming it and saying %q", c.path, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Resolve(%q) = %d, %v; want %d", c.path, got, err, c.want)
		}
	}
	if _, err := Resolve(tr, 1, "/nope"); !errors.Is(err, ErrNotExist) {
		t.Errorf("a missing name: %v does not wrap ErrNotExist", err)
	}
}

func TestDirCache(t *testing.T) {
	var c DirCache
	reads := 0
	read := func(id uint64) func(func(string, uint64) error) error {
		return func(add func(string, uint64) error) error {
			reads++
			return add(fmt.Sprint("name", id), id*10)
		}
	}
	for range 3 {
		m, err := c.Names(7, read(7))
		if err != nil || m["name7"] != 70 {
			t.Fatalf("Names: %v, %v", m, err)
		}
	}
	if reads != 1 {
		t.Errorf("%d reads of a cached directory, want 1", reads)
	}
	for id := range uint64(dirCacheLen + 1) {
		c.Names(100+id, read(100+id))
	}
	if len(c.m) > dirCacheLen {
		t.Errorf("the cache holds %d directories, at most %d", len(c.m), dirCacheLen)
	}
	if _, err := c.Names(1, func(func(string, uint64) error) error { return errors.New("bad") }); err == nil {
		t.Error("a failed read was cached or its error lost")
	}
	if _, ok := c.m[1]; ok {
		t.Error("a failed read was cached")
	}
}
