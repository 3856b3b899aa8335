package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// sfdiskParts are the partitions sfdisk -J sees in a raw disk, in
// sectors.
func sfdiskParts(t *testing.T, raw string) []struct{ Start, Size int64 } {
	t.Helper()
	var p struct {
		PartitionTable struct {
			Partitions []struct{ Start, Size int64 }
		}
	}
	out := sh(t, "sfdisk", "-J", raw)
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("sfdisk -J %s: %v\n%s", raw, err, out)
	}
	return p.PartitionTable.Partitions
}

// mbrDisk is partDisk's disk with an MBR instead of a GPT: three primary
// partitions, the last up to 1 MiB before the end.
func mbrDisk(t *testing.T, e *env) (img string, fs []byte) {
	t.Helper()
	img, fs = partDisk(t, e)
	sfdisk(t, img, "label: dos\nstart=2048, size=2048, type=83\nstart=4096, size=16384, type=83\nstart=20480, size=26624, type=83\n")
	return img, fs
}

// VM image targets made larger than the source with --size: after
// --final --grow-last-partition the image checks clean, its virtual size
// is --size, the backup GPT is at its end (sgdisk -v), the last
// partition (GPT or MBR) reaches the end and the others are as the
// source's; the state is gone, so the next pass copies everything again.
func TestMigrateGrowVMImage(t *testing.T) {
	needTools(t, "qemu-img", "sfdisk", "sgdisk", "mkfs.ext4")
	const size = 48 << 20
	for _, tc := range []struct {
		name, ext, qemu string
		check           bool
		mbr             bool
	}{
		{"qcow2-gpt", ".qcow2", "qcow2", true, false},
		{"vmdk-gpt", ".vmdk", "vmdk", true, false},
		{"vmdk-mbr", ".vmdk", "vmdk", true, true},
		{"vhd-gpt", ".vhd", "vpc", false, false},
		{"vdi-mbr", ".vdi", "vdi", true, true},
		{"vhdx-gpt", ".vhdx", "vhdx", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newBareEnv(t)
			src, fs := partDisk(t, e)
			if tc.mbr {
				src, fs = mbrDisk(t, e)
			}
			target := e.path("grown" + tc.ext)
			e.ok("migrate", src, target, "--size", "48M")
			checkImageTarget(t, target, tc.qemu, tc.check)
			out := e.ok("migrate", src, target, "--final", "--grow-last-partition")
			if !strings.Contains(out, "grew partition 3") || !tc.mbr && !strings.Contains(out, "moved the backup GPT") {
				t.Errorf("migrate --final --grow-last-partition did not say what it grew:\n%s", out)
			}
			raw := checkImageTarget(t, target, tc.qemu, tc.check)
			if fi, err := os.Stat(raw); err != nil || fi.Size() != size {
				t.Fatalf("the image's virtual size: %v, %v (want %d)", fi.Size(), err, size)
			}
			if !tc.mbr {
				if o, err := exec.Command("sgdisk", "-v", raw).CombinedOutput(); err != nil || !strings.Contains(string(o), "No problems found") {
					t.Errorf("sgdisk -v of the grown image: %v\n%s", err, o)
				}
			}
			parts := sfdiskParts(t, raw)
			if len(parts) != 3 {
				t.Fatalf("%d partitions: %+v", len(parts), parts)
			}
			end := (parts[2].Start + parts[2].Size) * 512
			if end < size-(1<<20) || end > size {
				t.Errorf("the last partition ends at %d, not near the image's end (%d)", end, size)
			}
			got, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[2<<20:10<<20], fs) {
				t.Error("partition 2 differs from the source's")
			}
			wantSrc, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[10<<20:22<<20], wantSrc[10<<20:22<<20]) {
				t.Error("partition 3's data differs from the source's")
			}
			passes, _ := parseMigrate(t, e.ok("migrate", src, target, "--json"))
			if len(passes) != 1 || passes[0].BytesWritten < int64(len(fs)) {
				t.Errorf("the pass after growth: %+v", passes)
			}
			checkImageTarget(t, target, tc.qemu, tc.check)
		})
	}
}

// Growing a VM image's filesystem is refused before any pass (it needs
// the kernel), as are --size and growth on a remote target.
func TestMigrateGrowVMImageRefusals(t *testing.T) {
	needTools(t, "qemu-img")
	e := newBareEnv(t)
	src := e.path("src.img")
	randomFile(t, src, 4<<20)
	for _, c := range []struct {
		target string
		args   []string
		want   string
	}{
		{e.path("x.qcow2"), []string{"--size", "64M", "--final", "--grow-last-partition", "--grow-fs"}, "grow it inside the VM"},
		{e.path("x.vmdk"), []string{"--final", "--grow-last-partition", "--grow-fs"}, "migrate into a raw target"},
		{"ssh://root@127.0.0.1/tmp/x.img", []string{"--size", "64M"}, "local targets"},
		{e.path("x.qcow2"), []string{"--size", "64M", "--grow-last-partition"}, "add --final"},
	} {
		e.fail([]string{c.want}, append([]string{"migrate", src, c.target}, c.args...)...)
		if strings.HasPrefix(c.target, "/") && fileExists(c.target) {
			t.Errorf("%s was created", c.target)
		}
	}
	// A source without a partition table grows its image, with nothing
	// to fix; asked to grow a partition, it says there is none.
	target := e.path("plain.qcow2")
	e.ok("migrate", src, target, "--size", "8M", "--final")
	qemuCheck(t, target, "qcow2", false)
	e.fail([]string{"no partition"}, "migrate", src, e.path("plain2.qcow2"), "--size", "8M", "--final", "--grow-last-partition")
}

// The serial-printing boot disk, given an MBR partition, migrated into a
// grown qcow2: the image boots under QEMU (TCG) and its partition
// reaches the new end.
func TestMigrateGrowVMImageBoots(t *testing.T) {
	needTools(t, "qemu-img", "sfdisk")
	requireTool(t, "qemu-system-x86_64")
	e := newBareEnv(t)
	src := e.path("boot.img")
	line := "SAUVE GROWN BOOT " + hex.EncodeToString(randomBytes(4))
	bootDisk(t, src, line)
	fi, err := os.Stat(src)
	if err != nil {
		t.Fatal(err)
	}
	// One partition from 1 MiB to the end, written by hand: sfdisk
	// would not keep the boot code as it is.
	entry := make([]byte, 16)
	entry[0], entry[4] = 0x80, 0x83
	binary.LittleEndian.PutUint32(entry[8:], 2048)
	binary.LittleEndian.PutUint32(entry[12:], uint32(fi.Size()/512-2048))
	writeAt(t, src, 446, entry)
	target := e.path("boot.qcow2")
	const size = 64 << 20
	out := e.ok("migrate", src, target, "--size", "64M", "--final", "--grow-last-partition")
	if !strings.Contains(out, "grew partition 1") {
		t.Errorf("no partition grown:\n%s", out)
	}
	qemuCheck(t, target, "qcow2", false)
	boot(t, target, "qcow2", line)
	parts := sfdiskParts(t, qemuRaw(t, e, target, "qcow2"))
	if len(parts) != 1 || (parts[0].Start+parts[0].Size)*512 != size {
		t.Errorf("the partition of the grown image: %+v (want it to end at %d)", parts, size)
	}
}
