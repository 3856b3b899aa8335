package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestServeNBD serves a backed-up image and reads it back with the qemu
// and libnbd tools: same bytes, the zero hole reported as one.
func TestServeNBD(t *testing.T) {
	needTools(t, "qemu-img", "nbdinfo", "nbdcopy")
	e := newEnv(t)
	img := e.path("disk.img")
	const mib = 1 << 20
	data := make([]byte, 8*mib)
	copy(data, textBytes(1, 2*mib))
	copy(data[6*mib:], randomBytes(2*mib))
	writeFile(t, img, data)
	b := e.backup(img)
	if b.Disk == "" {
		t.Fatalf("backup names no disk: %+v", b)
	}

	// A short folder: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "sauve-nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	d := startDaemon(t, "sauve serve nbd", e.cmd(nil, "serve", "nbd", "latest", "--listen", "unix:"+sock), e.path("serve.log"), syscall.SIGINT, func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	uri := "nbd+unix:///" + b.Disk + "?socket=" + sock

	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s\n%s", err, out, d.logText())
	}
	out, err := exec.Command("nbdinfo", "--list", "nbd+unix://?socket="+sock).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "export=\""+b.Disk+"\"") && !strings.Contains(string(out), b.Disk) {
		t.Fatalf("nbdinfo --list: %v\n%s", err, out)
	}
	out, err = exec.Command("nbdinfo", "--map", uri).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	t.Logf("nbdinfo --map:\n%s", out)
	// The hole [2, 6) MiB, give or take a chunk at its ends.
	hole := false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[2] != "3" || f[3] != "hole,zero" {
			continue
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		if off <= 3*mib && off+n >= 5*mib {
			hole = true
		}
	}
	if !hole {
		t.Errorf("nbdinfo --map shows no hole over [3, 5) MiB:\n%s", out)
	}
	copyOut := e.path("copy.img")
	if out, err := exec.Command("nbdcopy", uri, copyOut).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	got, err := os.ReadFile(copyOut)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Error("nbdcopy's copy differs from the image")
	}

	d.stop(t, syscall.SIGINT)
	t.Logf("server output:\n%s", d.logText())
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("sauve serve nbd exited %d after SIGINT:\n%s", code, d.logText())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("the socket is still there: %v", err)
	}
	if log := d.logText(); !strings.Contains(log, uri) || !strings.Contains(log, "Ctrl-C stops") {
		t.Errorf("the server did not print the export's URI:\n%s", log)
	}
}

func TestServeNBDListenUsage(t *testing.T) {
	e := newEnv(t)
	r := e.run("serve", "nbd", "latest", "--listen", "tcp:127.0.0.1:10809")
	if r.code != 2 || !strings.Contains(r.stderr, "needs TLS") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Errorf("tcp: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := e.run("serve", "nbd", "latest", "--listen", "/tmp/x.sock"); r.code != 2 || !strings.Contains(r.stderr, "want unix:PATH") {
		t.Errorf("--listen without unix: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestServeNBDPartitions serves a disk's partitions as exports of their
// own, on the default socket under $XDG_RUNTIME_DIR.
func TestServeNBDPartitions(t *testing.T) {
	needTools(t, "qemu-img", "nbdinfo", "sfdisk")
	e := newEnv(t)
	img := e.path("disk.img")
	const mib = 1 << 20
	writeFile(t, img, make([]byte, 16*mib))
	sfdisk(t, img, "label: dos\nstart=2048, size=16384, type=83\nstart=18432, type=83\n")
	part := randomBytes(8 * mib)
	writeAt(t, img, mib, part)
	partFile := e.path("part1.img")
	writeFile(t, partFile, part)
	b := e.backup(img)

	dir, err := os.MkdirTemp("", "sauve-xdg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e.setenv("XDG_RUNTIME_DIR", dir)
	sock := filepath.Join(dir, "sauve", "nbd-"+b.ShortID+".sock")
	d := startDaemon(t, "sauve serve nbd", e.cmd(nil, "serve", "nbd", b.ShortID), e.path("serve.log"), syscall.SIGTERM, func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	name := b.Disk + ":1"
	out, err := exec.Command("nbdinfo", "--list", "nbd+unix://?socket="+sock).CombinedOutput()
	if err != nil || !strings.Contains(string(out), name) {
		t.Fatalf("nbdinfo --list: %v\n%s\n%s", err, out, d.logText())
	}
	uri := "nbd+unix:///" + name + "?socket=" + sock
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", partFile, uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare of partition 1: %v\n%s\n%s", err, out, d.logText())
	}
	d.stop(t, syscall.SIGTERM)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("sauve serve nbd exited %d after SIGTERM:\n%s", code, d.logText())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("the socket is still there: %v", err)
	}
}
