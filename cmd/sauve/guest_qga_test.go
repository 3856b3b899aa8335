package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/qmp"
)

// qgaRun is how to run the guest-freeze test by hand.
const qgaRun = "SAUVE_GUEST=1 go test -run TestGuestAgentFreezeInGuest -timeout 30m -v ./cmd/sauve"

// TestGuestAgentFreezeInGuest backs up a live VM with sauve on the host,
// through QMP and a real qemu-ga in a booted guest: the Debian 12 guest
// of test/guest (run.sh with guest-qga.sh, TCG) mounts an ext4 data
// drive (qcow2) and runs a writer that makes fsync'ed, renamed,
// sequence-numbered files into it without end. In one boot (about 3
// minutes) it checks that:
//
//   - --guest-freeze on freezes the guest around the instant (the output
//     says how long, under the freeze timeout) and the restored drive is
//     a clean filesystem: no journal to recover, e2fsck -fn clean, every
//     file of the writer whole, the last one made between the start and
//     the end of the backup; after it the guest is thawed (the agent
//     says so) and the writer goes on;
//   - with --guest-freeze off the restored drive's journal needs recovery
//     (the contrast: the check above tells frozen from not), and after
//     recovery its files are whole too (crash-consistent);
//   - a sauve killed (SIGKILL) while the guest is frozen does not leave
//     it frozen (qemu-ga has no timeout of its own): sauve's guest thaw
//     guard thaws it within seconds; the next backup removes what the
//     killed one left in the VM and freezes as usual; the one after
//     finds the agent among the VM's chardevs and reads incrementally;
//   - --guest-freeze on with no agent answering (qemu-ga stopped in the
//     guest; a socket path with nothing there) fails with one clear
//     error, stores no snapshot and leaves nothing in the VM.
//
// The kill needs the freeze to last: a pass-through QMP proxy holds back
// sauve's transaction, so sauve is killed between the freeze and the
// copy. Run it with:
//
//	SAUVE_GUEST=1 go test -run TestGuestAgentFreezeInGuest -timeout 30m -v ./cmd/sauve
func TestGuestAgentFreezeInGuest(t *testing.T) {
	limit := guestTest(t, 6*time.Minute, qgaRun, "the guest agent's freeze is tested with qemu-ga in a QEMU (TCG) guest booted by test/guest/run.sh")
	needTools(t, "qemu-img", "dumpe2fs", "e2fsck", "debugfs")
	start := time.Now()
	dir := t.TempDir()
	seqfile := filepath.Join(dir, "seqfile")
	sh(t, "go", "build", "-o", seqfile, "../../test/guest/seqfile")
	e := newEnv(t)
	g := bootQGAGuest(t, dir, limit)
	t.Logf("guest ready after %s; its filesystems: %s", time.Since(start).Round(time.Second), g.agent("guest-get-fsinfo"))

	// A frozen backup restores as a clean filesystem of whole files.
	done := guestStep(t, "frozen")
	before := g.seq()
	frozen, stderr := g.backup(e, "--guest-agent", g.qga, "--guest-freeze", "on")
	after := g.seq()
	t.Logf("frozen backup %.8s: guest frozen %.3f s (writer at file %d before, %d after); stderr %q",
		frozen.Snapshot, frozen.GuestFrozen, before, after, stderr)
	if frozen.GuestFrozen <= 0 || frozen.GuestFrozen >= 10 || frozen.GuestFreeze != "" {
		t.Errorf("--guest-freeze on: guest_frozen_seconds %v, guest_freeze %q; want (0, 10 s: the freeze timeout) and \"\"",
			frozen.GuestFrozen, frozen.GuestFreeze)
	}
	if len(frozen.Disks) != 1 || frozen.Disks[0].Disk != "data" || frozen.Disks[0].Copy != "qemu" {
		t.Errorf("frozen backup's disks: %+v", frozen.Disks)
	}
	if strings.Contains(stderr, "needs recovery") {
		t.Errorf("sauve found the frozen copy's journal in need of recovery: %s", stderr)
	}
	img := g.restore(e, frozen.Snapshot, "frozen")
	if img.recovery || img.fsck != 0 {
		t.Errorf("the frozen copy is no clean filesystem: needs_recovery %v, e2fsck -fn exit %d:\n%s", img.recovery, img.fsck, img.fsckOut)
	}
	files := checkFiles(t, seqfile, img.path)
	if files.last < before || files.last > after {
		t.Errorf("the frozen copy's last file is %d: not between %d (before the backup) and %d (after)", files.last, before, after)
	}
	t.Logf("frozen copy: features %q, e2fsck -fn exit %d, files: %s", img.features, img.fsck, files.report)
	g.thawed("after the frozen backup")
	done()

	// Not frozen, the copy's journal needs recovery: what the checks
	// above tell apart.
	done = guestStep(t, "unfrozen")
	off, stderr := g.backup(e, "--guest-agent", g.qga, "--guest-freeze", "off")
	if off.GuestFrozen != 0 || off.GuestFreeze != "guest freeze off" {
		t.Errorf("--guest-freeze off: guest_frozen_seconds %v, guest_freeze %q", off.GuestFrozen, off.GuestFreeze)
	}
	img = g.restore(e, off.Snapshot, "unfrozen")
	t.Logf("unfrozen copy %.8s: features %q, e2fsck -fn exit %d; sauve said %q", off.Snapshot, img.features, img.fsck, stderr)
	if !img.recovery {
		t.Errorf("the copy taken without a freeze needs no journal recovery: the test cannot tell a frozen copy from another")
	}
	if out, err := exec.Command("e2fsck", "-fy", img.path).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
			t.Errorf("e2fsck -fy of the unfrozen copy: %v\n%s", err, out)
		}
	}
	t.Logf("unfrozen copy after journal recovery: files %s", checkFiles(t, seqfile, img.path).report)
	done()

	// Killed while the guest is frozen.
	done = guestStep(t, "killed while frozen")
	n := g.snapshots(e)
	hold := holdTransaction(t, g.qmp, filepath.Join(dir, "hold.qmp"))
	killed := e.cmd(nil, "backup", "qemu:"+hold.path, "--drive", "data", "--guest-agent", g.qga,
		"--guest-freeze", "on", "--freeze-timeout", "3s", "--json")
	var kout bytes.Buffer
	killed.Stdout, killed.Stderr = &kout, &kout
	if err := killed.Start(); err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	go func() { ended <- killed.Wait() }()
	select {
	case <-hold.held:
	case err := <-ended:
		t.Fatalf("sauve ended before its transaction (%v):\n%s", err, kout.String())
	case <-time.After(2 * time.Minute):
		killed.Process.Kill()
		t.Fatalf("sauve sent no transaction in 2 minutes:\n%s", kout.String())
	}
	killedAt := time.Now()
	killed.Process.Kill()
	<-ended
	// The guard thaws the guest as soon as sauve is gone, well before
	// the killed sauve's freeze timeout (3 s) would have.
	for st := g.agentStatus(); st != "thawed"; st = g.agentStatus() {
		if time.Since(killedAt) > 3*time.Second {
			t.Fatalf("%s after sauve was killed while the guest was frozen, the agent says %q: no guard thawed it",
				time.Since(killedAt).Round(100*time.Millisecond), st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("sauve killed during the freeze: the guest was thawed %s later", time.Since(killedAt).Round(100*time.Millisecond))
	g.progresses("after the guard thawed the guest")
	left := g.leftovers()
	if got := g.snapshots(e); got != n || len(left) == 0 {
		t.Errorf("sauve killed during the freeze: %d snapshots (were %d), left in the VM: %v; want no new snapshot, its fleecing nodes",
			got, n, left)
	}
	t.Logf("sauve killed during the freeze left in the VM: %v", left)
	start = time.Now()
	rec, stderr := g.backup(e, "--guest-agent", g.qga, "--guest-freeze", "auto", "--freeze-timeout", "3s")
	t.Logf("the backup after the kill (%s): guest_freeze %q; stderr:\n%s", time.Since(start).Round(100*time.Millisecond), rec.GuestFreeze, stderr)
	if !strings.Contains(stderr, "removed what a sauve that died left in it") {
		t.Errorf("the backup after the kill does not say it removed what the killed one left")
	}
	if rec.GuestFrozen <= 0 || rec.GuestFreeze != "" || g.snapshots(e) != n+1 {
		t.Errorf("the backup after the kill: guest_frozen_seconds %v, guest_freeze %q, %d snapshots (were %d); want frozen as usual, one more",
			rec.GuestFrozen, rec.GuestFreeze, g.snapshots(e), n)
	}
	g.thawed("after the backup that followed the kill")
	if left := g.leftovers(); len(left) > 0 {
		t.Errorf("left in the VM after the backup that followed the kill: %v", left)
	}
	next, _ := g.backup(e, "--guest-freeze", "on")
	if next.GuestFrozen <= 0 || len(next.Disks) != 1 || next.Disks[0].Base != rec.Snapshot {
		t.Errorf("the next backup (agent found among the chardevs): guest_frozen_seconds %v, disks %+v; want frozen, incremental from %.8s",
			next.GuestFrozen, next.Disks, rec.Snapshot)
	}
	if len(next.Disks) != 1 {
		t.Fatalf("the next backup's disks: %+v", next.Disks)
	}
	img = g.restore(e, next.Snapshot, "next")
	if img.recovery || img.fsck != 0 {
		t.Errorf("the next frozen copy is no clean filesystem: needs_recovery %v, e2fsck -fn exit %d:\n%s", img.recovery, img.fsck, img.fsckOut)
	}
	t.Logf("the next backup %.8s: frozen %.3f s, read %d bytes (base %.8s); files %s",
		next.Snapshot, next.GuestFrozen, next.Disks[0].BytesRead, next.Disks[0].Base, checkFiles(t, seqfile, img.path).report)
	g.thawed("after the next backup")
	done()

	// No agent answers: one clear error, nothing stored, nothing left.
	done = guestStep(t, "no agent")
	if got := g.ctl("qga-stop"); got != "CTL qga-stop done" {
		t.Fatalf("stopping qemu-ga in the guest: %s", got)
	}
	for _, c := range []struct {
		socket string
		want   []string
	}{
		{g.qga, []string{"guest freeze on", "did not answer within", "is qemu-ga running in the guest?"}},
		{filepath.Join(dir, "nothing.sock"), []string{"guest freeze on", "connect to the guest agent at " + filepath.Join(dir, "nothing.sock")}},
	} {
		g.backupFails(e, "--guest-freeze on with no agent at "+c.socket, c.want, "--guest-agent", c.socket, "--guest-freeze", "on")
	}
	g.progresses("after the failed backups")
	if bm := (&liveVM{t: t, writer: g.mon}).bitmaps(); len(bm) != 1 || !strings.HasPrefix(bm[0], "sauve-") {
		t.Errorf("the VM's bitmaps: %v (want sauve's newest)", bm)
	}
	done()

	g.finish()
	t.Logf("all steps in one boot: %s", time.Since(g.booted).Round(time.Second))
}

// guestStep logs how long a step of a guest test took when the
// function it returns is called.
func guestStep(t *testing.T, name string) func() {
	s := time.Now()
	return func() {
		t.Helper()
		t.Logf("step %s: %s", name, time.Since(s).Round(100*time.Millisecond))
	}
}

// qgaGuest is the test guest running guest-qga.sh: its console, read a
// line at a time, takes commands (see guest-qga.sh).
type qgaGuest struct {
	t        *testing.T
	dir      string
	qmp, qga string      // sockets: sauve's QMP, the guest agent's (qemu-ga's or sauve's)
	mon      *qmp.Client // the VM's second QMP monitor, the test's
	stdin    io.WriteCloser
	exited   chan struct{}
	err      error // run.sh's, once exited
	booted   time.Time

	mu    sync.Mutex
	lines []string
	eof   bool
}

// bootQGAGuest boots the guest with qemu-ga on its channel (see
// bootGuest).
func bootQGAGuest(t *testing.T, dir string, limit time.Duration) *qgaGuest {
	t.Helper()
	return bootGuest(t, dir, limit, guestChannel{id: "qga0", socket: "qga.sock", port: "org.qemu.guest_agent.0"}, "SAUVE_BIN=none")
}

// guestChannel is the VM's channel to the guest's agent: a chardev
// (its id, its socket's name in the test's directory) on the
// virtserialport of that name.
type guestChannel struct{ id, socket, port string }

// bootGuest makes the data drive (ext4 on a qcow2), boots the guest
// (run.sh with guest-qga.sh, env added to its environment) with it, a
// QMP socket for sauve and one for the test, and the agent's channel,
// and waits until the guest is ready.
func bootGuest(t *testing.T, dir string, limit time.Duration, ch guestChannel, env ...string) *qgaGuest {
	t.Helper()
	monPath := filepath.Join(dir, "mon.qmp")
	g := &qgaGuest{t: t, dir: dir, qmp: filepath.Join(dir, "vm.qmp"), qga: filepath.Join(dir, ch.socket), exited: make(chan struct{})}
	raw, data := filepath.Join(dir, "data.raw"), filepath.Join(dir, "data.qcow2")
	sh(t, "truncate", "-s", "256M", raw)
	sh(t, "mkfs.ext4", "-q", "-F", "-L", "sauve-data", raw)
	sh(t, "qemu-img", "convert", "-q", "-O", "qcow2", raw, data)
	os.Remove(raw)

	ctx, cancel := context.WithTimeout(context.Background(), limit+2*time.Minute)
	cmd := guestCommand(ctx, t, limit, append(env, "SAUVE_GUEST_SCRIPT=guest-qga.sh", "SAUVE_GUEST_STDIN=1")...)
	// After run.sh's drives (root, scratch, payload: vda to vdc), at PCI
	// slots of their own so that they stay so.
	cmd.Args = append(cmd.Args, "-name", "sauve-guest",
		"-qmp", "unix:"+g.qmp+",server=on,wait=off", "-qmp", "unix:"+monPath+",server=on,wait=off",
		"-chardev", "socket,id="+ch.id+",path="+g.qga+",server=on,wait=off",
		"-device", "virtio-serial-pci,addr=0x10", "-device", "virtserialport,chardev="+ch.id+",name="+ch.port,
		"-drive", "file="+data+",format=qcow2,if=none,id=data",
		"-device", "virtio-blk-pci,drive=data,serial=sauve-data,addr=0x11")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	g.stdin = stdin
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	g.booted = time.Now()
	go g.read(pr)
	go func() { g.err = cmd.Wait(); close(g.exited) }()
	t.Cleanup(func() {
		cancel()
		<-g.exited
		g.mu.Lock()
		defer g.mu.Unlock()
		t.Logf("guest console:\n%s", strings.Join(g.lines, "\n"))
	})
	if _, ok := g.waitLine(0, limit, func(l string) bool { return l == "SAUVE-QGA-READY" }); !ok {
		t.Fatalf("the guest did not get ready (run.sh: %v): see its console below", g.err)
	}
	mctx, mcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer mcancel()
	if g.mon, err = qmp.Dial(mctx, monPath); err != nil {
		t.Fatalf("the VM's second monitor: %v", err)
	}
	t.Cleanup(func() { g.mon.Close() })
	return g
}

func (g *qgaGuest) read(r io.ReadCloser) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		g.mu.Lock()
		g.lines = append(g.lines, sc.Text())
		g.mu.Unlock()
	}
	g.mu.Lock()
	g.eof = true
	g.mu.Unlock()
}

