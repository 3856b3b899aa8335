package shadow

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

const mib = 1 << 20

func twoDrives() []testDrive {
	return []testDrive{{id: "drive0", format: "qcow2", size: 16 * mib}, {id: "drive1", format: "raw", size: 16 * mib}}
}

// The views hold what the drives held at the instant, whatever the VM
// writes after it; Close leaves nothing behind.
func TestQEMUViews(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	vm.mustWrite("drive0", 1, 0, 2*mib)
	vm.mustWrite("drive1", 2, 4*mib, mib)
	q, warns := vm.open(QEMUOptions{})
	if uuid, name := q.VM(); uuid != testUUID || name != "vm1" {
		t.Errorf("VM() = %q, %q", uuid, name)
	}
	want := []QEMUDrive{{ID: "drive0", Node: "node-drive0", Format: "qcow2", Size: 16 * mib}, {ID: "drive1", Node: "node-drive1", Format: "raw", Size: 16 * mib}}
	got := q.Drives()
	for i := range got {
		got[i].QDev = "" // the device's QOM path is QEMU's choice
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Drives() = %+v, want %+v", got, want)
	}
	vs := views(t, q)
	// Written after the instant: not in the views.
	vm.mustWrite("drive0", 9, mib, 2*mib)
	vm.mustWrite("drive1", 9, 0, 16*mib)
	for i, tc := range []struct {
		data []extent.Range
		fill func(off int64) byte
	}{
		{[]extent.Range{{Start: 0, End: 2 * mib}}, func(off int64) byte {
			if off < 2*mib {
				return 1
			}
			return 0
		}},
		{nil, func(off int64) byte {
			if off >= 4*mib && off < 5*mib {
				return 2
			}
			return 0
		}},
	} {
		v := vs[i]
		if wantPath := "qemu:" + vm.sock + "#" + want[i].ID; v.Of.Path != wantPath || v.Of.Kind != "qemu" || v.Size != 16*mib || v.Copy != "qemu" {
			t.Errorf("view %d: path %s kind %s size %d copy %s", i, v.Of.Path, v.Of.Kind, v.Size, v.Copy)
		}
		buf := make([]byte, v.Size)
		if _, err := v.At.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		for off := int64(0); off < v.Size; off += 64 << 10 {
			if buf[off] != tc.fill(off) || buf[off+65535] != tc.fill(off) {
				t.Fatalf("view of %s at %d holds %d, want %d", want[i].ID, off, buf[off], tc.fill(off))
			}
		}
		if i == 0 {
			if got := ranges(t, v.Data, v.Size); !reflect.DeepEqual(got, tc.data) {
				t.Errorf("data map of drive0: %v, want %v", got, tc.data)
			}
		}
		if err := v.Verify(); err != nil {
			t.Errorf("Verify of %s: %v", want[i].ID, err)
		}
		if v.Tracker != "" || v.Changes != nil || v.FullRead != "" {
			t.Errorf("without Bitmaps: tracker %q, changes %v, full read %q", v.Tracker, v.Changes, v.FullRead)
		}
	}
	// Both drives had 1 MiB of data overwritten after the instant, and
	// holes, which the fleecing images record as such: they hold 1 MiB of
	// data each, and their tables.
	for i, v := range vs {
		if used := v.CopyUsed(); used < mib || used > 3*mib {
			t.Errorf("CopyUsed of drive%d = %d, want 1 MiB and some", i, used)
		}
	}
	if err := vs[0].Release(); err != nil {
		t.Fatal(err)
	}
	if err := vs[0].Verify(); err != nil {
		t.Errorf("Verify after Release: %v", err)
	}
	if r := q.Report(); r.NoFreeze != "guest freeze off" || r.FleeceUsed < 2*mib {
		t.Errorf("report %+v", r)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	vm.assertClean(q.opts.FleeceDir, nil)
	if len(*warns) > 0 {
		t.Errorf("warnings: %q", *warns)
	}
}

// Fleecing images are files without a name: nothing is on disk, even
// while they are in use.
func TestQEMUNamelessImages(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	q, _ := vm.open(QEMUOptions{})
	views(t, q)
	if ents, _ := os.ReadDir(q.opts.FleeceDir); len(ents) > 0 {
		t.Errorf("in the fleecing folder: %v", ents)
	}
	if ents, _ := os.ReadDir(os.Getenv("TMPDIR")); len(ents) > 0 {
		t.Errorf("in TMPDIR: %v", ents)
	}
}

func errorContains(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("error %v, want one saying %q", err, want)
	}
}

