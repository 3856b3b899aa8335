package shadow

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
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

// The guest agent tests run the real qemu-ga on the host. Its
// guest-fsfreeze-freeze freezes every filesystem its /proc/self/mountinfo
// lists, so it runs in a mount namespace of its own whose root is a tmpfs
// (holding a copy of qemu-ga and its libraries) with nothing mounted but
// the test's loop-mounted ext4 on /mnt and /proc: the host's filesystems
// are not in its mount table at all. The namespace is checked, from
// outside, before any test talks to the agent (qgaAgent.check); the
// test is aborted if anything else is mounted in it. The test reaches
// the agent's socket and the ext4 through /proc/PID/root.

// qgaAgent is a qemu-ga running in a mount namespace of its own.
type qgaAgent struct {
	pid  int
	dev  uint64 // the loop device of the test's ext4
	sock string // the agent's socket, from the host
	mnt  string // the test's ext4, from the host
	log  *qgaLog
}

// qgaLog gathers what qemu-ga says.
type qgaLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *qgaLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *qgaLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The environment of the namespace child.
const (
	qgaChildEnv = "SAUVE_QGA_CHILD"
	qgaRootEnv  = "SAUVE_QGA_ROOT"
	qgaLoopEnv  = "SAUVE_QGA_LOOP"
	qgaFilesEnv = "SAUVE_QGA_FILES"
)

