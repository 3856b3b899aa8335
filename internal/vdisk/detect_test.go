package vdisk

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/sauve-backup/sauve/internal/vdisk/ova"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

// at returns a file of size bytes holding each piece at its offset.
func at(size int, pieces map[int]string) []byte {
	b := make([]byte, size)
	for off, p := range pieces {
		copy(b[off:], p)
	}
	return b
}

// mbr returns a 1 MiB disk whose first sector is a boot sector that
// starts with code (the first bytes of a real boot loader's MBR) and
// holds one partition.
func mbr(code string) []byte {
	b := at(1<<20, map[int]string{0: code, 446: "\x80\x20\x21\x00\x83\x14\x50\x00\x00\x08\x00\x00\x00\xf8\x0f\x00", 510: "\x55\xaa"})
	for i := len(code); i < 440; i++ {
		b[i] = byte(i * 7) // more code
	}
	return b
}

// raws are disks no signature may claim.
func raws(t testing.TB) map[string][]byte {
	gpt := mbr("\xeb\x63\x90\x10\x8e\xd0\xbc\x00")
	copy(gpt[512:], "EFI PART\x00\x00\x01\x00\x5c\x00\x00\x00")
	return map[string][]byte{
		"MBR, GRUB":         mbr("\xeb\x63\x90\x10\x8e\xd0\xbc\x00\xb0\xb8\x00\x00\x8e\xd8\x8e\xc0"),
		"MBR, Windows":      mbr("\x33\xc0\x8e\xd0\xbc\x00\x7c\x8e\xc0\x8e\xd8\xbe\x00\x7c\xbf\x00"),
		"MBR, syslinux":     mbr("\xfa\x31\xc0\x8e\xd8\x8e\xd0\xbc\x00\x7c\x89\xe6\x06\x57\x8e\xc0"),
		"MBR, no boot code": mbr(""),
		"GPT":               gpt,
		"NTFS":              at(1<<20, map[int]string{0: "\xeb\x52\x90NTFS    \x00\x02\x08", 510: "\x55\xaa"}),
		"FAT32":             at(1<<20, map[int]string{0: "\xeb\x58\x90mkfs.fat\x00\x02\x08", 82: "FAT32   ", 510: "\x55\xaa"}),
		"ext4":              at(1<<20, map[int]string{1024 + 56: "\x53\xef"}),
		"XFS":               at(1<<20, map[int]string{0: "XFSB\x00\x00\x10\x00"}),
		"LUKS1":             at(1<<20, map[int]string{0: "LUKS\xba\xbe\x00\x01aes\x00", 40: "xts-plain64\x00", 72: "sha256\x00"}),
		"LUKS2":             at(1<<20, map[int]string{0: "LUKS\xba\xbe\x00\x02", 16384: "SKUL\xba\xbe\x00\x02"}),
		"LVM":               at(1<<20, map[int]string{512: "LABELONE\x01\x00\x00\x00\x00\x00\x00\x00", 536: "LVM2 001"}),
		"swap":              at(1<<20, map[int]string{4086: "SWAPSPACE2"}),
		"ISO 9660":          at(1<<20, map[int]string{32768: "\x01CD001\x01"}),
		"squashfs":          at(1<<20, map[int]string{0: "hsqs"}),
		"zeros":             make([]byte, 1<<20),
		"one byte":          {0x1f},
		"text":              []byte("#!/bin/sh\necho hello\n"),
	}
}

// foreignFiles are files of each refused format, from their writers
// where Go has one, else from the format's specification.
func foreignFiles(t testing.TB) map[string][]byte {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(mbr("\xeb\x63\x90"))
	zw.Close()
	var zs bytes.Buffer
	ze, _ := zstd.NewWriter(&zs)
	ze.Write(mbr("\xeb\x63\x90"))
	ze.Close()
	var zp bytes.Buffer
	zpw := zip.NewWriter(&zp)
	w, _ := zpw.Create("disk.img")
	w.Write(mbr("\xeb\x63\x90"))
	zpw.Close()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "disk.img", Size: 512, Mode: 0o644, Typeflag: tar.TypeReg})
	tw.Write(make([]byte, 512))
	tw.Close()
	le := binary.LittleEndian
	qed := at(1<<20, map[int]string{0: "QED\x00"})
	le.PutUint32(qed[4:], 65536)
	le.PutUint32(qed[8:], 4)
	koly := at(1<<20, map[int]string{1<<20 - 512: "koly\x00\x00\x00\x04\x00\x00\x02\x00"})
	return map[string][]byte{
		"parallels":     at(1<<20, map[int]string{0: "WithoutFreeSpace\x02\x00\x00\x00\x10\x00\x00\x00"}),
		"parallels ext": at(1<<20, map[int]string{0: "WithouFreSpacExt\x02\x00\x00\x00"}),
		"bochs":         at(1<<20, map[int]string{0: "Bochs Virtual HD Image", 32: "Redolog", 48: "Growing", 64: "\x00\x00\x02\x00"}),
		"cloop":         at(1<<20, map[int]string{0: "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"}),
		"qed":           qed,
		"dmg":           koly,
		"cow":           at(1<<20, map[int]string{0: "OOOM\x00\x00\x00\x02"}),
		"vmdk-cowd":     at(1<<20, map[int]string{0: "COWD\x01\x00\x00\x00"}),
		"gzip":          gz.Bytes(),
		"bzip2":         at(4096, map[int]string{0: "BZh91AY&SY"}),
		"xz":            at(4096, map[int]string{0: "\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46"}),
		"zstd":          zs.Bytes(),
		"lz4":           at(4096, map[int]string{0: "\x04\x22\x4d\x18\x64\x40\xa7"}),
		"zip":           zp.Bytes(),
		"7z":            at(4096, map[int]string{0: "7z\xbc\xaf\x27\x1c\x00\x04"}),
		"ntfsclone":     at(4096, map[int]string{0: "\x00ntfsclone-image\x0a\x01"}),
		"partclone":     at(4096, map[int]string{0: "partclone-image\x000.3.23", 30: "0002"}),
		"tar":           tb.Bytes(),
	}
}

