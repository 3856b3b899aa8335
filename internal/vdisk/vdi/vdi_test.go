package vdi

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
		for _, c := range []struct{ size, block int64 }{{0, mib}, {512, mib}, {5<<20 + 1536, mib}, {70000 / 512 * 512, 4096}} {
			disk, img := write(t, c.size, fixed, c.block, uint64(c.size))
			v, err := Open(bytes.NewReader(img), int64(len(img)), "t.vdi")
			if err != nil {
				t.Fatalf("fixed %v size %d: %v", fixed, c.size, err)
			}
			if v.Size() != c.size {
				t.Fatalf("size %d read as %d", c.size, v.Size())
			}
			vdiotest.Check(t, v, disk)
		}
	}
}

func TestBadHeaders(t *testing.T) {
	_, img := write(t, 4<<20, false, mib, 1)
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
	}{
		{"tiny", func(b []byte) []byte { return b[:100] }},
		{"version", func(b []byte) []byte { vdio.LE.PutUint32(b[68:], 0x00020000); return b }},
		{"differencing", func(b []byte) []byte { vdio.LE.PutUint32(b[76:], typeDiff); return b }},
		{"sector size", func(b []byte) []byte { vdio.LE.PutUint32(b[360:], 4096); return b }},
		{"block size", func(b []byte) []byte { vdio.LE.PutUint32(b[376:], 3000); return b }},
		{"absurd size", func(b []byte) []byte { vdio.LE.PutUint64(b[368:], 1<<62); return b }},
		{"too few blocks", func(b []byte) []byte { vdio.LE.PutUint32(b[384:], 1); return b }},
		{"map past end", func(b []byte) []byte { vdio.LE.PutUint32(b[340:], 1<<31); return b }},
		{"block past end", func(b []byte) []byte { vdio.LE.PutUint32(b[mib:], 1000); return b }},
	} {
		b := c.edit(bytes.Clone(img))
		_, err := Open(bytes.NewReader(b), int64(len(b)), "bad.vdi")
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.File != "bad.vdi" || fe.Format != "vdi" {
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
	v, err := Open(r, size, "fuzz.vdi")
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
