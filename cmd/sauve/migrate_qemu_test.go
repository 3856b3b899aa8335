package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// vmPass is migrate's --json line of a pass of a VM's drive.
type vmPass struct {
	migratePass
	ChunksUnread int64  `json:"chunks_unread"`
	FullRead     string `json:"full_read"`
}

// migrateVM is a running VM (startLiveVM: drive0, a qcow2, and drive1,
// a raw image) with a third drive, big (a qcow2 of bigSize), and what
// the guest wrote to big, to compare targets with.
type migrateVM struct {
	*liveVM
	e    *env
	want []byte
}

const bigSize = 64 << 20

func startMigrateVM(t *testing.T, e *env, extra ...string) *migrateVM {
	t.Helper()
	big := e.path("big.qcow2")
	if _, err := exec.LookPath("qemu-img"); err == nil {
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", big, "64M")
	}
	vm := startLiveVM(t, e.dir, append([]string{"-drive", "if=none,id=big,file=" + big + ",format=qcow2"}, extra...)...)
	return &migrateVM{liveVM: vm, e: e, want: make([]byte, bigSize)}
}

// put writes n bytes at off of big as the guest, each MiB of them a
// pattern of its own (seed, and the MiB's index), so that a chunk
// copied to the wrong place or from the wrong pass is seen.
func (vm *migrateVM) put(seed byte, off, n int64) {
	vm.t.Helper()
	for p := off; p < off+n; {
		end := min((p>>20+1)<<20, off+n)
		pat := seed + byte(p>>20)*7
		vm.write("big", pat, p, end-p)
		copy(vm.want[p:end], bytes.Repeat([]byte{pat}, int(end-p)))
		p = end
	}
}

// check asserts that target holds what the guest wrote to big, and,
// for a qcow2, that qemu-img check finds it clean.
func (vm *migrateVM) check(target string) {
	t := vm.t
	t.Helper()
	ref := vm.e.path("want.raw")
	if err := os.WriteFile(ref, vm.want, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", ref, target).CombinedOutput(); err != nil {
		t.Fatalf("target %s differs from the drive: %v\n%s", target, err, out)
	}
	if strings.HasSuffix(target, ".qcow2") {
		if out, err := exec.Command("qemu-img", "check", "-q", target).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", target, err, out)
		}
	}
}

// pass runs a pass of big onto target and returns its --json line.
func (vm *migrateVM) pass(target string, args ...string) vmPass {
	vm.t.Helper()
	out := vm.e.ok(append([]string{"migrate", "qemu:" + vm.sock, target, "--drive", "big", "--json"}, args...)...)
	var p vmPass
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 2 {
		vm.t.Fatalf("migrate --json: %s", out)
	}
	if err := jsonUnmarshal(lines[len(lines)-2], &p); err != nil {
		vm.t.Fatalf("migrate --json: %v\n%s", err, out)
	}
	parseMigrate(vm.t, out)
	return p
}

// status is the VM's run state (query-status).
func (vm *migrateVM) status() string {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var st struct{ Status string }
	if err := vm.writer.Execute(ctx, "query-status", nil, &st); err != nil {
		vm.t.Fatal(err)
	}
	return st.Status
}

// removeBitmaps removes sauve's dirty bitmaps from big, as a user or
// another tool may.
func (vm *migrateVM) removeBitmaps() {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var blocks []struct {
		Device   string
		Inserted struct {
			Node string `json:"node-name"`
		}
	}
	if err := vm.writer.Execute(ctx, "query-block", nil, &blocks); err != nil {
		vm.t.Fatal(err)
	}
	n := 0
	for _, b := range blocks {
		if b.Device != "big" {
			continue
		}
		for _, name := range vm.bitmaps() {
			if strings.HasPrefix(name, "sauve-") {
				if err := vm.writer.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": b.Inserted.Node, "name": name}, nil); err != nil {
					vm.t.Fatal(err)
				}
				n++
			}
		}
	}
	if n == 0 {
		vm.t.Fatal("no sauve bitmap to remove")
	}
}

// onlyOneBitmap asserts that the VM holds nothing of sauve's but the
// newest bitmap generation of big.
func (vm *migrateVM) onlyOneBitmap() {
	vm.t.Helper()
	left := vm.bitmaps()
	if len(left) != 1 || !strings.HasPrefix(left[0], "sauve-") {
		vm.t.Errorf("left in the VM: %v (want one sauve bitmap)", left)
	}
}

