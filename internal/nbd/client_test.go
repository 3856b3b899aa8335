package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian package qemu-utils)", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// serve runs qemu-nbd on img and returns its socket.
func serve(t *testing.T, img string, args ...string) (string, *exec.Cmd) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command("qemu-nbd", append([]string{"--persistent", "--shared=8", "-k", sock}, append(args, img)...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			return sock, cmd
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("qemu-nbd did not start: %s", stderr.String())
	return "", nil
}

func dial(t *testing.T, sock string, o Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// writes are the ranges the test image holds data in, with a pattern
// byte each; the rest is never written.
var writes = []struct {
	off, n int64
	pat    byte
}{{0, 64 << 10, 0x11}, {1 << 20, 3 << 20, 0x22}, {40 << 20, 64 << 10, 0x33}, {63 << 20, 1 << 20, 0x44}}

// image makes a 64 MiB qcow2 with writes and returns it and its raw
// contents.
func image(t *testing.T) (string, []byte) {
	t.Helper()
	need(t, "qemu-img", "qemu-io", "qemu-nbd")
	img := filepath.Join(t.TempDir(), "d.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	want := make([]byte, 64<<20)
	for _, w := range writes {
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P %d %d %d", w.pat, w.off, w.n), img)
		copy(want[w.off:w.off+w.n], bytes.Repeat([]byte{w.pat}, int(w.n)))
	}
	return img, want
}

func TestReadAt(t *testing.T) {
	img, want := image(t)
	sock, _ := serve(t, img, "-f", "qcow2", "-r")
	c := dial(t, sock, Options{})
	if c.Size() != int64(len(want)) {
		t.Fatalf("size %d, want %d", c.Size(), len(want))
	}
	got := make([]byte, len(want))
	if n, err := c.ReadAt(got, 0); err != nil || n != len(got) {
		t.Fatalf("read all: %d, %v", n, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the export does not read as the image")
	}
	// Past the end: what there is, then io.EOF, as a file.
	buf := make([]byte, 8192)
	if n, err := c.ReadAt(buf, c.Size()-4096); n != 4096 || !errors.Is(err, io.EOF) {
		t.Errorf("read across the end: %d, %v", n, err)
	}
	if _, err := c.ReadAt(buf, c.Size()); !errors.Is(err, io.EOF) {
		t.Errorf("read at the end: %v", err)
	}
}

func TestConcurrentReads(t *testing.T) {
	img, want := image(t)
	sock, _ := serve(t, img, "-f", "qcow2", "-r")
	c := dial(t, sock, Options{})
	c.maxReq = 1 << 20 // requests split: reads cross the limit
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for range 40 {
				off := rng.Int64N(int64(len(want)) - 4<<20)
				buf := make([]byte, 1+rng.IntN(3<<20))
				if _, err := c.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
					errs <- fmt.Errorf("read at %d: wrong data", off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestAllocationMap(t *testing.T) {
	img, _ := image(t)
	sock, _ := serve(t, img, "-f", "qcow2", "-r")
	c := dial(t, sock, Options{MetaContexts: []string{"base:allocation"}})
	m := c.Map(context.Background(), "base:allocation", func(f uint32) bool { return f&StateZero == 0 })
	var got []extent.Range
	for off := int64(0); off < c.Size(); off += 256 << 10 {
		rs, err := m.Data(off, 256<<10)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, rs...)
	}
	got = merge(got)
	var want []extent.Range
	for _, w := range writes {
		want = append(want, extent.Range{Start: w.off, End: w.off + w.n})
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("data ranges %v, want %v", got, want)
	}
}

func TestDirtyBitmap(t *testing.T) {
	img, _ := image(t)
	run(t, "qemu-img", "bitmap", "--add", img, "b0")
	dirty := []extent.Range{{Start: 2 << 20, End: 2<<20 + 64<<10}, {Start: 50 << 20, End: 51 << 20}}
	for _, d := range dirty {
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 7 %d %d", d.Start, d.Len()), img)
	}
	sock, _ := serve(t, img, "-f", "qcow2", "-r", "-B", "b0")
	meta := "qemu:dirty-bitmap:b0"
	c := dial(t, sock, Options{MetaContexts: []string{"base:allocation", meta}})
	if len(c.Contexts()) != 2 {
		t.Fatalf("contexts %v", c.Contexts())
	}
	m := c.Map(context.Background(), meta, func(f uint32) bool { return f&1 != 0 })
	got, err := m.Data(0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(dirty) {
		t.Errorf("dirty ranges %v, want %v", got, dirty)
	}
	if err := c.BlockStatus(context.Background(), "qemu:dirty-bitmap:other", 0, 1, func(Extent) error { return nil }); err == nil || !strings.Contains(err.Error(), "did not agree") {
		t.Errorf("unknown context: %v", err)
	}
}

func TestUnknownExport(t *testing.T) {
	img, _ := image(t)
	sock, _ := serve(t, img, "-f", "qcow2", "-r", "-x", "disk0")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Dial(ctx, "unix", sock, Options{Export: "disk9"})
	if err == nil || !strings.Contains(err.Error(), `export "disk9"`) || !strings.Contains(err.Error(), "no such export") {
		t.Fatalf("err %v", err)
	}
	dial(t, sock, Options{Export: "disk0"})
}

// A server that is not NBD, or says nothing, fails the dial within its
// context, never hangs.
func TestNotNBD(t *testing.T) {
	for _, tc := range []struct {
		name, greeting, want string
	}{
		{"http", "HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"},
		{"oldstyle", "NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53", "oldstyle"},
		{"silent", "", "deadline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				defer conn.Close()
				conn.Write([]byte(tc.greeting))
				io.Copy(io.Discard, conn)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			start := time.Now()
			_, err = Dial(ctx, "tcp", ln.Addr().String(), Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
			if time.Since(start) > 3*time.Second {
				t.Errorf("took %v", time.Since(start))
			}
		})
	}
}

// The server dying fails reads in flight and later ones, promptly.
func TestServerDies(t *testing.T) {
	img, _ := image(t)
	sock, cmd := serve(t, img, "-f", "qcow2", "-r")
	c := dial(t, sock, Options{})
	buf := make([]byte, 1<<20)
	if _, err := c.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	done := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 100 && err == nil; i++ {
			_, err = c.ReadAt(buf, 0)
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("reads from a dead server succeed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a read from a dead server hangs")
	}
}
