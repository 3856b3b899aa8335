package qcow2

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/fuzzimg"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func write(t testing.TB, size int64, bits uint, seed uint64) ([]byte, []byte) {
	disk := vdiotest.Disk(size, seed)
	var f vdiotest.MemFile
	w, err := newWriter(&f, size, bits)
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, seed)
	return disk, f.B
}

func TestRoundTrip(t *testing.T) {
	for _, c := range []struct {
		size int64
		bits uint
	}{{0, 16}, {512, 16}, {3*65536 + 512, 16}, {5<<20 + 4096*3 + 512, 16}, {70000, 9}, {1 << 20, 12}} {
		disk, img := write(t, c.size, c.bits, uint64(c.size))
		q, err := Open(bytes.NewReader(img), int64(len(img)), "test.qcow2")
		if err != nil {
			t.Fatalf("size %d: %v", c.size, err)
		}
		if q.Size() != c.size {
			t.Fatalf("size %d read as %d", c.size, q.Size())
		}
		vdiotest.Check(t, q, disk)
	}
}

func TestWriterOrder(t *testing.T) {
	var f vdiotest.MemFile
	w, _ := NewWriter(&f, 1<<20)
	w.WriteAt([]byte{1}, 100000)
	if _, err := w.WriteAt([]byte{1}, 50); !errors.Is(err, vdio.ErrOrder) {
		t.Fatalf("backward write: %v", err)
	}
	if _, err := w.WriteAt([]byte{1}, 1<<20); err == nil {
		t.Fatal("write past the end accepted")
	}
}

