package source

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/vdisk"
	"github.com/sauve-backup/sauve/internal/vdisk/ova"
)

// guestDisk makes the disk a VM would hold: 64 MiB, an MBR and an empty
// ext4 partition of 48 MiB at 1 MiB.
func guestDisk(t *testing.T) string {
	t.Helper()
	fs := makeFS(t, fsKind{"ext4", "mkfs.ext4", "e2fsprogs", 48 << 20, []string{"mkfs.ext4", "-F", "-q"}})
	return partitioned(t, "dos", 64<<20, 48<<20, fs)
}

// prepare opens path and maps it as a backup does, reading every window
// the map gives; it returns the disk, its description and what was read.
func prepare(t *testing.T, path string, o Options, mo MapOptions) (*Disk, *repo.Disk, []byte) {
	t.Helper()
	src, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	d, err := OpenDisk(Live(src), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	l, err := d.Map(mo)
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, d.At, l.Map(), d.Size)
	l.WarnLate()
	var rd repo.Disk
	l.Describe(&rd)
	return d, &rd, got
}

// readAll reads a disk of size bytes through m in the 1 MiB windows a
// backup asks for; bytes m leaves out read as zeros.
func readAll(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, m extent.Map, size int64) []byte {
	t.Helper()
	if m == nil {
		m = extent.Full{}
	}
	out := make([]byte, size)
	const win = 1 << 20
	for off := int64(0); off < size; off += win {
		n := min(win, size-off)
		rs, err := m.Data(off, n)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := extent.ReadRanges(r, out[off:off+n], off, rs); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// writeOVA writes the disk at src as an OVA with sauve's own writer
// (qemu-img makes none).
func writeOVA(t *testing.T, src, out string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := vdisk.Create(f, vdisk.Options{Format: vdisk.OVA, Size: int64(len(b)), FileName: filepath.Base(out),
		OVA: ova.Options{Name: "guest", CPUs: 1, MemoryMiB: 512, Controller: "ide"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := vdisk.Copy(context.Background(), w, bytes.NewReader(b), nil, int64(len(b)), nil); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestVMImages: a VM disk image is read as the virtual disk it holds,
// whatever its format, and mapped inside it: the guest's partition and
// filesystem are found, its free space skipped, and what is read is the
// guest's disk. Raw reads the file's bytes as they are.
func TestVMImages(t *testing.T) {
	need(t, "qemu-img", "qemu-utils")
	guest := guestDisk(t)
	want, err := os.ReadFile(guest)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		qemu   []string // qemu-img convert options; nil: sauve writes an OVA
		format string
		raw    bool // --source-format raw
	}{
		{"raw", []string{"-O", "raw"}, vdisk.Raw, false},
		{"qcow2", []string{"-O", "qcow2"}, vdisk.QCOW2, false},
		{"vmdk", []string{"-O", "vmdk"}, vdisk.VMDK, false},
		{"vmdk streamOptimized", []string{"-O", "vmdk", "-o", "subformat=streamOptimized"}, vdisk.VMDK, false},
		{"vhd", []string{"-O", "vpc", "-o", "force_size=on"}, vdisk.VHD, false},
		{"vhd fixed", []string{"-O", "vpc", "-o", "subformat=fixed,force_size=on"}, vdisk.VHD, false},
		{"vhdx", []string{"-O", "vhdx"}, vdisk.VHDX, false},
		{"vdi", []string{"-O", "vdi"}, vdisk.VDI, false},
		{"ova", nil, vdisk.OVA, false},
		{"qcow2 read raw", []string{"-O", "qcow2"}, vdisk.Raw, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".img")
			if tc.qemu == nil {
				writeOVA(t, guest, img)
			} else {
				run(t, "qemu-img", append(append([]string{"convert", "-f", "raw"}, tc.qemu...), guest, img)...)
			}
			var warns []string
			d, rd, got := prepare(t, img, Options{Raw: tc.raw}, MapOptions{Warn: func(s string) { warns = append(warns, s) }})
			if d.Format != tc.format {
				t.Fatalf("read as %s, want %s", d.Format, tc.format)
			}
			if tc.raw {
				fi, _ := os.Stat(img)
				if d.Size != fi.Size() || d.At != d.View.At {
					t.Fatalf("read raw: %d bytes of a %d-byte file", d.Size, fi.Size())
				}
				return
			}
			if d.Size != int64(len(want)) {
				t.Fatalf("virtual size %d, want %d", d.Size, len(want))
			}
			if len(warns) != 0 {
				t.Fatalf("warnings: %q", warns)
			}
			if rd.PartitionTable != "mbr" || len(rd.Partitions) != 1 {
				t.Fatalf("description: %+v", rd)
			}
			p := rd.Partitions[0]
			if p.Filesystem != "ext4" || p.Start != 1<<20 || p.Size != 48<<20 || p.UsedBytes == nil || p.ImagedInFull != "" {
				t.Fatalf("partition: %+v", p)
			}
			if p.BytesSkipped < p.Size/2 || p.BytesRead > *p.UsedBytes+64<<10 {
				t.Fatalf("read %d, skipped %d, used %d of %d", p.BytesRead, p.BytesSkipped, *p.UsedBytes, p.Size)
			}
			// What was read is the guest's disk wherever the map has data;
			// the rest is free space (or holes), compared as zeros.
			l := mustMap(t, d)
			for off := int64(0); off < d.Size; off += 1 << 20 {
				rs, err := l.Map().Data(off, 1<<20)
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range rs {
					if !bytes.Equal(got[r.Start:r.End], want[r.Start:r.End]) {
						t.Fatalf("bytes [%d, %d) of the virtual disk differ from the guest's", r.Start, r.End)
					}
				}
			}
		})
	}
}

func mustMap(t *testing.T, d *Disk) *Layout {
	t.Helper()
	l, err := d.Map(MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestRefusedFormats: formats sauve recognises but does not read are
// refused with one error naming the file, the format and what to do;
// raw reads their bytes as they are.
func TestRefusedFormats(t *testing.T) {
	need(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	src := sparseFile(t, "src.img", 8<<20)
	if err := os.WriteFile(src, bytes.Repeat([]byte("some disk data "), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	type refused struct{ name, path, format string }
	var cases []refused
	for _, f := range []string{"qed", "parallels"} {
		p := filepath.Join(dir, "vm-"+f+".img")
		run(t, "qemu-img", "convert", "-f", "raw", "-O", f, src, p)
		cases = append(cases, refused{f, p, f})
	}
	need(t, "gzip", "gzip")
	gz := filepath.Join(dir, "disk.img.gz")
	run(t, "sh", "-c", "gzip -c "+src+" > "+gz)
	cases = append(cases, refused{"gzip", gz, "gzip"})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := mustOpen(t, tc.path)
			defer s.Close()
			_, err := OpenDisk(Live(s), Options{})
			if err == nil {
				t.Fatal("read")
			}
			msg := err.Error()
			for _, w := range []string{filepath.Base(tc.path), tc.format + ":", "--source-format raw"} {
				if !strings.Contains(msg, w) {
					t.Fatalf("error %q does not say %q", msg, w)
				}
			}
			t.Log(msg)
			if strings.Count(msg, "\n") != 0 {
				t.Fatalf("not one line: %q", msg)
			}
			d, err := OpenDisk(Live(s), Options{Raw: true})
			if err != nil || d.Format != vdisk.Raw || d.Size != s.Size {
				t.Fatalf("raw: %+v, %v", d, err)
			}
		})
	}
}

// TestDamagedImage: a truncated or garbled image is one error naming it,
// never a panic.
func TestDamagedImage(t *testing.T) {
	need(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", good, "64M")
	b, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"header only", b[:72]},
		{"L1 table past the end", func() []byte {
			c := bytes.Clone(b)
			copy(c[40:48], []byte{0x7f, 0, 0, 0, 0, 0, 0, 0}) // l1_table_offset
			return c
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".qcow2")
			os.WriteFile(p, tc.data, 0o600)
			s := mustOpen(t, p)
			defer s.Close()
			d, err := OpenDisk(Live(s), Options{})
			if err == nil {
				d.Close()
				t.Fatalf("read as %s of %d bytes", d.Format, d.Size)
			}
			if !strings.Contains(err.Error(), filepath.Base(p)) {
				t.Fatalf("error %q does not name the image", err)
			}
			t.Log(err)
		})
	}
}

// TestEmptyVirtualDisk: an image of a disk of 0 bytes is refused as an
// empty source is, though the file is not empty.
func TestEmptyVirtualDisk(t *testing.T) {
	need(t, "qemu-img", "qemu-utils")
	p := filepath.Join(t.TempDir(), "zero.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "0")
	s := mustOpen(t, p)
	defer s.Close()
	if err := s.RefuseEmpty("store an empty snapshot", "--allow-empty stores one"); err != nil {
		t.Fatalf("the file is refused: %v", err)
	}
	d, err := OpenDisk(Live(s), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	err = d.RefuseEmpty("store an empty snapshot", "--allow-empty stores one")
	want := "source " + p + " holds a disk of 0 bytes: refusing to store an empty snapshot (--allow-empty stores one)"
	if d.Format != vdisk.QCOW2 || d.Size != 0 || err == nil || err.Error() != want {
		t.Fatalf("%s of %d bytes: %v, want %q", d.Format, d.Size, err, want)
	}
}