// The first pass of a VM's qcow2 drive reads its data; after the guest
// rewrote about 2% of it, the next pass reads only the chunks its dirty
// bitmap marks (a tenth of the first pass at most); --no-bitmaps reads
// everything again, the pass after it reads only what changed since
// the last bitmap pass, and a bitmap removed from the VM makes the next
// pass a full read. Every target is the drive, qemu-img check clean.
func TestMigrateQEMUDeltaPasses(t *testing.T) {
	e := newBareEnv(t)
	vm := startMigrateVM(t, e)
	target := e.path("target.qcow2")
	vm.put(1, 0, 40<<20)

	first := vm.pass(target)
	if first.BytesRead < 40<<20 || first.BytesRead > 41<<20 || first.FullRead != "" {
		t.Fatalf("first pass read %d of 40 MiB of data (full_read %q)", first.BytesRead, first.FullRead)
	}
	vm.check(target)

	// 1.25 MiB (2% of the drive) over 6 chunks of 256 KiB (a VM drive's):
	// 4 whole, 2 in part; a chunk holding data is read whole (migrate
	// reads free space inside a used chunk as it is).
	vm.put(50, 5<<20, 1<<20)
	vm.put(60, 20<<20+300<<10, 128<<10)
	vm.put(70, 50<<20+64<<10, 128<<10)
	delta := vm.pass(target)
	if delta.BytesRead != 6*256<<10 || delta.ChunksChanged != 6 || delta.ChunksUnread != 250 || delta.FullRead != "" {
		t.Errorf("delta pass read %d bytes, %d chunks changed, %d unread (full_read %q): want 1.5 MiB of 6 chunks read, 250 not", delta.BytesRead, delta.ChunksChanged, delta.ChunksUnread, delta.FullRead)
	}
	if delta.BytesRead*10 > first.BytesRead {
		t.Errorf("delta pass read %d, over a tenth of the first pass's %d", delta.BytesRead, first.BytesRead)
	}
	vm.check(target)
	vm.onlyOneBitmap()

	vm.put(80, 30<<20, 64<<10)
	full := vm.pass(target, "--no-bitmaps")
	if full.BytesRead < 40<<20 || full.ChunksUnread != 0 || full.FullRead != "--no-bitmaps" {
		t.Errorf("--no-bitmaps pass read %d, %d chunks unread (full_read %q): want everything", full.BytesRead, full.ChunksUnread, full.FullRead)
	}
	vm.check(target)

	// The bitmap of the last pass with one still records: the next
	// reads only what changed since it.
	vm.put(90, 31<<20, 64<<10)
	after := vm.pass(target)
	if after.BytesRead > 2<<20 || after.FullRead != "" {
		t.Errorf("pass after --no-bitmaps read %d (full_read %q): want 2 chunks", after.BytesRead, after.FullRead)
	}
	vm.check(target)

	vm.removeBitmaps()
	vm.put(100, 10<<20, 64<<10)
	out := e.ok("migrate", "qemu:"+vm.sock, target, "--drive", "big")
	if !strings.Contains(out, "read in full") || !strings.Contains(out, "missing") {
		t.Errorf("a pass without its bitmap did not say why it read everything:\n%s", out)
	}
	vm.check(target)
	again := vm.pass(target)
	if again.BytesRead != 0 || again.ChunksChanged != 0 {
		t.Errorf("a pass after nothing was written read %d, changed %d chunks", again.BytesRead, again.ChunksChanged)
	}
	vm.onlyOneBitmap()
}

// A pass killed while it reads, a pass killed after its instant's
// bitmap generation was made, then passes that resume: the target is
// exact, and the leftovers in the VM are removed.
func TestMigrateQEMUKill9Resume(t *testing.T) {
	e := newBareEnv(t)
	vm := startMigrateVM(t, e)
	target := e.path("target.img")
	vm.put(1, 0, 48<<20)
	kill := func(after time.Duration, args ...string) {
		t.Helper()
		c := e.cmd(nil, append([]string{"migrate", "qemu:" + vm.sock, target, "--drive", "big", "--limit-rate", "12M"}, args...)...)
		var stderr bytes.Buffer
		c.Stderr = &stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(after)
		c.Process.Signal(syscall.SIGKILL)
		if err := c.Wait(); err == nil {
			t.Fatalf("the pass ended before kill -9 after %s: %s", after, stderr.String())
		}
	}
	kill(1500 * time.Millisecond) // a first pass: 4 s at 12M/s
	vm.put(20, 2<<20, 64<<10)
	vm.pass(target)
	vm.check(target)

	vm.put(30, 8<<20, 24<<20)
	kill(1200 * time.Millisecond) // a delta pass of 24 MiB: 2 s
	vm.put(40, 40<<20, 1<<20)
	p := vm.pass(target)
	vm.check(target)
	if p.BytesRead > 26<<20 || p.FullRead != "" {
		t.Errorf("the pass after a killed one read %d (full_read %q): want what both wrote, 25 MiB", p.BytesRead, p.FullRead)
	}
	vm.onlyOneBitmap()
}

