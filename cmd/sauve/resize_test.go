package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// gptDisk makes a 64 MiB GPT disk at path: partition 1 (8 MiB) of random
// bytes, partition 2 the rest, an ext4 filesystem with a file in it.
func gptDisk(t *testing.T, e *env, path string) {
	t.Helper()
	// 64 MiB - 9 MiB - the backup GPT (33 sectors).
	partedDisk(t, e, path, "gpt", 131038-18432+1)
}

// partedDisk is gptDisk with another label; partition 2 has p2 sectors.
func partedDisk(t *testing.T, e *env, path, label string, p2 int64) {
	t.Helper()
	writeFile(t, path, nil)
	os.Truncate(path, 64<<20)
	shIn(t, "label: "+label+"\n2048,8M\n,\n", "sfdisk", "-q", path)
	writeAt(t, path, 1<<20, randomBytes(8<<20))
	dir := e.path("content")
	os.MkdirAll(dir, 0o755)
	writeFile(t, dir+"/hello", textBytes(7, 100000))
	part := e.path("part2")
	writeFile(t, part, nil)
	os.Truncate(part, p2*512)
	sh(t, "mkfs.ext4", "-q", "-F", "-d", dir, part)
	sh(t, "dd", "if="+part, "of="+path, "bs=1M", "seek=9", "conv=notrunc,sparse", "status=none")
}

func shIn(t *testing.T, stdin, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

type sfPart struct {
	Start, Size int64
}

func partitionsOf(t *testing.T, path string) []sfPart {
	t.Helper()
	var v struct{ PartitionTable struct{ Partitions []sfPart } }
	if err := jsonUnmarshal(sh(t, "sfdisk", "-J", path), &v); err != nil {
		t.Fatal(err)
	}
	return v.PartitionTable.Partitions
}

func requireGPTClean(t *testing.T, path string) {
	t.Helper()
	if out := sh(t, "sgdisk", "-v", path); !strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v %s:\n%s", path, out)
	}
}

