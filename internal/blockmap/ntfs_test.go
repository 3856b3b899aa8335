package blockmap

import (
	"encoding/binary"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// ntfsImage makes an NTFS image filled through ntfs-3g, with files
// deleted so that free clusters hold stale data.
func ntfsImage(t *testing.T, size int64) string {
	t.Helper()
	need(t, "mkntfs", "ntfs-3g", "ntfscat")
	img := image(t, "n.img", size)
	run(t, "mkntfs", "-q", "-Q", "-F", "-L", "testvol", img)
	mountedWith(t, []string{"ntfs-3g", img}, func(dir string) {
		run(t, "cp", "-r", "../../internal", "/usr/share/doc/bash", dir)
		run(t, "rm", "-rf", dir+"/internal/crypto", dir+"/bash/README")
	})
	return img
}

func TestNTFSAgainstItsBitmap(t *testing.T) {
	img := ntfsImage(t, 64<<20)
	fs, _, warns := probeFile(t, img)
	if fs == nil || fs.Type != "ntfs" || fs.m == nil || len(warns) > 0 {
		t.Fatalf("probe: %+v %v", fs, warns)
	}
	if fs.Label != "testvol" {
		t.Errorf("label %q", fs.Label)
	}
	out, err := exec.Command("ntfscat", img, "$Bitmap").Output()
	if err != nil {
		t.Fatal(err)
	}
	used := usedUnits(t, fs, int64(fs.BlockSize))
	bad := 0
	for c := range used {
		want := out[c/8]&(1<<(c%8)) != 0
		if used[c] != want {
			bad++
			t.Logf("cluster %d of %d: used=%v", c, len(used), used[c])
		}
	}
	if bad > 0 {
		t.Fatalf("%d clusters disagree with $Bitmap", bad)
	}
}

// ntfs-3g empties $LogFile when it mounts, so a volume it has mounted
// always looks clean; Windows leaves restart pages with a client in use
// and no clean flag. This test writes such pages, as Windows would.
func TestNTFSDirtyLogIsImagedInFull(t *testing.T) {
	img := ntfsImage(t, 32<<20)
	fs, f, _ := probeFile(t, img)
	n := fs.m.(*allocMap).p.(*ntfsFS)
	runs, err := n.dataRuns(2)
	if err != nil {
		t.Fatal(err)
	}
	logOff := runs[0].lcn * n.cluster
	f.Close()
	write := func(flags uint16) {
		w, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		for k := int64(0); k < 2; k++ {
			w.WriteAt(restartPage(uint64(10+k), flags), logOff+k*4096)
		}
	}
	write(0)
	fs, _, _ = probeFile(t, img)
	if fs.m != nil || !strings.Contains(fs.Full, "$LogFile") {
		t.Fatalf("NTFS with a dirty log was mapped: %+v", fs)
	}
	write(2) // RESTART_VOLUME_IS_CLEAN
	if fs, _, _ = probeFile(t, img); fs.m == nil {
		t.Fatalf("NTFS with a clean log not mapped: %s", fs.Full)
	}
}

// restartPage builds a $LogFile restart page of 4096 bytes with one
// client in use and the given restart area flags.
func restartPage(lsn uint64, flags uint16) []byte {
	p := make([]byte, 4096)
	copy(p, "RSTR")
	binary.LittleEndian.PutUint16(p[4:], 0x1E) // update sequence offset
	binary.LittleEndian.PutUint16(p[6:], 9)    // 1 + 4096/512
	binary.LittleEndian.PutUint32(p[16:], 4096)
	binary.LittleEndian.PutUint32(p[20:], 4096)
	binary.LittleEndian.PutUint16(p[24:], 0x30)
	ra := p[0x30:]
	binary.LittleEndian.PutUint64(ra[0:], lsn)
	binary.LittleEndian.PutUint16(ra[8:], 1)
	binary.LittleEndian.PutUint16(ra[10:], 0xFFFF)
	binary.LittleEndian.PutUint16(ra[12:], 0)
	binary.LittleEndian.PutUint16(ra[14:], flags)
	binary.LittleEndian.PutUint16(p[0x1E:], 7) // update sequence number
	for k := 1; k <= 8; k++ {
		end := k*512 - 2
		copy(p[0x1E+2*k:], p[end:end+2])
		binary.LittleEndian.PutUint16(p[end:], 7)
	}
	return p
}

// mountedWith runs a mount command (its last argument the mount point is
// appended), fn, then unmounts.
func mountedWith(t *testing.T, cmd []string, fn func(dir string)) {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	run(t, cmd[0], append(cmd[1:], dir)...)
	defer func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v %s", err, out)
		}
	}()
	fn(dir)
}
