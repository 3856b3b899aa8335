package vhdx

import (
	"bytes"
	"errors"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func write(t testing.TB, size int64, seed uint64) ([]byte, []byte) {
	disk := vdiotest.Disk(size, seed)
	var f vdiotest.MemFile
	w, err := NewWriter(&f, size)
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, seed)
	return disk, f.B
}

func TestRoundTrip(t *testing.T) {
	for _, size := range []int64{0, 512, 5<<20 + 1536, 21<<20 + 4096} {
		disk, img := write(t, size, uint64(size))
		v, err := Open(bytes.NewReader(img), int64(len(img)), "t.vhdx")
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if v.Size() != size {
			t.Fatalf("size %d read as %d", size, v.Size())
		}
		vdiotest.Check(t, v, disk)
	}
}

func TestGUID(t *testing.T) {
	// The BAT region GUID as the specification's byte layout has it.
	want := []byte{0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08}
	if !bytes.Equal(guidBAT[:], want) {
		t.Fatalf("BAT GUID % x", guidBAT)
	}
}

func fixCRC(b []byte, at, n int) {
	vdio.LE.PutUint32(b[at+4:], crc(b[at:at+n], 4))
}

func TestBadHeaders(t *testing.T) {
	_, img := write(t, 4<<20, 1)
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
	}{
		{"tiny", func(b []byte) []byte { return b[:100] }},
		{"headers", func(b []byte) []byte { b[64*kib+100]++; b[128*kib+100]++; return b }},
		{"region tables", func(b []byte) []byte { b[192*kib+100]++; b[256*kib+100]++; return b }},
		{"log to replay", func(b []byte) []byte {
			for _, h := range []int{64 * kib, 128 * kib} {
				copy(b[h+48:], "0123456789abcdef")
				fixCRC(b, h, 4*kib)
			}
			copy(b[mib:], "loge")
			copy(b[mib+32:], "0123456789abcdef")
			return b
		}},
		{"BAT past end", func(b []byte) []byte {
			for _, r := range []int{192 * kib, 256 * kib} {
				vdio.LE.PutUint64(b[r+32:], 1<<40)
				fixCRC(b, r, 64*kib)
			}
			return b
		}},
		{"block past end", func(b []byte) []byte { vdio.LE.PutUint64(b[3*mib:], stateFull|1<<40); return b }},
		{"partial block", func(b []byte) []byte { vdio.LE.PutUint64(b[3*mib:], statePartial|4<<20); return b }},
		{"block size", func(b []byte) []byte { vdio.LE.PutUint32(b[2*mib+64*kib:], 3<<20); return b }},
		{"parent", func(b []byte) []byte { vdio.LE.PutUint32(b[2*mib+64*kib+4:], 2); return b }},
		{"absurd size", func(b []byte) []byte { vdio.LE.PutUint64(b[2*mib+64*kib+8:], 1<<60); return b }},
	} {
		b := c.edit(bytes.Clone(img))
		_, err := Open(bytes.NewReader(b), int64(len(b)), "bad.vhdx")
		var fe *vdio.FormatError
		if !errors.As(err, &fe) || fe.File != "bad.vhdx" || fe.Format != "vhdx" {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
}

// A VHDX is at least 4 MiB, mostly zeros: the fuzz target takes its
// parts (header, region table, metadata, BAT, blocks) and places them in
// a sparse file, so seeds stay small and mutations hit the structures.
func parts(img []byte) [][]byte {
	trim := func(b []byte) []byte { return bytes.TrimRight(b, "\x00") }
	return [][]byte{trim(img[64*kib : 68*kib]), trim(img[192*kib : 256*kib]), trim(img[2*mib : 2*mib+64*kib]),
		trim(img[2*mib+64*kib : 3*mib]), trim(img[3*mib : 4*mib]), trim(img[4*mib:])}
}

func assemble(hdr, rt, mtab, mitems, bat, data []byte, extraMiB uint16) *vdiotest.Segments {
	size := 4*mib + int64(len(data)) + int64(extraMiB%64)*mib
	return &vdiotest.Segments{Size: size, Segs: map[int64][]byte{
		0: []byte("vhdxfile"), 64 * kib: hdr, 128 * kib: hdr, 192 * kib: rt, 256 * kib: rt,
		2 * mib: mtab, 2*mib + 64*kib: mitems, 3 * mib: bat, 4 * mib: data,
	}}
}

func TestAssemble(t *testing.T) {
	disk, img := write(t, 3<<20, 5)
	p := parts(img)
	v, err := Open(assemble(p[0], p[1], p[2], p[3], p[4], p[5], 8), int64(4*mib+len(p[5])+8*mib), "t.vhdx")
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Check(t, v, disk)
}

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

// FuzzOpen opens a VHDX assembled from its parts (see assemble) and reads
// part of its disk (vdiotest.Exercise); at places what is read.
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, hdr, rt, mtab, mitems, bat, data []byte, extra uint16, at uint64) {
		if len(hdr) > 4*kib || len(rt) > 64*kib || len(mtab) > 64*kib || len(mitems) > mib-64*kib || len(bat) > mib {
			return
		}
		s := assemble(hdr, rt, mtab, mitems, bat, data, extra)
		v, err := Open(s, s.Size, "fuzz.vhdx")
		if err != nil {
			return
		}
		vdiotest.Exercise(t, v, v.Size(), at)
	})
}

// seeds are the parts of small images of disks that are mostly zeros:
// the data part (the blocks, zeros at its end trimmed) holds a few bytes.
func seeds(t testing.TB) map[string][][]byte {
	disk := make([]byte, 20000/512*512)
	copy(disk[512:], "sauve seed sector 1")
	var f vdiotest.MemFile
	w, err := NewWriter(&f, int64(len(disk)))
	if err != nil {
		t.Fatal(err)
	}
	vdiotest.Write(t, w, disk, 1)
	_, b := write(t, 0, 2)
	return map[string][][]byte{"sauve-dynamic": parts(f.B), "sauve-empty": parts(b)}
}

// TestWriteCorpus checks that the seeds of testdata/fuzz/FuzzOpen open,
// and refreshes them first when SAUVE_WRITE_CORPUS is set.
func TestWriteCorpus(t *testing.T) {
	vdiotest.WriteCorpus(t, "FuzzOpen", seeds(t), "uint16(8)", "uint64(5000)")
	for _, name := range []string{"sauve-dynamic", "sauve-empty"} {
		p := vdiotest.Corpus(t, "FuzzOpen")[name]
		if len(p) != 6 {
			t.Fatalf("seed %s has %d parts", name, len(p))
		}
		s := assemble(p[0], p[1], p[2], p[3], p[4], p[5], 8)
		if _, err := Open(s, s.Size, "seed.vhdx"); err != nil {
			t.Errorf("seed %s: %v", name, err)
		}
	}
}
