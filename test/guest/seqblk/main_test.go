package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// image is a disk in memory.
type image []byte

func (m image) ReadAt(b []byte, off int64) (int, error)  { return copy(b, m[off:]), nil }
func (m image) WriteAt(b []byte, off int64) (int, error) { return copy(m[off:], b), nil }

// write puts writes from..to (inclusive) into m, as the writer does.
func (m image) write(l layout, from, to uint64) {
	for s := from; s <= to; s++ {
		p := l.pos(s)
		block(m[p*blockSize:(p+1)*blockSize], s, p)
	}
}

func newImage(l layout, cut uint64) image {
	m := make(image, l.n*blockSize)
	m.write(l, 1, cut)
	return m
}

func TestLatest(t *testing.T) {
	l := layout{n: 16, stride: 5}
	for cut := uint64(0); cut < 5*l.n; cut++ {
		for p := uint64(0); p < l.n; p++ {
			var want uint64
			for s := uint64(1); s <= cut; s++ {
				if l.pos(s) == p {
					want = s
				}
			}
			if got := l.latest(p, cut); got != want {
				t.Fatalf("latest(%d, %d) = %d, want %d", p, cut, got, want)
			}
		}
	}
}

// TestCheck: images of one instant pass, and every way a read racing
// the writer, or a damaged copy, differs from one instant fails.
func TestCheck(t *testing.T) {
	l := layout{n: 64, stride: 13}
	tests := []struct {
		name   string
		make   func() image
		ok     bool
		cut    uint64
		reason string
	}{
		{"nothing written", func() image { return newImage(l, 0) }, true, 0, ""},
		{"one write", func() image { return newImage(l, 1) }, true, 1, ""},
		{"part of a round", func() image { return newImage(l, 40) }, true, 40, ""},
		{"one round", func() image { return newImage(l, 64) }, true, 64, ""},
		{"many rounds", func() image { return newImage(l, 64*7+5) }, true, 64*7 + 5, ""},
		{"a write missing before the cut", func() image {
			m := newImage(l, 40)
			p := l.pos(20)
			clear(m[p*blockSize : (p+1)*blockSize])
			return m
		}, false, 40, "leave write 20"},
		{"an older round at one position", func() image {
			m := newImage(l, 200)
			m.write(l, 197-64, 197-64) // position of write 197 set back a round
			return m
		}, false, 200, "holds write 133"},
		{"half a block new, half old", func() image {
			m := newImage(l, 100)
			p := l.pos(100)
			old := make([]byte, blockSize)
			block(old, 100-64, p)
			copy(m[p*blockSize+2048:(p+1)*blockSize], old[2048:])
			return m
		}, false, 99, "damaged"},
		{"a block at the wrong position", func() image {
			m := newImage(l, 30)
			copy(m[l.pos(5)*blockSize:], m[l.pos(6)*blockSize:(l.pos(6)+1)*blockSize])
			return m
		}, false, 30, "misplaced"},
		{"garbage", func() image {
			m := newImage(l, 30)
			copy(m[l.pos(7)*blockSize:], "not a block")
			return m
		}, false, 30, "no header"},
		{"read racing the writer", func() image { return racedRead(l, 100, 1) }, false, 0, "writes 1.."},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := check(tc.make(), l)
			if err != nil {
				t.Fatal(err)
			}
			if rep.ok() != tc.ok {
				t.Fatalf("ok = %v, want %v:\n%s", rep.ok(), tc.ok, rep)
			}
			if tc.cut != 0 && rep.cut != tc.cut {
				t.Errorf("cut = %d, want %d", rep.cut, tc.cut)
			}
			if !strings.Contains(rep.String(), tc.reason) {
				t.Errorf("report lacks %q:\n%s", tc.reason, rep)
			}
		})
	}
}

// racedRead reads an image block by block from the start while the
// writer goes on: every k blocks read, one more write lands.
func racedRead(l layout, start uint64, k int) image {
	disk := newImage(l, start)
	out := make(image, len(disk))
	s := start
	for p := uint64(0); p < l.n; p++ {
		copy(out[p*blockSize:(p+1)*blockSize], disk[p*blockSize:])
		if int(p)%k == 0 {
			s++
			disk.write(l, s, s)
		}
	}
	return out
}

// TestCheckFindsRacedReads: a read during which writes land is found
// torn, from one write per block read down to a score of writes in the
// whole read. (A read during which only a few writes land may see all
// of them ahead of it: then it is one instant, and passes.)
func TestCheckFindsRacedReads(t *testing.T) {
	l := layout{n: 1024, stride: 389}
	for _, k := range []int{1, 3, 50} {
		for _, start := range []uint64{0, 500, 5000} {
			rep, err := check(racedRead(l, start, k), l)
			if err != nil {
				t.Fatal(err)
			}
			if rep.ok() {
				t.Errorf("read with a write every %d blocks from write %d: passed as consistent (%s)", k, start, rep)
			}
		}
	}
}

func TestTear(t *testing.T) {
	l := layout{n: 64, stride: 13}
	for _, cut := range []uint64{2, 40, 64, 64*3 + 9} {
		m := newImage(l, cut)
		if _, _, err := tear(m, l); err != nil {
			t.Fatalf("cut %d: %v", cut, err)
		}
		rep, err := check(m, l)
		if err != nil {
			t.Fatal(err)
		}
		if rep.ok() {
			t.Errorf("cut %d: torn image passed: %s", cut, rep)
		}
	}
	if _, _, err := tear(newImage(l, 1), l); err == nil {
		t.Error("tear of an image with one write succeeded")
	}
}

func TestValidate(t *testing.T) {
	for _, l := range []layout{{n: 0, stride: 1}, {n: 64, stride: 0}, {n: 64, stride: 4}, {n: 1 << 31, stride: 1}} {
		if l.validate() == nil {
			t.Errorf("layout %+v accepted", l)
		}
	}
}

// TestWriteFile runs the writer as the guest does (O_DIRECT, -max) on a
// real file, over a region written before, and checks the result.
func TestWriteFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seq.dat")
	if err := os.WriteFile(path, []byte(strings.Repeat("old", 100000)), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		cut  uint64
	}{
		{[]string{"-blocks", "256", "-max", "1000"}, 1000},
		{[]string{"-blocks", "256", "-stride", "1", "-bs", "65536", "-max", "300"}, 300},
	}
	for _, tc := range tests {
		if err := cmdWrite(append(tc.args, path)); err != nil {
			if strings.Contains(err.Error(), "invalid argument") {
				t.Skipf("no O_DIRECT on %s: %v", path, err)
			}
			t.Fatal(err)
		}
		l := layout{n: 256, stride: 389}
		if tc.args[2] == "-stride" {
			l.stride = 1
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := check(f, l)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !rep.ok() || rep.cut != tc.cut {
			t.Errorf("write %v: %s", tc.args, rep)
		}
	}
}
