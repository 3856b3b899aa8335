package vdisk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/sauve-backup/sauve/internal/vdisk/ova"
	"github.com/sauve-backup/sauve/internal/vdisk/qcow2"
	"github.com/sauve-backup/sauve/internal/vdisk/vdi"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vhd"
	"github.com/sauve-backup/sauve/internal/vdisk/vhdx"
	"github.com/sauve-backup/sauve/internal/vdisk/vmdk"
)

// headLen is how much of a file's start detection reads: every signature
// checked lies in its first sector.
const headLen = 512

// foreign is a format sauve recognises but does not read: an image is
// refused rather than taken for a raw disk holding the container's bytes.
type foreign struct {
	name string // format name, in errors (QEMU's where QEMU has one)
	what string // what the file is, for people
	// hint says what to do; %[1]s is the file's base name, %[2]s that
	// name without its last extension, %[3]s the format's name and %[4]s
	// a name for a raw image made from it.
	hint string
	// match reports whether a file's first headLen bytes (fewer for a
	// small file) are of this format.
	match func(b []byte) bool
}

// Hints shared by several formats.
const (
	qemuHint = "convert it first, e.g. 'qemu-img convert -f %[3]s -O raw %[1]s %[4]s' (or -O qcow2), and read that"
	rawHint  = ", or keep its bytes as they are with --source-format raw"
)

func catHint(cat string) string {
	return "decompress it as sauve reads it, '" + cat + " %[1]s | sauve backup - --stdin-name %[2]s', or first, '" + cat + " %[1]s > %[2]s'"
}

// foreigns are checked in order, on the first sector; each signature is
// at a fixed offset and long, or backed by fields that must hold fixed
// values, so that no real disk (an MBR or GPT boot sector, a file system's
// first block, a LUKS header) matches one. QEMU's probes (block/*.c)
// check the same magics for the container formats.
var foreigns = []foreign{
	{name: "parallels", what: "a Parallels disk image", hint: qemuHint, match: func(b []byte) bool {
		// "WithoutFreeSpace" (or "WithouFreSpacExt" with its extension
		// area), then a little-endian version 2.
		return len(b) >= 20 && (string(b[:16]) == "WithoutFreeSpace" || string(b[:16]) == "WithouFreSpacExt") && le32(b[16:]) == 2
	}},
	{name: "bochs", what: "a Bochs growing disk image", hint: qemuHint, match: func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("Bochs Virtual HD Image\x00"))
	}},
	{name: "cloop", what: "a cloop compressed image", hint: qemuHint, match: func(b []byte) bool {
		// A shell script of 128 bytes: "#!/bin/sh\n#V2.0 Format\n" and a
		// line that loads the cloop module.
		const p = "#!/bin/sh\n#V"
		if len(b) < 128 || !bytes.HasPrefix(b, []byte(p)) {
			return false
		}
		v := b[len(p):]
		return isDigit(v[0]) && v[1] == '.' && isDigit(v[2]) && string(v[3:11]) == " Format\n" && bytes.Contains(b[:128], []byte("cloop"))
	}},
	{name: "qed", what: "a QED image (QEMU Enhanced Disk)", hint: qemuHint, match: func(b []byte) bool {
		// "QED\0", a cluster size that is a power of two from 4 KiB to
		// 64 MiB and a table size of 1 to 16 clusters (QED's spec).
		if len(b) < 12 || string(b[:4]) != "QED\x00" {
			return false
		}
		cs, ts := le32(b[4:]), le32(b[8:])
		return cs >= 4096 && cs <= 64<<20 && cs&(cs-1) == 0 && ts >= 1 && ts <= 16
	}},
	{name: "cow", what: "a User Mode Linux copy-on-write (COW) file", hint: "merge it into its backing file with 'uml_moo %[1]s %[4]s' and read that", match: func(b []byte) bool {
		return len(b) >= 8 && string(b[:4]) == "OOOM" && be32(b[4:]) >= 1 && be32(b[4:]) <= 3
	}},
	{name: "vmdk", what: "a VMware ESX sparse extent (COWD), which sauve does not read", hint: "convert it first, e.g. 'qemu-img convert -f vmdk -O raw %[1]s %[4]s', and read that", match: func(b []byte) bool {
		return len(b) >= 8 && string(b[:4]) == "COWD" && le32(b[4:]) == 1
	}},
	{name: "gzip", what: "a gzip-compressed file, not a disk image", hint: catHint("zcat"), match: func(b []byte) bool {
		// ID1 ID2, CM 8 (deflate), no reserved flag (RFC 1952).
		return len(b) >= 4 && b[0] == 0x1f && b[1] == 0x8b && b[2] == 8 && b[3]&0xe0 == 0
	}},
	{name: "bzip2", what: "a bzip2-compressed file, not a disk image", hint: catHint("bzcat"), match: func(b []byte) bool {
		// "BZh", the block size digit, then a block (the digits of pi)
		// or the end of the stream (those of sqrt(pi)).
		return len(b) >= 10 && string(b[:3]) == "BZh" && b[3] >= '1' && b[3] <= '9' &&
			(string(b[4:10]) == "\x31\x41\x59\x26\x53\x59" || string(b[4:10]) == "\x17\x72\x45\x38\x50\x90")
	}},
	{name: "xz", what: "an xz-compressed file, not a disk image", hint: catHint("xzcat"), match: func(b []byte) bool {
		// Header magic and stream flags: a zero byte, then the check
		// type in the low four bits.
		return len(b) >= 8 && string(b[:6]) == "\xfd7zXZ\x00" && b[6] == 0 && b[7]&0xf0 == 0
	}},
	{name: "zstd", what: "a zstd-compressed file, not a disk image", hint: catHint("zstdcat"), match: func(b []byte) bool {
		// Frame magic, then a frame header descriptor with its reserved
		// bit clear (RFC 8878).
		return len(b) >= 5 && le32(b) == 0xfd2fb528 && b[4]&0x08 == 0
	}},
	{name: "lz4", what: "an lz4-compressed file, not a disk image", hint: catHint("lz4cat"), match: func(b []byte) bool {
		// Frame magic, then FLG: version 01, reserved bit clear.
		return len(b) >= 5 && le32(b) == 0x184d2204 && b[4]>>6 == 1 && b[4]&0x02 == 0
	}},
	{name: "zip", what: "a zip archive, not a disk image", hint: "extract the disk image from it, 'unzip -p %[1]s | sauve backup - --stdin-name %[2]s', or first, 'unzip %[1]s'", match: func(b []byte) bool {
		// A local file header; the version needed to extract is at most
		// 6.3 in every published APPNOTE.
		return len(b) >= 6 && string(b[:4]) == "PK\x03\x04" && le16(b[4:]) <= 63
	}},
	{name: "7z", what: "a 7-Zip archive, not a disk image", hint: "extract the disk image from it, '7z x -so %[1]s | sauve backup - --stdin-name %[2]s', or first, '7z x %[1]s'", match: func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("7z\xbc\xaf\x27\x1c"))
	}},
	{name: "ntfsclone", what: "an ntfsclone image (an NTFS file system saved by 'ntfsclone --save-image'), not a disk", hint: "restore it first, 'ntfsclone --restore-image --overwrite %[2]s.ntfs %[1]s' (or onto a device), and back up or convert that", match: func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("\x00ntfsclone-image"))
	}},
	{name: "partclone", what: "a partclone image (a file system saved by partclone), not a disk", hint: "restore it first, onto a device or a file of the file system's size, 'partclone.restore -s %[1]s -O %[2]s.fs', and back up or convert that", match: func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("partclone-image\x00"))
	}},
}

