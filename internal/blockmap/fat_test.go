package blockmap

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

// fatImage makes a FAT image with mkfs.fat and fills it with mtools
// (there is no vfat driver to mount it), deleting some files so that free
// clusters hold stale data.
func fatImage(t *testing.T, bits string, size int64) string {
	t.Helper()
	need(t, "mkfs.fat", "mcopy", "mdel")
	img := image(t, "fat"+bits+".img", size)
	run(t, "mkfs.fat", "-F", bits, "-n", "TESTFAT", img)
	src := "../../internal/repo"
	ents, _ := os.ReadDir(src)
	for i, e := range ents {
		if i > 12 {
			break
		}
		run(t, "mcopy", "-i", img, filepath.Join(src, e.Name()), "::"+e.Name())
	}
	run(t, "mcopy", "-i", img, "-s", "/usr/share/doc/bash", "::bash")
	for i, e := range ents {
		if i%3 == 0 && i <= 12 {
			run(t, "mdel", "-i", img, "::"+e.Name())
		}
	}
	return img
}

var fsckClustersRE = regexp.MustCompile(`(\d+)/(\d+) clusters`)

func TestFATAgainstFsck(t *testing.T) {
	need(t, "fsck.fat")
	for _, tc := range []struct {
		bits string
		size int64
	}{{"12", 4 << 20}, {"16", 32 << 20}, {"32", 64 << 20}} {
		t.Run("fat"+tc.bits, func(t *testing.T) {
			img := fatImage(t, tc.bits, tc.size)
			fs, _, warns := probeFile(t, img)
			if fs == nil || fs.Type != "fat"+tc.bits || fs.m == nil || len(warns) > 0 {
				t.Fatalf("probe: %+v %v", fs, warns)
			}
			if fs.Label != "TESTFAT" {
				t.Errorf("label %q", fs.Label)
			}
			out, _ := exec.Command("fsck.fat", "-n", "-v", img).CombinedOutput()
			m := fsckClustersRE.FindSubmatch(out)
			if m == nil {
				t.Fatalf("fsck.fat output:\n%s", out)
			}
			wantUsed, _ := strconv.ParseInt(string(m[1]), 10, 64)
			wantTotal, _ := strconv.ParseInt(string(m[2]), 10, 64)
			f := fs.m.(*allocMap).p.(*fatFS)
			if f.clusters != wantTotal {
				t.Fatalf("%d clusters, fsck.fat says %d", f.clusters, wantTotal)
			}
			used := usedUnits(t, fs, f.bps)
			var clusters int64
			for s := f.firstData; s < int64(len(used)); s += f.spc {
				if used[s] {
					clusters++
				}
				for k := s; k < s+f.spc && k < int64(len(used)); k++ {
					if used[k] != used[s] {
						t.Fatalf("sector %d of a cluster differs from its first", k)
					}
				}
			}
			for s := int64(0); s < f.firstData; s++ {
				if !used[s] {
					t.Fatalf("sector %d before the data area is not used", s)
				}
			}
			t.Logf("%d of %d clusters used", clusters, wantTotal)
			if clusters != wantUsed {
				t.Fatalf("%d used clusters, fsck.fat says %d", clusters, wantUsed)
			}
		})
	}
}
