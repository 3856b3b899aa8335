package vhd

import (
	"bytes"
	"errors"
	"io"
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