func extBlockCount(t *testing.T, img string, off, size int64) int64 {
	t.Helper()
	dev := losetup(t, img, "-o", strconv.FormatInt(off, 10), "--sizelimit", strconv.FormatInt(size, 10))
	sh(t, "e2fsck", "-fn", dev)
	m := regexp.MustCompile(`Block count:\s+(\d+)`).FindStringSubmatch(sh(t, "dumpe2fs", "-h", dev))
	if m == nil {
		t.Fatal("no block count")
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// TestRestoreLarger restores and exports a GPT disk onto larger raw
// targets: the backup GPT ends up at the end (sgdisk -v is clean, which
// it is not for a plain copy), and on request the last partition and its
// ext4 grow.
func TestRestoreLarger(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"sfdisk", "sgdisk", "mkfs.ext4", "resize2fs"} {
		requireTool(t, tool)
	}
	e := newEnv(t)
	src := e.path("gpt.img")
	gptDisk(t, e, src)
	e.backup(src)
	p1 := fileHashAt(t, src, 1<<20, 8<<20)
	before := partitionsOf(t, src)
	blocks := extBlockCount(t, src, before[1].Start*512, before[1].Size*512)

	check := func(t *testing.T, out string, grown bool) {
		t.Helper()
		if fi, err := os.Stat(out); err != nil || fi.Size() != 128<<20 {
			t.Fatalf("target %v, %v: want 128 MiB", fi, err)
		}
		requireGPTClean(t, out)
		after := partitionsOf(t, out)
		if len(after) != 2 || after[0] != before[0] || after[1].Start != before[1].Start {
			t.Fatalf("partitions %+v, were %+v", after, before)
		}
		if fileHashAt(t, out, 1<<20, 8<<20) != p1 {
			t.Error("partition 1 changed")
		}
		wantEnd := int64(128<<11 - 34) // the last usable sector of 128 MiB
		n := extBlockCount(t, out, after[1].Start*512, after[1].Size*512)
		if grown {
			if after[1].Start+after[1].Size-1 != wantEnd || n <= blocks*3/2 {
				t.Errorf("partition 2 ends at %d (want %d), ext4 %d blocks (was %d)", after[1].Start+after[1].Size-1, wantEnd, n, blocks)
			}
		} else if after[1] != before[1] || n != blocks {
			t.Errorf("partition 2 %+v and %d blocks, want %+v and %d", after[1], n, before[1], blocks)
		}
	}
	t.Run("restore device", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("big.img")
		writeFile(t, out, nil)
		os.Truncate(out, 128<<20)
		e.ok("restore", "latest", losetup(t, out))
		check(t, out, false)
	})
	t.Run("restore file is cut", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("cut.img")
		writeFile(t, out, nil)
		os.Truncate(out, 128<<20)
		e.ok("restore", "latest", out)
		sameFile(t, src, out)
	})
	t.Run("restore grow", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("big-grow.img")
		writeFile(t, out, nil)
		os.Truncate(out, 128<<20)
		msg := e.ok("restore", "latest", out, "--grow-last-partition", "--grow-fs")
		if !strings.Contains(msg, "grew partition 2") {
			t.Errorf("output:\n%s", msg)
		}
		check(t, out, true)
	})
	t.Run("restore device grow", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("big-dev-grow.img")
		writeFile(t, out, nil)
		os.Truncate(out, 128<<20)
		e.ok("restore", "latest", losetup(t, out), "--grow-last-partition", "--grow-fs")
		check(t, out, true)
	})
	t.Run("export", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("export.img")
		e.ok("export", "latest", out, "--size", "128M")
		check(t, out, false)
	})
	t.Run("export grow", func(t *testing.T) {
		e := e.sub(t)
		out := e.path("export-grow.img")
		e.ok("export", "latest", out, "--size", "128M", "--grow-last-partition", "--grow-fs")
		check(t, out, true)
	})
	t.Run("export qcow2", func(t *testing.T) {
		requireTool(t, "qemu-img")
		e := e.sub(t)
		out := e.path("export.qcow2")
		e.ok("export", "latest", out, "--size", "128M")
		raw := e.path("export-qcow2.img")
		sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, raw)
		check(t, raw, false)
	})
	t.Run("export qcow2 grow", func(t *testing.T) {
		requireTool(t, "qemu-img")
		e := e.sub(t)
		out := e.path("export-grow.qcow2")
		e.ok("export", "latest", out, "--size", "128M", "--grow-last-partition")
		raw := e.path("export-grow-qcow2.img")
		sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, raw)
		requireGPTClean(t, raw)
		after := partitionsOf(t, raw)
		if len(after) != 2 || after[0] != before[0] || after[1].Start+after[1].Size != 128<<11-33 {
			t.Fatalf("partitions %+v, were %+v", after, before)
		}
		if fileHashAt(t, raw, 1<<20, 8<<20) != p1 {
			t.Error("partition 1 changed")
		}
		// The filesystem is the same, in a larger partition.
		if n := extBlockCount(t, raw, after[1].Start*512, after[1].Size*512); n != blocks {
			t.Errorf("ext4 has %d blocks, had %d", n, blocks)
		}
		e.fail([]string{"raw exports only"}, "export", "latest", e.path("x.qcow2"), "--size", "128M", "--grow-last-partition", "--grow-fs")
	})
	// Every streamed format gets the patches in its stream: read back
	// through qemu-img, the table is clean and partition 2 ends at the end.
	for _, v := range variants {
		if v.format == "raw" {
			continue
		}
		t.Run("export stream "+v.name, func(t *testing.T) {
			requireTool(t, "qemu-img")
			e := e.sub(t)
			out := e.path("grow-" + v.name + "." + v.ext)
			e.ok(append([]string{"export", "latest", out, "--size", "128M", "--grow-last-partition"}, v.args()...)...)
			raw := out + ".raw"
			sh(t, "qemu-img", "convert", "-f", v.qemu, "-O", "raw", out, raw)
			requireGPTClean(t, raw)
			fi, _ := os.Stat(raw)
			after := partitionsOf(t, raw)
			if len(after) != 2 || after[1].Start+after[1].Size != fi.Size()/512-33 {
				t.Fatalf("partitions %+v of %d bytes", after, fi.Size())
			}
			if fileHashAt(t, raw, 1<<20, 8<<20) != p1 {
				t.Error("partition 1 changed")
			}
		})
	}
	t.Run("grow-fs alone", func(t *testing.T) {
		e := e.sub(t)
		e.fail([]string{"give both"}, "restore", "latest", e.path("y.img"), "--grow-fs")
	})
}

