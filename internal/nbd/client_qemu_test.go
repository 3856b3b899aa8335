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
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

const (
	mib = 1 << 20
	kib = 1 << 10
)

func need(t *testing.T, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed: %v", p, err)
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// qemuNBD serves an image with qemu-nbd (args end with the image) on a
// unix socket and returns the socket and the server process.
func qemuNBD(t *testing.T, args ...string) (string, *os.Process) {
	t.Helper()
	need(t, "qemu-nbd")
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	logf, err := os.Create(filepath.Join(dir, "qemu-nbd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("qemu-nbd", append([]string{"--persistent", "--shared=8", "-k", sock}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock, cmd.Process
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("qemu-nbd %s exited:\n%s", strings.Join(args, " "), log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-nbd did not listen within 10 s")
		}
	}
}

func dialUnix(t *testing.T, sock string, o Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c
}

// testImage writes a raw image of random bytes with zero stretches (which
// a qcow2 converted from it leaves unallocated, so qemu answers reads of
// them with hole chunks), and returns its path and contents.
func testImage(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	data := randomData(48*mib, 9)
	clear(data[8*mib : 16*mib])
	clear(data[33*mib : 33*mib+64*kib])
	path := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// TestQemuRead checks byte-exact reads of raw and qcow2 exports from
// qemu-nbd: one read longer than the 32 MiB maximum block size, random
// reads from 8 goroutines at once, reads split into many requests, and
// reads past the end.
func TestQemuRead(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img")
	dir := t.TempDir()
	raw, data := testImage(t, dir)
	qcow := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
	for _, tt := range []struct{ format, path string }{{"raw", raw}, {"qcow2", qcow}} {
		t.Run(tt.format, func(t *testing.T) {
			sock, _ := qemuNBD(t, "-r", "-f", tt.format, tt.path)
			c := dialUnix(t, sock, Options{})
			if c.Size() != int64(len(data)) {
				t.Fatalf("Size = %d, want %d", c.Size(), len(data))
			}
			if !c.ReadOnly() {
				t.Error("ReadOnly = false for a qemu-nbd -r export")
			}
			big := bytes.Repeat([]byte{0xee}, 40*mib)
			if n, err := c.ReadAt(big, mib+123); n != len(big) || err != nil {
				t.Fatalf("40 MiB ReadAt = %d, %v", n, err)
			}
			if !bytes.Equal(big, data[mib+123:mib+123+len(big)]) {
				t.Fatal("40 MiB read differs from the image")
			}
			concurrentReads(t, c, data, 2*mib)
			small := dialUnix(t, sock, Options{MaxRequest: 64 * kib})
			checkReads(t, small, data, 30, mib, 11)
			checkTail(t, c, data)
		})
	}
}

func concurrentReads(t *testing.T, c *Client, data []byte, maxLen int) {
	t.Helper()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() { checkReads(t, c, data, 25, maxLen, uint64(100+g)) })
	}
	wg.Wait()
}

// checkTail checks reads at and across the end, which act as on a file.
func checkTail(t *testing.T, c *Client, data []byte) {
	t.Helper()
	size := int64(len(data))
	buf := make([]byte, 100)
	if n, err := c.ReadAt(buf, size-10); n != 10 || err != io.EOF || !bytes.Equal(buf[:10], data[size-10:]) {
		t.Fatalf("ReadAt across the end = %d, %v; want 10, EOF and the last bytes", n, err)
	}
	if n, err := c.ReadAt(buf, size); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
	if n, err := c.ReadAt(buf[:0], size-1); n != 0 || err != nil {
		t.Fatalf("empty ReadAt = %d, %v", n, err)
	}
	if _, err := c.ReadAt(buf, -1); err == nil {
		t.Fatal("ReadAt at offset -1 succeeded")
	}
}

// TestQemuAllocation checks base:allocation against images whose data was
// written at known offsets with qemu-io, the rest never written.
func TestQemuAllocation(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img", "qemu-io")
	const size = 64 * mib
	writes := []extent.Range{{Start: mib, End: mib + 64*kib}, {Start: 10 * mib, End: 11 * mib}, {Start: 30 * mib, End: 30*mib + 128*kib}, {Start: size - 64*kib, End: size}}
	for _, format := range []string{"qcow2", "raw"} {
		t.Run(format, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "disk."+format)
			if format == "raw" {
				// Not qemu-img create, which writes the first block of a raw image.
				if err := os.WriteFile(img, nil, 0o644); err != nil || os.Truncate(img, size) != nil {
					t.Fatal("cannot create a sparse image")
				}
			} else {
				run(t, "qemu-img", "create", "-f", format, img, fmt.Sprint(size))
			}
			args := []string{"-f", format}
			for i, w := range writes {
				args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", 0x10+i, w.Start, w.Len()))
			}
			if format == "qcow2" {
				args = append(args, "-c", fmt.Sprintf("write -z %d %d", 20*mib, mib)) // a zero cluster
			}
			run(t, "qemu-io", append(args, img)...)
			sock, _ := qemuNBD(t, "-r", "-f", format, img)
			c := dialUnix(t, sock, Options{MetaContexts: []string{"base:allocation"}})
			if got := c.Contexts(); !slices.Equal(got, []string{"base:allocation"}) {
				t.Fatalf("Contexts = %q", got)
			}
			exts := allExtents(t, c, "base:allocation")
			for _, e := range exts {
				zero := e.Flags&StateZero != 0
				if written := overlaps(writes, e); written == zero {
					t.Errorf("extent %+v: zero %v, but written %v", e, zero, written)
				}
				if format == "qcow2" && e.Offset >= 20*mib && e.End() <= 21*mib && !zero {
					t.Errorf("zero cluster extent %+v without StateZero", e)
				}
			}
			checkMap(t, c, "base:allocation", func(f uint32) bool { return f&StateZero == 0 }, writes)
		})
	}
}

