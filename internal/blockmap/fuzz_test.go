package blockmap

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// Fuzz inputs are sparse disk images, so a seed can describe a filesystem
// of many MiB in a few KiB:
//
//	u32 size in KiB (at most 1 GiB)
//	then segments: u32 offset in 512-byte sectors, u16 length, bytes
//
// Everything not in a segment reads as zeros.

type sparseImage struct {
	size int64
	segs []imgSeg
}

type imgSeg struct {
	off  int64
	data []byte
}

func decodeImage(in []byte) *sparseImage {
	if len(in) < 4 {
		return &sparseImage{}
	}
	img := &sparseImage{size: int64(binary.LittleEndian.Uint32(in)%(1<<20)) << 10}
	in = in[4:]
	for len(in) >= 6 {
		off := int64(binary.LittleEndian.Uint32(in)) * 512
		n := int(binary.LittleEndian.Uint16(in[4:]))
		in = in[6:]
		n = min(n, len(in))
		img.segs = append(img.segs, imgSeg{off, in[:n]})
		in = in[n:]
	}
	return img
}

func (s *sparseImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > s.size-off {
		n = int(s.size - off)
	}
	clear(p[:n])
	for _, g := range s.segs {
		a, z := max(off, g.off), min(off+int64(n), g.off+int64(len(g.data)))
		if a < z {
			copy(p[a-off:z-off], g.data[a-g.off:z-g.off])
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// encodeImage turns an image file into a fuzz input holding its non-zero
// sectors, at most limit bytes of them and the first 16 KiB of each run
// (the rest of a long run, such as NTFS's 0xFF-filled $LogFile, adds size
// and slows the fuzzer without reaching new code).
func encodeImage(t *testing.T, path string, limit int) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	binary.Write(&out, binary.LittleEndian, uint32(len(b)>>10))
	zero := make([]byte, 512)
	for s := 0; s+512 <= len(b) && out.Len() < limit; {
		if bytes.Equal(b[s:s+512], zero) {
			s += 512
			continue
		}
		e := s
		for e+512 <= len(b) && !bytes.Equal(b[e:e+512], zero) {
			e += 512
		}
		n := min(e-s, 16<<10)
		binary.Write(&out, binary.LittleEndian, uint32(s/512))
		binary.Write(&out, binary.LittleEndian, uint16(n))
		out.Write(b[s : s+n])
		s = e
	}
	return out.Bytes()
}

// exercise probes an image with p and reads its whole map, as a backup
// would; it must not panic, and its ranges must be in order and inside
// the windows.
func exercise(t *testing.T, p probe, in []byte) {
	img := decodeImage(in)
	fs, err := p(img, img.size, func(string) {})
	if err != nil || fs == nil || fs.m == nil {
		return
	}
	if fs.Size > img.size {
		t.Fatalf("filesystem of %d bytes in %d", fs.Size, img.size)
	}
	const win = 256 << 10
	for off := int64(0); off < fs.Size; off += win {
		n := min(win, fs.Size-off)
		rs, err := fs.m.Data(off, n)
		if err != nil {
			return
		}
		last := off
		for _, r := range rs {
			if r.Start < last || r.End <= r.Start || r.End > off+n {
				t.Fatalf("range %v out of order in window [%d, %d)", r, off, off+n)
			}
			last = r.End
		}
	}
}

func fuzzProbe(f *testing.F, p probe) {
	f.Fuzz(func(t *testing.T, in []byte) { exercise(t, p, in) })
}

func FuzzExt(f *testing.F)  { fuzzProbe(f, probeExt) }
func FuzzXFS(f *testing.F)  { fuzzProbe(f, probeXFSTrees) }
func FuzzNTFS(f *testing.F) { fuzzProbe(f, probeNTFS) }
func FuzzFAT(f *testing.F)  { fuzzProbe(f, probeFAT) }
func FuzzSwap(f *testing.F) { fuzzProbe(f, probeSwap) }

// FuzzLayout reads a whole disk: partition tables, then filesystems.
func FuzzLayout(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		img := decodeImage(in)
		l, err := NewLayout(img, img.size, LayoutOptions{})
		if err != nil {
			return
		}
		for off := int64(0); off < img.size; off += 1 << 20 {
			if _, err := l.Data(off, min(1<<20, img.size-off)); err != nil {
				return
			}
		}
	})
}

