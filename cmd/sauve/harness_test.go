package main

// End-to-end tests: they build the sauve binary once and run it as a user
// would, against real files, loop devices and file systems.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

var sauveBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sauve-e2e-bin")
	if err != nil {
		panic(err)
	}
	sauveBin = filepath.Join(dir, "sauve")
	// SAUVE_TEST_RACE=1 builds the binary under test with the race
	// detector: the pipelines are concurrent, and only the end-to-end
	// tests drive them whole.
	args := []string{"build", "-o", sauveBin}
	if os.Getenv("SAUVE_TEST_RACE") != "" {
		args = append(args, "-race")
	}
	out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build sauve: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one user's world: a repository, a config and cache directory.
type env struct {
	t    *testing.T
	dir  string
	repo string
	vars []string
}

// newEnv makes a fresh environment with an initialised repository.
func newEnv(t *testing.T, initArgs ...string) *env {
	t.Helper()
	e := newBareEnv(t)
	e.ok(append([]string{"init"}, initArgs...)...)
	return e
}

// newBareEnv makes an environment without a repository.
func newBareEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, dir: dir, repo: filepath.Join(dir, "repo")}
	e.vars = []string{
		"HOME=" + dir,
		"PATH=" + os.Getenv("PATH"),
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "config"),
		"XDG_CACHE_HOME=" + filepath.Join(dir, "cache"),
		"SAUVE_REPO=" + e.repo,
	}
	return e
}

// setenv adds or replaces an environment variable for later runs.
func (e *env) setenv(k, v string) {
	for i, kv := range e.vars {
		if strings.HasPrefix(kv, k+"=") {
			e.vars[i] = k + "=" + v
			return
		}
	}
	e.vars = append(e.vars, k+"="+v)
}

func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

type result struct {
	stdout, stderr string
	code           int
}

func (e *env) cmd(stdin io.Reader, args ...string) *exec.Cmd {
	c := exec.Command(sauveBin, args...)
	c.Env = e.vars
	c.Stdin = stdin
	return c
}

func (e *env) runIn(stdin io.Reader, args ...string) result {
	e.t.Helper()
	c := e.cmd(stdin, args...)
	var o, er bytes.Buffer
	c.Stdout, c.Stderr = &o, &er
	err := c.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			e.t.Fatalf("run sauve %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	if strings.Contains(er.String(), "panic:") || strings.Contains(er.String(), "goroutine ") {
		e.t.Fatalf("sauve %v panicked:\n%s", args, er.String())
	}
	return result{o.String(), er.String(), code}
}

func (e *env) run(args ...string) result { e.t.Helper(); return e.runIn(nil, args...) }