// dmg is the Apple disk image, recognised by its UDIF trailer: the last
// 512 bytes start with "koly", version 4, header size 512. (QEMU goes by
// the file name.)
var dmg = foreign{name: "dmg", what: "an Apple disk image (DMG)", hint: qemuHint}

func isDmgTrailer(b []byte) bool {
	return len(b) == 512 && string(b[:4]) == "koly" && be32(b[4:]) == 4 && be32(b[8:]) == 512
}

// tarArchive is a tar archive that is not an OVA.
var tarArchive = foreign{name: "tar", what: "a tar archive that is not an OVA (an OVA's first member is its .ovf descriptor)",
	hint: "extract the disk image from it first, 'tar -xf %[1]s', and read that"}

func le16(b []byte) uint16 { return binary.LittleEndian.Uint16(b) }
func le32(b []byte) uint32 { return binary.LittleEndian.Uint32(b) }
func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func isDigit(c byte) bool  { return c >= '0' && c <= '9' }

// Detect names the format of the image in r (size bytes) from its
// signatures, whatever the file's name, or returns Raw. Besides the
// formats sauve reads (Formats, OVA included) it names the formats it
// recognises and refuses (Open says why and what to do): parallels,
// bochs, cloop, qed, dmg, cow (User Mode Linux), vmdk ESX sparse (COWD,
// named "vmdk-cowd"), gzip, bzip2, xz, zstd, lz4, zip, 7z, ntfsclone,
// partclone and tar. A LUKS volume, a file system or a disk with an MBR
// or GPT is raw.
func Detect(r io.ReaderAt, size int64) string {
	f, _ := detect(r, size)
	return f
}

// detect is Detect, and for a refused format what Open says of it.
func detect(r io.ReaderAt, size int64) (string, *foreign) {
	if size <= 0 {
		return Raw, nil
	}
	b := make([]byte, min(headLen, size))
	n, _ := r.ReadAt(b, 0)
	b = b[:n]
	switch {
	case qcow2.Magic(b):
		return QCOW2, nil
	case vmdk.Magic(b), vmdk.IsDescriptor(b):
		return VMDK, nil
	case vhdx.Magic(b):
		return VHDX, nil
	case vdi.Magic(b):
		return VDI, nil
	case vhd.Probe(r, size):
		return VHD, nil
	}
	for i := range foreigns {
		if f := &foreigns[i]; f.match(b) {
			if f.name == "vmdk" {
				return "vmdk-cowd", f
			}
			return f.name, f
		}
	}
	if ova.IsTar(b) {
		first, ok := ova.Sniff(r, size)
		if ok {
			return OVA, nil
		}
		t := tarArchive
		if first != "" {
			t.what += fmt.Sprintf(" (its first member is %q)", first)
		}
		return t.name, &t
	}
	if size >= 1024 {
		t := make([]byte, 512)
		if n, _ := r.ReadAt(t, size-512); n == len(t) && isDmgTrailer(t) {
			return dmg.name, &dmg
		}
	}
	return Raw, nil
}

// refusal is the error Open returns for a format it recognises and does
// not read.
func refusal(name string, f *foreign, off int64) error {
	base := filepath.Base(name)
	stem := strings.TrimSuffix(base, filepath.Ext(base))
	if stem == "" || stem == base {
		stem = base + "-disk"
	}
	out := stem + ".raw"
	if out == base {
		out = stem + "-disk.raw"
	}
	hint := fmt.Sprintf(f.hint, base, stem, f.name, out)
	return vdio.Unsupported(name, f.name, off, "%s: %s%s", f.what, hint, rawHint)
}