// TestBadHeaders: damaged headers get a FormatError naming the file,
// the format and an offset.
func TestBadHeaders(t *testing.T) {
	_, img := write(t, 1<<20, 16, 1)
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
	}{
		{"truncated header", func(b []byte) []byte { return b[:50] }},
		{"version 1", func(b []byte) []byte { vdio.BE.PutUint32(b[4:], 1); return b }},
		{"cluster bits", func(b []byte) []byte { vdio.BE.PutUint32(b[20:], 40); return b }},
		{"absurd size", func(b []byte) []byte { vdio.BE.PutUint64(b[24:], 1<<62); return b }},
		{"L1 too small", func(b []byte) []byte { vdio.BE.PutUint32(b[36:], 0); return b }},
		{"L1 past end", func(b []byte) []byte { vdio.BE.PutUint64(b[40:], 1<<40); return b }},
		{"encrypted", func(b []byte) []byte { vdio.BE.PutUint32(b[32:], 2); return b }},
		{"backing file", func(b []byte) []byte { vdio.BE.PutUint64(b[8:], 512); vdio.BE.PutUint32(b[16:], 4); return b }},
		{"unknown feature", func(b []byte) []byte { vdio.BE.PutUint64(b[72:], 1<<40); return b }},
		{"L1 entry unaligned", func(b []byte) []byte { vdio.BE.PutUint64(b[65536:], 1000|flagCopied); return b }},
	} {
		b := c.edit(bytes.Clone(img))
		_, err := Open(bytes.NewReader(b), int64(len(b)), "bad.qcow2")
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.File != "bad.qcow2" || fe.Format != "qcow2" {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	// L2 table past the end: found when read.
	b := bytes.Clone(img)
	vdio.BE.PutUint64(b[65536:], 1<<30|flagCopied)
	q, err := Open(bytes.NewReader(b), int64(len(b)), "bad.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("L2 table past the end of the file read without error")
	}
}

// seeds are images of this writer, small and with 512-byte clusters, of
// disks that are mostly zeros, so that their fuzz inputs are small.
func seeds(t testing.TB) map[string][]byte {
	s := map[string][]byte{}
	for i, c := range []struct {
		size int64
		bits uint
	}{{4096, 9}, {20000, 9}, {0, 9}} {
		var f vdiotest.MemFile
		w, err := newWriter(&f, c.size, c.bits)
		if err != nil {
			t.Fatal(err)
		}
		vdiotest.Write(t, w, vdiotest.SeedDisk(c.size, uint64(i)), uint64(i))
		s["sauve-"+string(rune('a'+i))] = f.B
	}
	return s
}

// fuzzBase is the backing disk of the images FuzzOpen opens.
var fuzzBase = vdiotest.Disk(100000, 5)

func fuzzOpen(r io.ReaderAt, size int64) (vdiotest.Image, int64, error) {
	q, err := OpenWithBacking(r, size, "fuzz.qcow2", func(string, string) (Backing, error) {
		return memBacking{bytes.NewReader(fuzzBase), int64(len(fuzzBase))}, nil
	})
	if err != nil {
		return nil, 0, err
	}
	return q, q.Size(), nil
}

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

func FuzzOpen(f *testing.F) { vdiotest.Fuzz(f, fuzzOpen) }

// TestWriteCorpus checks that the seeds of testdata/fuzz/FuzzOpen open,
// and refreshes them first when SAUVE_WRITE_CORPUS is set: images of
// this writer, and small ones of qemu-img (deflate and zstd compressed,
// version 2, extended L2 entries).
func TestWriteCorpus(t *testing.T) {
	vdiotest.FuzzCorpus(t, fuzzOpen, func() map[string][]byte {
		s := seeds(t)
		dir := t.TempDir()
		raw := filepath.Join(dir, "src.raw")
		os.WriteFile(raw, vdiotest.SeedDisk(40000, 7), 0o644)
		for name, opts := range map[string][]string{
			"qemu-deflate":  {"-c", "-o", "cluster_size=512"},
			"qemu-zstd":     {"-c", "-o", "cluster_size=512,compression_type=zstd"},
			"qemu-v2":       {"-o", "cluster_size=512,compat=0.10"},
			"qemu-extended": {"-o", "cluster_size=16384,extended_l2=on"},
		} {
			out := filepath.Join(dir, name)
			if o, err := exec.Command("qemu-img", append(append([]string{"convert", "-f", "raw", "-O", "qcow2"}, opts...), raw, out)...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img: %v\n%s", err, o)
			}
			s[name], _ = os.ReadFile(out)
		}
		return s
	})
}

type memBacking struct {
	*bytes.Reader
	size int64
}

func (m memBacking) Size() int64 { return m.size }
func (m memBacking) Data(off, n int64) ([]extent.Range, error) {
	return []extent.Range{{Start: off, End: off + n}}, nil
}

func TestBacking(t *testing.T) {
	// An overlay with clusters at 0 and 128 KiB, over a backing disk
	// shorter than it.
	const size = 1 << 20
	top := make([]byte, size)
	copy(top, bytes.Repeat([]byte{0xaa}, 65536))
	copy(top[131072:], bytes.Repeat([]byte{0xbb}, 65536))
	var f vdiotest.MemFile
	w, _ := NewWriter(&f, size)
	vdiotest.Write(t, w, top, 1)
	img := f.B
	vdio.BE.PutUint32(img[112:], 0xe2792aca)
	vdio.BE.PutUint32(img[116:], 3)
	copy(img[120:], "raw")
	vdio.BE.PutUint64(img[8:], 200)
	vdio.BE.PutUint32(img[16:], 8)
	copy(img[200:], "base.img")
	base := vdiotest.Disk(700000, 3)
	var gotName, gotFmt string
	q, err := OpenWithBacking(bytes.NewReader(img), int64(len(img)), "top.qcow2", func(name, f string) (Backing, error) {
		gotName, gotFmt = name, f
		return memBacking{bytes.NewReader(base), int64(len(base))}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if gotName != "base.img" || gotFmt != "raw" || q.BackingFile != "base.img" {
		t.Fatalf("backing %q format %q", gotName, gotFmt)
	}
	want := make([]byte, size)
	copy(want, base)
	copy(want, top[:65536])
	copy(want[131072:], top[131072:196608])
	vdiotest.Check(t, q, want)
	if _, err := Open(bytes.NewReader(img), int64(len(img)), "top.qcow2"); !errors.Is(err, vdio.ErrUnsupported) {
		t.Fatalf("Open of an overlay: %v", err)
	}
	// A backing file name longer than the header allows.
	vdio.BE.PutUint32(img[16:], 5000)
	if _, err := OpenWithBacking(bytes.NewReader(img), int64(len(img)), "top.qcow2", nil); err == nil {
		t.Fatal("backing file name of 5000 bytes accepted")
	}
}
