package blockmap

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// need skips the test when a tool is missing (CI installs them all).
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// image makes a sparse file of size bytes in a temporary directory.
func image(t *testing.T, name string, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// probeFile opens an image and probes it as one region.
func probeFile(t *testing.T, p string) (*Filesystem, *os.File, []string) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, _ := f.Stat()
	var warns []string
	fs, err := Probe(f, fi.Size(), func(s string) { warns = append(warns, s) })
	if err != nil {
		t.Fatal(err)
	}
	return fs, f, warns
}

// usedUnits walks a filesystem's map in backup-sized windows and returns
// which units of unit bytes it says are used.
func usedUnits(t *testing.T, fs *Filesystem, unit int64) []bool {
	t.Helper()
	if fs.m == nil {
		t.Fatalf("%s: no map (%s)", fs.Type, fs.Full)
	}
	used := make([]bool, (fs.Size+unit-1)/unit)
	const win = 256 << 10
	for off := int64(0); off < fs.Size; off += win {
		rs, err := fs.m.Data(off, min(win, fs.Size-off))
		if err != nil {
			t.Fatal(err)
		}
		last := off
		for _, r := range rs {
			if r.Start < last || r.End <= r.Start || r.End > off+win {
				t.Fatalf("bad range %v in window %d (after %d)", r, off, last)
			}
			last = r.End
			if r.Start%unit != 0 && r.End%unit != 0 {
				t.Fatalf("range %v not aligned to %d", r, unit)
			}
			for u := r.Start / unit; u < (r.End+unit-1)/unit; u++ {
				used[u] = true
			}
		}
	}
	return used
}

var freeRangeRE = regexp.MustCompile(`(\d+)(?:-(\d+))?`)

// dumpe2fsFree returns the free blocks dumpe2fs lists.
func dumpe2fsFree(t *testing.T, img string) map[int64]bool {
	out := run(t, "dumpe2fs", img)
	free := map[int64]bool{}
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "Free blocks: ") {
			continue
		}
		for _, m := range freeRangeRE.FindAllStringSubmatch(strings.TrimPrefix(line, "Free blocks: "), -1) {
			a, _ := strconv.ParseInt(m[1], 10, 64)
			b := a
			if m[2] != "" {
				b, _ = strconv.ParseInt(m[2], 10, 64)
			}
			for x := a; x <= b; x++ {
				free[x] = true
			}
		}
	}
	return free
}

func TestExtAgainstDumpe2fs(t *testing.T) {
	need(t, "mkfs.ext4", "dumpe2fs", "debugfs")
	cases := []struct {
		name string
		args []string
		size int64
	}{
		{"ext2", []string{"-t", "ext2"}, 24 << 20},
		{"ext3", []string{"-t", "ext3"}, 24 << 20},
		{"ext4-1k", []string{"-t", "ext4", "-b", "1024"}, 40 << 20},
		{"ext4-lazy", []string{"-t", "ext4", "-E", "lazy_itable_init=1"}, 300 << 20},
		{"ext4-nolazy-32bit", []string{"-t", "ext4", "-O", "^64bit", "-E", "lazy_itable_init=0"}, 200 << 20},
		{"ext4-uninit-nocsum", []string{"-t", "ext4", "-O", "^metadata_csum,uninit_bg"}, 300 << 20},
		{"ext4-metabg", []string{"-t", "ext4", "-O", "meta_bg,^resize_inode"}, 300 << 20},
		{"ext4-noflex", []string{"-t", "ext4", "-O", "^flex_bg"}, 200 << 20},
		{"ext4-bigalloc", []string{"-t", "ext4", "-O", "bigalloc", "-C", "16384"}, 200 << 20},
		{"ext4-sparse2", []string{"-t", "ext4", "-O", "sparse_super2"}, 300 << 20},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img := image(t, tc.name+".img", tc.size)
			run(t, "mkfs.ext4", append(append([]string{"-q", "-F"}, tc.args...), "-d", "../../internal", img)...)
			// Remove some files so freed blocks hold stale data.
			run(t, "debugfs", "-w", "-R", "rm /blockmap/alloc.go", img)
			fs, _, warns := probeFile(t, img)
			if fs == nil || fs.m == nil || len(warns) > 0 {
				t.Fatalf("probe: %+v %v", fs, warns)
			}
			if !strings.HasPrefix(tc.name, fs.Type) {
				t.Errorf("type %s", fs.Type)
			}
			hdr := run(t, "dumpe2fs", "-h", img)
			blk := headerInt(t, hdr, "Block size:")
			if fs.BlockSize != int(blk) && !strings.Contains(tc.name, "bigalloc") {
				t.Fatalf("block size %d, dumpe2fs says %d", fs.BlockSize, blk)
			}
			ratio := int64(fs.BlockSize) / blk
			free := dumpe2fsFree(t, img)
			used := usedUnits(t, fs, blk)
			var mismatch []string
			for b := int64(0); b < int64(len(used)); b++ {
				// dumpe2fs lists free clusters by their first block.
				isFree := free[b/ratio*ratio]
				if used[b] == isFree {
					mismatch = append(mismatch, fmt.Sprintf("%d(used=%v)", b, used[b]))
				}
			}
			if len(mismatch) > 0 {
				t.Fatalf("%d blocks disagree with dumpe2fs, first: %v", len(mismatch), mismatch[:min(10, len(mismatch))])
			}
		})
	}
}

func headerInt(t *testing.T, out, key string) int64 {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, key) {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimPrefix(line, key)), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	t.Fatalf("no %q in:\n%s", key, out)
	return 0
}

// zerosWith is a disk of size bytes of zeros but for data at off.
type zerosWith struct {
	size, off int64
	data      []byte
}

func (z zerosWith) ReadAt(p []byte, off int64) (int, error) {
	if off >= z.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), z.size-off))
	clear(p[:n])
	if a, b := max(off, z.off), min(off+int64(n), z.off+int64(len(z.data))); a < b {
		copy(p[a-off:b-off], z.data[a-z.off:b-z.off])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// TestExtClaimedGroupsDoNotAllocate: a damaged superblock of a large
// disk claiming many tiny block groups (here 8M groups of 8 blocks, on
// 64 GiB) costs memory for the descriptors read, not for the groups
// claimed: the first descriptor is zeros, so the filesystem is imaged in
// full after one block is read. Found while bounding the fuzz targets'
// work: the descriptor slice was allocated for every group up front.
func TestExtClaimedGroupsDoNotAllocate(t *testing.T) {
	sb := make([]byte, 1024)
	binary.LittleEndian.PutUint32(sb[4:], 64<<20) // blocks of 1 KiB
	binary.LittleEndian.PutUint32(sb[20:], 1)     // first data block
	binary.LittleEndian.PutUint32(sb[32:], 8)     // blocks per group
	binary.LittleEndian.PutUint32(sb[40:], 8)     // inodes per group
	binary.LittleEndian.PutUint16(sb[56:], 0xEF53)
	binary.LittleEndian.PutUint16(sb[58:], 1) // clean
	disk := zerosWith{size: 64 << 30, off: 1024, data: sb}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	fs, err := probeExt(disk, disk.size, func(string) {})
	runtime.ReadMemStats(&after)
	if err != nil || fs == nil || fs.Full == "" {
		t.Fatalf("probe: %+v %v", fs, err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("probing allocated %d bytes", n)
	}
}