// TestDetect: every refused format is named by its signature; no raw disk
// is taken for anything but raw.
func TestDetect(t *testing.T) {
	for name, b := range raws(t) {
		if got := Detect(bytes.NewReader(b), int64(len(b))); got != Raw {
			t.Errorf("%s: detected as %s", name, got)
		}
	}
	for name, b := range foreignFiles(t) {
		want := strings.Fields(name)[0]
		if got := Detect(bytes.NewReader(b), int64(len(b))); got != want {
			t.Errorf("%s: detected as %s", name, got)
		}
	}
	// A signature one byte off is no signature.
	for name, b := range foreignFiles(t) {
		if name == "dmg" || name == "tar" || name == "zip" || name == "gzip" || name == "zstd" {
			continue
		}
		c := append([]byte{0}, b...)
		if got := Detect(bytes.NewReader(c), int64(len(c))); got != Raw {
			t.Errorf("%s shifted by a byte: detected as %s", name, got)
		}
	}
}

// TestRefused: Open refuses each format with one error naming the file,
// the format, and what to do.
func TestRefused(t *testing.T) {
	for name, b := range foreignFiles(t) {
		_, err := Open(bytes.NewReader(b), int64(len(b)), "/srv/x/disk.img.bin", nil)
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || !errors.Is(err, vdio.ErrUnsupported) || fe.File != "/srv/x/disk.img.bin" {
			t.Fatalf("%s: %v", name, err)
		}
		msg := err.Error()
		if !strings.Contains(msg, "--source-format raw") || strings.Contains(msg, "%!") || strings.Count(msg, "\n") > 0 {
			t.Errorf("%s: %s", name, msg)
		}
		wantFmt := map[string]string{"vmdk-cowd": "vmdk", "parallels ext": "parallels"}[name]
		if wantFmt == "" {
			wantFmt = name
		}
		if fe.Format != wantFmt {
			t.Errorf("%s: format %q", name, fe.Format)
		}
		switch name {
		case "gzip":
			if !strings.Contains(msg, "'zcat disk.img.bin | sauve backup - --stdin-name disk.img'") {
				t.Errorf("gzip hint: %s", msg)
			}
		case "parallels", "qed", "bochs", "cloop", "dmg":
			if !strings.Contains(msg, "'qemu-img convert -f "+name+" -O raw disk.img.bin disk.img.raw'") {
				t.Errorf("%s hint: %s", name, msg)
			}
		}
		if name == "dmg" && fe.Offset != 1<<20-512 {
			t.Errorf("dmg offset %d", fe.Offset)
		}
	}
}

// TestStrayVHDFooter: a raw disk ending in a fixed VHD's footer (from a
// smaller disk) is read as raw, at its own size.
func TestStrayVHDFooter(t *testing.T) {
	var f vdiotest.MemFile
	w, err := Create(&f, Options{Format: VHD, Subformat: "fixed", Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	disk := mbr("\xeb\x63\x90")
	disk = append(disk, make([]byte, 31<<20)...)
	copy(disk[len(disk)-512:], f.B[len(f.B)-512:])
	img, err := Open(bytes.NewReader(disk), int64(len(disk)), "raw.img", nil)
	if err != nil || img.Format != Raw || img.Size != int64(len(disk)) {
		t.Fatalf("raw disk with a stray footer: %+v, %v", img, err)
	}
	// The VHD itself still reads as one.
	img, err = Open(bytes.NewReader(f.B), int64(len(f.B)), "tiny.vhd", nil)
	if err != nil || img.Format != VHD || img.Size != 8<<20 {
		t.Fatalf("fixed VHD: %+v, %v", img, err)
	}
}

func ovaOpts() ova.Options {
	return ova.Options{Name: "vm", CPUs: 1, MemoryMiB: 512, Controller: "ide"}
}

// TestOVAFormat: an OVA sauve writes reads back as its disk.
func TestOVAFormat(t *testing.T) {
	const size = 3<<20 + 1536
	disk := vdiotest.Disk(size, 11)
	var f vdiotest.MemFile
	w, err := Create(&f, Options{Format: OVA, Size: size, OVA: ovaOpts()})
	if err != nil {
		t.Fatal(err)
	}
	if err := Copy(context.Background(), w, bytes.NewReader(disk), nil, size, nil); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	img, err := Open(bytes.NewReader(f.B), int64(len(f.B)), "vm.ova", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Format != OVA || img.Detail != "disk vm-disk1.vmdk, vmdk streamOptimized" || img.Size != size {
		t.Fatalf("OVA opened as %s %q, %d bytes", img.Format, img.Detail, img.Size)
	}
	vdiotest.Check(t, struct{ *Image }{img}, disk)
}
