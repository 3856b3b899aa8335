package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// End to end, as root: the real 'sauve agent run' freezing a loop-mounted
// ext4, and a real caller over TCP and TLS.

const ioctlFIFREEZE = 0xC0045877

func e2eRun(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

func e2eNeedRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices, mount and FIFREEZE (CI runs as root)")
	}
	for _, p := range []string{"mkfs.ext4", "losetup", "mount", "go"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed", p)
		}
	}
}

// buildSauve builds the sauve binary into a temporary folder.
func buildSauve(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "sauve")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/sauve-backup/sauve/cmd/sauve").CombinedOutput()
	if err != nil {
		t.Fatalf("build sauve: %v\n%s", err, out)
	}
	return bin
}

// loopExt4 mounts a fresh ext4 through a loop device in dir. At the end
// it fails the test if the filesystem was left frozen, and unmounts it.
func loopExt4(t *testing.T, dir string) string {
	t.Helper()
	img, mnt := filepath.Join(dir, "ext4.img"), filepath.Join(dir, "mnt")
	e2eRun(t, "truncate", "-s", "64M", img)
	e2eRun(t, "mkfs.ext4", "-q", img)
	loop := e2eRun(t, "losetup", "-f", "--show", img)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	os.Mkdir(mnt, 0o755)
	e2eRun(t, "mount", loop, mnt)
	t.Cleanup(func() {
		for i := 0; i < 30; i++ {
			if exec.Command("umount", mnt).Run() == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("umount %s failed (unmounted lazily)", mnt)
		exec.Command("umount", "-l", mnt).Run()
	})
	t.Cleanup(func() {
		if thawIfFrozen(t, mnt) {
			t.Errorf("%s was left frozen", mnt)
		}
	})
	return mnt
}

// thawIfFrozen thaws mnt and says whether it was frozen.
func thawIfFrozen(t *testing.T, mnt string) bool {
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Errorf("open %s: %v", mnt, err)
		return false
	}
	defer unix.Close(fd)
	// FITHAW from linux/fs.h, _IOWR('X', 120, int), as fsfreeze -u uses.
	err = unix.IoctlSetInt(fd, 0xC0045878, 0)
	if err != nil && !errors.Is(err, unix.EINVAL) {
		t.Errorf("FITHAW %s: %v", mnt, err)
	}
	return err == nil
}

// probe starts a write of a new file in mnt; the channel gets its end.
func probe(mnt string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		if f, err := os.CreateTemp(mnt, "probe"); err == nil {
			f.Write([]byte("probe"))
			f.Sync()
			f.Close()
		}
		ch <- time.Now()
	}()
	return ch
}

// blocked says whether a write started now is still waiting after d.
func blocked(mnt string, d time.Duration) (bool, <-chan time.Time) {
	p := probe(mnt)
	select {
	case <-p:
		return false, p
	case <-time.After(d):
		return true, p
	}
}

// agentProc is a running 'sauve agent run' and its log.
type agentProc struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []map[string]any
	raw   strings.Builder
	done  chan struct{}
	addr  string
}

func startAgent(t *testing.T, bin string, args ...string) *agentProc {
	t.Helper()
	p := &agentProc{cmd: exec.Command(bin, append([]string{"agent", "run"}, args...)...), done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.done })
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.raw.WriteString(sc.Text() + "\n")
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				p.lines = append(p.lines, m)
			}
			p.mu.Unlock()
		}
		p.cmd.Wait()
	}()
	start := p.waitLog(t, "start", "", 20*time.Second)
	if l, ok := start["listen"].([]any); ok && len(l) > 0 {
		p.addr, _ = l[0].(string)
	}
	return p
}

