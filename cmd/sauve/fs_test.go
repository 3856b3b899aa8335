package main

// End-to-end tests of whole-disk fidelity: real filesystems made with
// Debian's mkfs tools on images whose every byte was random before, so
// free blocks hold stale data; backed up with free space skipped,
// restored onto targets full of random bytes, then checked with each
// filesystem's own fsck and by comparing every file.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// needTools skips when a tool is missing (CI installs them all).
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	requireRoot(t)
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
}

// randomFile writes size random bytes to path, 4 MiB at a time.
func randomFile(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		rand.Read(buf[:n])
		if _, err := f.Write(buf[:n]); err != nil {
			t.Fatal(err)
		}
	}
}

// hashTree returns the SHA-256 of every regular file under dir.
func hashTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if strings.HasPrefix(rel, "lost+found") || strings.HasPrefix(rel, "System Volume Information") {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		out[rel] = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameTree(t *testing.T, want, got map[string]string) {
	t.Helper()
	if len(want) == 0 {
		t.Fatal("no files to compare")
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("file %s differs after restore (%d files in the original, %d restored)", k, len(want), len(got))
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d files restored, %d in the original", len(got), len(want))
	}
}

// withMount mounts dev (read-only unless rw) and runs fn on the mount
// point. NTFS goes through ntfs-3g.
func withMount(t *testing.T, fstype, dev string, rw bool, fn func(dir string)) {
	t.Helper()
	dir, err := os.MkdirTemp("", "sauve-mnt")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	opt := "ro"
	if rw {
		opt = "rw"
	}
	if fstype == "ntfs" {
		sh(t, "ntfs-3g", "-o", opt, dev, dir)
	} else {
		if !strings.HasPrefix(dev, "/dev/") {
			opt += ",loop"
		}
		sh(t, "mount", "-o", opt, dev, dir)
	}
	defer func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dir, err, out)
		}
	}()
	fn(dir)
}

// fsKind says how to make, fill, read and check one filesystem.
type fsKind struct {
	mkfs  []string // command; the device is appended
	size  int64
	fsck  []string // command that must exit 0; the device is appended
	mount string   // "" for FAT (mtools) and swap
	pc    string   // partclone tool for the used-bytes comparison
}