// --final --stop-source pauses the VM before the final instant and
// leaves it paused, the target exact; a final pass that fails resumes
// it. Without --stop-source the VM runs on, and the output says so.
func TestMigrateQEMUFinalStopSource(t *testing.T) {
	e := newBareEnv(t)
	vm := startMigrateVM(t, e)
	target := e.path("target.qcow2")
	vm.put(1, 0, 16<<20)
	vm.pass(target)
	vm.put(2, 4<<20, 1<<20)

	out := e.ok("migrate", "qemu:"+vm.sock, target, "--drive", "big", "--final")
	if !strings.Contains(out, "runs on") || !strings.Contains(out, "not on "+target) {
		t.Errorf("--final without --stop-source did not say that later writes are not on the target:\n%s", out)
	}
	vm.check(target)
	if s := vm.status(); s != "running" {
		t.Fatalf("--final alone left the VM %s", s)
	}

	vm.put(3, 6<<20, 1<<20)
	fail := e.fail([]string{"resumed"}, "migrate", "qemu:"+vm.sock, target, "--drive", "big", "--final", "--stop-source", "--fleece-dir", e.path("none"))
	if s := vm.status(); s != "running" {
		t.Fatalf("a failed final pass left the VM %s:\n%s", s, fail)
	}

	vm.put(4, 7<<20, 1<<20)
	r := e.run("migrate", "qemu:"+vm.sock, target, "--drive", "big", "--final", "--stop-source", "--json")
	if r.code != 0 {
		t.Fatalf("--final --stop-source: %s", r.stderr)
	}
	passes, _ := parseMigrate(t, r.stdout)
	if !passes[len(passes)-1].Final || !strings.Contains(r.stdout, `"vm_paused":true`) {
		t.Errorf("--final --stop-source --json: %s", r.stdout)
	}
	if s := vm.status(); s != "paused" {
		t.Fatalf("--stop-source left the VM %s", s)
	}
	vm.check(target)
	again := e.run("migrate", "qemu:"+vm.sock, target, "--drive", "big", "--final", "--stop-source")
	if again.code != 0 || !strings.Contains(again.stdout, "paused already") || strings.Contains(again.stderr, "died") {
		t.Errorf("a final pass of a paused VM (exit %d):\n%s\n%s", again.code, again.stdout, again.stderr)
	}
	if s := vm.status(); s != "paused" {
		t.Fatalf("a final pass of a paused VM left it %s", s)
	}
}

// Refused, with nothing written: a VM of several drives without
// --drive, an unknown drive, a state of another drive or VM, a target
// that is the VM's own drive, and the VM flags where they mean nothing.
func TestMigrateQEMURefusals(t *testing.T) {
	e := newBareEnv(t)
	vm := startMigrateVM(t, e)
	vm.put(1, 0, 2<<20)
	target := e.path("target.img")
	e.fail([]string{"3 writable drives", "drive0, drive1, big", "--drive"}, "migrate", "qemu:"+vm.sock, target)
	e.fail([]string{"no drive nope", "drive0, drive1, big"}, "migrate", "qemu:"+vm.sock, target, "--drive", "nope")
	e.fail([]string{"own disk"}, "migrate", "qemu:"+vm.sock, vm.qcow2, "--drive", "big")
	e.fail([]string{"--final"}, "migrate", "qemu:"+vm.sock, target, "--drive", "big", "--stop-source")
	e.fail([]string{"qemu:SOCKET"}, "migrate", vm.raw, target, "--drive", "big")
	e.fail([]string{"not supported with a qemu: source", "--guest-freeze"}, "migrate", "qemu:"+vm.sock, target, "--drive", "big", "--final", "--pre-freeze", "true")
	if _, err := os.Stat(target); err == nil {
		t.Fatal("a refused migration made the target")
	}

	state := e.path("s.state")
	vm.pass(target, "--state", state)
	e.fail([]string{"another source", "drive"}, "migrate", "qemu:"+vm.sock, target, "--drive", "drive0", "--state", state)

	e2 := newBareEnv(t)
	other := startMigrateVM(t, e2, "-name", "vm2", "-uuid", "11111111-2222-4333-8444-555555555555")
	other.put(1, 0, 2<<20)
	e.fail([]string{"another source", "VM"}, "migrate", "qemu:"+other.sock, target, "--drive", "big", "--state", state)
	vm.check(target) // untouched by the refusals
	if b := other.bitmaps(); len(b) != 0 {
		t.Errorf("a refused migration left bitmaps in the VM: %v", b)
	}
	// The default state is of the VM, not of its socket's path.
	vm.pass(target)
	link := filepath.Join(e.dir, "vm-again.qmp")
	if err := os.Symlink(vm.sock, link); err != nil {
		t.Fatal(err)
	}
	if p := vm.pass(target); p.BytesRead != 0 {
		t.Errorf("a pass with nothing changed read %d", p.BytesRead)
	}
	out := e.ok("migrate", "qemu:"+link, target, "--drive", "big", "--json")
	if ps, _ := parseMigrate(t, out); ps[0].Pass < 3 || ps[0].BytesRead != 0 {
		t.Errorf("through another socket path: %+v", ps[0])
	}
}