// The drives are read at one instant: a writer that writes numbered
// blocks to two drives in lockstep, while the copies are taken and read,
// finds in them one cut of its sequence.
// SAUVE_SOAK=1 takes many cuts.
func TestQEMUConsistentCut(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	rounds := 1
	if os.Getenv("SAUVE_SOAK") == "1" {
		rounds = 30
	}
	for i := 0; i < rounds && !t.Failed(); i++ {
		cutRound(t, vm)
	}
}

func cutRound(t *testing.T, vm *testVM) {
	const blocks, steps, block = 8, 240, 64 << 10
	var step atomic.Int64
	viewsDone := make(chan struct{})
	writerErr := make(chan error, 1)
	go func() {
		for s := int64(1); s <= steps; s++ {
			if s == 200 {
				<-viewsDone // the instant falls before the sequence ends
			}
			off := (s % blocks) * mib
			for _, d := range []string{"drive0", "drive1"} {
				if err := vm.write(d, byte(s), off, block); err != nil {
					writerErr <- err
					return
				}
			}
			step.Store(s)
		}
		writerErr <- nil
	}()
	for step.Load() < 40 {
		time.Sleep(time.Millisecond)
	}
	q, _ := vm.open(QEMUOptions{})
	defer q.Close()
	vs := views(t, q)
	close(viewsDone)
	cuts := make([]int, 2)
	for i, v := range vs {
		seen := make([]int, blocks)
		buf := make([]byte, block)
		for b := 0; b < blocks; b++ {
			if _, err := v.At.ReadAt(buf, int64(b)*mib); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, bytes.Repeat(buf[:1], block)) {
				t.Fatalf("drive%d block %d is torn", i, b)
			}
			seen[b] = int(buf[0])
			cuts[i] = max(cuts[i], seen[b])
		}
		// Block b holds the last step s <= cut with s%blocks == b.
		for b, got := range seen {
			want := cuts[i] - ((cuts[i]-b)%blocks+blocks)%blocks
			if want < 1 {
				want = 0
			}
			if got != want {
				t.Errorf("drive%d at cut %d: block %d holds step %d, want %d", i, cuts[i], b, got, want)
			}
		}
		if err := v.Verify(); err != nil {
			t.Error(err)
		}
	}
	if err := <-writerErr; err != nil {
		t.Fatal(err)
	}
	// drive0 is written first in each step.
	if cuts[0] < 40 || cuts[0] >= 200 || (cuts[1] != cuts[0] && cuts[1] != cuts[0]-1) {
		t.Errorf("cut at step %d of drive0 and %d of drive1: not one instant between steps 40 and 200", cuts[0], cuts[1])
	}
}

