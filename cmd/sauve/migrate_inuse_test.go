package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A target that a running QEMU has open (raw or qcow2, nothing mounted
// from it) is refused by migrate and restore with nothing written:
// QEMU's image locks say so. Once QEMU has stopped, the same command
// migrates.
func TestMigrateRefusesTargetOfRunningQEMU(t *testing.T) {
	needTools(t, "qemu-system-x86_64", "qemu-img")
	e := newEnv(t)
	src := e.path("src.img")
	randomFile(t, src, 8<<20)
	e.ok("backup", src)
	raw, qc := e.path("vm.raw"), e.path("vm.qcow2")
	randomFile(t, raw, 8<<20)
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", qc, "8M")
	ctx, cancel := context.WithCancel(context.Background())
	vm := exec.CommandContext(ctx, "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-S",
		"-drive", "if=none,id=d0,file="+raw+",format=raw", "-drive", "if=none,id=d1,file="+qc+",format=qcow2")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			vm.Wait()
		}
	}
	defer stop()
	// QEMU locks its images once it has opened them.
	deadline := time.Now().Add(20 * time.Second)
	for !locked(t, qc) {
		if time.Now().After(deadline) {
			t.Fatal("QEMU took no lock on its qcow2 image in 20 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, c := range [][]string{{"migrate", src, raw}, {"migrate", src, qc}, {"restore", "latest", raw, "--force"}} {
		tgt := c[2]
		before := fileHash(t, tgt, -1)
		stderr := e.fail([]string{"target " + tgt + " is in use", "qemu"}, c...)
		if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
			t.Errorf("%s: a %d-line error:\n%s", c[0], n+1, stderr)
		}
		if fileHash(t, tgt, -1) != before {
			t.Errorf("%s was written by a refused %s", tgt, c[0])
		}
	}
	stop()
	e.ok("migrate", src, raw)
	if fileHash(t, raw, -1) != fileHash(t, src, -1) {
		t.Error("after QEMU stopped, the migrated target differs from the source")
	}
}

// locked says whether some process holds a byte-range lock on path, as
// /proc/locks shows it.
func locked(t *testing.T, path string) bool {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	ino := fmt.Sprint(fi.Sys().(*syscall.Stat_t).Ino)
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.Count(f, ":") == 2 && strings.HasSuffix(f, ":"+ino) {
				return true
			}
		}
	}
	return false
}