// probeXFSTrees is probeXFS with the log taken as clean, so the fuzzer
// reaches the free-space trees (a seed cannot hold a whole log).
func probeXFSTrees(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	xfsAssumeCleanLog = true
	defer func() { xfsAssumeCleanLog = false }()
	return probeXFS(r, size, warn)
}

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the fuzz seed corpora from freshly made filesystems")

// TestFuzzSeeds checks that every committed seed parses as the filesystem
// it was made from, and with -update-seeds makes them again.
func TestFuzzSeeds(t *testing.T) {
	seeds := []struct {
		fuzz, name string
		size       int64
		mk         []string
		want       string
	}{
		{"FuzzExt", "ext4", 2 << 20, []string{"mkfs.ext4", "-q", "-F", "-b", "1024"}, "ext4"},
		{"FuzzExt", "ext4-uninit", 8 << 20, []string{"mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "^metadata_csum,uninit_bg,^flex_bg"}, "ext4"},
		{"FuzzExt", "ext2", 2 << 20, []string{"mkfs.ext2", "-q", "-F"}, "ext2"},
		{"FuzzXFS", "xfs", 300 << 20, []string{"mkfs.xfs", "-q", "-f"}, "xfs"},
		{"FuzzNTFS", "ntfs", 8 << 20, []string{"mkntfs", "-q", "-Q", "-F"}, "ntfs"},
		{"FuzzFAT", "fat12", 2 << 20, []string{"mkfs.fat", "-F", "12"}, "fat12"},
		{"FuzzFAT", "fat16", 16 << 20, []string{"mkfs.fat", "-F", "16"}, "fat16"},
		{"FuzzFAT", "fat32", 40 << 20, []string{"mkfs.fat", "-F", "32"}, "fat32"},
		{"FuzzSwap", "swap", 1 << 20, []string{"mkswap"}, "swap"},
	}
	for _, s := range seeds {
		path := filepath.Join("testdata", "fuzz", s.fuzz, s.name)
		if *updateSeeds {
			need(t, s.mk[0])
			img := image(t, s.name, s.size)
			run(t, s.mk[0], append(s.mk[1:], img)...)
			enc := encodeImage(t, img, 64<<10)
			os.MkdirAll(filepath.Dir(path), 0o755)
			if err := os.WriteFile(path, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", enc)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("seed %s: %v (make it with go test -run TestFuzzSeeds -update-seeds)", path, err)
		}
		in := parseCorpus(t, raw)
		img := decodeImage(in)
		p := map[string]probe{"FuzzExt": probeExt, "FuzzXFS": probeXFSTrees, "FuzzNTFS": probeNTFS, "FuzzFAT": probeFAT, "FuzzSwap": probeSwap}[s.fuzz]
		fs, err := p(img, img.size, func(string) {})
		if err != nil || fs == nil || fs.Type != s.want {
			t.Fatalf("seed %s: %+v %v", path, fs, err)
		}
		if s.fuzz != "FuzzNTFS" && fs.m == nil {
			t.Errorf("seed %s is not mapped: %s", path, fs.Full)
		}
		exercise(t, p, in)
	}
}

// parseCorpus reads a one-value "go test fuzz v1" file.
func parseCorpus(t *testing.T, raw []byte) []byte {
	t.Helper()
	lines := bytes.SplitN(raw, []byte("\n"), 3)
	if len(lines) < 2 || !bytes.HasPrefix(lines[1], []byte("[]byte(")) {
		t.Fatalf("not a fuzz corpus file")
	}
	var s string
	if _, err := fmt.Sscanf(string(bytes.TrimSuffix(bytes.TrimPrefix(lines[1], []byte("[]byte(")), []byte(")"))), "%q", &s); err != nil {
		t.Fatal(err)
	}
	return []byte(s)
}