var fsKinds = map[string]fsKind{
	"ext2":                 {mkfs: []string{"mkfs.ext2", "-q", "-F", "-E", "nodiscard"}, size: 24 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext2", pc: "partclone.ext2"},
	"ext3":                 {mkfs: []string{"mkfs.ext3", "-q", "-F", "-E", "nodiscard"}, size: 24 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext3", pc: "partclone.ext3"},
	"ext4":                 {mkfs: []string{"mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1", "-b", "4096"}, size: 48 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext4", pc: "partclone.ext4"},
	"ext4-32bit-uninit_bg": {mkfs: []string{"mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-b", "4096", "-O", "^64bit,^metadata_csum,uninit_bg"}, size: 48 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext4", pc: "partclone.ext4"},
	"ext4-meta_bg-noflex":  {mkfs: []string{"mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-b", "1024", "-O", "meta_bg,^resize_inode,^flex_bg"}, size: 40 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext4", pc: "partclone.ext4"},
	"ext4-nolazy":          {mkfs: []string{"mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", "-b", "4096", "-O", "^flex_bg"}, size: 48 << 20, fsck: []string{"e2fsck", "-fn"}, mount: "ext4", pc: "partclone.ext4"},
	// mkfs.xfs refuses filesystems under 300 MiB; the image is sparse
	// where mkfs did not write, so it costs little.
	"xfs":  {mkfs: []string{"mkfs.xfs", "-q", "-f", "-K"}, size: 300 << 20, fsck: []string{"xfs_repair", "-n"}, mount: "xfs", pc: "partclone.xfs"},
	"ntfs": {mkfs: []string{"mkntfs", "-q", "-Q", "-F", "-L", "win"}, size: 40 << 20, fsck: []string{"ntfsfix", "-n"}, mount: "ntfs", pc: "partclone.ntfs"},
	// partclone.fat12 misreads FAT12 entries (it counts 445952 more bytes
	// than fsck.fat on the test image): FAT12 is compared with fsck.fat.
	"fat12": {mkfs: []string{"mkfs.fat", "-F", "12", "-n", "F12"}, size: 4 << 20, fsck: []string{"fsck.vfat", "-n"}},
	"fat16": {mkfs: []string{"mkfs.fat", "-F", "16", "-n", "F16"}, size: 24 << 20, fsck: []string{"fsck.vfat", "-n"}, pc: "partclone.fat16"},
	"fat32": {mkfs: []string{"mkfs.fat", "-F", "32", "-n", "F32"}, size: 40 << 20, fsck: []string{"fsck.vfat", "-n"}, pc: "partclone.fat32"},
	"swap":  {mkfs: []string{"mkswap", "-L", "myswap"}, size: 16 << 20},
}

// makeFS formats dev (an image or a partition) and fills it with files,
// deleting some so that freed blocks hold data. It returns the hashes of
// the files left.
func makeFS(t *testing.T, kind string, dev string) map[string]string {
	t.Helper()
	k := fsKinds[kind]
	sh(t, k.mkfs[0], append(k.mkfs[1:], dev)...)
	src := filepath.Join(t.TempDir(), "files")
	os.MkdirAll(filepath.Join(src, "docs"), 0o755)
	for i := range 12 {
		data := textBytes(uint64(i+100), 40<<10+i*7919)
		if i%4 == 0 {
			data = randomBytes(100<<10 + i)
		}
		writeFile(t, filepath.Join(src, fmt.Sprintf("file%02d.dat", i)), data)
	}
	writeFile(t, filepath.Join(src, "docs", "readme.txt"), textBytes(7, 3000))
	doomed := []string{"file01.dat", "file04.dat", "file07.dat"}
	switch {
	case kind == "swap":
		return nil
	case strings.HasPrefix(kind, "fat"):
		for _, e := range mustReadDir(t, src) {
			sh(t, "mcopy", "-s", "-i", dev, filepath.Join(src, e), "::"+e)
		}
		for _, d := range doomed {
			sh(t, "mdel", "-i", dev, "::"+d)
		}
		out := filepath.Join(t.TempDir(), "fat-out")
		return fatFiles(t, dev, out)
	default:
		var hashes map[string]string
		withMount(t, k.mount, dev, true, func(dir string) {
			sh(t, "cp", "-r", src+"/.", dir)
			sh(t, "sync")
			for _, d := range doomed {
				os.Remove(filepath.Join(dir, d))
			}
			hashes = hashTree(t, dir)
		})
		return hashes
	}
}

func mustReadDir(t *testing.T, dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// fatFiles copies a FAT filesystem's files out with mtools and hashes them.
func fatFiles(t *testing.T, dev, dir string) map[string]string {
	t.Helper()
	os.RemoveAll(dir)
	os.MkdirAll(dir, 0o755)
	sh(t, "mcopy", "-s", "-n", "-i", dev, "::*", dir)
	return hashTree(t, dir)
}

// checkFS runs the filesystem's fsck on dev and compares its files.
func checkFS(t *testing.T, kind, dev string, want map[string]string) {
	t.Helper()
	k := fsKinds[kind]
	if k.fsck != nil {
		out, err := exec.Command(k.fsck[0], append(k.fsck[1:], dev)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s on the restored %s: %v\n%s", strings.Join(k.fsck, " "), dev, kind, err, out)
		}
	}
	switch {
	case kind == "swap":
		out := sh(t, "blkid", "-p", "-o", "export", dev)
		if !strings.Contains(out, "TYPE=swap") || !strings.Contains(out, "LABEL=myswap") {
			t.Fatalf("restored swap: blkid says\n%s", out)
		}
	case strings.HasPrefix(kind, "fat"):
		sameTree(t, want, fatFiles(t, dev, filepath.Join(t.TempDir(), "fat-check")))
	default:
		withMount(t, k.mount, dev, false, func(dir string) { sameTree(t, want, hashTree(t, dir)) })
	}
}

type partOut struct {
	Number       int
	Start, Size  int64
	Type         string
	TypeName     string `json:"type_name"`
	Filesystem   string
	Label        string
	UsedBytes    *int64 `json:"used_bytes"`
	BytesRead    int64  `json:"bytes_read"`
	BytesSkipped int64  `json:"bytes_skipped"`
	ImagedInFull string `json:"imaged_in_full"`
	Extended     bool
}

type fsBackupOut struct {
	backupOut
	PartitionTable string    `json:"partition_table"`
	Partitions     []partOut `json:"partitions"`
	BytesSkipped   int64     `json:"bytes_skipped"`
	Outside        int64     `json:"bytes_outside_partitions"`
}

func (e *env) fsBackup(args ...string) (fsBackupOut, string) {
	e.t.Helper()
	r := e.run(append(append([]string{"backup"}, args...), "--json")...)
	if r.code != 0 {
		e.t.Fatalf("backup %v: exit %d\n%s", args, r.code, r.stderr)
	}
	var b fsBackupOut
	if err := jsonUnmarshal(r.stdout, &b); err != nil {
		e.t.Fatalf("backup --json: %v\n%s", err, r.stdout)
	}
	return b, r.stderr
}

var pcInUse = regexp.MustCompile(`Space in use:\s+\S+ \S+ = (\d+) Blocks`)
var pcBlock = regexp.MustCompile(`Block size:\s+(\d+) Byte`)

// partcloneUsed returns the bytes partclone counts as in use.
func partcloneUsed(t *testing.T, tool, dev string) int64 {
	t.Helper()
	out, _ := exec.Command(tool, "-c", "-s", dev, "-O", "/dev/null", "-q").CombinedOutput()
	u, b := pcInUse.FindSubmatch(out), pcBlock.FindSubmatch(out)
	if u == nil || b == nil {
		t.Fatalf("%s -c -s %s: no usage in its output:\n%s", tool, dev, out)
	}
	blocks, _ := strconv.ParseInt(string(u[1]), 10, 64)
	bs, _ := strconv.ParseInt(string(b[1]), 10, 64)
	return blocks * bs
}

// usedMargin is how far sauve's used bytes may be from partclone's: 1%.
// Both read the same allocation maps and agree exactly on every test
// image today; the margin leaves room for what each counts around them
// (a last partial cluster, the AG free lists of XFS).
func usedMargin(size int64) int64 {
	return max(size/100, 64<<10)
}

func TestFilesystemRoundTrips(t *testing.T) {
	needTools(t, "mkfs.ext4", "mkfs.xfs", "mkntfs", "ntfs-3g", "ntfsfix", "mkfs.fat", "fsck.vfat", "mcopy", "mkswap", "xfs_repair", "e2fsck", "blkid")
	e := newEnv(t)
	for _, kind := range []string{"ext2", "ext3", "ext4", "ext4-32bit-uninit_bg", "ext4-meta_bg-noflex", "ext4-nolazy", "xfs", "ntfs", "fat12", "fat16", "fat32", "swap"} {
		t.Run(kind, func(t *testing.T) {
			k := fsKinds[kind]
			img := e.path(kind + ".img")
			randomFile(t, img, k.size) // stale data everywhere before mkfs
			want := makeFS(t, kind, img)

			b, stderr := e.fsBackup(img)
			if len(b.Partitions) != 1 {
				t.Fatalf("partitions: %+v\n%s", b.Partitions, stderr)
			}
			p := b.Partitions[0]
			wantType := strings.SplitN(kind, "-", 2)[0]
			if p.Filesystem != wantType || p.ImagedInFull != "" || p.UsedBytes == nil {
				t.Fatalf("partition: %+v\n%s", p, stderr)
			}
			// Bytes after the filesystem's last block (NTFS's backup boot
			// sector, a last partial cluster) are read too: at most 64 KiB.
			if b.BytesRead > *p.UsedBytes+64<<10 || b.BytesSkipped < k.size/4 || b.BytesSkipped != p.BytesSkipped {
				t.Fatalf("read %d bytes, used %d, skipped %d of %d", b.BytesRead, *p.UsedBytes, b.BytesSkipped, k.size)
			}
			if k.pc != "" {
				if _, err := exec.LookPath(k.pc); err == nil {
					pc := partcloneUsed(t, k.pc, img)
					t.Logf("used: sauve %d, %s %d (%+d)", *p.UsedBytes, k.pc, pc, *p.UsedBytes-pc)
					if d := *p.UsedBytes - pc; d > usedMargin(k.size) || -d > usedMargin(k.size) {
						t.Errorf("sauve counts %d bytes used, %s %d", *p.UsedBytes, k.pc, pc)
					}
				}
			}
			if strings.HasPrefix(kind, "fat") {
				if u := fsckFatUsed(t, img); u != *p.UsedBytes {
					t.Errorf("sauve counts %d bytes used, fsck.fat %d", *p.UsedBytes, u)
				}
			}
			// Restore onto a file full of random bytes.
			dst := e.path(kind + ".restored")
			randomFile(t, dst, k.size)
			e.ok("restore", b.Snapshot, dst)
			checkFS(t, kind, dst, want)
			if kind == "swap" {
				// Only the header page is kept; the rest reads as zeros.
				got := mustRead(t, dst)
				if !bytes.Equal(got[:4096], mustRead(t, img)[:4096]) || !bytes.Equal(got[4096:], make([]byte, len(got)-4096)) {
					t.Fatal("restored swap is not its header followed by zeros")
				}
			}
			os.Remove(dst)
			os.Remove(img)
		})
	}
}

var (
	fatClusters  = regexp.MustCompile(`(\d+)/\d+ clusters`)
	fatClusterSz = regexp.MustCompile(`(\d+) bytes per cluster`)
	fatDataStart = regexp.MustCompile(`Data area starts at byte (\d+)`)
)

// fsckFatUsed returns the bytes fsck.fat -v counts as used: the sectors
// before the data area and the used clusters.
func fsckFatUsed(t *testing.T, dev string) int64 {
	t.Helper()
	out, _ := exec.Command("fsck.fat", "-n", "-v", dev).CombinedOutput()
	var v [3]int64
	for i, re := range []*regexp.Regexp{fatClusters, fatClusterSz, fatDataStart} {
		m := re.FindSubmatch(out)
		if m == nil {
			t.Fatalf("fsck.fat -v: no %s in\n%s", re, out)
		}
		v[i], _ = strconv.ParseInt(string(m[1]), 10, 64)
	}
	return v[0]*v[1] + v[2]
}
