// Package testsrv starts the real servers that the remote backends are
// tested against, on 127.0.0.1 and free ports, and stops them when the test
// ends: Azurite (Microsoft's Azure Storage emulator), versitygw (an
// S3-compatible gateway serving a temporary folder) and OpenSSH's sshd with
// a throw-away host key and user key.
//
// .ci/services installs Azurite and versitygw; Debian's openssh-server
// provides sshd. When one is missing the test fails, naming what to run,
// except on a developer's machine (not root, CI unset), where it is skipped
// with that message.
//
// It is imported by tests only.
package testsrv

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// missing fails or skips the test because a tool is not installed.
func missing(t testing.TB, what string) {
	t.Helper()
	msg := what + " is not installed: run .ci/services (as root) to install the test servers"
	if os.Getenv("CI") != "" || os.Geteuid() == 0 {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// ModuleRoot returns the directory of go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("testsrv: go.mod not found above the working directory")
		}
		dir = parent
	}
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// syncBuffer collects a server's output for the failure message.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() < 1<<20 {
		s.b.Write(p)
	}
	return len(p), nil
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// process is a running server.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

// start runs a server, waits until it accepts connections on port, and
// stops it (SIGKILL, then wait) when the test ends. The server dies with the
// test binary too (Pdeathsig).
func start(t testing.TB, name string, port int, args []string, env []string) *process {
	t.Helper()
	p := &process{name: name, out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited before it listened on %s:\n%s", name, addr, p.out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on %s after 60s:\n%s", name, addr, p.out.String())
		}
	}
}

func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	// The whole process group: a server may have children (sshd's
	// sessions).
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Output returns what the server printed so far.
func (p *process) Output() string { return p.out.String() }
