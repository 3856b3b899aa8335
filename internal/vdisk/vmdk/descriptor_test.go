package vmdk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

// memFiles opens extents from memory.
func memFiles(files map[string][]byte) Opener {
	return func(name string) (io.ReaderAt, int64, io.Closer, error) {
		b, ok := files[name]
		if !ok {
			return nil, 0, nil, fmt.Errorf("open %s: %w", name, os.ErrNotExist)
		}
		return bytes.NewReader(b), int64(len(b)), io.NopCloser(nil), nil
	}
}

func descriptorText(extents string) []byte {
	return []byte("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"custom\"\n\n# Extent description\n" +
		extents + "\n# The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n")
}

func TestDescriptor(t *testing.T) {
	// flat (with an offset), zero, sparse, flat: reads cross extents.
	flat := vdiotest.Disk(64<<10+4096, 1)
	sdisk, simg := write(t, 20480, false, 8, 2)
	files := map[string][]byte{"a-flat.vmdk": flat, "b-s001.vmdk": simg}
	text := descriptorText(`RW 128 FLAT "a-flat.vmdk" 8
RW 16 ZERO
RDONLY 40 SPARSE "b-s001.vmdk"
RW 8 FLAT "a-flat.vmdk" 0`)
	d, err := OpenDescriptor(bytes.NewReader(text), int64(len(text)), "d.vmdk", memFiles(files))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	want := append(append(append(bytes.Clone(flat[4096:4096+65536]), make([]byte, 8192)...), sdisk...), flat[:4096]...)
	if d.Size() != int64(len(want)) || d.CreateType != "custom" {
		t.Fatalf("size %d, want %d", d.Size(), len(want))
	}
	vdiotest.Check(t, d, want)
	got := make([]byte, 10000)
	if _, err := d.ReadAt(got, 60000); err != nil || !bytes.Equal(got, want[60000:70000]) {
		t.Fatalf("read across extents: %v", err)
	}
}

func TestDescriptorErrors(t *testing.T) {
	_, simg := write(t, 4096, false, 8, 3)
	files := map[string][]byte{"f.vmdk": make([]byte, 8192), "s.vmdk": simg}
	for _, c := range []struct{ name, extents string }{
		{"no extent", ""},
		{"missing file", `RW 8 FLAT "gone.vmdk" 0`},
		{"flat too short", `RW 100 FLAT "f.vmdk" 0`},
		{"flat offset", `RW 8 FLAT "f.vmdk" 15`},
		{"sparse too small", `RW 100 SPARSE "s.vmdk"`},
		{"escape", `RW 8 FLAT "../f.vmdk" 0`},
		{"absolute", `RW 8 FLAT "/etc/f.vmdk" 0`},
		{"unknown type", `RW 8 VMFSSPARSE "f.vmdk"`},
		{"noaccess", `NOACCESS 8 FLAT "f.vmdk" 0`},
		{"size", `RW -8 FLAT "f.vmdk" 0`},
		{"huge", `RW 9999999999999999 ZERO`},
		{"no name", `RW 8 FLAT f.vmdk 0`},
		{"sparse not sparse", `RW 8 SPARSE "f.vmdk"`},
	} {
		text := descriptorText(c.extents)
		_, err := OpenDescriptor(bytes.NewReader(text), int64(len(text)), "d.vmdk", memFiles(files))
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.Format != "vmdk" {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	text := bytes.Replace(descriptorText(`RW 8 FLAT "f.vmdk" 0`), []byte("parentCID=ffffffff"), []byte("parentCID=0badf00d"), 1)
	if _, err := OpenDescriptor(bytes.NewReader(text), int64(len(text)), "d.vmdk", memFiles(files)); !errors.Is(err, vdio.ErrUnsupported) {
		t.Fatalf("delta disk: %v", err)
	}
}

func descriptorSeeds(t testing.TB) map[string][][]byte {
	return map[string][][]byte{
		"flat-zero-sparse": {descriptorText("RW 16 FLAT \"f.vmdk\" 2\nRW 16 ZERO\nRW 40 SPARSE \"s.vmdk\"")},
		"split":            {descriptorText("RW 8 SPARSE \"s.vmdk\"\nRW 8 SPARSE \"s.vmdk\"\nRW 4 FLAT \"f.vmdk\" 0")},
	}
}

// FuzzDescriptor opens a descriptor file (the input, as text) whose
// extents are two files in memory, and reads part of the disk
// (vdiotest.Exercise); at places what is read.
func FuzzDescriptor(f *testing.F) {
	_, simg := write(f, 20480, false, 8, 4)
	files := map[string][]byte{"f.vmdk": vdiotest.Disk(16384, 5), "s.vmdk": simg}
	f.Fuzz(func(t *testing.T, b []byte, at uint64) {
		d, err := OpenDescriptor(bytes.NewReader(b), int64(len(b)), "fuzz.vmdk", memFiles(files))
		if err != nil {
			return
		}
		vdiotest.Exercise(t, d, d.Size(), at)
		d.Close()
	})
}

// TestWriteDescriptorCorpus refreshes testdata/fuzz/FuzzDescriptor when
// SAUVE_WRITE_CORPUS is set.
func TestWriteDescriptorCorpus(t *testing.T) {
	if os.Getenv("SAUVE_WRITE_CORPUS") == "" {
		t.Skip("set SAUVE_WRITE_CORPUS=1 to rewrite the seed corpus")
	}
	vdiotest.WriteCorpus(t, "FuzzDescriptor", descriptorSeeds(t), "uint64(5000)")
}