// TestRestoreLargerDamagedGPT restores a disk whose primary GPT header
// fails its CRC onto a larger device: the patch is refused, and the
// target is left as restored.
func TestRestoreLargerDamagedGPT(t *testing.T) {
	requireRoot(t)
	requireTool(t, "sfdisk")
	requireTool(t, "mkfs.ext4")
	e := newEnv(t)
	src := e.path("gpt.img")
	gptDisk(t, e, src)
	f, err := os.OpenFile(src, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xAB}, 512+40) // inside the CRC'd header: first usable LBA
	f.Close()
	e.backup(src)
	out := e.path("big.img")
	writeFile(t, out, nil)
	os.Truncate(out, 128<<20)
	e.fail([]string{"fails its CRC", "left as restored"}, "restore", "latest", losetup(t, out))
	if fileHashAt(t, out, 0, 64<<20) != fileHashAt(t, src, 0, 64<<20) {
		t.Error("the target is not the restored disk")
	}
	if fileHashAt(t, out, 64<<20, 64<<20) != fileHashAt(t, "/dev/zero", 0, 64<<20) {
		t.Error("the target was written past the disk")
	}
}

// TestBootRestoredLarger restores the serial-printing boot disk (an MBR
// with boot code and no partitions) onto a larger device: it still
// boots.
func TestBootRestoredLarger(t *testing.T) {
	requireTool(t, "qemu-system-x86_64")
	requireRoot(t)
	e := newEnv(t)
	line := "SAUVE BOOT OK " + hex.EncodeToString(randomBytes(4))
	src := e.path("boot.raw")
	bootDisk(t, src, line)
	e.backup(src)
	out := e.path("big.raw")
	writeFile(t, out, nil)
	os.Truncate(out, 32<<20)
	e.ok("restore", "latest", losetup(t, out))
	if fi, _ := os.Stat(out); fi.Size() != 32<<20 {
		t.Fatalf("target is %d bytes", fi.Size())
	}
	boot(t, out, "raw", line)
}

// fileHashAt hashes n bytes of path at off.
func fileHashAt(t *testing.T, path string, off, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestRestoreLargerMBR grows the last partition of an MBR disk and its
// ext4 on a larger file.
func TestRestoreLargerMBR(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"sfdisk", "mkfs.ext4", "resize2fs"} {
		requireTool(t, tool)
	}
	e := newEnv(t)
	src := e.path("mbr.img")
	partedDisk(t, e, src, "dos", 131072-18432)
	e.backup(src)
	before := partitionsOf(t, src)
	blocks := extBlockCount(t, src, before[1].Start*512, before[1].Size*512)
	out := e.path("big.img")
	writeFile(t, out, nil)
	os.Truncate(out, 128<<20)
	e.ok("restore", "latest", out, "--grow-last-partition", "--grow-fs")
	if v := sh(t, "sfdisk", "--verify", out); !strings.Contains(v, "No errors detected") {
		t.Fatalf("sfdisk --verify:\n%s", v)
	}
	after := partitionsOf(t, out)
	if len(after) != 2 || after[0] != before[0] || after[1].Start != before[1].Start || after[1].Start+after[1].Size != 128<<11 {
		t.Fatalf("partitions %+v, were %+v", after, before)
	}
	if n := extBlockCount(t, out, after[1].Start*512, after[1].Size*512); n <= blocks*3/2 {
		t.Errorf("ext4 has %d blocks, had %d", n, blocks)
	}
}
