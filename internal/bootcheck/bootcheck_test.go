package bootcheck

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// printingDisk writes a 1 MiB raw disk whose boot sector prints text on
// COM1 and halts:
//
//	cli; xor ax,ax; mov ds,ax; mov si,0x7c17; mov dx,0x3f8
//	loop: lodsb; test al,al; jz halt; out dx,al; jmp loop
//	halt: cli; hlt; jmp halt
//	0x7c17: text, 0
func printingDisk(t *testing.T, text string) string {
	t.Helper()
	code, _ := hex.DecodeString("fa31c08ed8be177cbaf803ac84c07403eeebf8faf4ebfc")
	mbr := make([]byte, 512)
	copy(mbr, code)
	copy(mbr[len(code):], text+"\x00")
	mbr[510], mbr[511] = 0x55, 0xAA
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, append(mbr, make([]byte, 1<<20-512)...), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func needQEMU(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64")
	}
}

// TCG: KVM guests hang on this project's test machines.
func opts(marker string, timeout time.Duration) Options {
	return Options{Marker: marker, Timeout: timeout, Accel: "tcg", Memory: "32"}
}

func TestBootReachesMarker(t *testing.T) {
	needQEMU(t)
	img := printingDisk(t, "Debian GNU/Linux 12 web1 ttyS0\r\n\r\nweb1 login: ")
	before, _ := os.ReadFile(img)
	var console bytes.Buffer
	o := opts("", 60*time.Second) // the default marker, "login:"
	o.Console = &console
	res, err := Boot(context.Background(), img, o)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Reached || !strings.Contains(res.Tail, "web1 login:") || !strings.Contains(console.String(), "Debian") {
		t.Fatalf("boot: %+v, console %q", res, console.String())
	}
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Error("the test boot wrote the image")
	}
}

func TestBootMissesMarker(t *testing.T) {
	needQEMU(t)
	img := printingDisk(t, "Kernel panic - not syncing: VFS: Unable to mount root fs")
	res, err := Boot(context.Background(), img, opts("login:", 8*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if res.Reached || !strings.Contains(res.Tail, "Kernel panic") || res.Seconds < 7 {
		t.Fatalf("a guest that never prints the marker: %+v", res)
	}
}

func TestBootRefusals(t *testing.T) {
	needQEMU(t)
	img := printingDisk(t, "x")
	o := opts("x", 20*time.Second)
	o.Format = "qcow2" // a raw file read as qcow2: QEMU refuses it
	if _, err := Boot(context.Background(), img, o); err == nil || !strings.Contains(err.Error(), "test boot of") {
		t.Errorf("a wrong format: %v", err)
	}
	if _, err := Boot(context.Background(), filepath.Join(t.TempDir(), "none.img"), opts("x", time.Second)); err == nil {
		t.Error("a missing image was booted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Boot(ctx, img, opts("never", 20*time.Second)); err == nil {
		t.Error("a cancelled boot reported a result")
	}
}

func TestWatchAcrossReads(t *testing.T) {
	// The marker split between two reads is found; a long console keeps
	// only its tail.
	r := &chunked{parts: []string{strings.Repeat("x", 10000) + "log", "in: "}}
	ok, tail := watch(r, "login:", nil)
	if !ok || len(tail) > tailLen || !strings.HasSuffix(tail, "login: ") {
		t.Fatalf("watch: %v, tail of %d bytes", ok, len(tail))
	}
}

type chunked struct{ parts []string }

func (c *chunked) Read(p []byte) (int, error) {
	if len(c.parts) == 0 {
		return 0, os.ErrClosed
	}
	n := copy(p, c.parts[0])
	if n == len(c.parts[0]) {
		c.parts = c.parts[1:]
	} else {
		c.parts[0] = c.parts[0][n:]
	}
	return n, nil
}
