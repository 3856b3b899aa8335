package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// written makes files 1..n in a new directory as the writer does.
func written(t *testing.T, n, keep uint64) string {
	t.Helper()
	dir := t.TempDir()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	w := &writer{dir: dir, keep: keep, state: filepath.Join(t.TempDir(), "last")}
	for s := uint64(1); s <= n; s++ {
		if err := w.make(d, s); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(w.state); err != nil || string(b) != strconv.FormatUint(n, 10)+"\n" {
		t.Fatalf("state file: %q, %v", b, err)
	}
	return dir
}

func mustCheck(t *testing.T, dir string) *report {
	t.Helper()
	r, err := check(dir)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestCheckWhole(t *testing.T) {
	dir := written(t, 12, 5)
	r := mustCheck(t, dir)
	if r.String() != "first=8 last=12 files=5 tmp=none" || len(r.wrong) > 0 {
		t.Fatalf("%v %v", r, r.wrong)
	}
	// The file being written at the instant, whatever it holds.
	if err := os.WriteFile(filepath.Join(dir, tmpName(13)), []byte("seqf"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := mustCheck(t, dir); r.tmp != ".tmp-13" || len(r.wrong) > 0 {
		t.Fatalf("%v %v", r, r.wrong)
	}
	if r := mustCheck(t, t.TempDir()); r.String() != "first=0 last=0 files=0 tmp=none" || len(r.wrong) > 0 {
		t.Fatalf("empty: %v %v", r, r.wrong)
	}
}

func TestCheckFindsDamage(t *testing.T) {
	cases := map[string]struct {
		damage func(dir string) error
		want   string
	}{
		"cut short": {func(dir string) error { return os.Truncate(filepath.Join(dir, name(10)), 100) }, "f0000000010: 100 bytes, want"},
		"zeroed": {func(dir string) error {
			return os.WriteFile(filepath.Join(dir, name(9)), make([]byte, len(content(9))), 0o644)
		}, "f0000000009: byte 0 is 0x0"},
		"another's": {func(dir string) error {
			return os.WriteFile(filepath.Join(dir, name(9)), content(11), 0o644)
		}, "f0000000009: "},
		"missing":  {func(dir string) error { return os.Remove(filepath.Join(dir, name(10))) }, "files 8..12: 1 of them missing"},
		"two tmps": {func(dir string) error { return os.WriteFile(filepath.Join(dir, tmpName(20)), nil, 0o644) }, "is being written, after file 12"},
		"stranger": {func(dir string) error { return os.WriteFile(filepath.Join(dir, "f12"), nil, 0o644) }, "f12: not a file of the writer"},
	}
	for what, c := range cases {
		dir := written(t, 12, 5)
		if err := c.damage(dir); err != nil {
			t.Fatal(err)
		}
		r := mustCheck(t, dir)
		if !strings.Contains(strings.Join(r.wrong, "\n"), c.want) {
			t.Errorf("%s: check says %v %q, want %q", what, r, r.wrong, c.want)
		}
	}
}

func TestSizesVary(t *testing.T) {
	seen := map[int]bool{}
	for s := uint64(1); s < 100; s++ {
		seen[size(s)] = true
		if n := size(s); n < 1024 || n > 62<<10 {
			t.Fatalf("size(%d) = %d", s, n)
		}
	}
	if len(seen) < 90 {
		t.Errorf("only %d sizes among 99 files", len(seen))
	}
}
