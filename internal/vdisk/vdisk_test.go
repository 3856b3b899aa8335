package vdisk

import (
	"bytes"
	"context"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func TestParseFormat(t *testing.T) {
	for _, c := range []struct {
		f, sub, wf, wsub string
		err              bool
	}{
		{"qcow2", "", "qcow2", "", false},
		{"VMDK", "", "vmdk", "monolithicSparse", false},
		{"vmdk", "streamoptimized", "vmdk", "streamOptimized", false},
		{"vpc", "fixed", "vhd", "fixed", false},
		{"vdi", "", "vdi", "dynamic", false},
		{"vmdk", "flat", "", "", true},
		{"qcow2", "fixed", "", "", true},
		{"iso", "", "", "", true},
	} {
		f, sub, err := ParseFormat(c.f, c.sub)
		if (err != nil) != c.err || f != c.wf || sub != c.wsub {
			t.Errorf("ParseFormat(%q, %q) = %q, %q, %v", c.f, c.sub, f, sub, err)
		}
	}
	for name, want := range map[string]string{"a.QCOW2": "qcow2", "b.vhd": "vhd", "c.img": "raw", "d.ova": "ova", "e.vhdx": "vhdx", "f.txt": ""} {
		if got := FromExtension(name); got != want {
			t.Errorf("FromExtension(%q) = %q, want %q", name, got, want)
		}
	}
	if RoundSize(Raw, 1001) != 1001 || RoundSize(QCOW2, 1001) != 1024 {
		t.Error("RoundSize")
	}
}

// TestEveryFormat writes a disk in every format and opens it back by
// detection alone.
func TestEveryFormat(t *testing.T) {
	const size = 3<<20 + 1536
	disk := vdiotest.Disk(size, 9)
	for _, c := range []struct{ f, sub, detail string }{
		{Raw, "", ""}, {QCOW2, "", "version 3"}, {VMDK, "monolithicSparse", "monolithicSparse"}, {VMDK, "streamOptimized", "streamOptimized"},
		{VHD, "dynamic", "dynamic"}, {VHD, "fixed", "fixed"}, {VHDX, "", ""}, {VDI, "dynamic", ""}, {VDI, "fixed", ""},
	} {
		var f vdiotest.MemFile
		w, err := Create(&f, Options{Format: c.f, Subformat: c.sub, Size: size, FileName: "t"})
		if err != nil {
			t.Fatal(err)
		}
		src := bytes.NewReader(disk)
		if err := Copy(context.Background(), w, src, nil, size, nil); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		img, err := Open(bytes.NewReader(f.B), int64(len(f.B)), "t", nil)
		if err != nil {
			t.Fatalf("%s %s: %v", c.f, c.sub, err)
		}
		if img.Format != c.f || img.Detail != c.detail || img.Size != size {
			t.Fatalf("%s %s detected as %s %q, size %d", c.f, c.sub, img.Format, img.Detail, img.Size)
		}
		if img.Map == nil {
			img.Map = extent.Full{}
		}
		vdiotest.Check(t, struct {
			*Image
		}{img}, disk)
	}
}

func TestTooLarge(t *testing.T) {
	var f vdiotest.MemFile
	if _, err := Create(&f, Options{Format: VHD, Subformat: "dynamic", Size: 3 << 40}); err == nil {
		t.Fatal("a 3 TiB VHD was accepted")
	}
	if _, err := Create(&f, Options{Format: VMDK, Size: 3 << 40}); err == nil {
		t.Fatal("a 3 TiB VMDK was accepted")
	}
}

// pieces is a PieceReader over a byte slice that hands out pieces of at
// most 1000 bytes, zeros as nil, and counts what ReadAt reads.
type pieces struct {
	b     []byte
	reads int
}

func (p *pieces) ReadAt(b []byte, off int64) (int, error) {
	p.reads++
	return bytes.NewReader(p.b).ReadAt(b, off)
}

func (p *pieces) ReadEach(off, n int64, fn func(off, n int64, data []byte) error) error {
	for end := off + n; off < end; {
		k := min(1000, end-off)
		data := p.b[off : off+k]
		if bytes.Count(data, []byte{0}) == len(data) {
			data = nil
		}
		if err := fn(off, k, data); err != nil {
			return err
		}
		off += k
	}
	return nil
}

// TestCopyPieces: a PieceReader is copied from its pieces, not read
// into a buffer, and the image is the same.
func TestCopyPieces(t *testing.T) {
	const size = 1<<20 + 512
	disk := vdiotest.Disk(size, 4)
	clear(disk[100000:300000])
	src := &pieces{b: disk}
	var f vdiotest.MemFile
	w, err := Create(&f, Options{Format: QCOW2, Size: size, FileName: "t"})
	if err != nil {
		t.Fatal(err)
	}
	var prog Progress
	m := extent.Full{}
	if err := Copy(context.Background(), w, src, m, size, &prog); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if src.reads != 0 || prog.Done.Load() != size || prog.Read.Load() >= size {
		t.Fatalf("%d ReadAt calls, progress done %d read %d", src.reads, prog.Done.Load(), prog.Read.Load())
	}
	img, err := Open(bytes.NewReader(f.B), int64(len(f.B)), "t", nil)
	if err != nil {
		t.Fatal(err)
	}
	img.Map = extent.Full{}
	vdiotest.Check(t, struct{ *Image }{img}, disk)
}