const migrateGuestRun = "SAUVE_GUEST=1 go test -run TestMigrateQEMUInGuest -timeout 30m -v ./cmd/sauve"

// TestMigrateQEMUInGuest migrates the ext4 data drive of a booted guest
// (test/guest, with qemu-ga and a writer making fsync'ed files without
// end) by passes while the writer runs: the final pass freezes the guest
// through its agent, and the target is then a clean filesystem (no
// journal to recover, e2fsck -fn clean) of whole files, the last one
// made during the final pass; the guest is thawed after it and writes
// on. --final --stop-source leaves the VM paused; cont resumes it.
//
//	SAUVE_GUEST=1 go test -run TestMigrateQEMUInGuest -timeout 30m -v ./cmd/sauve
func TestMigrateQEMUInGuest(t *testing.T) {
	limit := guestTest(t, 6*time.Minute, migrateGuestRun, "migrate's final pass under the guest agent's freeze is tested in a QEMU (TCG) guest booted by test/guest/run.sh")
	needTools(t, "qemu-img", "dumpe2fs", "e2fsck", "debugfs")
	dir := t.TempDir()
	seqfile := filepath.Join(dir, "seqfile")
	sh(t, "go", "build", "-o", seqfile, "../../test/guest/seqfile")
	e := newBareEnv(t)
	g := bootQGAGuest(t, dir, limit)
	target := filepath.Join(dir, "target.raw")
	args := []string{"migrate", "qemu:" + g.qmp, target, "--drive", "data", "--guest-agent", g.qga, "--json"}
	e.ok(append(args, "--guest-freeze", "on")...)
	out := e.ok(append(args, "--guest-freeze", "on")...)
	parseMigrate(t, out)
	var delta vmPass
	if err := jsonUnmarshal(strings.SplitN(out, "\n", 2)[0], &delta); err != nil {
		t.Fatal(err)
	}
	// 1024 chunks, of which the writer touches a few between passes.
	if delta.ChunksUnread < 512 || delta.FullRead != "" {
		t.Errorf("the delta pass read %d, %d chunks unread (full_read %q): the bitmap was not used", delta.BytesRead, delta.ChunksUnread, delta.FullRead)
	}

	before := g.seq()
	passes, sum := parseMigrate(t, e.ok(append(args, "--guest-freeze", "on", "--final")...))
	after := g.seq()
	if len(passes) != 1 || !sum.Final || sum.FrozenSeconds <= 0 || sum.FrozenSeconds >= 10 {
		t.Errorf("final pass: %+v, summary %+v: want one pass, frozen in (0, 10 s)", passes, sum)
	}
	var features string
	for _, l := range strings.Split(sh(t, "dumpe2fs", "-h", target), "\n") {
		if f, ok := strings.CutPrefix(l, "Filesystem features:"); ok {
			features = strings.TrimSpace(f)
		}
	}
	if features == "" || strings.Contains(" "+features+" ", " needs_recovery ") {
		t.Errorf("the target after the frozen final pass needs journal recovery (features %q)", features)
	}
	if out, err := exec.Command("e2fsck", "-fn", target).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn of the target: %v\n%s", err, out)
	}
	files := checkFiles(t, seqfile, target)
	if files.last < before || files.last > after {
		t.Errorf("the target's last file is %d: not between %d (before the final pass) and %d (after)", files.last, before, after)
	}
	t.Logf("target: %s", files.report)
	g.thawed("after the final pass")

	out = e.ok("migrate", "qemu:"+g.qmp, target, "--drive", "data", "--guest-agent", g.qga, "--final", "--stop-source")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var st struct{ Status string }
	if err := g.mon.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("after --stop-source the VM is %q (%v):\n%s", st.Status, err, out)
	}
	if !strings.Contains(out, "cont") {
		t.Errorf("--stop-source did not say how to resume the VM:\n%s", out)
	}
	if err := g.mon.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	g.progresses("after cont")
	g.finish()
}