// waitLog waits for a log line with msg (and, if not "", outcome).
func (p *agentProc) waitLog(t *testing.T, msg, outcome string, within time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		p.mu.Lock()
		for _, l := range p.lines {
			if l["msg"] == msg && l["warning"] == nil && (outcome == "" || l["outcome"] == outcome) {
				p.mu.Unlock()
				return l
			}
		}
		raw := p.raw.String()
		p.mu.Unlock()
		select {
		case <-p.done:
			t.Fatalf("the agent exited (%v) before logging %s %s:\n%s", p.cmd.ProcessState, msg, outcome, raw)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s %s in the agent's log within %v:\n%s", msg, outcome, within, raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// e2eWorld is the keys and files of an agent and a caller, made with the
// sauve binary itself.
type e2eWorld struct {
	bin, dir, mnt string
	cfg           ClientConfig
}

func newE2E(t *testing.T) *e2eWorld {
	e2eNeedRoot(t)
	w := &e2eWorld{bin: buildSauve(t), dir: t.TempDir()}
	w.mnt = loopExt4(t, w.dir)
	e2eRun(t, w.bin, "agent", "keygen", "--out", w.path("agent.key"))
	e2eRun(t, w.bin, "agent", "keygen", "--out", w.path("caller.key"))
	e2eRun(t, w.bin, "agent", "authorize", w.path("caller.key.pub"), "--from", "127.0.0.1", "--window", "30s", "--file", w.path("authorized_keys"))
	key, err := LoadPrivateKey(w.path("caller.key"))
	if err != nil {
		t.Fatal(err)
	}
	ak, _, err := ReadPublicKeyArg(w.path("agent.key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	w.cfg = ClientConfig{Key: key, AgentKey: ak, Timeout: 5 * time.Second}
	return w
}

func (w *e2eWorld) path(name string) string { return filepath.Join(w.dir, name) }

func (w *e2eWorld) start(t *testing.T) *agentProc {
	return startAgent(t, w.bin, "--listen", "tcp:127.0.0.1:0", "--mount", w.mnt, "--key", w.path("agent.key"),
		"--authorized", w.path("authorized_keys"), "--state", w.path("run/state.json"))
}

// The real agent freezes a real filesystem for a real caller: a write
// waits while frozen and goes through after the thaw; a second caller is
// refused meanwhile; 'sauve agent freeze' works too; SIGTERM thaws.
func TestE2EFreezeThaw(t *testing.T) {
	w := newE2E(t)
	a := w.start(t)
	ctx := context.Background()
	s, err := Dial(ctx, a.addr, w.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rep, err := s.Freeze(ctx, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Mounts) != 1 || rep.Mounts[0] != w.mnt || rep.Window != 10*time.Second {
		t.Errorf("report %+v", rep)
	}
	t.Logf("frozen in %v", rep.Took)
	isBlocked, p := blocked(w.mnt, 500*time.Millisecond)
	if !isBlocked {
		t.Fatal("a write to the mount went through while frozen")
	}
	if _, err := os.Stat(w.path("run/state.json")); err != nil {
		t.Errorf("no state file while frozen: %v", err)
	}
	// A second caller is refused while the first holds the freeze.
	s2, err := Dial(ctx, a.addr, w.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Freeze(ctx, time.Second); refusedCode(err) != codeBusy {
		t.Errorf("second freeze: %v", err)
	}
	s2.Close()
	thawAt := time.Now()
	th, err := s.Thaw(ctx)
	if err != nil || !th.Held {
		t.Fatalf("thaw: %+v %v", th, err)
	}
	select {
	case end := <-p:
		t.Logf("the held write ended %v after the thaw request; frozen %v", end.Sub(thawAt), th.Frozen)
	case <-time.After(2 * time.Second):
		t.Fatal("the write is still held 2s after the thaw")
	}
	if _, err := os.Stat(w.path("run/state.json")); !os.IsNotExist(err) {
		t.Errorf("state file left after the thaw: %v", err)
	}
	a.waitLog(t, "thaw", outcomeThawed, time.Second)

	// The command line's client.
	out, err := exec.Command(w.bin, "agent", "freeze", a.addr, "--key", w.path("caller.key"), "--agent-key", w.path("agent.key.pub"), "--window", "5s", "--hold", "200ms").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "frozen: "+w.mnt) || !strings.Contains(string(out), "thawed: held") {
		t.Errorf("sauve agent freeze: %v\n%s", err, out)
	}

	// SIGTERM while frozen: the agent thaws, then exits 0.
	if _, err := s.Freeze(ctx, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if b, _ := blocked(w.mnt, 300*time.Millisecond); !b {
		t.Fatal("not frozen")
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not exit 10s after SIGTERM")
	}
	if !a.cmd.ProcessState.Success() {
		t.Errorf("agent exit after SIGTERM: %v\n%s", a.cmd.ProcessState, a.raw.String())
	}
	if b, _ := blocked(w.mnt, 2*time.Second); b {
		t.Fatal("still frozen after the agent stopped")
	}
	a.waitLog(t, "thaw", outcomeThawed, time.Second)
	if !strings.Contains(a.raw.String(), `"reason":"stopping"`) {
		t.Errorf("no thaw for stopping in the log:\n%s", a.raw.String())
	}
}

// kill -9 of the agent while frozen: its thaw guard thaws at once (well
// within the window). And a run that died frozen with its guard (both
// killed) is thawed by the next start, from the state file.
func TestE2EKill9Thaws(t *testing.T) {
	w := newE2E(t)
	a := w.start(t)
	ctx := context.Background()
	s, err := Dial(ctx, a.addr, w.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Freeze(ctx, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	isBlocked, p := blocked(w.mnt, 300*time.Millisecond)
	if !isBlocked {
		t.Fatal("not frozen")
	}
	killed := time.Now()
	a.cmd.Process.Kill()
	select {
	case end := <-p:
		t.Logf("writable %v after kill -9 of the agent (window 20s)", end.Sub(killed))
		if end.Sub(killed) > 5*time.Second {
			t.Errorf("writable only %v after kill -9", end.Sub(killed))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still frozen 10s after kill -9 of the agent")
	}
	if _, err := s.Thaw(ctx); err == nil {
		t.Error("a thaw after the agent died succeeded")
	}
	<-a.done
	// The dead run's state file is still there; the next start finds
	// it. Freeze the mount by hand, as if the guard had died too.
	if _, err := os.Stat(w.path("run/state.json")); err != nil {
		t.Fatalf("the killed agent's state file: %v", err)
	}
	fd, err := unix.Open(w.mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.IoctlSetInt(fd, ioctlFIFREEZE, 0)
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	isBlocked, p = blocked(w.mnt, 300*time.Millisecond)
	if !isBlocked {
		t.Fatal("FIFREEZE by hand did not freeze")
	}
	a2 := w.start(t)
	select {
	case <-p:
	case <-time.After(5 * time.Second):
		t.Fatal("the restarted agent did not thaw what the dead run left frozen")
	}
	a2.waitLog(t, "recover", "thawed", time.Second)
	if _, err := os.Stat(w.path("run/state.json")); !os.IsNotExist(err) {
		t.Errorf("state file left after recovery: %v", err)
	}
	// And it serves.
	s2, err := Dial(ctx, a2.addr, w.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Freeze(ctx, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
}

// openPTY opens a pseudo-terminal pair in raw mode, as a stand-in for a
// virtio-serial port: the agent opens the slave by its path, as it opens
// /dev/virtio-ports/..., and the test talks on the master, as the host
// does on the chardev's socket. The slave stays open here so that raw
// mode holds when the agent opens it.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { master.Close() })
	rc, err := master.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ierr error
	rc.Control(func(fd uintptr) {
		if ierr = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); ierr == nil {
			n, ierr = unix.IoctlGetInt(int(fd), unix.TIOCGPTN)
		}
	})
	if ierr != nil {
		t.Fatal(ierr)
	}
	path := "/dev/pts/" + strconv.Itoa(n)
	slave, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slave.Close() })
	sc, _ := slave.SyscallConn()
	sc.Control(func(fd uintptr) {
		var tio *unix.Termios
		if tio, ierr = unix.IoctlGetTermios(int(fd), unix.TCGETS); ierr != nil {
			return
		}
		// cfmakeraw(3)
		tio.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		tio.Oflag &^= unix.OPOST
		tio.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		tio.Cflag &^= unix.CSIZE | unix.PARENB
		tio.Cflag |= unix.CS8
		tio.Cc[unix.VMIN], tio.Cc[unix.VTIME] = 1, 0
		ierr = unix.IoctlSetTermios(int(fd), unix.TCSETS, tio)
	})
	if ierr != nil {
		t.Fatal(ierr)
	}
	return master, path
}

// The real agent on a serial port (a pseudo-terminal standing in for
// the virtio-serial port): the same protocol without TLS, and a key
// admitted there by from="serial".
func TestE2ESerial(t *testing.T) {
	w := newE2E(t)
	master, port := openPTY(t)
	w2 := filepath.Join(w.dir, "authorized_serial")
	e2eRun(t, w.bin, "agent", "authorize", w.path("caller.key.pub"), "--from", "serial", "--file", w2)
	a := startAgent(t, w.bin, "--serial", port, "--mount", w.mnt, "--key", w.path("agent.key"),
		"--authorized", w2, "--state", w.path("run/state.json"))
	ctx := context.Background()
	s, err := NewSession(ctx, master, "unix:/run/vm1-agent.sock", w.cfg)
	if err != nil {
		t.Fatalf("%v\n%s", err, a.raw.String())
	}
	if _, err := s.Freeze(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	isBlocked, p := blocked(w.mnt, 300*time.Millisecond)
	if !isBlocked {
		t.Fatal("not frozen")
	}
	if th, err := s.Thaw(ctx); err != nil || !th.Held {
		t.Fatalf("thaw: %+v %v", th, err)
	}
	select {
	case <-p:
	case <-time.After(2 * time.Second):
		t.Fatal("still frozen after the thaw")
	}
	l := a.waitLog(t, "auth", outcomeAccepted, time.Second)
	if l[logAddr] != "serial:"+port {
		t.Errorf("logged address %v", l[logAddr])
	}
}