// startQGA starts qemu-ga in a mount namespace of its own, on an ext4 of
// its own, or skips the test when a program is missing.
func startQGA(t *testing.T) *qgaAgent {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the guest agent tests mount filesystems: run them as root")
	}
	qga := qgaLookPath(t, "qemu-ga")
	for _, p := range []string{"mkfs.ext4", "losetup", "ldd"} {
		qgaLookPath(t, p)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	qgaRun(t, "truncate", "-s", "32M", img)
	qgaRun(t, "mkfs.ext4", "-q", "-F", img)
	loop := strings.TrimSpace(qgaRun(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	var st unix.Stat_t
	if err := unix.Stat(loop, &st); err != nil {
		t.Fatal(err)
	}
	files := append([]string{qga}, qgaLibraries(t, qga)...)
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	a := &qgaAgent{dev: st.Rdev, log: &qgaLog{}}
	cmd := exec.Command(self, "-test.run=^TestGuestAgentNamespaceChild$")
	cmd.Env = append(os.Environ(), qgaChildEnv+"=1", qgaRootEnv+"="+root, qgaLoopEnv+"="+loop,
		qgaFilesEnv+"="+strings.Join(files, ":"))
	cmd.Stdout, cmd.Stderr = a.log, a.log
	// The child starts in a mount namespace of its own, all private
	// (Go remounts / MS_REC|MS_PRIVATE when Unshareflags has CLONE_NEWNS):
	// nothing it mounts is seen by the host.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	a.pid = cmd.Process.Pid
	a.sock = fmt.Sprintf("/proc/%d/root/state/qga.sock", a.pid)
	a.mnt = fmt.Sprintf("/proc/%d/root/mnt", a.pid)
	t.Cleanup(func() {
		// Thaw before the namespace goes: a filesystem frozen when its
		// last mount goes stays frozen, out of reach.
		a.fithaw()
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("qemu-ga said:\n%s", a.log)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(a.sock); err == nil {
			break
		}
		select {
		case <-exited:
			t.Fatalf("qemu-ga in its namespace exited: %s", a.log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-ga made no socket in 10s: %s", a.log)
		}
	}
	a.check(t)
	return a
}

// check aborts the test unless the agent's mount table is that of its
// namespace: its own root, the test's ext4, /proc.
func (a *qgaAgent) check(t *testing.T) {
	t.Helper()
	own, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	its, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", a.pid))
	if err != nil {
		t.Fatal(err)
	}
	if its == own {
		t.Fatalf("ABORT: qemu-ga runs in the host's mount namespace (%s); no freeze is sent", its)
	}
	info, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", a.pid))
	if err != nil {
		t.Fatal(err)
	}
	if err := qgaCheckMounts(string(info), a.dev); err != nil {
		t.Fatalf("ABORT: the guest agent's mount table is not the test's: %v; no freeze is sent:\n%s", err, info)
	}
	var st unix.Stat_t
	if err := unix.Stat(a.mnt, &st); err != nil || st.Dev != a.dev {
		t.Fatalf("ABORT: %s is not the test's ext4 (device %d, want %d): %v", a.mnt, st.Dev, a.dev, err)
	}
}

// qgaCheckMounts says why mountinfo is not exactly a tmpfs root, the
// ext4 of device dev on /mnt and /proc.
func qgaCheckMounts(mountinfo string, dev uint64) error {
	want := map[string]string{"/": "tmpfs", "/mnt": "ext4", "/proc": "proc"}
	seen := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(mountinfo), "\n") {
		f := strings.Fields(line)
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if len(f) < 5 || sep < 5 || sep+1 >= len(f) {
			return fmt.Errorf("unreadable line %q", line)
		}
		point, fstype := f[4], f[sep+1]
		if want[point] != fstype || seen[point] {
			return fmt.Errorf("%s (%s) is mounted", point, fstype)
		}
		seen[point] = true
		if point == "/mnt" && f[2] != fmt.Sprintf("%d:%d", unix.Major(dev), unix.Minor(dev)) {
			return fmt.Errorf("/mnt is device %s, not the test's %d:%d", f[2], unix.Major(dev), unix.Minor(dev))
		}
	}
	if len(seen) != len(want) {
		return fmt.Errorf("%d mounts, want %d", len(seen), len(want))
	}
	return nil
}

// qgaFITHAW is linux/fs.h's FITHAW, _IOWR('X', 120, int).
const qgaFITHAW = 0xC0045878

// fithaw thaws the test's ext4 directly, whatever the agent did.
func (a *qgaAgent) fithaw() {
	f, err := os.Open(a.mnt)
	if err != nil {
		return
	}
	defer f.Close()
	unix.IoctlSetInt(int(f.Fd()), qgaFITHAW, 0)
}

// write writes a file on the test's ext4 and says when it is written.
func (a *qgaAgent) write(name string) <-chan error {
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(a.mnt, name), []byte(name), 0o644) }()
	return done
}

// raw sends commands to the agent as another client would, waits for the
// answer to the last and hangs up.
func (a *qgaAgent) raw(t *testing.T, commands ...string) string {
	t.Helper()
	s, err := a.tryRaw(commands...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (a *qgaAgent) tryRaw(commands ...string) (string, error) {
	conn, err := net.DialTimeout("unix", a.sock, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}\n"
	for i, c := range commands {
		req += fmt.Sprintf(`{"execute":%q,"id":%d}`+"\n", c, 100+i)
	}
	if _, err := conn.Write([]byte(req)); err != nil {
		return "", err
	}
	last := fmt.Sprintf(`"id": %d`, 100+len(commands)-1)
	br := bufio.NewReader(conn)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("%v: %w (%q)", commands, err, line)
		}
		if strings.Contains(line, last) {
			return strings.TrimSpace(line), nil
		}
	}
}

func qgaLookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed (Debian: qemu-guest-agent, e2fsprogs, util-linux, libc-bin)", name)
	}
	return p
}

func qgaRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qgaLibraries lists the shared libraries that bin loads, its loader
// among them.
func qgaLibraries(t *testing.T, bin string) []string {
	var libs []string
	for _, line := range strings.Split(qgaRun(t, "ldd", bin), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	if len(libs) == 0 {
		t.Fatalf("ldd %s lists no library", bin)
	}
	return libs
}

// TestGuestAgentNamespaceChild is not a test: it is the process that
// startQGA starts in a mount namespace of its own, and that becomes
// qemu-ga once the namespace holds nothing of the host.
func TestGuestAgentNamespaceChild(t *testing.T) {
	if os.Getenv(qgaChildEnv) == "" {
		t.Skip("the guest agent's namespace: started by the guest agent tests")
	}
	err := qgaChild(os.Getenv(qgaRootEnv), os.Getenv(qgaLoopEnv), strings.Split(os.Getenv(qgaFilesEnv), ":"))
	fmt.Fprintf(os.Stderr, "qemu-ga's namespace: %v\n", err)
	os.Exit(3)
}

// qgaChild makes root a tmpfs holding files, mounts loop on its /mnt,
// makes it the root of the namespace with the host's root unmounted,
// and runs qemu-ga.
func qgaChild(root, loop string, files []string) error {
	if err := unix.Mount("qga-root", root, "tmpfs", 0, "size=64m,mode=0755"); err != nil {
		return fmt.Errorf("mount the tmpfs root: %w", err)
	}
	var dirs []string
	for _, f := range files {
		if err := qgaCopy(f, filepath.Join(root, f)); err != nil {
			return err
		}
		dirs = append(dirs, filepath.Dir(f))
	}
	for _, d := range []string{"mnt", "proc", "state", "old"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount(loop, filepath.Join(root, "mnt"), "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount %s: %w", loop, err)
	}
	if err := os.Chdir(root); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "old"); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount the host's root: %w", err)
	}
	if err := os.Remove("/old"); err != nil {
		return err
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Stat("/mnt", &st); err != nil {
		return err
	}
	if err := qgaCheckMounts(string(info), st.Dev); err != nil {
		return fmt.Errorf("not starting qemu-ga: %w:\n%s", err, info)
	}
	env := []string{"LD_LIBRARY_PATH=" + strings.Join(dirs, ":")}
	args := []string{"qemu-ga", "-v", "-m", "unix-listen", "-p", "/state/qga.sock", "-t", "/state", "-f", "/state/qga.pid"}
	return syscall.Exec(files[0], args, env)
}

func qgaCopy(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o755)
}

// qgaFast are short delays for the tests.
var qgaFast = agentTimes{answer: 2 * time.Second, poll: 50 * time.Millisecond}

