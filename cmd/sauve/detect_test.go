package main

// End-to-end tests of how sauve tells what a source is ("format detection
// never guesses", issue 9): a raw disk ending in a stray VHD footer stays
// raw, containers and compressed files sauve does not read are refused by
// their signatures, Virtual PC disks are as large as their geometry, an
// OVA is read as its disk, and qcow2 backing files stay in the overlay's
// folder. Images are made by qemu-img and the tools users have (gzip,
// ntfsclone, partclone, GNU tar), or by hand from a format's
// specification where no tool writes it; qemu-img checks the hand-made
// ones where it reads them.

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// detDisk writes a raw disk of size bytes at path: an MBR with one Linux
// partition (sfdisk's boot sector) holding an ext4 file system with files,
// and the last MiB outside the partition (always imaged: what the tests
// write there must come back).
func detDisk(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	c := exec.Command("sfdisk", "-q", path)
	part := (size - 2<<20) / 512
	c.Stdin = strings.NewReader("label: dos\n2048," + strconv.FormatInt(part, 10) + ",L\n")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk %s: %v\n%s", path, err, out)
	}
	sh(t, "mkfs.ext4", "-q", "-F", "-d", "/usr/share/doc/coreutils", "-E", "offset=1048576", path, strconv.FormatInt(part/2, 10)+"k")
}

// detOneError checks that stderr holds one error line.
func detOneError(t *testing.T, stderr string) {
	t.Helper()
	i := strings.Index(stderr, "sauve: error:")
	if i < 0 || strings.Count(stderr, "sauve: error:") != 1 || strings.Contains(strings.TrimSpace(stderr[i:]), "\n") {
		t.Fatalf("want one error line:\n%s", stderr)
	}
}

// detSnapshots returns how many snapshots the repository holds.
func detSnapshots(e *env) int {
	var snaps []json.RawMessage
	e.okJSON(&snaps, "snapshots")
	return len(snaps)
}

// qemuSize returns the virtual size and format qemu-img sees in path (by
// its own probing unless format is given).
func qemuSize(t *testing.T, path, format string) (int64, string) {
	t.Helper()
	args := []string{"info", "--output=json"}
	if format != "" {
		args = append(args, "-f", format)
	}
	out, code := qemuImg(t, append(args, path)...)
	if code != 0 {
		t.Fatalf("qemu-img info %s: exit %d\n%s", path, code, out)
	}
	var info qemuInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	return info.VirtualSize, info.Format
}

