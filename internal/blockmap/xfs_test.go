package blockmap

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// xfsFree lists the free blocks xfs_db reports, as filesystem block
// numbers.
func xfsFree(t *testing.T, img string, agblocks int64) map[int64]bool {
	out := run(t, "xfs_db", "-r", "-c", "freesp -d", img)
	free := map[int64]bool{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		ag, err1 := strconv.ParseInt(f[0], 10, 64)
		bno, err2 := strconv.ParseInt(f[1], 10, 64)
		n, err3 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		for b := bno; b < bno+n; b++ {
			free[ag*agblocks+b] = true
		}
	}
	return free
}

// mounted fills a filesystem image through a loop mount; fn runs with
// the mount point.
func mounted(t *testing.T, img string, fn func(dir string), opts ...string) {
	t.Helper()
	if strings.Contains(t.Name(), "v4") {
		return
	}
	requireRoot(t)
	dir := t.TempDir()
	run(t, "mount", append(append([]string{"-o", "loop"}, opts...), img, dir)...)
	defer func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v %s", err, out)
		}
	}()
	fn(dir)
}

func TestXFSAgainstXFSDB(t *testing.T) {
	need(t, "mkfs.xfs", "xfs_db")
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"v5", nil},
		// The kernel no longer mounts v4: it is checked empty.
		{"v4", []string{"-m", "crc=0"}},
		{"4ag-1k", []string{"-b", "size=1024", "-d", "agcount=4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := image(t, "x.img", 300<<20)
			run(t, "mkfs.xfs", append(append([]string{"-q"}, tc.args...), img)...)
			mounted(t, img, func(dir string) {
				if tc.name == "v4" {
					return
				}
				run(t, "cp", "-r", "../../internal", "/usr/share/doc/bash", dir)
				run(t, "rm", "-rf", dir+"/internal/crypto")
				// Fragment free space so the tree has several levels.
				for i := range 3000 {
					os.WriteFile(dir+"/f"+strconv.Itoa(i), []byte(strings.Repeat("x", 5000)), 0o644)
				}
				for i := 0; i < 3000; i += 2 {
					os.Remove(dir + "/f" + strconv.Itoa(i))
				}
			})
			fs, _, warns := probeFile(t, img)
			if fs == nil || fs.Type != "xfs" || fs.m == nil || len(warns) > 0 {
				t.Fatalf("probe: %+v %v", fs, warns)
			}
			x := fs.m.(*allocMap).p.(*xfsFS)
			used := usedUnits(t, fs, int64(fs.BlockSize))
			free := xfsFree(t, img, int64(x.agblocks))
			bad := 0
			for b := range used {
				if used[b] == free[int64(b)] {
					bad++
					if bad < 5 {
						t.Errorf("block %d: used=%v", b, used[b])
					}
				}
			}
			if bad > 0 {
				t.Fatalf("%d blocks disagree with xfs_db freesp", bad)
			}
		})
	}
}

func TestXFSDirtyLogIsImagedInFull(t *testing.T) {
	need(t, "mkfs.xfs")
	img := image(t, "x.img", 300<<20)
	run(t, "mkfs.xfs", "-q", img)
	copyPath := img + ".copy"
	mounted(t, img, func(dir string) {
		run(t, "cp", "-r", "../../internal", dir)
		run(t, "sync")
		// A copy taken while mounted is what a crash leaves.
		run(t, "cp", "--sparse=always", img, copyPath)
	})
	fs, _, _ := probeFile(t, img)
	if fs.m == nil {
		t.Fatalf("cleanly unmounted XFS not mapped: %s", fs.Full)
	}
	fs, _, _ = probeFile(t, copyPath)
	if fs.m != nil || !strings.Contains(fs.Full, "log") {
		t.Fatalf("XFS with a dirty log: %+v", fs)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount (CI runs as root)")
	}
}
