package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// partDev returns the device of partition n of a loop device attached with
// -P, waiting for the kernel to create it.
func partDev(t *testing.T, dev string, n int) string {
	t.Helper()
	p := fmt.Sprintf("%sp%d", dev, n)
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		if i%10 == 0 {
			// Some kernels (this test machine's) are built without the
			// partition table parsers: partx adds the partitions from
			// user space.
			exec.Command("partx", "-a", dev).Run()
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", p)
	return ""
}

// sfdisk writes a partition table from a script.
func sfdisk(t *testing.T, target, script string) {
	t.Helper()
	c := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", target)
	c.Stdin = strings.NewReader(script)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
}

// sameExceptFree compares two disk images byte for byte, except inside
// partitions whose free space was skipped (which restore as zeros).
func sameExceptFree(t *testing.T, a, b string, parts []partOut) {
	t.Helper()
	x, y := mustRead(t, a), mustRead(t, b)
	if len(x) != len(y) {
		t.Fatalf("%s is %d bytes, %s %d", a, len(x), b, len(y))
	}
	skip := make([]bool, len(x)/512)
	for _, p := range parts {
		if p.Extended || p.ImagedInFull != "" || p.Filesystem == "" {
			continue
		}
		for s := p.Start / 512; s < (p.Start+p.Size)/512; s++ {
			skip[s] = true
		}
	}
	for s := range skip {
		if !skip[s] && !bytes.Equal(x[s*512:(s+1)*512], y[s*512:(s+1)*512]) {
			t.Fatalf("sector %d (outside the filesystems whose free space was skipped) differs after restore", s)
		}
	}
}

func TestGPTDiskRoundTrip(t *testing.T) {
	needTools(t, "sfdisk", "losetup", "mkfs.ext4", "mkntfs", "ntfs-3g", "mkfs.fat", "mcopy", "mkswap", "blkid")
	e := newEnv(t)
	img := e.path("gpt.img")
	const size = 160 << 20
	randomFile(t, img, size) // boot code, gaps and free space all hold data
	sfdisk(t, img, `label: gpt
first-lba: 34
start=34, size=2014, type=21686148-6449-6E6F-744E-656564454649, name="bios"
start=2048, size=40MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
size=40MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
size=8MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
size=24MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="data"
size=8MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="raw"
`)
	writeAt(t, img, 0, randomBytes(440)) // boot code, as grub-install writes it
	dev := losetup(t, img, "-P")
	kinds := map[int]string{2: "fat32", 3: "ext4", 4: "swap", 5: "ntfs"}
	want := map[int]map[string]string{}
	for n, kind := range kinds {
		want[n] = makeFS(t, kind, partDev(t, dev, n))
	}

	// Mounted read-write, a filesystem is imaged in full, with a warning.
	var b fsBackupOut
	var stderr string
	withMount(t, "ext4", partDev(t, dev, 3), true, func(string) {
		b, stderr = e.fsBackup(dev)
	})
	if !strings.Contains(stderr, "mounted read-write") || b.Partitions[2].ImagedInFull == "" || b.Partitions[2].BytesSkipped != 0 {
		t.Fatalf("backup with partition 3 mounted: %+v\n%s", b.Partitions[2], stderr)
	}

	b, stderr = e.fsBackup(dev)
	if b.PartitionTable != "gpt" || len(b.Partitions) != 6 {
		t.Fatalf("layout: %s %+v\n%s", b.PartitionTable, b.Partitions, stderr)
	}
	for i, fsType := range []string{"", "fat32", "ext4", "swap", "ntfs", ""} {
		p := b.Partitions[i]
		if p.Number != i+1 || p.Filesystem != fsType || (fsType != "") != (p.ImagedInFull == "") {
			t.Fatalf("partition %d: %+v", i+1, p)
		}
	}
	if p := b.Partitions[1]; p.Start != 2048*512 || p.Size != 40<<20 || p.TypeName != "EFI System" {
		t.Fatalf("EFI partition: %+v", p)
	}
	if !strings.Contains(stderr, "partition 6") || !strings.Contains(stderr, "imaged in full") {
		t.Fatalf("no warning for the partition without a filesystem:\n%s", stderr)
	}
	if b.BytesSkipped < 80<<20 {
		t.Fatalf("skipped only %d bytes", b.BytesSkipped)
	}

	// sauve show and snapshots --json list the partitions.
	show := e.ok("show", b.Snapshot[:10])
	for _, s := range []string{"partition table: gpt", "fat32", "ext4", "swap", "ntfs", "EFI System", "imaged in full"} {
		if !strings.Contains(show, s) {
			t.Fatalf("sauve show lacks %q:\n%s", s, show)
		}
	}
	var sns []struct {
		Disks []struct {
			PartitionTable string `json:"partition_table"`
			Partitions     []partOut
		}
	}
	e.okJSON(&sns, "snapshots")
	last := sns[len(sns)-1].Disks[0]
	if last.PartitionTable != "gpt" || len(last.Partitions) != 6 || last.Partitions[2].UsedBytes == nil {
		t.Fatalf("snapshots --json: %+v", last)
	}

	// Restore onto a device full of random bytes.
	target := e.path("target.img")
	randomFile(t, target, size)
	tdev := losetup(t, target)
	e.ok("restore", b.Snapshot, tdev)
	exec.Command("losetup", "-d", tdev).Run()
	exec.Command("losetup", "-d", dev).Run()
	sameExceptFree(t, img, target, b.Partitions)
	rdev := losetup(t, target, "-P")
	for n, kind := range kinds {
		checkFS(t, kind, partDev(t, rdev, n), want[n])
	}
}

func TestMBRLogicalPartitionsRoundTrip(t *testing.T) {
	needTools(t, "sfdisk", "losetup", "mkfs.ext4", "mkfs.fat", "mcopy", "mkswap", "blkid")
	e := newEnv(t)
	img := e.path("mbr.img")
	const size = 80 << 20
	randomFile(t, img, size)
	sfdisk(t, img, `label: dos
label-id: 0x5a17e001
start=2048, size=16MiB, type=83, bootable
start=34816, size=56MiB, type=5
start=36864, size=16MiB, type=6
start=71680, size=24MiB, type=83
start=122880, size=4MiB, type=82
`)
	writeAt(t, img, 0, randomBytes(440))
	kinds := map[int]string{1: "ext2", 5: "fat16", 6: "ext4", 7: "swap"}
	want := map[int]map[string]string{}
	func() {
		dev := losetup(t, img, "-P")
		defer exec.Command("losetup", "-d", dev).Run()
		for n, kind := range kinds {
			want[n] = makeFS(t, kind, partDev(t, dev, n))
		}
	}()

	b, stderr := e.fsBackup(img) // an image file this time
	if b.PartitionTable != "mbr" || len(b.Partitions) != 5 {
		t.Fatalf("layout: %s %+v\n%s", b.PartitionTable, b.Partitions, stderr)
	}
	for i, w := range []struct {
		n  int
		fs string
	}{{1, "ext2"}, {2, ""}, {5, "fat16"}, {6, "ext4"}, {7, "swap"}} {
		p := b.Partitions[i]
		if p.Number != w.n || p.Filesystem != w.fs || p.Extended != (w.n == 2) {
			t.Fatalf("partition %d: %+v", i, p)
		}
	}
	if strings.Contains(stderr, "warning") {
		t.Fatalf("unexpected warnings:\n%s", stderr)
	}
	target := e.path("target.img")
	randomFile(t, target, size)
	e.ok("restore", b.Snapshot, target)
	sameExceptFree(t, img, target, b.Partitions) // MBR, EBRs, gaps
	if !bytes.Equal(mustRead(t, img)[:512], mustRead(t, target)[:512]) {
		t.Fatal("MBR differs")
	}
	rdev := losetup(t, target, "-P")
	for n, kind := range kinds {
		checkFS(t, kind, partDev(t, rdev, n), want[n])
	}
}

// mbrEntry writes partition entry i of an MBR sector.
func mbrEntry(sector []byte, i int, typ byte, start, count uint32) {
	e := sector[446+16*i:]
	e[4] = typ
	binary.LittleEndian.PutUint32(e[8:], start)
	binary.LittleEndian.PutUint32(e[12:], count)
}

func TestDamagedLayoutsAreImagedInFull(t *testing.T) {
	needTools(t, "mkfs.ext4", "debugfs")
	e := newEnv(t)
	cases := []struct {
		name string
		make func(img string)
		want []string // in the warnings
	}{
		{"overlapping and oversized partitions", func(img string) {
			randomFile(t, img, 32<<20)
			sh(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", img, "8M")
			sector := make([]byte, 512)
			copy(sector, randomBytes(440))
			mbrEntry(sector, 0, 0x83, 2048, 16384)
			mbrEntry(sector, 1, 0x83, 10000, 16384) // overlaps partition 1
			mbrEntry(sector, 2, 0x83, 60000, 16384) // runs past the end
			sector[510], sector[511] = 0x55, 0xAA
			writeAt(t, img, 0, sector)
		}, []string{"partition 1", "overlaps partition 2", "runs past the end of the disk"}},
		{"superblock claims more blocks than the disk", func(img string) {
			randomFile(t, img, 16<<20)
			sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-O", "^metadata_csum", img)
			writeAt(t, img, 1024+4, []byte{0, 0, 0, 1}) // s_blocks_count_lo
		}, []string{"larger than its partition", "imaged in full"}},
		{"superblock checksum", func(img string) {
			randomFile(t, img, 16<<20)
			sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", img)
			writeAt(t, img, 1024+120, []byte("tampered")) // volume name
		}, []string{"superblock checksum mismatch"}},
		{"bitmap outside the filesystem", func(img string) {
			randomFile(t, img, 16<<20)
			sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-b", "1024", "-O", "^metadata_csum,^uninit_bg,^flex_bg", img)
			writeAt(t, img, 2048, []byte{0xFF, 0xFF, 0xFF, 0x00}) // group 0's block bitmap
		}, []string{"lie outside the filesystem"}},
		{"no filesystem", func(img string) { randomFile(t, img, 8<<20) }, []string{"no partition table or filesystem"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img := e.path("damaged.img")
			os.Remove(img)
			tc.make(img)
			b, stderr := e.fsBackup(img)
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Fatalf("warnings lack %q:\n%s", w, stderr)
				}
			}
			if b.BytesSkipped != 0 {
				t.Fatalf("skipped %d bytes as free", b.BytesSkipped)
			}
			dst := e.path("damaged.out")
			os.Remove(dst)
			e.ok("restore", b.Snapshot, dst)
			sameFile(t, img, dst)
		})
	}
}

func TestNoFSSkip(t *testing.T) {
	needTools(t, "mkfs.ext4")
	e := newEnv(t)
	img := e.path("fs.img")
	randomFile(t, img, 24<<20)
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", img)
	b, _ := e.fsBackup(img, "--no-fs-skip")
	if b.BytesSkipped != 0 || len(b.Partitions) != 1 || b.Partitions[0].Filesystem != "ext4" || b.Partitions[0].UsedBytes == nil {
		t.Fatalf("--no-fs-skip: %+v", b)
	}
	dst := e.path("out.img")
	e.ok("restore", "latest", dst)
	sameFile(t, img, dst)
	if !strings.Contains(e.ok("backup", "--help"), "--no-fs-skip") || !strings.Contains(e.ok("show", "--help"), "sauve show") {
		t.Fatal("help does not document --no-fs-skip or sauve show")
	}
}
