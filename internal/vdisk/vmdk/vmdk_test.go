package vmdk

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func write(t testing.TB, size int64, stream bool, grain int64, seed uint64) ([]byte, []byte) {
	disk := vdiotest.Disk(size, seed)
	return disk, writeDisk(t, disk, stream, grain, seed)
}

func writeDisk(t testing.TB, disk []byte, stream bool, grain int64, seed uint64) []byte {
	size := int64(len(disk))
	var f vdiotest.MemFile
	if stream {
		var buf bytes.Buffer
		w, err := newStreamWriter(&buf, size, Options{FileName: "t.vmdk"}, grain)
		if err != nil {
			t.Fatal(err)
		}
		vdiotest.Write(t, w, disk, seed)
		return buf.Bytes()
	}
	w, err := newSparseWriter(&f, size, Options{FileName: "t.vmdk"}, grain)
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, seed)
	return f.B
}

func TestRoundTrip(t *testing.T) {
	for _, stream := range []bool{false, true} {
		for _, c := range []struct{ size, grain int64 }{{0, 128}, {512, 128}, {3*65536 + 512, 128}, {33<<20 + 1536, 128}, {70000 / 512 * 512, 8}} {
			disk, img := write(t, c.size, stream, c.grain, uint64(c.size))
			v, err := Open(bytes.NewReader(img), int64(len(img)), "t.vmdk")
			if err != nil {
				t.Fatalf("stream %v size %d: %v", stream, c.size, err)
			}
			if v.Size() != c.size || v.Compressed() != stream {
				t.Fatalf("size %d read as %d", c.size, v.Size())
			}
			want := "monolithicSparse"
			if stream {
				want = "streamOptimized"
			}
			if v.CreateType != want {
				t.Fatalf("createType %q", v.CreateType)
			}
			vdiotest.Check(t, v, disk)
		}
	}
}

func TestBadHeaders(t *testing.T) {
	_, img := write(t, 1<<20, false, 128, 1)
	_, simg := write(t, 1<<20, true, 128, 1)
	for _, c := range []struct {
		name string
		img  []byte
		edit func(b []byte) []byte
	}{
		{"truncated", img, func(b []byte) []byte { return b[:100] }},
		{"version", img, func(b []byte) []byte { vdio.LE.PutUint32(b[4:], 9); return b }},
		{"grain size", img, func(b []byte) []byte { vdio.LE.PutUint64(b[20:], 3); return b }},
		{"huge grain", img, func(b []byte) []byte { vdio.LE.PutUint64(b[20:], 1<<20); return b }},
		{"capacity", img, func(b []byte) []byte { vdio.LE.PutUint64(b[12:], 1<<60); return b }},
		{"GD past end", img, func(b []byte) []byte { vdio.LE.PutUint64(b[56:], 1<<30); return b }},
		{"compression", img, func(b []byte) []byte { vdio.LE.PutUint32(b[8:], flagComp); vdio.LE.PutUint16(b[77:], 7); return b }},
		{"parent", img, func(b []byte) []byte {
			copy(b[512+bytes.Index(b[512:], []byte("parentCID=")):], "parentCID=12345678")
			return b
		}},
		{"stream without footer", simg, func(b []byte) []byte { return b[:len(b)-1024] }},
	} {
		b := c.edit(bytes.Clone(c.img))
		_, err := Open(bytes.NewReader(b), int64(len(b)), "bad.vmdk")
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.File != "bad.vmdk" || fe.Format != "vmdk" {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	// A grain table entry past the end is found when read.
	b := bytes.Clone(img)
	gt := int64(vdio.LE.Uint32(b[int64(vdio.LE.Uint64(b[56:]))*512:])) * 512
	vdio.LE.PutUint32(b[gt:], 1<<30)
	v, err := Open(bytes.NewReader(b), int64(len(b)), "bad.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("grain past the end of the file read without error")
	}
}

// seeds are small images of disks that are mostly zeros, with 4 KiB
// grains, so that their fuzz inputs are small.
func seeds(t testing.TB) map[string][]byte {
	return map[string][]byte{
		"sauve-sparse": writeDisk(t, vdiotest.SeedDisk(20480, 1), false, 8, 1),
		"sauve-stream": writeDisk(t, vdiotest.SeedDisk(20480, 2), true, 8, 2),
		"sauve-empty":  writeDisk(t, nil, false, 8, 3),
	}
}

func fuzzOpen(r io.ReaderAt, size int64) (vdiotest.Image, int64, error) {
	v, err := Open(r, size, "fuzz.vmdk")
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
