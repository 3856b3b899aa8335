package vhd

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func write(t testing.TB, size int64, fixed bool, block int64, seed uint64) ([]byte, []byte) {
	disk := vdiotest.Disk(size, seed)
	return disk, writeDisk(t, disk, fixed, block, seed)
}

func writeDisk(t testing.TB, disk []byte, fixed bool, block int64, seed uint64) []byte {
	size := int64(len(disk))
	var f vdiotest.MemFile
	w, err := newWriter(&f, size, fixed, block)
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, seed)
	return f.B
}

func TestRoundTrip(t *testing.T) {
	for _, fixed := range []bool{false, true} {
		for _, c := range []struct{ size, block int64 }{{0, defaultBlock}, {512, defaultBlock}, {5<<20 + 1536, defaultBlock}, {70000 / 512 * 512, 4096}, {1 << 20, 512}} {
			disk, img := write(t, c.size, fixed, c.block, uint64(c.size))
			v, err := Open(bytes.NewReader(img), int64(len(img)), "t.vhd")
			if err != nil {
				t.Fatalf("fixed %v size %d: %v", fixed, c.size, err)
			}
			if v.Size() != c.size || v.Fixed() != fixed {
				t.Fatalf("size %d read as %d", c.size, v.Size())
			}
			vdiotest.Check(t, v, disk)
		}
	}
}

func TestCHS(t *testing.T) {
	// Values of the specification's algorithm (also QEMU's).
	for _, c := range []struct {
		sectors int64
		c, h, s int
	}{{20480, 301, 4, 17}, {2097152, 2080, 16, 63}, {65535 * 16 * 255 * 2, 65535, 16, 255}} {
		cc, hh, ss := vdio.CHS(c.sectors)
		if cc != c.c || hh != c.h || ss != c.s {
			t.Errorf("CHS(%d) = %d/%d/%d, want %d/%d/%d", c.sectors, cc, hh, ss, c.c, c.h, c.s)
		}
	}
}

func TestBadHeaders(t *testing.T) {
	_, img := write(t, 4<<20, false, defaultBlock, 1)
	n := len(img)
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
	}{
		{"tiny", func(b []byte) []byte { return b[:100] }},
		{"footer checksum", func(b []byte) []byte { b[70]++; return b }},
		{"differencing", func(b []byte) []byte {
			vdio.BE.PutUint32(b[60:], typeDiff)
			vdio.BE.PutUint32(b[64:], checksum(b[:512], 64))
			return b
		}},
		{"header checksum", func(b []byte) []byte { b[512+40]++; return b }},
		{"BAT past end", func(b []byte) []byte {
			vdio.BE.PutUint64(b[512+16:], 1<<40)
			vdio.BE.PutUint32(b[512+36:], checksum(b[512:1536], 36))
			return b
		}},
		{"block size", func(b []byte) []byte {
			vdio.BE.PutUint32(b[512+32:], 3000)
			vdio.BE.PutUint32(b[512+36:], checksum(b[512:1536], 36))
			return b
		}},
		{"absurd size", func(b []byte) []byte {
			vdio.BE.PutUint64(b[48:], 1<<62)
			vdio.BE.PutUint32(b[64:], checksum(b[:512], 64))
			return b
		}},
		{"fixed too small", func(b []byte) []byte {
			f := bytes.Clone(b[n-512:])
			vdio.BE.PutUint32(f[60:], typeFixed)
			vdio.BE.PutUint32(f[64:], checksum(f, 64))
			return append(make([]byte, 1024), f...)
		}},
	} {
		b := c.edit(bytes.Clone(img))
		_, err := Open(bytes.NewReader(b), int64(len(b)), "bad.vhd")
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.File != "bad.vhd" || fe.Format != "vhd" {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
}

// seeds are small images of disks that are mostly zeros, with 4 KiB
// blocks, so that their fuzz inputs are small.
func seeds(t testing.TB) map[string][]byte {
	return map[string][]byte{
		"sauve-dynamic": writeDisk(t, vdiotest.SeedDisk(20480, 1), false, 4096, 1),
		"sauve-fixed":   writeDisk(t, vdiotest.SeedDisk(8192, 2), true, 4096, 2),
		"sauve-empty":   writeDisk(t, nil, false, 4096, 3),
	}
}

func fuzzOpen(r io.ReaderAt, size int64) (vdiotest.Image, int64, error) {
	v, err := Open(r, size, "fuzz.vhd")
	if err != nil {
		return nil, 0, err
	}
	return v, v.Size(), nil
}

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

func FuzzOpen(f *testing.F) { vdiotest.Fuzz(f, fuzzOpen) }

// TestWriteCorpus checks that the seeds of testdata/fuzz/FuzzOpen open,
// and refreshes them first when SAUVE_WRITE_CORPUS is set.
func TestWriteCorpus(t *testing.T) {
	vdiotest.FuzzCorpus(t, fuzzOpen, func() map[string][]byte { return seeds(t) })
}

// reFooter rewrites the footer at b[off:off+512] with edit applied and a
// fresh checksum.
func reFooter(b []byte, off int, edit func(f []byte)) {
	f := b[off : off+sector]
	edit(f)
	vdio.BE.PutUint32(f[64:], checksum(f, 64))
}

// TestProbe: a footer counts only where the file is what it describes.
func TestProbe(t *testing.T) {
	_, fixed := write(t, 1<<20, true, defaultBlock, 1)
	_, dyn := write(t, 1<<20, false, 4096, 2)
	_, empty := write(t, 0, true, defaultBlock, 3)
	stray := func(grow int) []byte {
		// A raw disk whose last sector is a fixed VHD's footer.
		b := make([]byte, len(fixed)+grow)
		copy(b[len(b)-sector:], fixed[len(fixed)-sector:])
		b[0] = 0xfa
		return b
	}
	for _, c := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"fixed", fixed, true},
		{"fixed of an empty disk", empty, true},
		{"dynamic", dyn, true},
		{"stray footer, larger file", stray(1 << 20), false},
		{"stray footer, one sector more", stray(sector), false},
		{"stray footer, one sector less", stray(-sector), false},
		{"dynamic, first sector damaged", func() []byte {
			b := bytes.Clone(dyn)
			clear(b[:sector])
			return b
		}(), true},
		{"stray dynamic footer", func() []byte {
			b := make([]byte, 4<<20)
			copy(b[len(b)-sector:], dyn[len(dyn)-sector:])
			return b
		}(), false},
		{"fixed footer copy at 0, nothing at the end", func() []byte {
			b := make([]byte, 4<<20)
			copy(b, fixed[len(fixed)-sector:])
			return b
		}(), false},
		{"zeros", make([]byte, 4096), false},
		{"tiny", []byte("conectix"), false},
	} {
		if got := Probe(bytes.NewReader(c.b), int64(len(c.b))); got != c.want {
			t.Errorf("%s: Probe = %v, want %v", c.name, got, c.want)
		}
	}
	// Open agrees: a fixed disk is exactly its data and the footer.
	b := stray(1 << 20)
	if _, err := Open(bytes.NewReader(b), int64(len(b)), "stray.img"); err == nil || !strings.Contains(err.Error(), "fixed disk of 1048576 bytes") {
		t.Fatalf("a stray footer opened: %v", err)
	}
}