// allExtents returns the extents of the whole export, checking that they
// come in order and cover it exactly.
func allExtents(t *testing.T, c *Client, metaContext string) []Extent {
	t.Helper()
	var exts []Extent
	pos := int64(0)
	err := c.BlockStatus(context.Background(), metaContext, 0, c.Size(), func(e Extent) error {
		if e.Offset != pos || e.Length <= 0 {
			return fmt.Errorf("extent %+v after offset %d", e, pos)
		}
		pos = e.End()
		exts = append(exts, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if pos != c.Size() {
		t.Fatalf("extents end at %d, the export at %d", pos, c.Size())
	}
	return exts
}

func overlaps(rs []extent.Range, e Extent) bool {
	for _, r := range rs {
		if r.Start < e.End() && e.Offset < r.End {
			return true
		}
	}
	return false
}

// checkMap checks that c.Map gives exactly want, asked for the whole
// export at once and chunk by chunk as a backup asks, the latter in few
// requests.
func checkMap(t *testing.T, c *Client, metaContext string, data func(uint32) bool, want []extent.Range) {
	t.Helper()
	whole, err := c.Map(context.Background(), metaContext, data).Data(0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(whole, want) {
		t.Fatalf("Data(0, size) = %v, want %v", whole, want)
	}
	m := c.Map(context.Background(), metaContext, data)
	before := c.requestsSent()
	var chunked []extent.Range
	for off := int64(0); off < c.Size(); off += mib {
		rs, err := m.Data(off, mib)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			chunked = appendRange(chunked, r)
		}
	}
	if !slices.Equal(chunked, want) {
		t.Fatalf("Data chunk by chunk = %v, want %v", chunked, want)
	}
	if n := c.requestsSent() - before; n > 2 {
		t.Errorf("Data in 1 MiB chunks over %d MiB sent %d block status requests, want at most 2", c.Size()/mib, n)
	}
	// A window inside the first range, unaligned.
	at := want[0].Start + 100
	inner, err := m.Data(at, 200)
	if err != nil || !slices.Equal(inner, []extent.Range{{Start: at, End: at + 200}}) {
		t.Fatalf("Data(%d, 200) = %v, %v", at, inner, err)
	}
}

func (c *Client) requestsSent() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.statusRequests
}

// TestQemuDirtyBitmap checks that a qemu:dirty-bitmap context gives
// exactly the ranges written after the bitmap was added.
func TestQemuDirtyBitmap(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img", "qemu-io")
	img := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", img, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", img) // before the bitmap: clean
	run(t, "qemu-img", "bitmap", "--add", "-g", "64K", img, "b0")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 5M 64k", "-c", "write -P 3 30M 128k",
		"-c", fmt.Sprintf("write -P 4 %d 4k", 40*mib+4*kib), img)
	sock, _ := qemuNBD(t, "-r", "-f", "qcow2", "-B", "b0", img)
	dirty := "qemu:dirty-bitmap:b0"
	c := dialUnix(t, sock, Options{MetaContexts: []string{"base:allocation", dirty, "qemu:dirty-bitmap:nope"}})
	got := c.Contexts()
	slices.Sort(got)
	if !slices.Equal(got, []string{"base:allocation", dirty}) {
		t.Fatalf("Contexts = %q", got)
	}
	want := []extent.Range{{Start: 5 * mib, End: 5*mib + 64*kib}, {Start: 30 * mib, End: 30*mib + 128*kib}, {Start: 40 * mib, End: 40*mib + 64*kib}}
	checkMap(t, c, dirty, func(f uint32) bool { return f&StateDirty != 0 }, want)
	// The other context on the same connection: the write before the
	// bitmap is data, though clean.
	alloc := c.Map(context.Background(), "base:allocation", func(f uint32) bool { return f&StateZero == 0 })
	if rs, err := alloc.Data(0, 2*mib); err != nil || !slices.Equal(rs, []extent.Range{{Start: mib, End: mib + 64*kib}}) {
		t.Fatalf("base:allocation Data(0, 2 MiB) = %v, %v", rs, err)
	}
	err := c.BlockStatus(context.Background(), "qemu:dirty-bitmap:nope", 0, mib, func(Extent) error { return nil })
	if err == nil || !strings.Contains(err.Error(), `"qemu:dirty-bitmap:nope" was not agreed`) {
		t.Fatalf("BlockStatus of a bitmap not exported: %v", err)
	}
}