// waitLine waits up to d for a console line, after the first from, that
// ok accepts.
func (g *qgaGuest) waitLine(from int, d time.Duration, ok func(string) bool) (string, bool) {
	deadline := time.Now().Add(d)
	for {
		g.mu.Lock()
		for ; from < len(g.lines); from++ {
			if ok(g.lines[from]) {
				g.mu.Unlock()
				return g.lines[from], true
			}
		}
		eof := g.eof
		g.mu.Unlock()
		if eof || time.Now().After(deadline) {
			return "", false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctl sends the guest a command and returns its answer line.
func (g *qgaGuest) ctl(cmd string) string {
	g.t.Helper()
	g.mu.Lock()
	from := len(g.lines)
	g.mu.Unlock()
	if _, err := io.WriteString(g.stdin, cmd+"\n"); err != nil {
		g.t.Fatalf("send %q to the guest: %v", cmd, err)
	}
	line, ok := g.waitLine(from, time.Minute, func(l string) bool { return strings.HasPrefix(l, "CTL "+cmd) })
	if !ok {
		g.t.Fatalf("the guest did not answer %q", cmd)
	}
	return line
}

var ctlSeq = regexp.MustCompile(`^CTL status seq=(\d+) `)

// seq is the number of the writer's last file.
func (g *qgaGuest) seq() uint64 {
	g.t.Helper()
	line := g.ctl("status")
	m := ctlSeq.FindStringSubmatch(line)
	if m == nil {
		g.t.Fatalf("the guest's status: %q", line)
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

// progresses fails the test unless the writer makes files.
func (g *qgaGuest) progresses(when string) {
	g.t.Helper()
	s0 := g.seq()
	for range 20 {
		time.Sleep(500 * time.Millisecond)
		if s := g.seq(); s > s0 {
			return
		}
	}
	g.t.Errorf("%s: the writer made no file in 10 s (it is at file %d): is the guest still frozen?", when, s0)
}

// thawed fails the test unless the agent says the guest is thawed and
// the writer makes files.
func (g *qgaGuest) thawed(when string) {
	g.t.Helper()
	if st := g.agentStatus(); st != "thawed" {
		g.t.Errorf("%s: the guest agent says the guest's filesystems are %q", when, st)
	}
	g.progresses(when)
}

// agent runs a command of the guest agent (the test's own client:
// guest-sync-delimited, then the command) and returns its answer.
func (g *qgaGuest) agent(command string) string {
	g.t.Helper()
	conn, err := net.DialTimeout("unix", g.qga, 5*time.Second)
	if err != nil {
		g.t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(15 * time.Second))
	id := time.Now().UnixNano() % 1e9
	fmt.Fprintf(conn, "\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":%d}}\n", id)
	br := bufio.NewReader(conn)
	for {
		if _, err := br.ReadBytes(0xff); err != nil {
			g.t.Fatalf("the guest agent: guest-sync-delimited: %v", err)
		}
		line, err := br.ReadString('\n')
		if err != nil {
			g.t.Fatalf("the guest agent: guest-sync-delimited: %v", err)
		}
		if strings.TrimSpace(line) == fmt.Sprintf(`{"return": %d}`, id) {
			break
		}
	}
	fmt.Fprintf(conn, "{\"execute\":%q}\n", command)
	line, err := br.ReadString('\n')
	if err != nil {
		g.t.Fatalf("the guest agent: %s: %v", command, err)
	}
	return strings.TrimSpace(line)
}

// agentStatus is guest-fsfreeze-status: "thawed" or "frozen".
func (g *qgaGuest) agentStatus() string {
	g.t.Helper()
	line := g.agent("guest-fsfreeze-status")
	var rep struct {
		Return string `json:"return"`
	}
	if err := json.Unmarshal([]byte(line), &rep); err != nil {
		g.t.Fatalf("guest-fsfreeze-status: %q: %v", line, err)
	}
	return rep.Return
}

// guestBackupOut is what sauve backup --json says of a VM.
type guestBackupOut struct {
	qemuBackupOut
	GuestFrozen float64      `json:"guest_frozen_seconds"`
	GuestFreeze string       `json:"guest_freeze"`
	Quiesce     *quiesceJSON `json:"quiesce"`
}

// backup backs up the VM's data drive and returns what sauve printed.
func (g *qgaGuest) backup(e *env, args ...string) (guestBackupOut, string) {
	g.t.Helper()
	args = append([]string{"backup", "qemu:" + g.qmp, "--drive", "data", "--json"}, args...)
	r := e.run(args...)
	if r.code != 0 {
		g.t.Fatalf("sauve %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	var out guestBackupOut
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		g.t.Fatalf("sauve %s: %v\n%s", strings.Join(args, " "), err, r.stdout)
	}
	return out, r.stderr
}

// backupFails backs up the VM's data drive, with args, and fails the
// test unless sauve fails with one clear error (one line, also the JSON
// output) that says every one of want, stores no snapshot and leaves
// nothing in the VM. It returns the error.
func (g *qgaGuest) backupFails(e *env, what string, want []string, args ...string) string {
	g.t.Helper()
	n := g.snapshots(e)
	start := time.Now()
	r := e.run(append([]string{"backup", "qemu:" + g.qmp, "--drive", "data", "--json"}, args...)...)
	g.t.Logf("%s: exit %d after %s: %s", what, r.code, time.Since(start).Round(100*time.Millisecond), r.stderr)
	// With --json the error is also the output: {"error": "..."}.
	var out struct{ Error string }
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if err := json.Unmarshal([]byte(r.stdout), &out); r.code == 0 || err != nil || len(lines) != 1 || lines[0] != "sauve: error: "+out.Error {
		g.t.Errorf("%s: exit %d, stdout %q, stderr %q; want an error, in one line and as the JSON output", what, r.code, r.stdout, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			g.t.Errorf("%s: the error does not say %q", what, w)
		}
	}
	if got := g.snapshots(e); got != n {
		g.t.Errorf("%s: a failed backup stored a snapshot: %d snapshots, were %d", what, got, n)
	}
	if left := g.leftovers(); len(left) > 0 {
		g.t.Errorf("%s: left in the VM after a failed backup: %v", what, left)
	}
	return out.Error
}

func (g *qgaGuest) snapshots(e *env) int {
	g.t.Helper()
	var list []json.RawMessage
	e.okJSON(&list, "snapshots")
	return len(list)
}

// leftovers lists what of sauve's is in the VM: block nodes, jobs and
// exports (its bitmaps are meant to stay).
func (g *qgaGuest) leftovers() []string {
	g.t.Helper()
	var left []string
	for _, b := range (&liveVM{t: g.t, writer: g.mon}).bitmaps() {
		if strings.HasPrefix(b, "node ") {
			left = append(left, b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, q := range []struct{ command, field string }{{"query-block-jobs", "device"}, {"query-block-exports", "id"}} {
		var list []map[string]any
		if err := g.mon.Execute(ctx, q.command, nil, &list); err != nil {
			g.t.Fatal(err)
		}
		for _, o := range list {
			left = append(left, fmt.Sprintf("%s: %v", q.command, o[q.field]))
		}
	}
	return left
}

// restoredFS is a restored data drive and what the ext4 tools say of it.
type restoredFS struct {
	path     string
	features string // dumpe2fs -h: "Filesystem features"
	recovery bool   // needs_recovery among them
	fsck     int    // e2fsck -fn's exit status
	fsckOut  string
}

// restore restores snapshot to a new raw file and looks at its ext4.
func (g *qgaGuest) restore(e *env, snapshot, name string) restoredFS {
	g.t.Helper()
	img := restoredFS{path: filepath.Join(g.dir, name+".raw")}
	e.ok("restore", snapshot, img.path)
	for _, l := range strings.Split(sh(g.t, "dumpe2fs", "-h", img.path), "\n") {
		if f, ok := strings.CutPrefix(l, "Filesystem features:"); ok {
			img.features = strings.TrimSpace(f)
		}
	}
	if img.features == "" {
		g.t.Fatalf("dumpe2fs -h %s shows no features", img.path)
	}
	img.recovery = strings.Contains(" "+img.features+" ", " needs_recovery ")
	out, err := exec.Command("e2fsck", "-fn", img.path).CombinedOutput()
	img.fsckOut = string(out)
	if ee, ok := err.(*exec.ExitError); ok {
		img.fsck = ee.ExitCode()
	} else if err != nil {
		g.t.Fatal(err)
	}
	return img
}

// filesReport is what seqfile check says of the writer's files.
type filesReport struct {
	report string
	last   uint64
}

var filesLast = regexp.MustCompile(` last=(\d+) `)

// checkFiles copies the writer's files out of an ext4 image (debugfs,
// no mount) and checks them with seqfile: it fails the test unless every
// file is whole and none is missing.
func checkFiles(t *testing.T, seqfile, img string) filesReport {
	t.Helper()
	out := img + ".files"
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	sh(t, "debugfs", "-R", "rdump /w "+out, img)
	b, err := exec.Command(seqfile, "check", filepath.Join(out, "w")).CombinedOutput()
	r := filesReport{report: strings.TrimSpace(string(b))}
	if err != nil {
		t.Errorf("the writer's files in %s: %v\n%s", filepath.Base(img), err, r.report)
		return r
	}
	m := filesLast.FindStringSubmatch(r.report)
	if m == nil {
		t.Fatalf("seqfile check: %q", r.report)
	}
	r.last, _ = strconv.ParseUint(m[1], 10, 64)
	if r.last == 0 {
		t.Errorf("no file of the writer in %s", filepath.Base(img))
	}
	return r
}

// finish ends the guest's script: it checks the writer's files and the
// filesystem in the guest, and powers off.
func (g *qgaGuest) finish() {
	g.t.Helper()
	g.ctl("finish")
	select {
	case <-g.exited:
	case <-time.After(3 * time.Minute):
		g.t.Fatal("the guest did not power off in 3 minutes")
	}
	g.mu.Lock()
	result, failed := guestResult(strings.Join(g.lines, "\n") + "\n")
	g.mu.Unlock()
	if result != "PASS" || g.err != nil {
		g.t.Errorf("the guest's own checks: %s (run.sh: %v)\n%s", result, g.err, strings.Join(failed, "\n"))
	}
}

// qmpHold passes one QMP connection through to QEMU, the file
// descriptors sent along included, until the client sends the
// transaction that takes the copies: that it holds back, and closes held.
// sauve has frozen the guest just before it, and waits for the answer
// with the guest frozen.
type qmpHold struct {
	path string
	ln   *net.UnixListener
	held chan struct{}
}

func holdTransaction(t *testing.T, upstream, path string) *qmpHold {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	h := &qmpHold{path: path, ln: ln, held: make(chan struct{})}
	t.Cleanup(func() { ln.Close() })
	go h.serve(upstream)
	return h
}

func (h *qmpHold) serve(upstream string) {
	c, err := h.ln.AcceptUnix()
	h.ln.Close()
	if err != nil {
		return
	}
	defer c.Close()
	u, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: upstream, Net: "unix"})
	if err != nil {
		return
	}
	// QEMU sees its client go when the client does.
	defer u.Close()
	go func() { io.Copy(c, u); c.Close() }()
	buf, oob := make([]byte, 64<<10), make([]byte, 4096)
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		fds := passedFDs(oob[:oobn])
		if bytes.Contains(buf[:n], []byte(`"execute":"transaction"`)) {
			closeFDs(fds)
			close(h.held)
			io.Copy(io.Discard, c)
			return
		}
		if n > 0 || oobn > 0 {
			if _, _, werr := u.WriteMsgUnix(buf[:n], oob[:oobn], nil); werr != nil {
				err = werr
			}
		}
		closeFDs(fds)
		if err != nil {
			return
		}
	}
}

// passedFDs are the file descriptors that came with a message.
func passedFDs(oob []byte) []int {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		if f, err := syscall.ParseUnixRights(&msgs[i]); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}
