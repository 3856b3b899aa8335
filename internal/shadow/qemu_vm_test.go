package shadow

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/qmp"
	"github.com/sauve-backup/sauve/internal/source"
)

// A QEMU for the tests: qemu-system-x86_64 with no machine (-M none boots
// no guest, under TCG too), drives from image files, one QMP monitor for
// sauve and one for the test, which writes to the drives with qemu-io
// (human-monitor-command) while sauve works.

const testUUID = "6f1c9a52-3b1e-4c55-9d0e-2a7b8c9d0e1f"

type testDrive struct {
	id, format string
	size       int64
	path       string
}

type testVM struct {
	t       *testing.T
	dir     string
	sock    string // sauve's monitor
	monSock string
	mon     *qmp.Client // the test's monitor
	cmd     *exec.Cmd
	out     *lockedBuffer // QEMU's output: qemu-io's reports
	drives  []testDrive
	args    []string // more arguments (devices, chardevs)
	machine string
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func needQEMU(t *testing.T) {
	t.Helper()
	for _, p := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed", p)
		}
	}
}

// newVM makes the drives' images and starts the VM; it is killed when
// the test ends.
func newVM(t *testing.T, machine string, args []string, drives ...testDrive) *testVM {
	t.Helper()
	needQEMU(t)
	dir := t.TempDir()
	// sauve makes the NBD server's socket folder in TMPDIR: the test
	// checks that it is gone.
	t.Setenv("TMPDIR", filepath.Join(dir, "tmp"))
	os.Mkdir(filepath.Join(dir, "tmp"), 0o700)
	vm := &testVM{t: t, dir: dir, sock: filepath.Join(dir, "qmp.sock"), monSock: filepath.Join(dir, "mon.sock"),
		args: args, machine: machine, out: &lockedBuffer{}}
	for _, d := range drives {
		d.path = filepath.Join(dir, d.id+"."+d.format)
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", d.format, d.path, fmt.Sprint(d.size)).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
		vm.drives = append(vm.drives, d)
	}
	vm.start()
	t.Cleanup(vm.stop)
	return vm
}