// ok runs sauve and fails the test unless it succeeds.
func (e *env) ok(args ...string) string {
	e.t.Helper()
	r := e.run(args...)
	if r.code != 0 {
		e.t.Fatalf("sauve %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// fail runs sauve, expects a non-zero exit and one error line naming
// every string in want, and returns stderr.
func (e *env) fail(want []string, args ...string) string {
	e.t.Helper()
	r := e.run(args...)
	if r.code == 0 {
		e.t.Fatalf("sauve %s succeeded, expected failure\nstdout: %s", strings.Join(args, " "), r.stdout)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			e.t.Fatalf("sauve %s: stderr lacks %q:\n%s", strings.Join(args, " "), w, r.stderr)
		}
	}
	return r.stderr
}

// okJSON runs sauve with --json and decodes its output.
func (e *env) okJSON(v any, args ...string) {
	e.t.Helper()
	out := e.ok(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		e.t.Fatalf("sauve %v --json: %v\n%s", args, err, out)
	}
}

type backupOut struct {
	Snapshot       string `json:"snapshot"`
	ShortID        string `json:"short_id"`
	Size           int64  `json:"size"`
	BytesRead      int64  `json:"bytes_read"`
	BytesNew       int64  `json:"bytes_new"`
	BytesNewCoded  int64  `json:"bytes_new_compressed"`
	ChunksNew      int64  `json:"chunks_new"`
	ChunksReused   int64  `json:"chunks_reused"`
	ChunksZero     int64  `json:"chunks_zero"`
	Packs          int    `json:"packs"`
	Seconds        float64
	Disk, Source   string
	Host           string
	Tags           []string
	BytesStoredRaw int64 `json:"bytes_stored"`
	ParityBytes    int64 `json:"parity_bytes"`
}

func (e *env) backup(args ...string) backupOut {
	e.t.Helper()
	var b backupOut
	e.okJSON(&b, append([]string{"backup"}, args...)...)
	return b
}

// fileHash returns the SHA-256 of a file's first n bytes (all if n < 0).
func fileHash(t *testing.T, path string, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var r io.Reader = f
	if n >= 0 {
		r = io.LimitReader(f, n)
	}
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	fa, err := os.Stat(a)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := os.Stat(b)
	if err != nil {
		t.Fatal(err)
	}
	if fa.Size() != fb.Size() {
		t.Fatalf("%s is %d bytes, %s is %d", a, fa.Size(), b, fb.Size())
	}
	if fileHash(t, a, -1) != fileHash(t, b, -1) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

// image patterns
func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// textBytes returns compressible, non-repeating text.
func textBytes(seed uint64, n int) []byte {
	r := mrand.New(mrand.NewPCG(seed, 1))
	words := strings.Fields("the quick brown fox jumps over a lazy dog while sauve backs up every disk block to the repository and restores them again later")
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(12) == 0 {
			fmt.Fprintf(&b, " %d\n", r.Uint32())
		} else {
			b.WriteByte(' ')
		}
	}
	return b.Bytes()[:n]
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeAt writes data at off in the file at path, creating it.
func writeAt(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices (CI runs as root)")
	}
}

// losetup attaches a loop device to file and detaches it at the end.
func losetup(t *testing.T, file string, args ...string) string {
	t.Helper()
	requireRoot(t)
	out, err := exec.Command("losetup", append([]string{"-f", "--show"}, append(args, file)...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v\n%s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// daemon is a server process a test started (a database): in a process
// group of its own, its output in a log, killed should the test binary
// die (Pdeathsig).
type daemon struct {
	what   string // "postgres on DATA", for messages
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	// ready is how long the server took to accept connections (for a
	// restored copy: its crash recovery).
	ready time.Duration
}

// startDaemon starts cmd, its output in log, and waits until ready says
// it accepts connections, failing the test if it exits first or is not
// ready within a minute. When the test ends it is stopped with endSig
// unless stop did already.
func startDaemon(t *testing.T, what string, cmd *exec.Cmd, log string, endSig syscall.Signal, ready func() bool) *daemon {
	t.Helper()
	d := &daemon{what: what, log: log, cmd: cmd, exited: make(chan struct{})}
	logf, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Dir = "/" // the test's folder may be closed to the server's user
	cmd.Stdout, cmd.Stderr = logf, logf
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid, cmd.SysProcAttr.Pdeathsig = true, syscall.SIGKILL
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() { d.stop(t, endSig) })
	for !ready() {
		select {
		case <-d.exited:
			t.Fatalf("%s exited before accepting connections: %v\n%s", what, cmd.ProcessState, d.logText())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Since(t0) > time.Minute {
			t.Fatalf("%s does not accept connections after a minute:\n%s", what, d.logText())
		}
	}
	d.ready = time.Since(t0)
	return d
}

// stop stops the server with sig and waits, killing its process group
// after 15 s. Stopping a stopped server does nothing.
func (d *daemon) stop(t *testing.T, sig syscall.Signal) {
	select {
	case <-d.exited:
		return
	default:
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Errorf("%s did not stop within 15 s of %v: killed", d.what, sig)
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-d.exited
	}
}

func (d *daemon) logText() string { b, _ := os.ReadFile(d.log); return string(b) }
