package writer

import (
	"context"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// serverDir makes a folder for a throw-away server. When owner is not ""
// and the tests run as root, the server runs as that OS user (PostgreSQL
// refuses to run as root) and the folder is theirs. It returns the
// credential to run the server's commands with, nil to run them as
// ourselves.
func serverDir(t *testing.T, owner string) (string, *syscall.Credential) {
	t.Helper()
	if owner == "" || os.Geteuid() != 0 {
		return t.TempDir(), nil
	}
	u, err := user.Lookup(owner)
	if err != nil {
		t.Skipf("no OS user %s to run the server as: %v", owner, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	// Under /tmp rather than t.TempDir, whose parents (TMPDIR may be
	// anywhere) the server's user may not be able to traverse. Removed
	// after the server stops, cleanups running last first.
	dir, err := os.MkdirTemp("/tmp", "sauve-writer-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
}

// run runs a command to set a server up, as cred, and fails the test
// with its output if it fails.
func run(t *testing.T, cred *syscall.Credential, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
}

// startServer starts a server in the background, as cred, its output in
// dir/server.log, and waits for ready to succeed. The server is stopped
// with stop (then SIGKILL) when the test ends, however it ends; if the test
// binary itself dies, the kernel kills the server (Pdeathsig).
func startServer(t *testing.T, dir string, cred *syscall.Credential, stop syscall.Signal, ready func(context.Context) error, name string, args ...string) {
	t.Helper()
	logPath := filepath.Join(dir, "server.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(stop)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			t.Errorf("%s did not stop within 15 s: killed", name)
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		err := ready(ctx)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-exited:
			out, _ := os.ReadFile(logPath)
			t.Fatalf("%s exited: %v\n%s", name, cmd.ProcessState, out)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logPath)
			t.Fatalf("%s not ready within 30 s: %v\n%s", name, err, out)
		}
	}
}
