package source

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// need skips the test when tool is missing, naming the Debian package
// that has it (CI installs them all: .ci/packages).
func need(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Skipf("%s is not installed: install the Debian package %s (listed in .ci/packages)", tool, pkg)
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// sparseFile makes a file of size bytes, all hole, in a temporary folder.
func sparseFile(t *testing.T, name string, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// place copies the blocks of src that are not all zeros into dst at
// off: dst stays sparse where src is blank.
func place(t *testing.T, dst string, off int64, src string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	buf := make([]byte, 64<<10)
	zero := make([]byte, len(buf))
	for pos := int64(0); ; {
		n, err := in.ReadAt(buf, pos)
		if n > 0 && !bytes.Equal(buf[:n], zero[:n]) {
			if _, err := out.WriteAt(buf[:n], off+pos); err != nil {
				t.Fatal(err)
			}
		}
		pos += int64(n)
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// fsKind is a filesystem sauve maps, made on a regular file.
type fsKind struct {
	name      string // as the snapshot records it
	tool, pkg string
	size      int64
	mkfs      []string // the file's path is appended
}

var fsKinds = []fsKind{
	{"ext4", "mkfs.ext4", "e2fsprogs", 32 << 20, []string{"mkfs.ext4", "-F", "-q"}},
	{"xfs", "mkfs.xfs", "xfsprogs", 300 << 20, []string{"mkfs.xfs", "-f", "-q"}},
	{"ntfs", "mkfs.ntfs", "ntfs-3g", 40 << 20, []string{"mkfs.ntfs", "-F", "-Q", "-q"}},
	{"fat16", "mformat", "mtools", 24 << 20, nil}, // mformat -i FILE ::
	{"swap", "mkswap", "util-linux", 16 << 20, []string{"mkswap", "-L", "swap0"}},
}

// makeFS makes a filesystem of kind k in a new file and returns its path.
func makeFS(t *testing.T, k fsKind) string {
	t.Helper()
	need(t, k.tool, k.pkg)
	p := sparseFile(t, k.name+".fs", k.size)
	if k.mkfs == nil {
		run(t, "mformat", "-i", p, "::")
	} else {
		run(t, k.mkfs[0], append(k.mkfs[1:], p)...)
	}
	return p
}

// partitioned makes a disk of size bytes with a partition table ("dos"
// or "gpt") holding one partition of n bytes at 1 MiB, filled with the
// file fs.
func partitioned(t *testing.T, label string, size, n int64, fs string) string {
	t.Helper()
	need(t, "sfdisk", "fdisk")
	p := sparseFile(t, "disk-"+label+".img", size)
	script := "label: " + label + "\nstart=2048, size=" + strconv.FormatInt(n/512, 10) + "\n"
	c := exec.Command("sfdisk", "-q", p)
	c.Stdin = strings.NewReader(script)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk %s: %v\n%s", p, err, out)
	}
	if fs != "" {
		place(t, p, 1<<20, fs)
	}
	return p
}

// asStdin runs open with descriptor 0 replaced by r, as a shell pipe
// would set it, and puts the old one back.
func asStdin(t *testing.T, r *os.File, open func()) {
	t.Helper()
	saved, err := unix.Dup(0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(saved)
	if err := unix.Dup2(int(r.Fd()), 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Dup2(saved, 0)
	open()
}
