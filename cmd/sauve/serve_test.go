package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/sauve-backup/sauve/internal/testpki"
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
	if r.code != 2 || !strings.HasPrefix(r.stderr, "sauve: --listen tcp: serves decrypted disks to the network and needs --tls-creds DIR") {
		t.Errorf("tcp: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := e.run("serve", "nbd", "latest", "--listen", "/tmp/x.sock"); r.code != 2 || !strings.Contains(r.stderr, "want unix:PATH or tcp:HOST:PORT") {
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

// TestServeNBDTLS serves over TCP with TLS and client certificates:
// nbdinfo, nbdcopy and qemu-img with the CA's client certificate read
// the disk; without TLS, without a certificate, or with one of another
// CA they are refused, and the server goes on.
func TestServeNBDTLS(t *testing.T) {
	needTools(t, "nbdinfo", "nbdcopy", "qemu-img")
	e := newEnv(t)
	img := e.path("disk.img")
	data := randomBytes(3 << 20)
	writeFile(t, img, data)
	b := e.backup(img)
	pki := func(name string) *testpki.CA {
		ca, err := testpki.NewCA(name)
		if err != nil {
			t.Fatal(err)
		}
		return ca
	}
	ca, other := pki("sauve test CA"), pki("another CA")
	srv, cli, bad := e.path("srv"), e.path("cli"), e.path("bad")
	for _, err := range []error{ca.WriteServer(srv), ca.WriteClient(cli), other.WriteClient(bad)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	log := e.path("serve.log")
	d := startDaemon(t, "sauve serve nbd (tcp)", e.cmd(nil, "serve", "nbd", "latest", "--listen", "tcp:127.0.0.1:0", "--tls-creds", srv), log, syscall.SIGINT, func() bool {
		b, _ := os.ReadFile(log)
		return bytes.Contains(b, []byte("Ctrl-C stops"))
	})
	m := regexp.MustCompile(`nbds://127\.0\.0\.1:(\d+)/` + regexp.QuoteMeta(b.Disk) + `\b`).FindStringSubmatch(d.logText())
	if m == nil {
		t.Fatalf("no nbds:// URI in the server's output:\n%s", d.logText())
	}
	port := m[1]
	uri := "nbds://127.0.0.1:" + port + "/" + b.Disk
	run := func(name string, args ...string) (string, error) {
		out, err := exec.Command(name, args...).CombinedOutput()
		return string(out), err
	}
	if out, err := run("nbdinfo", "--size", uri+"?tls-certificates="+cli); err != nil || strings.TrimSpace(out) != strconv.Itoa(len(data)) {
		t.Fatalf("nbdinfo over TLS: %v\n%s\n%s", err, out, d.logText())
	}
	copyOut := e.path("copy.img")
	if out, err := run("nbdcopy", uri+"?tls-certificates="+cli, copyOut); err != nil {
		t.Fatalf("nbdcopy over TLS: %v\n%s", err, out)
	}
	if got, _ := os.ReadFile(copyOut); !bytes.Equal(got, data) {
		t.Error("nbdcopy over TLS copied other bytes")
	}
	out, err := run("qemu-img", "info", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+cli,
		"--image-opts", "driver=nbd,host=127.0.0.1,port="+port+",export="+b.Disk+",tls-creds=tls0")
	if err != nil || !strings.Contains(out, "("+strconv.Itoa(len(data))+" bytes)") {
		t.Errorf("qemu-img info over TLS: %v\n%s", err, out)
	}
	for _, c := range []struct{ what, uri string }{
		{"no TLS", "nbd://127.0.0.1:" + port + "/" + b.Disk},
		{"no client certificate", uri + "?tls-verify-peer=false"},
		{"another CA's certificate", uri + "?tls-certificates=" + bad},
	} {
		if out, err := run("nbdinfo", "--size", c.uri); err == nil {
			t.Errorf("%s: nbdinfo was served:\n%s", c.what, out)
		}
	}
	if out, err := run("nbdinfo", "--size", uri+"?tls-certificates="+cli); err != nil {
		t.Fatalf("nbdinfo after refused clients: %v\n%s\n%s", err, out, d.logText())
	}
	d.stop(t, syscall.SIGINT)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit %d:\n%s", code, d.logText())
	}
}