// Writes to the guest's filesystem wait while it is frozen; thaw lets
// them through and says how long the freeze lasted.
func TestGuestFreezeQGA(t *testing.T) {
	a := startQGA(t)
	ctx := context.Background()
	thaw, err := freezeGuest(ctx, a.sock, 10*time.Second, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	wrote := a.write("during")
	hold := 300 * time.Millisecond
	select {
	case err := <-wrote:
		thaw()
		t.Fatalf("a write went through the freeze (%v)", err)
	case <-time.After(hold):
	}
	d, err := thaw()
	if err != nil {
		t.Fatal(err)
	}
	if d < hold || d > 5*time.Second {
		t.Errorf("thaw says the guest was frozen for %v, it was for %v and a little more", d, hold)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the write still waits after the thaw")
	}
	if b, err := os.ReadFile(filepath.Join(a.mnt, "during")); err != nil || string(b) != "during" {
		t.Errorf("the file written during the freeze holds %q (%v)", b, err)
	}
	if d2, err := thaw(); d2 != d || err != nil {
		t.Errorf("thaw again: %v, %v; want %v, nil", d2, err, d)
	}
	if got := a.raw(t, "guest-fsfreeze-status"); !strings.Contains(got, `"thawed"`) {
		t.Errorf("status after thaw: %s", got)
	}
	// The agent is left ready for the next backup.
	thaw, err = freezeGuest(ctx, a.sock, 10*time.Second, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := thaw(); err != nil {
		t.Fatal(err)
	}
}

// A freeze not thawed within the freeze timeout is thawed by itself, and
// thaw then says so.
func TestGuestFreezeTimeoutQGA(t *testing.T) {
	a := startQGA(t)
	window := time.Second
	start := time.Now()
	thaw, err := freezeGuest(context.Background(), a.sock, window, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-a.write("late"):
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(window + 5*time.Second):
		thaw()
		t.Fatal("the freeze outlasted its timeout")
	}
	if waited := time.Since(start); waited < window {
		t.Errorf("the write went through after %v, before the freeze timeout of %v", waited, window)
	}
	d, err := thaw()
	if err == nil || !strings.Contains(err.Error(), "the freeze lasted longer than the freeze timeout (1s): sauve thawed the guest's filesystems after") {
		t.Errorf("thaw after the timeout: %v", err)
	}
	if d < window || d > window+3*time.Second {
		t.Errorf("thaw says the guest was frozen for %v, the timeout is %v", d, window)
	}
}

// A guest left frozen (by a client killed while it was frozen: qemu-ga
// does not thaw when its client goes) is thawed once it has stayed
// frozen for the freeze timeout, and the freeze fails saying so.
func TestGuestFreezeAbandonedQGA(t *testing.T) {
	a := startQGA(t)
	if got := a.raw(t, "guest-fsfreeze-freeze"); got != `{"return": 1, "id": 100}` {
		t.Fatalf("freeze by another client: %s", got)
	}
	wrote := a.write("left")
	window := 700 * time.Millisecond
	start := time.Now()
	_, err := freezeGuest(context.Background(), a.sock, window, qgaFast)
	if !errors.Is(err, errGuestWasFrozen) || !strings.Contains(err.Error(), "sauve thawed them (1 filesystem): back up again") {
		t.Fatalf("freeze of a guest left frozen: %v", err)
	}
	if waited := time.Since(start); waited < window {
		t.Errorf("thawed after %v, before the freeze timeout of %v", waited, window)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the guest left frozen is still frozen")
	}
	thaw, err := freezeGuest(context.Background(), a.sock, window, qgaFast)
	if err != nil {
		t.Fatalf("the backup after: %v", err)
	}
	if _, err := thaw(); err != nil {
		t.Fatal(err)
	}
}

// A guest frozen by someone else who thaws it within the freeze timeout
// is waited for: their freeze is left alone, then sauve freezes.
func TestGuestFreezeOthersQGA(t *testing.T) {
	a := startQGA(t)
	a.raw(t, "guest-fsfreeze-freeze")
	theirs := make(chan string, 1)
	go func() {
		time.Sleep(400 * time.Millisecond)
		s, err := a.tryRaw("guest-fsfreeze-thaw")
		if err != nil {
			s = err.Error()
		}
		theirs <- s
	}()
	thaw, err := freezeGuest(context.Background(), a.sock, 10*time.Second, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	// They thawed the filesystem they froze: sauve had not thawed it.
	if got := <-theirs; got != `{"return": 1, "id": 100}` {
		t.Errorf("their thaw: %s", got)
	}
	select {
	case err := <-a.write("ours"):
		t.Errorf("a write went through sauve's freeze (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	if _, err := thaw(); err != nil {
		t.Fatal(err)
	}

	// Interrupted while it waits, sauve leaves their freeze alone.
	a.raw(t, "guest-fsfreeze-freeze")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = freezeGuest(ctx, a.sock, 10*time.Second, qgaFast)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "frozen by someone else") {
		t.Errorf("interrupted wait: %v", err)
	}
	if got := a.raw(t, "guest-fsfreeze-status"); !strings.Contains(got, `"frozen"`) {
		t.Errorf("their freeze after sauve gave up: %s", got)
	}
	a.raw(t, "guest-fsfreeze-thaw")
}

// The namespace check refuses the host's mount table.
func TestGuestAgentMountCheck(t *testing.T) {
	host, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if err := qgaCheckMounts(string(host), 7<<8); err == nil {
		t.Fatalf("the host's mount table passes the check:\n%s", host)
	}
	ok := "21 20 0:40 / / rw - tmpfs qga-root rw\n22 21 7:3 / /mnt rw - ext4 /dev/loop3 rw\n23 21 0:41 / /proc rw - proc proc rw\n"
	if err := qgaCheckMounts(ok, unix.Mkdev(7, 3)); err != nil {
		t.Errorf("the namespace's mount table: %v", err)
	}
	for _, bad := range []string{
		strings.Replace(ok, "7:3", "8:1", 1),
		ok + "24 21 8:1 / /mnt/host rw - ext4 /dev/sda1 rw\n",
		strings.Replace(ok, "tmpfs", "ext4", 1),
		"21 20 0:40 / / rw - tmpfs qga-root rw\n",
	} {
		if err := qgaCheckMounts(bad, unix.Mkdev(7, 3)); err == nil {
			t.Errorf("passes:\n%s", bad)
		}
	}
}

// qgaPeer is a scripted guest agent: answers maps a command to what is
// sent back, with ID replaced by the command's id and SYNC by
// guest-sync-delimited's; a command it does not have is not answered;
// "CLOSE" hangs up.
type qgaPeer struct {
	sock string
	mu   sync.Mutex
	got  []string // the commands received
}

func (p *qgaPeer) commands() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.got...)
}

func startPeer(t *testing.T, greeting string, answers map[string]string) *qgaPeer {
	t.Helper()
	dir, err := os.MkdirTemp("", "qga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &qgaPeer{sock: filepath.Join(dir, "qga.sock")}
	l, err := net.Listen("unix", p.sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var conns []net.Conn
	var mu sync.Mutex
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				p.serve(conn, greeting, answers)
			}()
		}
	}()
	return p
}

