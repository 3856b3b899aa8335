package vdisk

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

// image writes disk in format f (subformat sub) and returns the file.
func image(t testing.TB, f, sub string, disk []byte) []byte {
	t.Helper()
	var m vdiotest.MemFile
	w, err := Create(&m, Options{Format: f, Subformat: sub, Size: int64(len(disk)), FileName: "disk", OVA: ovaOpts()})
	if err != nil {
		t.Fatal(err)
	}
	if err := Copy(context.Background(), w, bytes.NewReader(disk), nil, int64(len(disk)), nil); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return m.B
}

type member struct{ name, data string }

// ovaOf makes an OVA whose descriptor lists disks (file names; "" for a
// blank disk) and holds the members after it.
func ovaOf(t testing.TB, disks []string, members ...member) []byte {
	t.Helper()
	var refs, ds string
	for i, d := range disks {
		id := string(rune('1' + i))
		if d == "" {
			ds += `<Disk ovf:diskId="vmdisk` + id + `" ovf:capacity="1048576"/>`
			continue
		}
		refs += `<File ovf:id="file` + id + `" ovf:href="` + d + `"/>`
		ds += `<Disk ovf:diskId="vmdisk` + id + `" ovf:fileRef="file` + id + `" ovf:capacity="1048576"/>`
	}
	desc := `<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>` +
		refs + `</References><DiskSection>` + ds + `</DiskSection></Envelope>`
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, m := range append([]member{{"vm.ovf", desc}}, members...) {
		if err := tw.WriteHeader(&tar.Header{Name: m.name, Size: int64(len(m.data)), Mode: 0o644, Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(m.data))
	}
	tw.Close()
	return b.Bytes()
}

// TestOpenOVA: an OVA is read as its one disk, whatever format that disk
// is in; what sauve cannot read in it is refused, naming it.
func TestOpenOVA(t *testing.T) {
	disk := vdiotest.Disk(1<<20+512, 12)
	sparse := string(image(t, VMDK, "monolithicSparse", disk))
	flatDesc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2049 FLAT \"disk-flat.vmdk\" 0\n"
	for _, c := range []struct {
		name   string
		ova    []byte
		format string // the disk's; "" when refused
		err    []string
	}{
		{"monolithicSparse", ovaOf(t, []string{"disk.vmdk"}, member{"disk.vmdk", sparse}), "vmdk monolithicSparse", nil},
		{"qcow2", ovaOf(t, []string{"disk.qcow2"}, member{"disk.qcow2", string(image(t, QCOW2, "", disk))}), "qcow2 version 3", nil},
		{"raw", ovaOf(t, []string{"disk.img"}, member{"disk.img", string(disk)}), "raw", nil},
		{"descriptor and flat extent", ovaOf(t, []string{"d/disk.vmdk"}, member{"d/disk.vmdk", flatDesc}, member{"d/disk-flat.vmdk", string(disk)}), "vmdk monolithicFlat", nil},
		{"two disks", ovaOf(t, []string{"a.vmdk", "b.vmdk"}, member{"a.vmdk", sparse}, member{"b.vmdk", sparse}), "",
			[]string{"vm.ova", "the OVA holds 2 disks, vmdisk1 (a.vmdk), vmdisk2 (b.vmdk)", "tar -xf vm.ova"}},
		{"a disk and a blank one", ovaOf(t, []string{"a.vmdk", ""}, member{"a.vmdk", sparse}), "", []string{"2 disks", "vmdisk2 (blank, no file)"}},
		{"blank disk only", ovaOf(t, []string{""}), "", []string{"vmdisk1, has no file"}},
		{"missing extent", ovaOf(t, []string{"disk.vmdk"}, member{"disk.vmdk", flatDesc}), "", []string{"member disk.vmdk at byte", "disk-flat.vmdk"}},
		{"damaged VMDK", ovaOf(t, []string{"disk.vmdk"}, member{"disk.vmdk", sparse[:2048]}), "", []string{"vm.ova, member disk.vmdk at byte 1536", "vmdk", "offset"}},
		{"gzip member", ovaOf(t, []string{"disk.vmdk"}, member{"disk.vmdk", string(foreignFiles(t)["gzip"])}), "", []string{"member disk.vmdk, is a gzip-compressed file"}},
		{"OVA in an OVA", ovaOf(t, []string{"inner.ova"}, member{"inner.ova", string(image(t, OVA, "", disk))}), "", []string{"is itself an OVA"}},
	} {
		img, err := Open(bytes.NewReader(c.ova), int64(len(c.ova)), "vm.ova", nil)
		if c.format == "" {
			if err == nil {
				t.Errorf("%s: opened", c.name)
				continue
			}
			for _, w := range c.err {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: %v lacks %q", c.name, err, w)
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if img.Format != OVA || !strings.HasSuffix(img.Detail, ", "+c.format) || img.Size != int64(len(disk)) {
			t.Errorf("%s: %s %q, %d bytes", c.name, img.Format, img.Detail, img.Size)
		}
		if img.Map == nil {
			img.Map = extent.Full{}
		}
		vdiotest.Check(t, struct{ *Image }{img}, disk)
		img.Close()
	}
}

// overlay writes a qcow2 image at path whose backing file is backing
// (raw): an image sauve wrote, with the backing file's name patched into
// its header.
func overlay(t *testing.T, path, backing string, size int64) {
	t.Helper()
	b := image(t, QCOW2, "", make([]byte, size))
	const at = 1024 // unused room in the header cluster
	copy(b[at:], backing)
	vdio.BE.PutUint64(b[8:], at)
	vdio.BE.PutUint32(b[16:], uint32(len(backing)))
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestBackingConfined: backing files lie in the overlay's folder or
// below it, symlinks followed, unless AllowOutside.
func TestBackingConfined(t *testing.T) {
	dir := t.TempDir()
	disk := vdiotest.Disk(64<<10, 13)
	put := func(name string, b []byte) {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	put("vm/base.raw", disk)
	put("vm/sub/base.raw", disk)
	put("secret.raw", disk)
	if err := os.Symlink("../secret.raw", filepath.Join(dir, "vm/link.raw")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("base.raw", filepath.Join(dir, "vm/inlink.raw")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		backing string
		ok      bool
	}{
		{"base.raw", true},
		{"sub/base.raw", true},
		{filepath.Join(dir, "vm/base.raw"), true},
		{"inlink.raw", true},
		{"./sub/../base.raw", true},
		{"../secret.raw", false},
		{filepath.Join(dir, "secret.raw"), false},
		{"link.raw", false},
		{"/etc/passwd", false},
	} {
		top := filepath.Join(dir, "vm", "top.qcow2")
		overlay(t, top, c.backing, int64(len(disk)))
		for _, allow := range []bool{false, true} {
			f, err := os.Open(top)
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := f.Stat()
			img, err := OpenWith(f, fi.Size(), top, nil, OpenOptions{AllowOutside: allow})
			switch {
			case c.ok || allow && c.backing != "/etc/passwd":
				if err != nil {
					t.Errorf("backing %s (allow %v): %v", c.backing, allow, err)
					break
				}
				vdiotest.Check(t, struct{ *Image }{img}, disk)
				img.Close()
			case allow:
				// /etc/passwd is no disk of the right size; reading it
				// is all that is asked.
				if err == nil {
					img.Close()
				}
			default:
				if err == nil || !errors.Is(err, vdio.ErrUnsupported) || !strings.Contains(err.Error(), "--allow-backing-outside") ||
					!strings.Contains(err.Error(), c.backing) || !strings.Contains(err.Error(), "top.qcow2") {
					t.Errorf("backing %s: %v", c.backing, err)
				}
			}
			f.Close()
		}
	}
	// VMDK extents that are symlinks out of the folder are refused too.
	put("vm/flat.vmdk", []byte("# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 128 FLAT \"out-flat.vmdk\" 0\n"))
	if err := os.Symlink("../secret.raw", filepath.Join(dir, "vm/out-flat.vmdk")); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "vm/flat.vmdk")
	b, _ := os.ReadFile(p)
	if _, err := Open(bytes.NewReader(b), int64(len(b)), p, nil); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Fatalf("extent symlinked out of the folder: %v", err)
	}
	img, err := OpenWith(bytes.NewReader(b), int64(len(b)), p, nil, OpenOptions{AllowOutside: true})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
}
