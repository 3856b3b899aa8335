package vdisk

import (
	"bytes"
	"errors"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

// fuzzSeeds are small files of every kind detection tells apart.
func fuzzSeeds(t testing.TB) [][]byte {
	var seeds [][]byte
	small := func(b []byte) []byte { return b[:min(len(b), 4096)] }
	for _, b := range raws(t) {
		seeds = append(seeds, small(b))
	}
	for name, b := range foreignFiles(t) {
		if name == "dmg" {
			b = at(4096, map[int]string{4096 - 512: "koly\x00\x00\x00\x04\x00\x00\x02\x00"})
		}
		seeds = append(seeds, small(b))
	}
	disk := make([]byte, 64<<10)
	copy(disk[510:], "\x55\xaa")
	seeds = append(seeds,
		image(t, OVA, "", disk),
		image(t, VHD, "fixed", disk[:8192]),
		ovaOf(t, []string{"disk.vmdk"}, member{"disk.vmdk", "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 16 FLAT \"flat.vmdk\" 0\n"}, member{"flat.vmdk", string(disk[:8192])}),
		ovaOf(t, []string{"a.img", ""}, member{"a.img", "x"}),
	)
	return seeds
}

// FuzzDetect: detection reads any bytes without a panic; a refused format
// is refused as unsupported; an OVA (which refers to nothing outside
// itself) opens or fails cleanly, and what opens can be read.
func FuzzDetect(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<16 {
			return
		}
		r := bytes.NewReader(b)
		n := int64(len(b))
		format, fo := detect(r, n)
		if fo == nil && format != OVA {
			return // the readers have fuzz targets of their own
		}
		img, err := Open(r, n, "fuzz.img", nil)
		if fo != nil {
			if err == nil || !errors.Is(err, vdio.ErrUnsupported) {
				t.Fatalf("%s opened or failed otherwise: %v", format, err)
			}
			return
		}
		if err != nil {
			return
		}
		defer img.Close()
		buf := make([]byte, 4096)
		if img.Map != nil {
			img.Data(0, min(img.Size, 1<<20))
		}
		img.ReadAt(buf, 0)
		img.ReadAt(buf, max(0, img.Size-int64(len(buf))))
	})
}
