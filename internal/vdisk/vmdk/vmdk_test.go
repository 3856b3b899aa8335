package vmdk

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func write(t testing.TB, size int64, stream bool, grain int64, seed uint64) ([]byte, []byte) {
	disk := vdiotest.Disk(size, seed)
	var f vdiotest.MemFile
	if stream {
		var buf bytes.Buffer
		w, err := newStreamWriter(&buf, size, Options{FileName: "t.vmdk"}, grain)
		if err != nil {
			t.Fatal(err)
		}
		vdiotest.Write(t, w, disk, seed)
		return disk, buf.Bytes()
	}
	w, err := newSparseWriter(&f, size, Options{FileName: "t.vmdk"}, grain)
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, seed)
	return disk, f.B
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

func seeds(t testing.TB) map[string][][]byte {
	s := map[string][][]byte{}
	_, a := write(t, 20480, false, 8, 1)
	_, b := write(t, 20480, true, 8, 2)
	_, c := write(t, 0, false, 8, 3)
	s["sauve-sparse"], s["sauve-stream"], s["sauve-empty"] = [][]byte{a}, [][]byte{b}, [][]byte{c}
	return s
}

func FuzzOpen(f *testing.F) {
	for _, s := range seeds(f) {
		f.Add(s[0])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := Open(bytes.NewReader(b), int64(len(b)), "fuzz.vmdk")
		if err != nil {
			return
		}
		vdiotest.Exercise(v, v.Size())
	})
}

// TestWriteCorpus refreshes testdata/fuzz/FuzzOpen when
// SAUVE_WRITE_CORPUS is set.
func TestWriteCorpus(t *testing.T) {
	if os.Getenv("SAUVE_WRITE_CORPUS") == "" {
		t.Skip("set SAUVE_WRITE_CORPUS=1 to rewrite the seed corpus")
	}
	vdiotest.WriteCorpus(t, "FuzzOpen", seeds(t))
}