// Bitmaps: each backup's view records a new generation; the next one's
// Changes are exactly the blocks written since (at 64 KiB); a backup that
// failed (no Commit) loses nothing; a bitmap that is gone means a full
// read, and says why.
func TestQEMUBitmaps(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	since := map[string]string{}
	backup := func(commit bool) []string {
		t.Helper()
		q, _ := vm.open(QEMUOptions{Bitmaps: true, Since: func(d string) string { return since[d] }})
		vs := views(t, q)
		fullRead := []string{vs[0].FullRead, vs[1].FullRead}
		if vs[1].Tracker != "" || vs[1].Changes != nil {
			t.Errorf("raw drive1: tracker %q, changes %v", vs[1].Tracker, vs[1].Changes)
		}
		if !strings.HasPrefix(vs[0].Tracker, TrackerPrefix+"sauve-") {
			t.Fatalf("drive0's tracker %q", vs[0].Tracker)
		}
		if q.Report().FullRead["drive1"] != "drive drive1 is raw: persistent dirty bitmaps need qcow2" {
			t.Errorf("report %v", q.Report().FullRead)
		}
		if c := vs[0].Changes; c != nil {
			if c.Since != since["drive0"] {
				t.Errorf("Changes.Since %q, want %q", c.Since, since["drive0"])
			}
			fullRead = append(fullRead, fmt.Sprint(ranges(t, c.Map, vs[0].Size)))
		}
		for _, v := range vs {
			if err := v.Verify(); err != nil {
				t.Fatal(err)
			}
		}
		if commit {
			if err := q.Commit(context.Background()); err != nil {
				t.Fatal(err)
			}
			since["drive0"] = vs[0].Tracker
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		return append(fullRead, bitmapOf(vs[0].Tracker))
	}
	r := backup(true)
	if r[0] != "no earlier backup of drive0 through this VM" || r[1] != "drive drive1 is raw: persistent dirty bitmaps need qcow2" {
		t.Errorf("first backup's full reads: %q", r)
	}
	gen1 := r[2]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen1}})

	vm.mustWrite("drive0", 3, 100<<10, 10<<10) // one block: 64 KiB..128 KiB
	vm.mustWrite("drive0", 3, 5*mib, 200<<10)  // 5 MiB..5 MiB+256 KiB
	vm.mustWrite("drive1", 3, 0, mib)
	r = backup(false) // fails: not committed
	if want := "[{65536 131072} {5242880 5505024}]"; r[0] != "" || r[2] != want {
		t.Errorf("second backup: full read %q, changes %s, want %s", r[0], r[2], want)
	}
	gen2 := r[3]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen1, gen2}})

	vm.mustWrite("drive0", 4, 12*mib, 64<<10)
	r = backup(true)
	if want := "[{65536 131072} {5242880 5505024} {12582912 12648448}]"; r[0] != "" || r[2] != want {
		t.Errorf("third backup (after a failed one): full read %q, changes %s, want %s", r[0], r[2], want)
	}
	gen3 := r[3]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen3}})

	r = backup(false) // nothing written since
	if r[0] != "" || r[2] != "[]" {
		t.Errorf("backup with no writes: full read %q, changes %s", r[0], r[2])
	}
	since["drive0"] = TrackerPrefix + gen1 // retired by the third backup
	r = backup(false)
	if want := "bitmap " + gen1 + " is missing from drive0 (QEMU stopped before saving it, it was removed, or the image was replaced)"; r[0] != want {
		t.Errorf("full read %q, want %q", r[0], want)
	}
	// A bitmap of another tool is left alone.
	vm.exec("block-dirty-bitmap-add", map[string]any{"node": "node-drive0", "name": "sauve-backup-of-other-tool", "persistent": true}, nil)
	since["drive0"] = TrackerPrefix + gen3
	backup(true)
	var nodes []qNode
	vm.exec("query-named-block-nodes", map[string]any{"flat": true}, &nodes)
	found := false
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			found = found || b.Name == "sauve-backup-of-other-tool"
		}
	}
	if !found {
		t.Error("Commit removed another tool's bitmap")
	}
}

// Persistent bitmaps survive a clean restart of QEMU; after a crash they
// are inconsistent, and the next backup reads in full, saying why (and
// retires them once it is stored).
func TestQEMURestart(t *testing.T) {
	vm := newVM(t, "none", nil, testDrive{id: "drive0", format: "qcow2", size: 16 * mib})
	tracker := ""
	backup := func() (fullRead, changes string) {
		t.Helper()
		q, _ := vm.open(QEMUOptions{Bitmaps: true, Since: func(string) string { return tracker }})
		v := views(t, q)[0]
		if v.Changes != nil {
			changes = fmt.Sprint(ranges(t, v.Changes.Map, v.Size))
		}
		if err := q.Commit(context.Background()); err != nil {
			t.Fatal(err)
		}
		q.Close()
		tracker = v.Tracker
		return v.FullRead, changes
	}
	backup()
	vm.mustWrite("drive0", 5, 3*mib, 64<<10)
	vm.quit()
	vm.start()
	if fullRead, changes := backup(); fullRead != "" || changes != "[{3145728 3211264}]" {
		t.Errorf("after a clean restart: full read %q, changes %s", fullRead, changes)
	}
	vm.quit()
	vm.start()
	vm.mustWrite("drive0", 6, 0, 64<<10)
	vm.kill()
	vm.start()
	want := "bitmap " + bitmapOf(tracker) + " of drive0 is inconsistent (QEMU stopped uncleanly)"
	if fullRead, _ := backup(); fullRead != want {
		t.Errorf("after a crash: full read %q, want %q", fullRead, want)
	}
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {bitmapOf(tracker)}})
}

