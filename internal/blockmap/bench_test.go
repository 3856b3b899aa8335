package blockmap

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// BenchmarkLayoutData measures the map of a 4 GiB disk (MBR, one ext4
// partition) walked as a backup walks it, in 256 KiB windows through a
// Tally; it reports the cost per window, which a multi-TiB disk
// multiplies.
func BenchmarkLayoutData(b *testing.B) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		b.Skip("mkfs.ext4 is not installed")
	}
	p := filepath.Join(b.TempDir(), "disk.img")
	f, _ := os.Create(p)
	const size = 4 << 30
	f.Truncate(size)
	f.Close()
	mbr := make([]byte, 512)
	mbrTestEntry(mbr, 0x83, 2048, size/512-2048)
	os.WriteFile(p+".mbr", mbr, 0o644)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "offset=1048576", p, "4193280k").CombinedOutput(); err != nil {
		b.Fatalf("mkfs: %v %s", err, out)
	}
	f, _ = os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt(mbr, 0)
	defer f.Close()
	const win = 256 << 10
	b.ResetTimer()
	for range b.N {
		l, err := NewLayout(f, size, LayoutOptions{})
		if err != nil || len(l.Parts) != 1 || l.Parts[0].FS == nil {
			b.Fatalf("layout: %+v %v", l, err)
		}
		tl := NewTally(l)
		for off := int64(0); off < size; off += win {
			if _, err := tl.Data(off, win); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(size/win), "ns/window")
}

func mbrTestEntry(s []byte, typ byte, start, count uint32) {
	e := s[446:]
	e[4] = typ
	e[8], e[9], e[10], e[11] = byte(start), byte(start>>8), byte(start>>16), byte(start>>24)
	e[12], e[13], e[14], e[15] = byte(count), byte(count>>8), byte(count>>16), byte(count>>24)
	s[510], s[511] = 0x55, 0xAA
}