func (p *qgaPeer) serve(conn net.Conn, greeting string, answers map[string]string) {
	conn.Write([]byte(greeting))
	br := bufio.NewReader(conn)
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			return
		}
		var req struct {
			Execute   string `json:"execute"`
			ID        int64  `json:"id"`
			Arguments struct {
				ID int64 `json:"id"`
			} `json:"arguments"`
		}
		if json.Unmarshal(bytes.TrimLeft(line, "\xff"), &req) != nil {
			continue
		}
		p.mu.Lock()
		p.got = append(p.got, req.Execute)
		p.mu.Unlock()
		a, ok := answers[req.Execute]
		switch {
		case !ok:
			continue
		case a == "CLOSE":
			return
		}
		a = strings.ReplaceAll(a, "SYNC", strconv.FormatInt(req.Arguments.ID, 10))
		a = strings.ReplaceAll(a, "ID", strconv.FormatInt(req.ID, 10))
		if _, err := conn.Write([]byte(a)); err != nil {
			return
		}
	}
}

// qgaGood are the answers of an agent that does as told.
func qgaGood() map[string]string {
	return map[string]string{
		"guest-sync-delimited":  "\xff{\"return\": SYNC}\n",
		"guest-ping":            "{\"return\": {}, \"id\": ID}\n",
		"guest-fsfreeze-status": "{\"return\": \"thawed\", \"id\": ID}\n",
		"guest-fsfreeze-freeze": "{\"return\": 2, \"id\": ID}\n",
		"guest-fsfreeze-thaw":   "{\"return\": 2, \"id\": ID}\n",
	}
}

func qgaWith(m map[string]string, kv ...string) map[string]string {
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(m, kv[i])
		} else {
			m[kv[i]] = kv[i+1]
		}
	}
	return m
}

