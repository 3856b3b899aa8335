package vhd

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func inPlace(fixed bool, block int64) vdiotest.InPlace {
	return vdiotest.InPlace{Format: "vpc", Size: 9<<20 + 1536, Block: block,
		Create: func(f *os.File, size int64) (vdiotest.InPlaceUpdater, error) {
			return createUpdate(f, f.Name(), size, fixed, block)
		},
		Open: func(f *os.File) (vdiotest.InPlaceUpdater, error) { return OpenUpdate(f, f.Name()) },
	}
}

// qemu-img check does not check vpc images: compare does the work.
func TestUpdate(t *testing.T) {
	for _, c := range []struct {
		name  string
		fixed bool
		block int64
	}{{"dynamic", false, defaultBlock}, {"dynamic-64k", false, 64 << 10}, {"fixed", true, defaultBlock}} {
		t.Run(c.name, func(t *testing.T) { vdiotest.TestInPlace(t, inPlace(c.fixed, c.block)) })
	}
}

func TestUpdateCrash(t *testing.T) {
	c := inPlace(false, defaultBlock)
	vdiotest.TestCrash(t, c, func(f *vdiotest.DroppingFile) (vdiotest.InPlaceUpdater, error) {
		return OpenUpdate(f, f.Name())
	})
}

// A crash can leave a dynamic disk without its trailing footer: reopening
// writes it again after every block.
func TestUpdateMissingFooter(t *testing.T) {
	img := filepath.Join(t.TempDir(), "t.vhd")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u, err := CreateUpdate(f, img, 8<<20, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.WriteAt([]byte("hello"), 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := u.Sync(); err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	f.Truncate(fi.Size() - 512)
	if _, err := OpenUpdate(f, img); err != nil {
		t.Fatal(err)
	}
	fi2, _ := f.Stat()
	r, err := Open(f, fi2.Size(), img)
	if err != nil {
		t.Fatal(err)
	}
	last := make([]byte, 512)
	f.ReadAt(last, fi2.Size()-512)
	got := make([]byte, 5)
	r.ReadAt(got, 3<<20)
	if !IsFooter(last) || string(got) != "hello" || fi2.Size() != fi.Size() {
		t.Fatalf("repaired file: %d bytes (was %d), footer %v, data %q", fi2.Size(), fi.Size(), IsFooter(last), got)
	}
}

func TestUpdateRefusals(t *testing.T) {
	dir := t.TempDir()
	good := func() []byte {
		var f vdiotest.MemFile
		w, err := newWriter(&f, 8<<20, false, defaultBlock)
		if err != nil {
			t.Fatal(err)
		}
		w.WriteAt(make([]byte, 1<<20), 0)
		p := make([]byte, 4096)
		p[0] = 1
		w.WriteAt(p, 2<<20)
		w.Close()
		return f.B
	}
	setFooter := func(b []byte, at int, v uint32) {
		vdio.BE.PutUint32(b[at:], v)
		vdio.BE.PutUint32(b[64:], checksum(b[:512], 64))
	}
	for _, c := range []struct {
		name, want string
		mod        func(b []byte) []byte
		unsup      bool
	}{
		{"differencing", "differencing", func(b []byte) []byte { setFooter(b, 60, typeDiff); return b }, true},
		{"geometry-sized", "CHS geometry", func(b []byte) []byte { copy(b[28:], "vpc "); setFooter(b, 0, vdio.BE.Uint32(b)); return b }, true},
		{"block past the end", "outside the file", func(b []byte) []byte {
			vdio.BE.PutUint32(b[1536+4:], uint32(len(b)/512))
			return b
		}, false},
		{"block over the table", "over its headers", func(b []byte) []byte {
			vdio.BE.PutUint32(b[1536+4:], 3)
			return b
		}, false},
		{"bad header checksum", "checksum", func(b []byte) []byte { b[512+32]++; return b }, false},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".vhd")
		os.WriteFile(p, c.mod(good()), 0o600)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = OpenUpdate(f, p)
		f.Close()
		if err == nil || !strings.Contains(err.Error(), c.want) || errors.Is(err, vdio.ErrUnsupported) != c.unsup {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

func FuzzOpenUpdate(f *testing.F) {
	vdiotest.FuzzInPlace(f, func(rw vdio.RWFile) (vdiotest.InPlaceUpdater, int64, error) {
		u, err := OpenUpdate(rw, "fuzz.vhd")
		if err != nil {
			return nil, 0, err
		}
		return u, u.Size(), nil
	})
}
