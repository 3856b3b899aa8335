package ova

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

// file is a member of a test archive.
type file struct {
	name string
	data string
	typ  byte // tar.TypeReg unless set
}

// archive makes a tar of the files, in order.
func archive(t testing.TB, format tar.Format, files ...file) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, f := range files {
		typ := f.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		h := &tar.Header{Name: f.name, Typeflag: typ, Size: int64(len(f.data)), Mode: 0o644, ModTime: time.Unix(1700000000, 0), Format: format}
		if typ == tar.TypeDir {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if typ != tar.TypeDir {
			tw.Write([]byte(f.data))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// ovf returns a descriptor whose References and DiskSection hold refs
// and disks (XML fragments).
func ovf(refs, disks string) string {
	return `<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="2.0" xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2">
  <References>` + refs + `</References>
  <DiskSection><Info>Virtual disks</Info>` + disks + `</DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info></VirtualSystem>
</Envelope>
`
}

func ref(id, href string) string { return fmt.Sprintf(`<File ovf:id="%s" ovf:href="%s"/>`, id, href) }
func disk(id, file string) string {
	return fmt.Sprintf(`<Disk ovf:capacity="1048576" ovf:diskId="%s" ovf:fileRef="%s" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>`, id, file)
}

func TestReadOwnOVA(t *testing.T) {
	var f vdiotest.MemFile
	w, err := NewWriter(&f, 1<<20, Options{Name: "vm", CPUs: 1, MemoryMiB: 512, Controller: "sata"})
	if err != nil {
		t.Fatal(err)
	}
	w.WriteAt(bytes.Repeat([]byte{7}, 8192), 4096)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !IsTar(f.B) {
		t.Fatal("IsTar: false")
	}
	if first, ok := Sniff(bytes.NewReader(f.B), int64(len(f.B))); !ok || first != "vm.ovf" {
		t.Fatalf("Sniff = %q, %v", first, ok)
	}
	p, err := Read(bytes.NewReader(f.B), int64(len(f.B)), "vm.ova")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Disks) != 1 || p.Disks[0].File == nil || p.Disks[0].File.Name != "vm-disk1.vmdk" || p.Disks[0].ID != "vmdisk1" {
		t.Fatalf("disks %+v", p.Disks)
	}
	m := p.Disks[0].File
	if string(f.B[m.Offset:m.Offset+4]) != "KDMV" || m.Offset%512 != 0 || m.Offset+m.Size > int64(len(f.B)) {
		t.Fatalf("member %+v does not locate the VMDK", m)
	}
}

func TestRead(t *testing.T) {
	vmdk := "KDMV" + strings.Repeat("x", 1000)
	d1 := ovf(ref("f1", "disk1.vmdk"), disk("vmdisk1", "f1"))
	for _, c := range []struct {
		name  string
		b     []byte
		disks []string // labels; nil: an error containing err
		err   string
	}{
		{"one disk", archive(t, tar.FormatUSTAR, file{"vm.ovf", d1, 0}, file{"vm.mf", "x", 0}, file{"disk1.vmdk", vmdk, 0}), []string{"vmdisk1 (disk1.vmdk)"}, ""},
		{"PAX headers and ./ names", archive(t, tar.FormatPAX, file{"./vm.ovf", d1, 0}, file{"./disk1.vmdk", vmdk, 0}), []string{"vmdisk1 (disk1.vmdk)"}, ""},
		{"GNU format, a folder", archive(t, tar.FormatGNU, file{"vm.ovf", ovf(ref("f1", "d/disk1.vmdk"), disk("vmdisk1", "f1")), 0}, file{"d/", "", tar.TypeDir}, file{"d/disk1.vmdk", vmdk, 0}), []string{"vmdisk1 (d/disk1.vmdk)"}, ""},
		{"two disks and a blank one", archive(t, tar.FormatUSTAR,
			file{"vm.ovf", ovf(ref("f1", "a.vmdk")+ref("f2", "b.vmdk"), disk("d1", "f1")+disk("d2", "f2")+`<Disk ovf:diskId="d3" ovf:capacity="1"/>`), 0},
			file{"a.vmdk", vmdk, 0}, file{"b.vmdk", vmdk, 0}), []string{"d1 (a.vmdk)", "d2 (b.vmdk)", "d3 (blank, no file)"}, ""},
		{"not an OVA", archive(t, tar.FormatUSTAR, file{"disk.img", "x", 0}, file{"vm.ovf", d1, 0}), nil, `first member "disk.img" is not an OVF descriptor`},
		{"member missing", archive(t, tar.FormatUSTAR, file{"vm.ovf", d1, 0}), nil, `disk vmdisk1 is the file "disk1.vmdk", which the archive does not hold`},
		{"file not listed", archive(t, tar.FormatUSTAR, file{"vm.ovf", ovf("", disk("vmdisk1", "f9")), 0}), nil, `names file "f9", which References does not list`},
		{"URL", archive(t, tar.FormatUSTAR, file{"vm.ovf", ovf(ref("f1", "http://example.com/d.vmdk"), disk("vmdisk1", "f1")), 0}), nil, "outside the archive"},
		{"no disk", archive(t, tar.FormatUSTAR, file{"vm.ovf", ovf("", ""), 0}), nil, "lists no disk"},
		{"compressed", archive(t, tar.FormatUSTAR, file{"vm.ovf", ovf(`<File ovf:id="f1" ovf:href="disk1.vmdk" ovf:compression="gzip"/>`, disk("vmdisk1", "f1")), 0}, file{"disk1.vmdk", "x", 0}), nil, "gzip-compressed (ovf:compression)"},
		{"chunked", archive(t, tar.FormatUSTAR, file{"vm.ovf", ovf(`<File ovf:id="f1" ovf:href="disk1.vmdk" ovf:chunkSize="1000"/>`, disk("vmdisk1", "f1")), 0}, file{"disk1.vmdk", "x", 0}), nil, "split into chunks"},
		{"bad XML", archive(t, tar.FormatUSTAR, file{"vm.ovf", "<Envelope><References>", 0}), nil, "OVF descriptor vm.ovf: XML syntax error"},
		{"empty archive", make([]byte, 1024), nil, "holds no file"},
		{"truncated member", archive(t, tar.FormatUSTAR, file{"vm.ovf", d1, 0}, file{"disk1.vmdk", vmdk, 0})[:1536+600], nil, "runs past the end of the file"},
		{"truncated header", archive(t, tar.FormatUSTAR, file{"vm.ovf", d1, 0}, file{"disk1.vmdk", vmdk, 0})[:1536+100], nil, "truncated"},
		{"damaged header", func() []byte {
			b := archive(t, tar.FormatUSTAR, file{"vm.ovf", d1, 0}, file{"disk1.vmdk", vmdk, 0})
			b[1536+148]++ // second header's checksum
			return b
		}(), nil, "damaged tar header"},
	} {
		p, err := Read(bytes.NewReader(c.b), int64(len(c.b)), "vm.ova")
		if c.disks == nil {
			var fe *vdio.FormatError
			if !errors.As(err, &fe) || fe.File != "vm.ova" || fe.Format != "ova" || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: got %v, want an error with %q", c.name, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		var got []string
		for _, d := range p.Disks {
			got = append(got, d.Label())
			if d.File != nil && string(c.b[d.File.Offset:d.File.Offset+4]) != "KDMV" {
				t.Errorf("%s: disk %s at offset %d is not the member's data", c.name, d.ID, d.File.Offset)
			}
		}
		if strings.Join(got, "; ") != strings.Join(c.disks, "; ") {
			t.Errorf("%s: disks %q, want %q", c.name, got, c.disks)
		}
	}
}

func TestIsTar(t *testing.T) {
	b := archive(t, tar.FormatUSTAR, file{"vm.ovf", "x", 0})
	g := archive(t, tar.FormatGNU, file{"vm.ovf", "x", 0})
	if !IsTar(b) || !IsTar(g) {
		t.Fatal("a tar header is not one")
	}
	for _, bad := range [][]byte{make([]byte, 512), b[:511], func() []byte { c := bytes.Clone(b); c[0]++; return c }()} {
		if IsTar(bad) {
			t.Errorf("IsTar(%q...) = true", bad[:8])
		}
	}
	if first, ok := Sniff(bytes.NewReader(b), int64(len(b))); !ok || first != "vm.ovf" {
		t.Fatalf("Sniff = %q, %v", first, ok)
	}
	other := archive(t, tar.FormatUSTAR, file{"backup/", "", tar.TypeDir}, file{"backup/disk.img", "x", 0})
	if first, ok := Sniff(bytes.NewReader(other), int64(len(other))); ok || first != "backup/disk.img" {
		t.Fatalf("Sniff = %q, %v", first, ok)
	}
}