// What a sauve that died left in the VM (its jobs, exports, NBD server,
// nodes, bitmaps, fd sets) is removed by the next one, which says so.
func TestQEMULeftovers(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	q0, _ := vm.open(QEMUOptions{Bitmaps: true})
	v0 := views(t, q0)
	q0.Commit(context.Background())
	q0.Close()

	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	q1, _ := vm.open(QEMUOptions{Bitmaps: true, Since: func(string) string { return v0[0].Tracker }})
	q1.pid = dead.Process.Pid
	if v := views(t, q1); v[0].Changes == nil {
		t.Fatal("no changes exported")
	}
	q1.c.Close() // sauve dies
	s := vm.state()
	if len(s.nodes) != 4 || len(s.exports) != 2 || len(s.jobs) != 2 || len(s.fdsets) != 2 || !s.nbdServer || len(s.bitmaps["node-drive0"]) != 3 {
		t.Fatalf("the dead sauve left %+v", s)
	}
	q2, warns := vm.open(QEMUOptions{Bitmaps: true})
	want := fmt.Sprintf("VM vm1: removed what a sauve that died left in it: 2 jobs, 2 NBD exports, 1 bitmap, 4 block nodes, 2 fd sets, its NBD server (process %d)", dead.Process.Pid)
	if len(*warns) != 1 || (*warns)[0] != want {
		t.Errorf("warnings %q", *warns)
	}
	views(t, q2)
	q2.Commit(context.Background())
	q2.Close()
	s = vm.state()
	if len(s.nodes)+len(s.exports)+len(s.jobs)+len(s.fdsets) > 0 || s.nbdServer || len(s.bitmaps["node-drive0"]) != 1 {
		t.Errorf("left after the next backup: %+v", s)
	}
}

// When the fleecing images fill their folder, the copy is given up
// before the VM's writes fail: Verify says so, the VM writes on, and
// Close leaves nothing.
func TestQEMUFleeceFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a small tmpfs (CI runs as root)")
	}
	vm := newVM(t, "none", nil, testDrive{id: "drive0", format: "qcow2", size: 16 * mib})
	vm.mustWrite("drive0", 1, 0, 8*mib)
	dir := filepath.Join(vm.dir, "small")
	os.Mkdir(dir, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	q, warns := vm.open(QEMUOptions{FleeceDir: dir})
	v := views(t, q)[0]
	for off := int64(0); off < 4*mib; off += 256 << 10 {
		vm.write("drive0", 9, off, 256<<10)
	}
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err = v.Verify(); err != nil {
			break
		}
	}
	errorContains(t, err, "the fleecing image of drive drive0 in "+dir+" filled up: the copy of the instant is incomplete; nothing stored")
	if len(*warns) != 1 || !strings.Contains((*warns)[0], "the copies are given up so that the VM's writes go on") {
		t.Errorf("warnings %q", *warns)
	}
	// The VM writes on, whatever the folder holds.
	vm.mustWrite("drive0", 7, 10*mib, mib)
	for deadline := time.Now().Add(2 * time.Second); !strings.Contains(vm.out.String(), "wrote 1048576/1048576 bytes at offset 10485760"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the VM's write after the copy was given up failed: %s", vm.out)
		}
	}
	if err := v.Release(); err != nil {
		t.Error(err)
	}
	errorContains(t, v.Verify(), "filled up")
	if err := q.Close(); err != nil {
		t.Error(err)
	}
	vm.assertClean(dir, nil)
}