// TestGeometrySize: Virtual PC and old QEMU disks are as large as their
// geometry, other creators' as their footer's current size (see the
// package documentation).
func TestGeometrySize(t *testing.T) {
	const size = 2 << 20 // C/H/S 60/4/17: 16 sectors less
	chs := int64(60 * 4 * 17 * sector)
	for _, fixed := range []bool{false, true} {
		disk, img := write(t, size, fixed, defaultBlock, 4)
		for _, c := range []struct {
			creator string
			geom    [3]int // C, H, S; zero: as written
			want    int64
		}{
			{"win ", [3]int{}, size},
			{"vpc ", [3]int{}, chs},
			{"qemu", [3]int{}, chs},
			{"vs  ", [3]int{}, size},
			{"d2v ", [3]int{}, size},
			{"qem2", [3]int{}, size},
			{"vbox", [3]int{}, size},
			{"vpc ", [3]int{65535, 16, 255}, size},
		} {
			b := bytes.Clone(img)
			edit := func(f []byte) {
				copy(f[28:32], c.creator)
				if c.geom[0] != 0 {
					vdio.BE.PutUint16(f[56:], uint16(c.geom[0]))
					f[58], f[59] = byte(c.geom[1]), byte(c.geom[2])
				}
			}
			reFooter(b, len(b)-sector, edit)
			if !fixed {
				reFooter(b, 0, edit)
			}
			v, err := Open(bytes.NewReader(b), int64(len(b)), "vpc.vhd")
			if err != nil {
				t.Fatalf("fixed %v, creator %q: %v", fixed, c.creator, err)
			}
			if v.Size() != c.want {
				t.Errorf("fixed %v, creator %q, geometry %v: size %d, want %d", fixed, c.creator, c.geom, v.Size(), c.want)
			}
			if _, byGeom := v.SizedByGeometry(); byGeom != (c.want != size) {
				t.Errorf("fixed %v, creator %q: SizedByGeometry %v", fixed, c.creator, byGeom)
			}
			vdiotest.Check(t, v, disk[:c.want])
		}
	}
	// A geometry larger than a fixed disk's data is refused, not read
	// into the footer.
	_, img := write(t, 1<<20, true, defaultBlock, 5)
	reFooter(img, len(img)-sector, func(f []byte) {
		copy(f[28:32], "vpc ")
		vdio.BE.PutUint16(f[56:], 1000)
		f[58], f[59] = 16, 63
	})
	if _, err := Open(bytes.NewReader(img), int64(len(img)), "big.vhd"); err == nil || !strings.Contains(err.Error(), "geometry") {
		t.Fatalf("geometry past the data: %v", err)
	}
}