// What an agent answers in the pipe before the answer awaited is
// skipped: an earlier client's answers, an earlier sync's, half a line.
func TestGuestFreezeSkipsStaleAnswers(t *testing.T) {
	stale := "{\"return\": {}}\n\xff{\"return\": 12}\n{\"return\": 3, \"id\": 99}\n{\"ret"
	answers := qgaWith(qgaGood(),
		"guest-sync-delimited", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": 1}\n\xff{\"return\": SYNC}\n",
		"guest-ping", "{\"return\": {}, \"id\": 5}\n{\"return\": {}, \"id\": ID}\n")
	p := startPeer(t, stale, answers)
	thaw, err := freezeGuest(context.Background(), p.sock, time.Second, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := thaw(); err != nil {
		t.Fatal(err)
	}
	want := "guest-sync-delimited guest-ping guest-fsfreeze-status guest-fsfreeze-freeze guest-fsfreeze-thaw"
	if got := strings.Join(p.commands(), " "); got != want {
		t.Errorf("commands %q, want %q", got, want)
	}
}

// An agent that does not answer, answers nonsense or refuses is a clear
// error, soon; a freeze that may have frozen something is thawed.
func TestGuestFreezeBadAgents(t *testing.T) {
	long := "{\"return\": \"" + strings.Repeat("x", agentMaxLine) + "\", \"id\": ID}\n"
	for _, tc := range []struct {
		name     string
		greeting string
		answers  map[string]string
		err      string
		thawed   bool // a thaw was sent
	}{
		{name: "silent", answers: map[string]string{},
			err: "the guest agent at SOCK did not answer within 300ms (is qemu-ga running in the guest?)"},
		{name: "chatter", greeting: strings.Repeat("hello\n", 100), answers: map[string]string{},
			err: `the guest agent at SOCK did not answer guest-sync-delimited within 300ms (is it a guest agent? it sent 600 bytes that are no answer, ending "hello\nhello`},
		{name: "marker then garbage", answers: qgaWith(qgaGood(), "guest-sync-delimited", "\xffnonsense\n"),
			err: `did not answer guest-sync-delimited within 300ms (is it a guest agent? it sent 8 bytes that are no answer, ending "nonsense")`},
		{name: "flood", greeting: strings.Repeat("x", agentMaxSkip+1), answers: map[string]string{},
			err: "answered guest-sync-delimited with something that is no answer: more than 4 MiB without the sync marker"},
		{name: "garbage ping", answers: qgaWith(qgaGood(), "guest-ping", "{oops\n"),
			err: `the guest agent at SOCK answered guest-ping with something that is no answer: "{oops"`},
		{name: "long ping", answers: qgaWith(qgaGood(), "guest-ping", long),
			err: "the guest agent at SOCK answered guest-ping with an answer longer than 1 MiB"},
		{name: "neither", answers: qgaWith(qgaGood(), "guest-ping", "{\"foo\": 1}\n"),
			err: "answered guest-ping with something that is no answer (neither return nor error)"},
		{name: "status not a string", answers: qgaWith(qgaGood(), "guest-fsfreeze-status", "{\"return\": 42, \"id\": ID}\n"),
			err: `the guest agent at SOCK answered guest-fsfreeze-status with "42": json: cannot unmarshal number`},
		{name: "status unknown", answers: qgaWith(qgaGood(), "guest-fsfreeze-status", "{\"return\": \"melted\", \"id\": ID}\n"),
			err: `the guest agent at SOCK says the guest's filesystems are "melted", neither thawed nor frozen`},
		{name: "hangs up", answers: qgaWith(qgaGood(), "guest-ping", "CLOSE"),
			err: "the guest agent at SOCK closed the connection during guest-ping"},
		{name: "freeze disabled", answers: qgaWith(qgaGood(), "guest-fsfreeze-freeze",
			"{\"id\": ID, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-fsfreeze-freeze has been disabled\"}}\n"),
			err: "the guest agent at SOCK refused guest-fsfreeze-freeze: Command guest-fsfreeze-freeze has been disabled (CommandNotFound)"},
		{name: "freeze failed", answers: qgaWith(qgaGood(), "guest-fsfreeze-freeze",
			"{\"id\": ID, \"error\": {\"class\": \"GenericError\", \"desc\": \"failed to freeze /: Device or resource busy\"}}\n"),
			err: "the guest agent at SOCK refused guest-fsfreeze-freeze: failed to freeze /: Device or resource busy (GenericError)", thawed: true},
		{name: "freeze unanswered", answers: qgaWith(qgaGood(), "guest-fsfreeze-freeze", ""),
			err: "the guest agent at SOCK did not freeze the guest's filesystems within 500ms", thawed: true},
		{name: "freeze and thaw unanswered", answers: qgaWith(qgaGood(), "guest-fsfreeze-freeze", "", "guest-fsfreeze-thaw", ""),
			err: "did not freeze the guest's filesystems within 500ms; then, thawing: the guest agent at SOCK did not answer within 300ms", thawed: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPeer(t, tc.greeting, tc.answers)
			start := time.Now()
			thaw, err := freezeGuest(context.Background(), p.sock, 500*time.Millisecond, agentTimes{answer: 300 * time.Millisecond, poll: 10 * time.Millisecond})
			if err == nil {
				thaw()
				t.Fatal("no error")
			}
			if want := strings.ReplaceAll(tc.err, "SOCK", p.sock); !strings.Contains(err.Error(), want) {
				t.Errorf("error %q\nwant  %q", err, want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error of more than one line: %q", err)
			}
			if took := time.Since(start); took > 2*time.Second {
				t.Errorf("the error took %v", took)
			}
			cmds := p.commands()
			if thawed := len(cmds) > 0 && cmds[len(cmds)-1] == "guest-fsfreeze-thaw"; thawed != tc.thawed {
				t.Errorf("commands %q: thawed %v, want %v", cmds, thawed, tc.thawed)
			}
		})
	}
}

// The context bounds every wait; the thaw does not depend on it.
func TestGuestFreezeContext(t *testing.T) {
	p := startPeer(t, "", map[string]string{})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := freezeGuest(ctx, p.sock, time.Second, agentTimes{answer: 5 * time.Second, poll: time.Second})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Errorf("after %v: %v", time.Since(start), err)
	}

	p = startPeer(t, "", qgaGood())
	ctx, cancel = context.WithCancel(context.Background())
	thaw, err := freezeGuest(ctx, p.sock, time.Second, qgaFast)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := thaw(); err != nil {
		t.Errorf("thaw after the context ended: %v", err)
	}

	_, err = freezeGuest(context.Background(), filepath.Join(t.TempDir(), "none.sock"), time.Second, qgaFast)
	if err == nil || !strings.Contains(err.Error(), "connect to the guest agent at ") {
		t.Errorf("no socket: %v", err)
	}
}