func (vm *testVM) start() {
	t := vm.t
	t.Helper()
	os.Remove(vm.sock)
	os.Remove(vm.monSock)
	args := []string{"-M", vm.machine, "-nodefaults", "-display", "none", "-name", "vm1", "-uuid", testUUID,
		"-qmp", "unix:" + vm.sock + ",server=on,wait=off", "-qmp", "unix:" + vm.monSock + ",server=on,wait=off"}
	for _, d := range vm.drives {
		args = append(args, "-drive", fmt.Sprintf("if=none,id=%s,file=%s,format=%s,node-name=node-%s", d.id, d.path, d.format, d.id))
	}
	vm.cmd = exec.Command("qemu-system-x86_64", append(args, vm.args...)...)
	vm.cmd.Stdout, vm.cmd.Stderr = vm.out, vm.out
	if err := vm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(vm.monSock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu made no monitor socket in 10s: %s", vm.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	// The socket may exist a moment before QEMU listens on it.
	for vm.mon, err = qmp.Dial(ctx, vm.monSock); err != nil; vm.mon, err = qmp.Dial(ctx, vm.monSock) {
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// quit stops QEMU cleanly: persistent bitmaps are saved.
func (vm *testVM) quit() {
	vm.t.Helper()
	vm.exec("quit", nil, nil)
	vm.cmd.Wait()
	vm.mon.Close()
	vm.cmd = nil
}

// kill stops QEMU as a crash would.
func (vm *testVM) kill() {
	vm.cmd.Process.Kill()
	vm.cmd.Wait()
	vm.mon.Close()
	vm.cmd = nil
}

func (vm *testVM) stop() {
	if vm.cmd != nil {
		vm.kill()
	}
}

func (vm *testVM) exec(command string, args, result any) {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := vm.mon.Execute(ctx, command, args, result); err != nil {
		vm.t.Fatalf("test monitor: %v", err)
	}
}

// write writes n bytes of pattern at off of a drive, as the guest would.
func (vm *testVM) write(drive string, pattern byte, off, n int64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out string
	err := vm.mon.Execute(ctx, "human-monitor-command", map[string]any{
		"command-line": fmt.Sprintf(`qemu-io %s "write -P %d %d %d"`, drive, pattern, off, n)}, &out)
	if err == nil && out != "" {
		err = fmt.Errorf("qemu-io: %s", out)
	}
	return err
}

func (vm *testVM) mustWrite(drive string, pattern byte, off, n int64) {
	vm.t.Helper()
	if err := vm.write(drive, pattern, off, n); err != nil {
		vm.t.Fatal(err)
	}
}

// open opens a backup of the VM with o, whose unset Socket and FleeceDir
// the test fills; warnings are collected in the returned slice.
func (vm *testVM) open(o QEMUOptions) (*QEMUBackup, *[]string) {
	vm.t.Helper()
	q, warns, err := vm.tryOpen(o)
	if err != nil {
		vm.t.Fatal(err)
	}
	return q, warns
}

func (vm *testVM) tryOpen(o QEMUOptions) (*QEMUBackup, *[]string, error) {
	if o.Socket == "" {
		o.Socket = vm.sock
	}
	if o.FleeceDir == "" {
		o.FleeceDir = filepath.Join(vm.dir, "fleece")
		os.MkdirAll(o.FleeceDir, 0o700)
	}
	if o.GuestFreeze == "" {
		o.GuestFreeze = "off"
	}
	var mu sync.Mutex
	warns := &[]string{}
	o.Warn = func(s string) {
		mu.Lock()
		*warns = append(*warns, s)
		mu.Unlock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	q, err := OpenQEMU(ctx, o)
	if err != nil {
		return nil, warns, err
	}
	vm.t.Cleanup(func() { q.Close() })
	return q, warns, nil
}

func views(t *testing.T, q *QEMUBackup) []*source.View {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	v, err := q.Views(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// sauveState is what of sauve's is in the VM.
type sauveState struct {
	nodes, exports, jobs, fdsets []string
	bitmaps                      map[string][]string // node → sauve bitmaps
	nbdServer                    bool
}

func (vm *testVM) state() sauveState {
	vm.t.Helper()
	s := sauveState{bitmaps: map[string][]string{}}
	var nodes []qNode
	vm.exec("query-named-block-nodes", map[string]any{"flat": true}, &nodes)
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, "sauve") {
			s.nodes = append(s.nodes, n.NodeName)
		}
		for _, b := range n.DirtyBitmaps {
			if strings.HasPrefix(b.Name, "sauve") {
				s.bitmaps[n.NodeName] = append(s.bitmaps[n.NodeName], b.Name)
			}
		}
	}
	for _, l := range s.bitmaps {
		sort.Strings(l)
	}
	var exports []qExport
	vm.exec("query-block-exports", nil, &exports)
	for _, e := range exports {
		s.exports = append(s.exports, e.ID)
	}
	var jobs []qJob
	vm.exec("query-jobs", nil, &jobs)
	for _, j := range jobs {
		s.jobs = append(s.jobs, j.ID)
	}
	var sets []qFdset
	vm.exec("query-fdsets", nil, &sets)
	for _, set := range sets {
		for _, fd := range set.Fds {
			s.fdsets = append(s.fdsets, fd.Opaque)
		}
	}
	// nbd-server-start fails while a server runs; one started here is
	// stopped again.
	sock := filepath.Join(vm.dir, "probe.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := vm.mon.Execute(ctx, "nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}}, nil)
	if err == nil {
		vm.exec("nbd-server-stop", nil, nil)
	} else {
		s.nbdServer = true
	}
	return s
}

// assertClean checks that nothing of sauve's is left in the VM but the
// bitmap generations given (drive id → names), nor in fleeceDir and
// TMPDIR.
func (vm *testVM) assertClean(fleeceDir string, bitmaps map[string][]string) {
	t := vm.t
	t.Helper()
	s := vm.state()
	if len(s.nodes)+len(s.exports)+len(s.jobs)+len(s.fdsets) > 0 || s.nbdServer {
		t.Errorf("left in the VM: nodes %v, exports %v, jobs %v, fd sets %v, NBD server %v", s.nodes, s.exports, s.jobs, s.fdsets, s.nbdServer)
	}
	want := map[string][]string{}
	for d, l := range bitmaps {
		if len(l) > 0 {
			l = append([]string(nil), l...)
			sort.Strings(l)
			want["node-"+d] = l
		}
	}
	if fmt.Sprint(s.bitmaps) != fmt.Sprint(want) {
		t.Errorf("sauve's bitmaps in the VM: %v, want %v", s.bitmaps, want)
	}
	for _, dir := range []string{fleeceDir, os.Getenv("TMPDIR")} {
		if ents, _ := os.ReadDir(dir); len(ents) > 0 {
			t.Errorf("left in %s: %v", dir, ents)
		}
	}
}

func bitmapOf(tracker string) string { return strings.TrimPrefix(tracker, TrackerPrefix) }

// ranges returns the whole map of m over size bytes.
func ranges(t *testing.T, m extent.Map, size int64) []extent.Range {
	t.Helper()
	var out []extent.Range
	for off := int64(0); off < size; off += 4 << 20 {
		rs, err := m.Data(off, min(4<<20, size-off))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if n := len(out); n > 0 && out[n-1].End == r.Start {
				out[n-1].End = r.End
			} else {
				out = append(out, r)
			}
		}
	}
	return out
}