// TestDetectStrayVHDFooter: a raw disk whose last sector happens to hold
// a valid fixed-VHD footer (of a smaller disk) is backed up and converted
// at its own size, as the raw disk it is; qemu-img sees it as raw too.
func TestDetectStrayVHDFooter(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	tiny := e.path("tiny.vhd")
	sh(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", tiny, "8M")
	footer, _ := os.ReadFile(tiny)
	footer = footer[len(footer)-512:]
	const size = 256 << 20
	raw := e.path("disk.img")
	detDisk(t, raw, size)
	writeAt(t, raw, size-512, footer)
	if _, f := qemuSize(t, raw, ""); f != "raw" {
		t.Fatalf("qemu-img sees %s as %s", raw, f)
	}
	b := e.backup(raw)
	if b.Size != size {
		t.Fatalf("snapshot of a %d-byte raw disk ending in a VHD footer: %d bytes", int64(size), b.Size)
	}
	out := e.path("restored.img")
	e.ok("restore", b.ShortID, out)
	sameFile(t, raw, out)
	conv := e.path("conv.qcow2")
	e.ok("convert", raw, conv)
	if vs, _ := qemuSize(t, conv, "qcow2"); vs != size {
		t.Fatalf("converted to a %d-byte disk", vs)
	}
	if o, code := qemuImg(t, "compare", "-f", "raw", "-F", "qcow2", raw, conv); code != 0 {
		t.Fatalf("qemu-img compare: %s", o)
	}
	// The VHD itself still reads as its 8 MiB disk.
	if b := e.backup(tiny); b.Size != 8<<20 {
		t.Fatalf("fixed VHD backed up as %d bytes", b.Size)
	}
}

// bochsImage writes a Bochs "growing" redolog image of size bytes with no
// extent allocated, from the layout of Bochs' redolog header (QEMU's
// block/bochs.c reads the same).
func bochsImage(t *testing.T, path string, size int64) {
	const extent = 64 << 10
	n := size / extent
	b := make([]byte, 512+4*n)
	copy(b, "Bochs Virtual HD Image")
	copy(b[32:], "Redolog")
	copy(b[48:], "Growing")
	le := binary.LittleEndian
	le.PutUint32(b[64:], 0x00020000) // version 2
	le.PutUint32(b[68:], 512)        // header size
	le.PutUint32(b[72:], uint32(n))  // catalog entries
	le.PutUint32(b[76:], extent/512/8)
	le.PutUint32(b[80:], extent)
	le.PutUint64(b[88:], uint64(size))
	for i := range n {
		le.PutUint32(b[512+4*i:], 0xffffffff)
	}
	writeFile(t, path, b)
}

// cloopImage writes a cloop (version 2) image of one 64 KiB block of
// zeros: the 128-byte shell-script header, the block size and count, the
// table of offsets, the zlib-compressed block.
func cloopImage(t *testing.T, path string) {
	var z bytes.Buffer
	zw := zlib.NewWriter(&z)
	zw.Write(make([]byte, 64<<10))
	zw.Close()
	b := make([]byte, 136+16)
	copy(b, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
	binary.BigEndian.PutUint32(b[128:], 64<<10)
	binary.BigEndian.PutUint32(b[132:], 1)
	binary.BigEndian.PutUint64(b[136:], 152)
	binary.BigEndian.PutUint64(b[144:], uint64(152+z.Len()))
	writeFile(t, path, append(b, z.Bytes()...))
}

// dmgImage writes an Apple disk image: the data, then its UDIF trailer
// ("koly", version 4, header size 512, the data fork's offset and length)
// in the last 512 bytes.
func dmgImage(t *testing.T, path string, data []byte) {
	k := make([]byte, 512)
	copy(k, "koly")
	be := binary.BigEndian
	be.PutUint32(k[4:], 4)
	be.PutUint32(k[8:], 512)
	be.PutUint64(k[0x18:], 0)
	be.PutUint64(k[0x20:], uint64(len(data)))
	be.PutUint64(k[0x1ec:], uint64(len(data)/512)) // sector count
	writeFile(t, path, append(bytes.Clone(data), k...))
}

// TestDetectRefusedFormats: container formats sauve does not read, and
// compressed or imaging-tool files, are refused by their signatures
// (whatever the file's name), each with its format and what to do, a
// non-zero exit and nothing stored; --source-format raw keeps the bytes.
// A LUKS image and a disk with an MBR stay raw.
func TestDetectRefusedFormats(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	src := e.path("src.img")
	detDisk(t, src, 16<<20)
	srcData, _ := os.ReadFile(src)
	type refused struct {
		file   string
		format string
		hint   string
	}
	var cases []refused
	// Containers, by qemu-img where it writes them. Names say nothing.
	for _, f := range []string{"parallels", "qed"} {
		p := e.path("vm-" + f + ".img")
		sh(t, "qemu-img", "convert", "-f", "raw", "-O", f, src, p)
		cases = append(cases, refused{p, f, "qemu-img convert -f " + f + " -O raw"})
	}
	bochs := e.path("bochs.disk")
	bochsImage(t, bochs, 16<<20)
	cloop := e.path("cloop.disk")
	cloopImage(t, cloop)
	// qemu-img agrees that the hand-made ones are what they claim.
	for _, c := range []struct {
		p, f string
		size int64
	}{{bochs, "bochs", 16 << 20}, {cloop, "cloop", 64 << 10}} {
		if vs, f := qemuSize(t, c.p, ""); f != c.f || vs != c.size {
			t.Fatalf("qemu-img sees %s as %s of %d bytes", c.p, f, vs)
		}
		cases = append(cases, refused{c.p, c.f, "qemu-img convert -f " + c.f + " -O raw"})
	}
	dmg := e.path("mac.img")
	dmgImage(t, dmg, srcData[:1<<20])
	cases = append(cases, refused{dmg, "dmg", "qemu-img convert -f dmg"})
	// What dd | gzip, ntfsclone | bzip2 and partclone pipelines leave.
	for _, c := range []struct{ tool, cat string }{{"gzip", "zcat"}, {"bzip2", "bzcat"}, {"xz", "xzcat"}, {"zstd", "zstdcat"}} {
		requireTool(t, c.tool)
		p := e.path("disk-" + c.tool + ".img")
		out, err := exec.Command(c.tool, "-c", src).Output()
		if err != nil {
			t.Fatalf("%s: %v", c.tool, err)
		}
		writeFile(t, p, out)
		cases = append(cases, refused{p, c.tool, c.cat + " " + filepath.Base(p) + " | sauve backup - --stdin-name disk-" + c.tool})
	}
	requireTool(t, "mkntfs")
	requireTool(t, "ntfsclone")
	ntfs := e.path("part.ntfs")
	writeFile(t, ntfs, nil)
	os.Truncate(ntfs, 16<<20)
	sh(t, "mkntfs", "-q", "-F", "-Q", ntfs)
	nc := e.path("winxp_1.img")
	sh(t, "ntfsclone", "-q", "--save-image", "-o", nc, ntfs)
	cases = append(cases, refused{nc, "ntfsclone", "ntfsclone --restore-image"})
	requireTool(t, "partclone.ext4")
	ext := e.path("part.ext4")
	writeFile(t, ext, nil)
	os.Truncate(ext, 16<<20)
	sh(t, "mkfs.ext4", "-q", "-F", ext)
	pc := e.path("sda1.img")
	sh(t, "partclone.ext4", "-q", "-c", "-s", ext, "-o", pc)
	cases = append(cases, refused{pc, "partclone", "partclone.restore"})

	for _, c := range cases {
		stderr := e.fail([]string{filepath.Base(c.file), c.format + ":", c.hint, "--source-format raw"}, "backup", c.file)
		detOneError(t, stderr)
		e.fail([]string{filepath.Base(c.file), c.format + ":"}, "convert", c.file, e.path("out-"+c.format+".qcow2"))
	}
	if n := detSnapshots(e); n != 0 {
		t.Fatalf("%d snapshots stored from refused files", n)
	}
	ents, _ := os.ReadDir(e.dir)
	for _, en := range ents {
		if strings.HasPrefix(en.Name(), "out-") || strings.Contains(en.Name(), ".sauve-") {
			t.Fatalf("a refused conversion left %s behind", en.Name())
		}
	}
	// The escape hatch: the file's bytes as they are.
	gz := e.path("disk-gzip.img")
	st, _ := os.Stat(gz)
	if b := e.backup(gz, "--source-format", "raw"); b.Size != st.Size() {
		t.Fatalf("--source-format raw: %d bytes of a %d-byte file", b.Size, st.Size())
	}
	// Legitimate raw sources stay raw: a disk with an MBR, a LUKS image.
	if b := e.backup(src); b.Size != 16<<20 {
		t.Fatalf("MBR disk backed up as %d bytes", b.Size)
	}
	luks := e.path("secret.luks")
	for i := 0; ; i++ {
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=sec0,data=secret",
			"-o", "key-secret=sec0,iter-time=10", luks, "16M").CombinedOutput()
		if err == nil {
			break
		}
		if i == 4 {
			t.Fatalf("qemu-img create (luks): %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
	st, _ = os.Stat(luks)
	if out := e.ok("backup", luks); strings.Contains(out, "reading ") {
		t.Fatalf("LUKS image read as a VM disk:\n%s", out)
	}
	if b := e.backup(luks); b.Size != st.Size() {
		t.Fatalf("LUKS image backed up as %d bytes of %d", b.Size, st.Size())
	}
}

// TestDetectVirtualPCGeometry: a dynamic VHD made by Virtual PC (creator
// "vpc ") records the size asked for as its current size, and a smaller
// CHS geometry, the disk its guest saw; sauve takes the geometry's size,
// as qemu-img does.
func TestDetectVirtualPCGeometry(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	// 100 MiB asked for; the specification's algorithm gives 1003/12/17,
	// 104761344 bytes, 94 KiB less.
	const asked, chs = 100 << 20, 1003 * 12 * 17 * 512
	raw := e.path("guest.raw")
	detDisk(t, raw, chs)
	writeAt(t, raw, chs-4096, bytes.Repeat([]byte("end of the disk "), 256))
	vhd := e.path("vpc2007.vhd")
	sh(t, "qemu-img", "convert", "-f", "raw", "-O", "vpc", raw, vhd)
	// Make it what Virtual PC writes.
	b, _ := os.ReadFile(vhd)
	for _, off := range []int{0, len(b) - 512} {
		f := b[off : off+512]
		copy(f[28:], "vpc \x00\x05\x00\x03Wi2k")
		binary.BigEndian.PutUint64(f[40:], asked)
		binary.BigEndian.PutUint64(f[48:], asked)
		binary.BigEndian.PutUint16(f[56:], 1003)
		f[58], f[59] = 12, 17
		binary.BigEndian.PutUint32(f[64:], 0)
		var sum uint32
		for _, c := range f {
			sum += uint32(c)
		}
		binary.BigEndian.PutUint32(f[64:], ^sum)
	}
	writeFile(t, vhd, b)
	if vs, f := qemuSize(t, vhd, "vpc"); f != "vpc" || vs != chs {
		t.Fatalf("qemu-img sees %s as %s of %d bytes", vhd, f, vs)
	}
	bk := e.backup(vhd)
	if bk.Size != chs {
		t.Fatalf("Virtual PC disk backed up as %d bytes, qemu-img says %d", bk.Size, chs)
	}
	out := e.path("restored.raw")
	e.ok("restore", bk.ShortID, out)
	sameFile(t, raw, out)
	conv := e.path("conv.raw")
	e.ok("convert", vhd, conv)
	sameFile(t, raw, conv)
}

// detOVF is a descriptor in the style of VirtualBox's, listing disks
// (file names).
func detOVF(disks ...string) string {
	var refs, ds, items string
	for i, d := range disks {
		n := strconv.Itoa(i + 1)
		refs += `    <File ovf:id="file` + n + `" ovf:href="` + d + `"/>` + "\n"
		ds += `    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk` + n + `" ovf:fileRef="file` + n +
			`" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="d4b0c0de-0000-4000-8000-00000000000` + n + `"/>` + "\n"
		items += `      <Item><rasd:AddressOnParent>` + strconv.Itoa(i) + `</rasd:AddressOnParent><rasd:Caption>disk` + n + `</rasd:Caption><rasd:ElementName>disk` + n +
			`</rasd:ElementName><rasd:HostResource>/disk/vmdisk` + n + `</rasd:HostResource><rasd:InstanceID>` + strconv.Itoa(10+i) + `</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>` + "\n"
	}
	return `<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
` + refs + `  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
` + ds + `  </DiskSection>
  <VirtualSystem ovf:id="web1">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <Item><rasd:Caption>sataController0</rasd:Caption><rasd:ElementName>sataController0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
` + items + `    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`
}

// TestDetectOVA: an OVA given as a source is read as the disk it holds,
// in place inside the archive: backup stores the disk, convert writes it.
// An OVA of several disks is refused, listing them; a damaged one fails
// with one error naming it.
func TestDetectOVA(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "tar")
	e := newEnv(t)
	const size = 16 << 20
	raw := e.path("web1.raw")
	detDisk(t, raw, size)
	dir := e.path("pkg")
	os.Mkdir(dir, 0o755)
	sh(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(dir, "web1-disk001.vmdk"))
	writeFile(t, filepath.Join(dir, "web1.ovf"), []byte(detOVF("web1-disk001.vmdk")))
	writeFile(t, filepath.Join(dir, "web1.mf"), []byte("SHA256(web1.ovf)= 00\n"))
	ova := e.path("web1.ova")
	sh(t, "tar", "-C", dir, "--format=ustar", "-cf", ova, "web1.ovf", "web1-disk001.vmdk", "web1.mf")
	b := e.backup(ova)
	if b.Size != size {
		t.Fatalf("OVA backed up as %d bytes, its disk has %d", b.Size, int64(size))
	}
	out := e.path("restored.raw")
	e.ok("restore", b.ShortID, out)
	sameFile(t, raw, out)
	var c convertOut
	e.okJSON(&c, "convert", ova, e.path("web1.qcow2"))
	if c.SourceFormat != "ova" || c.VirtualSize != size {
		t.Fatalf("convert: %+v", c)
	}
	if o, code := qemuImg(t, "compare", "-f", "raw", "-F", "qcow2", raw, e.path("web1.qcow2")); code != 0 {
		t.Fatalf("qemu-img compare: %s", o)
	}
	// An OVA sauve exported reads back too.
	e.ok("export", b.ShortID, e.path("again.ova"))
	e.ok("convert", e.path("again.ova"), e.path("again.raw"))
	sameFile(t, raw, e.path("again.raw"))

	// Two disks: refused, naming both.
	sh(t, "cp", filepath.Join(dir, "web1-disk001.vmdk"), filepath.Join(dir, "web1-disk002.vmdk"))
	writeFile(t, filepath.Join(dir, "two.ovf"), []byte(detOVF("web1-disk001.vmdk", "web1-disk002.vmdk")))
	two := e.path("two.ova")
	sh(t, "tar", "-C", dir, "--format=ustar", "-cf", two, "two.ovf", "web1-disk001.vmdk", "web1-disk002.vmdk")
	detOneError(t, e.fail([]string{"two.ova", "2 disks", "vmdisk1 (web1-disk001.vmdk)", "vmdisk2 (web1-disk002.vmdk)"}, "backup", two))
	e.fail([]string{"two.ova", "2 disks"}, "convert", two, e.path("x-two.raw"))
	// Damaged: truncated inside the disk, and a descriptor naming a file
	// the archive lacks.
	data, _ := os.ReadFile(ova)
	cut := e.path("cut.ova")
	writeFile(t, cut, data[:len(data)/2])
	detOneError(t, e.fail([]string{"cut.ova", "ova", "web1-disk001.vmdk", "offset"}, "backup", cut))
	writeFile(t, filepath.Join(dir, "lost.ovf"), []byte(detOVF("web1-disk009.vmdk")))
	lost := e.path("lost.ova")
	sh(t, "tar", "-C", dir, "--format=ustar", "-cf", lost, "lost.ovf", "web1-disk001.vmdk")
	detOneError(t, e.fail([]string{"lost.ova", "web1-disk009.vmdk", "does not hold"}, "convert", lost, e.path("x-lost.raw")))
	if n := detSnapshots(e); n != 1 {
		t.Fatalf("%d snapshots, want 1", n)
	}
}

// TestDetectBackingConfined: a qcow2 overlay's backing file must lie in
// the overlay's folder or below, symlinks followed; others are refused,
// naming the backing file, unless --allow-backing-outside.
func TestDetectBackingConfined(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	vm := e.path("vm")
	os.MkdirAll(filepath.Join(vm, "base"), 0o755)
	const size = 4 << 20
	secret := e.path("secret.raw")
	writeFile(t, secret, textBytes(7, size))
	mk := func(name, backing, format string) string {
		p := filepath.Join(vm, name)
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format, p, strconv.Itoa(size))
		return p
	}
	os.Symlink("../secret.raw", filepath.Join(vm, "link.raw"))
	for _, c := range []struct{ overlay, backing, format string }{
		{"rel.qcow2", "../secret.raw", "raw"},
		{"abs.qcow2", secret, "raw"},
		{"shadow.qcow2", "/etc/shadow", "raw"},
		{"sym.qcow2", "link.raw", "raw"},
	} {
		p := mk(c.overlay, c.backing, c.format)
		detOneError(t, e.fail([]string{c.overlay, "qcow2", `backing file "` + c.backing + `"`, "outside " + vm, "--allow-backing-outside"}, "backup", p))
		e.fail([]string{c.overlay, "outside"}, "convert", p, e.path("x.raw"))
	}
	if n := detSnapshots(e); n != 0 {
		t.Fatalf("%d snapshots stored from refused overlays", n)
	}
	// Inside the folder, and below it: read.
	base := filepath.Join(vm, "base", "base.qcow2")
	sh(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", secret, base)
	in := mk("in.qcow2", "base/base.qcow2", "qcow2")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", in)
	ref := e.path("in.ref")
	sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", in, ref)
	b := e.backup(in)
	e.ok("restore", b.ShortID, e.path("in.restored"))
	sameFile(t, ref, e.path("in.restored"))
	// Outside, when asked for.
	rel := filepath.Join(vm, "rel.qcow2")
	b = e.backup(rel, "--allow-backing-outside")
	e.ok("restore", b.ShortID, e.path("rel.restored"))
	sameFile(t, secret, e.path("rel.restored"))
	e.ok("convert", filepath.Join(vm, "sym.qcow2"), e.path("sym.raw"), "--allow-backing-outside")
	sameFile(t, secret, e.path("sym.raw"))
}