// TestQemuExportNames checks that a named export is found and an unknown
// one is refused with its name.
func TestQemuExportNames(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img")
	img := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", img, "1M")
	sock, _ := qemuNBD(t, "-r", "-x", "vm1-drive0", "-f", "qcow2", img)
	if c := dialUnix(t, sock, Options{Export: "vm1-drive0"}); c.Size() != mib {
		t.Fatalf("Size = %d", c.Size())
	}
	for _, o := range []Options{{Export: "nosuch"}, {Export: "nosuch", MetaContexts: []string{"base:allocation"}}} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := Dial(ctx, "unix", sock, o)
		cancel()
		if err == nil {
			c.Close()
			t.Fatalf("Dial of export %q succeeded", o.Export)
		}
		if !strings.Contains(err.Error(), `export "nosuch" not found`) {
			t.Fatalf("Dial of an unknown export (contexts %q): %v", o.MetaContexts, err)
		}
	}
}

// TestNotNBDServers checks Dial against TCP listeners that are not NBD
// servers: a clear error, never a hang.
func TestNotNBDServers(t *testing.T) {
	tests := []struct {
		name  string
		serve func(net.Conn)
		want  string
	}{
		{"HTTP server", func(c net.Conn) { c.Write([]byte("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")) }, "not an NBD server: bad magic"},
		{"oldstyle NBD", func(c net.Conn) {
			c.Write(append(be32(be64(be64(be64(nil, NBDMagic), CliservMagic), mib), 1), make([]byte, 124)...))
		}, "oldstyle"},
		{"plain newstyle", func(c net.Conn) { c.Write(greetingMsg(0)) }, "fixed newstyle"},
		{"closes at once", func(c net.Conn) {}, "closed the connection"},
		{"says nothing", func(c net.Conn) { io.Copy(io.Discard, c) }, context.DeadlineExceeded.Error()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			t.Cleanup(func() { l.Close(); wg.Wait() })
			wg.Go(func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				tt.serve(c)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			c, err := Dial(ctx, "tcp", l.Addr().String(), Options{})
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), l.Addr().String()) {
				t.Fatalf("Dial: %v; want it to name the address and say %q", err, tt.want)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("Dial took %v", d)
			}
		})
	}
}

// TestQemuKilled checks that reads fail, promptly, when the server dies
// under them, and that everything after fails too.
func TestQemuKilled(t *testing.T) {
	need(t, "qemu-nbd")
	raw, data := testImage(t, t.TempDir())
	sock, proc := qemuNBD(t, "-r", "-f", "raw", raw)
	c := dialUnix(t, sock, Options{MetaContexts: []string{"base:allocation"}})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	started := make(chan struct{}, 8)
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			buf := make([]byte, mib)
			for i := 0; ; i++ {
				if i == 1 {
					started <- struct{}{}
				}
				off := rng.Int64N(int64(len(data) - len(buf)))
				if _, err := c.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, data[off:off+int64(len(buf))]) {
					errs <- errors.New("read differs from the image")
					return
				}
			}
		})
	}
	for range 8 {
		<-started
	}
	if err := proc.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("readers still running 5 s after the server was killed")
	}
	close(errs)
	for err := range errs {
		if !strings.Contains(err.Error(), "connection to unix:"+sock+" lost") {
			t.Errorf("ReadAt after the server died: %v", err)
		}
	}
	if _, err := c.ReadAt(make([]byte, 10), 0); err == nil {
		t.Error("ReadAt after the server died succeeded")
	}
	if err := c.BlockStatus(context.Background(), "base:allocation", 0, mib, func(Extent) error { return nil }); err == nil {
		t.Error("BlockStatus after the server died succeeded")
	}
}
