package source

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// loopDevice attaches a loop device to a file of size random bytes (a
// size not a multiple of 4 KiB: the device's end is not aligned).
func loopDevice(t *testing.T, size int64) (dev string, data []byte) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a loop device needs root")
	}
	need(t, "losetup", "mount")
	data = make([]byte, size)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	img := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		t.Skipf("no loop device: %v", err)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev, data
}

// A device source reads with O_DIRECT, and every read, aligned or not,
// at the end or across it, from several goroutines at once, returns the
// device's bytes.
func TestDeviceReadsDirect(t *testing.T) {
	size := int64(8<<20 + 3*512)
	dev, data := loopDevice(t, size)
	s, err := Open(context.Background(), dev)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.direct == nil || s.At != io.ReaderAt(s.direct) {
		t.Fatal("a device source does not read with O_DIRECT")
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 300 {
				off := rng.Int64N(size)
				n := rng.IntN(3<<20) + 1
				if rng.IntN(3) == 0 { // aligned, as the backup's chunk reads
					off &^= 4095
					n = (n + 4095) &^ 4095
				}
				buf := make([]byte, n)
				got, err := s.At.ReadAt(buf, off)
				want := min(int64(n), size-off)
				if int64(got) != want || (want < int64(n)) != (err == io.EOF) || (err != nil && err != io.EOF) {
					t.Errorf("read %d at %d: %d bytes, %v (want %d)", n, off, got, err, want)
					return
				}
				if !bytes.Equal(buf[:got], data[off:off+int64(got)]) {
					t.Errorf("read %d at %d: bytes differ from the device's", n, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n, err := s.At.ReadAt(make([]byte, 10), size); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v", n, err)
	}
}

// The O_DIRECT reader reads any range as a buffered read does, empty
// reads and reads past the end included (here on a file, where O_DIRECT
// works the same: no root needed).
func TestDirectReaderRanges(t *testing.T) {
	data := make([]byte, 3<<20+1536) // not a multiple of the alignment
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	path := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := int64(len(data))
	r, err := openDirect(f, size)
	if err != nil {
		t.Skipf("no O_DIRECT on %s: %v", path, err)
	}
	defer r.Close()
	ref := bytes.NewReader(data)
	for i := 0; i < 300; i++ {
		off := rng.Int64N(size + 100)
		n := rng.IntN(1 << 20)
		if i%3 == 0 {
			off = size - int64(rng.IntN(5000)) // around the end
		}
		got, want := make([]byte, n), make([]byte, n)
		gn, gerr := r.ReadAt(got, off)
		wn, werr := ref.ReadAt(want, off)
		if gn != wn || !bytes.Equal(got[:gn], want[:wn]) || (gerr == nil) != (werr == nil) || gerr != nil && gerr != io.EOF {
			t.Fatalf("ReadAt(%d bytes at %d): %d, %v; want %d, %v", n, off, gn, gerr, wn, werr)
		}
	}
}