// qgaChardev starts a QEMU (paused, no guest) with a guest agent channel
// and returns the channel's socket: one that accepts and never answers,
// as when qemu-ga is not running in the guest.
func qgaChardev(t *testing.T) string {
	t.Helper()
	qemu := qgaLookPath(t, "qemu-system-x86_64")
	dir, err := os.MkdirTemp("", "qga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vm.qga")
	var log qgaLog
	cmd := exec.Command(qemu, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-S",
		"-chardev", "socket,path="+sock+",server=on,wait=off,id=qga0",
		"-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("QEMU made no guest agent socket in 10s: %s", log.String())
		}
	}
}

// A VM whose guest runs no agent: its channel accepts and nothing
// answers; the error says so after 5s.
func TestGuestFreezeNoAgentQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("waits 5s")
	}
	sock := qgaChardev(t)
	start := time.Now()
	_, err := guestFreeze(context.Background(), sock, 0)
	want := "the guest agent at " + sock + " did not answer within 5s (is qemu-ga running in the guest?)"
	if err == nil || err.Error() != want {
		t.Errorf("error %v, want %q", err, want)
	}
	if took := time.Since(start); took < 5*time.Second || took > 7*time.Second {
		t.Errorf("took %v", took)
	}
	// The channel serves one client at a time: the next backup is not
	// kept out by the one that gave up.
	_, err = freezeGuest(context.Background(), sock, time.Second, agentTimes{answer: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "did not answer within 300ms") {
		t.Errorf("again: %v", err)
	}
}

func FuzzGuestAgentReply(f *testing.F) {
	for _, s := range []string{
		"\xff{\"return\": 7}\n{\"return\": {}, \"id\": 8}\n{\"return\": \"thawed\", \"id\": 9}\n{\"return\": 1, \"id\": 10}\n",
		"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\n\xff{\"return\": 3}\n\xff{\"return\": 7}\n{\"return\": {}}\n",
		"\xff{\"return\": 7}\n{\"id\": 8, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"disabled\"}}\n",
		"\xff{\"return\": 7}\n{\"return\": {}, \"id\": 5}\n\n{\"return\": null, \"id\": 8}\n",
		"\xff{\"return\": 7}\n{\"error\": null}\n",
		"\xff{\"return\": 7}\n[1,2]\n",
		"\xff\xff\xff{\"return\": 7",
		"\xffnonsense\n\xff{\"return\": 7}\r\n{\"return\": 1e400, \"id\": 8}\n",
		"\xff{\"return\": 7}\n" + strings.Repeat("[", 20000) + "\n",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		a := agentReader{r: bufio.NewReaderSize(bytes.NewReader(data), 16)}
		if err := a.readSync(7); err == nil {
			for id := int64(8); id < 12; id++ {
				rep, err := a.readReply(id)
				if err != nil {
					break
				}
				if (rep.err == nil) == (rep.ret == nil) {
					t.Fatalf("answer %d: return %q and error %v", id, rep.ret, rep.err)
				}
			}
		} else if a.skipped > len(data) {
			t.Fatalf("skipped %d of %d bytes", a.skipped, len(data))
		}
		rep, err := parseAgentReply(data)
		if err == nil && (rep.err == nil) == (rep.ret == nil) {
			t.Fatalf("return %q and error %v", rep.ret, rep.err)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Fatalf("error of more than one line: %q", err)
		}
	})
}