// A socket that is not QEMU's monitor, a QEMU too old for fleecing, a
// drive the VM does not have, a guest freeze that cannot be: one clear
// error each.
func TestQEMURefusals(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	other := fakeQMP(t, "SSH-2.0-OpenSSH_9.2\r\n")
	old := fakeQMP(t, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 6}, "package": ""}, "capabilities": []}}`+"\r\n")
	for _, tc := range []struct {
		o    QEMUOptions
		want string
	}{
		{QEMUOptions{Socket: other}, other + " is not a QEMU monitor (QMP) socket"},
		{QEMUOptions{Socket: old}, "QEMU 6.2 at " + old + " is too old for fleecing (7.0 or newer)"},
		{QEMUOptions{Drives: []string{"drive0", "disk9"}}, "VM vm1 has no drive disk9 (it has: drive0, drive1)"},
		{QEMUOptions{GuestFreeze: "on"}, "guest freeze on: VM vm1 has no guest agent channel"},
		{QEMUOptions{GuestFreeze: "maybe"}, `guest freeze "maybe": choose auto, on or off`},
	} {
		_, _, err := vm.tryOpen(tc.o)
		errorContains(t, err, tc.want)
	}
	// Named drives are backed up, once each, in the order named.
	q, _ := vm.open(QEMUOptions{Drives: []string{"node-drive1", "drive0", "drive1"}})
	if d := q.Drives(); len(d) != 2 || d[0].ID != "drive1" || d[1].ID != "drive0" {
		t.Errorf("drives %+v", d)
	}
}

// fakeQMP serves greeting (then answers every command with an empty
// return) on a unix socket.
func fakeQMP(t *testing.T, greeting string) string {
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(greeting))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				dec := json.NewDecoder(c)
				for {
					var req struct{ ID json.RawMessage }
					if dec.Decode(&req) != nil {
						return
					}
					fmt.Fprintf(c, `{"return": {}, "id": %s}`+"\r\n", req.ID)
				}
			}()
		}
	}()
	return sock
}

// A VM that runs an NBD server already: Views fails, saying what to do,
// and leaves nothing; given the server's address, sauve exports there
// (and leaves the server running).
func TestQEMUNBDServerRunning(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	theirs := filepath.Join(vm.dir, "theirs.sock")
	vm.exec("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": theirs}}}, nil)
	q, _ := vm.open(QEMUOptions{Bitmaps: true})
	_, err := q.Views(context.Background())
	errorContains(t, err, "VM vm1 already runs an NBD server: give its address (--nbd-server) for sauve to export its copies there")
	vm.exec("nbd-server-stop", nil, nil)
	gen := q.fleeces[0].newGen // the transaction ran: its generation stays
	vm.assertClean(q.opts.FleeceDir, map[string][]string{"drive0": {gen}})
	if err := q.Close(); err != nil {
		t.Error(err)
	}

	vm.exec("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": theirs}}}, nil)
	q, _ = vm.open(QEMUOptions{NBDServer: "unix:" + theirs})
	vs := views(t, q)
	buf := make([]byte, 16)
	if _, err := vs[0].At.ReadAt(buf, 0); err != nil {
		t.Error(err)
	}
	q.Close()
	s := vm.state()
	if !s.nbdServer || len(s.exports) > 0 || len(s.nodes) > 0 {
		t.Errorf("after a backup on the VM's own NBD server: %+v", s)
	}
}

// A VM with devices (libvirt's way: -blockdev and -device, no drive id)
// and CD-ROMs: every writable drive is backed up under its device's id;
// CD-ROMs are skipped, and said, unless named (a read-only drive is then
// exported as it is).
func TestQEMUDevices(t *testing.T) {
	needQEMU(t)
	dir := t.TempDir()
	disk, iso := filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, "cd.iso")
	exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "8M").Run()
	os.WriteFile(iso, bytes.Repeat([]byte{0xcd}, mib), 0o600)
	vm := newVM(t, "pc", []string{"-S",
		"-blockdev", "driver=file,filename=" + disk + ",node-name=disk-file",
		"-blockdev", "driver=qcow2,file=disk-file,node-name=disk-fmt",
		"-device", "virtio-blk-pci,drive=disk-fmt,id=vdisk0",
		"-drive", "if=none,id=cdx,file=" + iso + ",format=raw,media=cdrom,readonly=on",
		"-device", "ide-cd,drive=cdx,id=cd0,bus=ide.0",
		"-device", "ide-cd,id=cd1,bus=ide.1"})
	q, warns := vm.open(QEMUOptions{Bitmaps: true})
	if d := q.Drives(); len(d) != 1 || d[0] != (QEMUDrive{ID: "vdisk0", Node: "disk-fmt", Format: "qcow2", Size: 8 * mib, QDev: d[0].QDev}) || d[0].QDev == "" {
		t.Errorf("drives %+v", d)
	}
	want := []string{"VM vm1: drive cdx (a CD-ROM) is read-only: skipped (name it with --drive to back it up)",
		"VM vm1: drive cd1 (a CD-ROM) has no medium: skipped"}
	if !reflect.DeepEqual(*warns, want) || !reflect.DeepEqual(q.Report().Skipped, want) {
		t.Errorf("warnings %q, report %q; want %q", *warns, q.Report().Skipped, want)
	}
	if v := views(t, q)[0]; !strings.HasSuffix(v.Of.Path, "#vdisk0") || v.FullRead != "no earlier backup of vdisk0 through this VM" {
		t.Errorf("view of %s, full read %q", v.Of.Path, v.FullRead)
	}
	q.Close()

	q, _ = vm.open(QEMUOptions{Drives: []string{"cd0"}, Bitmaps: true})
	v := views(t, q)[0]
	buf := make([]byte, 4)
	if _, err := v.At.ReadAt(buf, 4096); err != nil || buf[0] != 0xcd || v.Verify() != nil {
		t.Errorf("view of the CD-ROM reads %x, %v", buf, err)
	}
	if v.CopyUsed != nil {
		t.Errorf("the CD-ROM, read as it is, has a copy of %d bytes", v.CopyUsed())
	}
	if v.FullRead != "drive cdx is read-only: QEMU keeps no dirty bitmap of it" {
		t.Errorf("full read %q", v.FullRead)
	}
	q.Close()
	_, _, err := vm.tryOpen(QEMUOptions{Drives: []string{"cd1"}})
	errorContains(t, err, "VM vm1: drive cd1 has no medium")
}

// The guest's filesystems are frozen around the transaction, when the VM
// has a guest agent channel; auto goes on without a freeze when the agent
// does not answer, on does not.
func TestQEMUGuestFreeze(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "qga.sock")
	vm := newVM(t, "none", []string{"-chardev", "socket,id=qga0,path=" + agent + ",server=on,wait=off"}, twoDrives()...)
	q, _ := vm.open(QEMUOptions{GuestFreeze: "auto", FreezeTimeout: 3 * time.Second})
	var events []string
	q.freeze = func(ctx context.Context, socket string, timeout time.Duration) (func() (time.Duration, error), error) {
		events = append(events, fmt.Sprintf("freeze %s %v, jobs %d", socket, timeout, len(vm.state().jobs)))
		return func() (time.Duration, error) {
			events = append(events, fmt.Sprintf("thaw, jobs %d", len(vm.state().jobs)))
			return 42 * time.Millisecond, nil
		}, nil
	}
	views(t, q)
	if want := []string{fmt.Sprintf("freeze %s 3s, jobs 0", agent), "thaw, jobs 2"}; !reflect.DeepEqual(events, want) {
		t.Errorf("events %q, want %q", events, want)
	}
	if r := q.Report(); r.Frozen != 42*time.Millisecond || r.NoFreeze != "" {
		t.Errorf("report: frozen %v, no freeze %q", r.Frozen, r.NoFreeze)
	}
	q.Close()

	refuse := func(context.Context, string, time.Duration) (func() (time.Duration, error), error) {
		return nil, errors.New("guest-fsfreeze-freeze: no reply in 3s")
	}
	q, warns := vm.open(QEMUOptions{GuestFreeze: "auto"})
	q.freeze = refuse
	views(t, q)
	why := "VM vm1: the guest agent froze nothing: guest-fsfreeze-freeze: no reply in 3s"
	if r := q.Report(); r.NoFreeze != why || len(*warns) != 1 || !strings.HasPrefix((*warns)[0], why) {
		t.Errorf("no freeze %q, warnings %q", r.NoFreeze, *warns)
	}
	q.Close()

	q, _ = vm.open(QEMUOptions{GuestFreeze: "on"})
	q.freeze = refuse
	_, err := q.Views(context.Background())
	errorContains(t, err, "guest freeze on: VM vm1: guest-fsfreeze-freeze: no reply in 3s")
	q.Close()
	vm.assertClean(q.opts.FleeceDir, nil)
}

// A VM that goes away during the backup: Verify fails, Close says what
// happened, nothing hangs.
func TestQEMUGoneDuringBackup(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	q, _ := vm.open(QEMUOptions{})
	vs := views(t, q)
	vm.kill()
	errorContains(t, vs[0].Verify(), "closed by QEMU")
	errorContains(t, q.Close(), "VM vm1: the copies cannot be removed: QMP connection to "+vm.sock+" closed by QEMU")
}

// A fleecing job stopped behind sauve's back: the copy may hold writes
// after the instant, and Verify says so.
func TestQEMUJobStopped(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	q, _ := vm.open(QEMUOptions{})
	vs := views(t, q)
	vm.exec("block-job-cancel", map[string]any{"device": objName(q.pid, 1, kindJob), "force": true}, nil)
	var err error
	for deadline := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		err = vs[1].Verify()
	}
	errorContains(t, err, "the fleecing job of drive drive1 failed: Operation canceled: the copy of the instant is incomplete; nothing stored")
	if err := vs[0].Verify(); err != nil {
		t.Errorf("drive0: %v", err)
	}
	if err := q.Close(); err != nil {
		t.Error(err)
	}
	vm.assertClean(q.opts.FleeceDir, nil)
}
