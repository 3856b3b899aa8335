package resize

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// fsDisk makes a GPT disk of size bytes whose last partition, starting
// at 1 MiB, holds a filesystem made by mkfs with args, and a file on it.
func fsDisk(t *testing.T, size, partSize int64, mkfs string, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	part := filepath.Join(dir, "part")
	os.WriteFile(part, nil, 0o600)
	os.Truncate(part, partSize)
	run(t, "", mkfs, append(args, part)...)
	path := filepath.Join(dir, "disk.img")
	os.WriteFile(path, nil, 0o600)
	os.Truncate(path, size)
	run(t, "label: gpt\n2048,"+strconv.FormatInt(partSize/512, 10)+"\n", "sfdisk", "-q", path)
	run(t, "", "dd", "if="+part, "of="+path, "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
	return path
}

func TestGrowFS(t *testing.T) {
	needTools(t, "sfdisk", "sgdisk", "losetup")
	if os.Geteuid() != 0 {
		t.Skip("loop devices and mounts need root")
	}
	tests := []struct {
		fs       string
		mkfs     string
		args     []string
		partSize int64
		size     func(t *testing.T, dev string) int64
	}{
		{Ext, "mkfs.ext4", []string{"-q", "-F"}, 16 * mib, extBlocks},
		{XFS, "mkfs.xfs", []string{"-q", "-f"}, 320 * mib, xfsBlocks},
	}
	for _, tc := range tests {
		t.Run(tc.fs, func(t *testing.T) {
			needTools(t, tc.mkfs)
			path := fsDisk(t, tc.partSize+2*mib, tc.partSize, tc.mkfs, tc.args...)
			before := tc.size(t, loopOf(t, path, mib, tc.partSize))
			res, err := grow(t, path, tc.partSize*2, Options{GrowLastPartition: true})
			if err != nil {
				t.Fatal(err)
			}
			fs, err := GrowFS(context.Background(), path, *res.Grown)
			if err != nil || fs != tc.fs {
				t.Fatalf("GrowFS: %q, %v", fs, err)
			}
			sgdiskClean(t, path)
			dev := loopOf(t, path, mib, res.Grown.NewSize)
			after := tc.size(t, dev)
			if after < before*19/10 {
				t.Errorf("filesystem has %d blocks after growing, %d before", after, before)
			}
			if tc.fs == Ext {
				run(t, "", "e2fsck", "-fn", dev)
			} else {
				run(t, "", "xfs_repair", "-n", dev)
			}
		})
	}
}

func loopOf(t *testing.T, path string, off, size int64) string {
	t.Helper()
	dev := strings.TrimSpace(run(t, "", "losetup", "-f", "--show", "-o", strconv.FormatInt(off, 10), "--sizelimit", strconv.FormatInt(size, 10), path))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func extBlocks(t *testing.T, dev string) int64 {
	return field(t, run(t, "", "dumpe2fs", "-h", dev), `Block count:\s+(\d+)`)
}

func xfsBlocks(t *testing.T, dev string) int64 {
	return field(t, run(t, "", "xfs_db", "-r", "-c", "sb 0", "-c", "print dblocks", dev), `dblocks = (\d+)`)
}

func field(t *testing.T, out, re string) int64 {
	t.Helper()
	m := regexp.MustCompile(re).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %s in\n%s", re, out)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

func TestGrowFSRefusesOther(t *testing.T) {
	needTools(t, "sfdisk")
	path := makeDisk(t, 20*mib, "label: gpt\n,4M\n")
	_, err := GrowFS(context.Background(), path, Grown{Number: 1, Start: mib, OldSize: 4 * mib, NewSize: 8 * mib})
	if err == nil || !strings.Contains(err.Error(), "no ext2/3/4 or XFS") {
		t.Fatalf("error %v", err)
	}
}
