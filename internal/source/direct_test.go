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
