package main

// End-to-end tests of what restore may write to and what backup may read
// from: targets that back mounted filesystems, targets holding another
// disk, empty and stalled sources, and interrupted restores to new files.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountDev mounts dev at a new directory and unmounts it at the end.
func mountDev(t *testing.T, e *env, dev, name string) string {
	t.Helper()
	dir := e.path(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sh(t, "mount", dev, dir)
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	return dir
}

// zeroFile makes a sparse file of size bytes.
func zeroFile(t *testing.T, path string, size int64) {
	t.Helper()
	writeFile(t, path, nil)
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

// TestTargetsBackingMountedFilesystems: a restore never writes to a file
// or device that a mounted filesystem uses through loop devices and
// partitions, even with --force; the error names the chain and the mount
// point, and the target is left as it was.
func TestTargetsBackingMountedFilesystems(t *testing.T) {
	needTools(t, "losetup", "mkfs.ext4", "sfdisk", "partx")
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(4<<20))
	b := e.backup(src)
	refused := func(target string, want ...string) {
		t.Helper()
		before := fileHash(t, target, -1)
		stderr := e.fail(append([]string{target, "unmount it first"}, want...), "restore", b.Snapshot, target, "--force")
		t.Logf("%s", strings.TrimSpace(stderr))
		if fileHash(t, target, -1) != before {
			t.Fatalf("the refused restore changed %s", target)
		}
	}

	// Filesystems are made with their inode tables and journal zeroed at
	// once: ext4lazyinit would otherwise write them after the mount, and
	// the refused restore would seem to have changed the target.

	// The backing file of a mounted loop device.
	img1 := e.path("one.img")
	zeroFile(t, img1, 32<<20)
	loop1 := losetup(t, img1)
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop1)
	mnt1 := mountDev(t, e, loop1, "mnt1")
	refused(img1, "backs a mounted filesystem through "+loop1+", mounted at "+mnt1)

	// A loop device over a loop device over a file, the top one mounted.
	img2 := e.path("two.img")
	zeroFile(t, img2, 32<<20)
	loopA := losetup(t, img2)
	loopB := losetup(t, loopA)
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loopB)
	mnt2 := mountDev(t, e, loopB, "mnt2")
	refused(img2, "through "+loopA+" → "+loopB+", mounted at "+mnt2)
	refused(loopA, "through "+loopB+", mounted at "+mnt2)

	// Partitions of a loop device: one mounted, the other used by a loop
	// device over the whole disk at the partition's offset.
	img3 := e.path("three.img")
	zeroFile(t, img3, 32<<20)
	sfdisk(t, img3, "label: dos\nstart=2048, size=8MiB, type=83\nstart=20480, size=8MiB, type=83\n")
	loopC := losetup(t, img3, "-P")
	p1, p2 := partDev(t, loopC, 1), partDev(t, loopC, 2)
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", p1)
	mnt3 := mountDev(t, e, p1, "mnt3")
	loopD := losetup(t, loopC, "-o", fmt.Sprint(20480*512), "--sizelimit", fmt.Sprint(8<<20))
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loopD)
	mnt4 := mountDev(t, e, loopD, "mnt4")
	refused(img3, "through "+loopC+" → "+p1+", mounted at "+mnt3, "(and 1 more mount)")
	refused(loopC, "through "+p1+", mounted at "+mnt3)
	refused(p1, "is mounted at "+mnt3)
	refused(p2, "through its disk "+loopC+" → "+loopD+", mounted at "+mnt4)

	// A loop device at an offset into its file.
	img4 := e.path("four.img")
	zeroFile(t, img4, 48<<20)
	loopE := losetup(t, img4, "-o", fmt.Sprint(8<<20), "--sizelimit", fmt.Sprint(32<<20))
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loopE)
	mnt5 := mountDev(t, e, loopE, "mnt5")
	refused(img4, "through "+loopE+", mounted at "+mnt5)

	// Unmounted, the same file is a target again.
	sh(t, "umount", mnt1)
	e.ok("restore", b.Snapshot, img1, "--force")
	sameFile(t, src, img1)
}

// uuids of the filesystems the tests make.
const (
	uuidA = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
	uuidB = "6f9619ff-8b86-d011-b42d-00c04fc964ff"
	gptA  = "0D9B6E2C-5B8A-4C0F-9C27-6A1D5E0F3A11"
	gptB  = "7C3A2B1D-0E4F-4A6B-8C9D-112233445566"
)

// ext4Image makes an ext4 image file with a UUID and label.
func ext4Image(t *testing.T, path, uuid, label string) {
	t.Helper()
	zeroFile(t, path, 16<<20)
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-F", "-U", uuid, "-L", label, path)
}

// TestTargetsForeignContentNeedsForce: restoring over a file or device
// that holds another disk's partition table or filesystem needs --force
// (or a yes on a terminal) and says what the target holds; rolling a disk
// back onto itself, and targets holding nothing recognisable, need neither.
func TestTargetsForeignContentNeedsForce(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "losetup")
	e := newEnv(t)
	a := e.path("a.img")
	ext4Image(t, a, uuidA, "alpha")
	ba := e.backup(a)

	other := e.path("other.img")
	ext4Image(t, other, uuidB, "data")
	before := fileHash(t, other, -1)
	want := []string{other + " holds an ext4 filesystem 'data' (uuid " + uuidB + "), not the snapshot's disk (an ext4 filesystem 'alpha' (uuid " + uuidA + "))", "add --force to overwrite it"}
	e.fail(want, "restore", ba.Snapshot, other)
	e.fail(want, "restore", ba.Snapshot, other, "--delta")
	dev := losetup(t, other)
	e.fail([]string{dev + " holds an ext4 filesystem 'data'", "add --force"}, "restore", ba.Snapshot, dev)
	exec.Command("losetup", "-d", dev).Run()
	if fileHash(t, other, -1) != before {
		t.Fatal("a refused restore changed the target")
	}
	e.ok("restore", ba.Snapshot, other, "--force")
	sameFile(t, a, other)

	// Rolling the disk back onto itself, changed since: no --force.
	writeAt(t, a, 12<<20, randomBytes(1<<20))
	e.ok("restore", ba.Snapshot, a)
	writeAt(t, a, 13<<20, randomBytes(4096))
	e.ok("restore", ba.Snapshot, a, "--delta")
	// Nothing recognisable: zeros, random bytes.
	zeros := e.path("zeros.img")
	zeroFile(t, zeros, 16<<20)
	e.ok("restore", ba.Snapshot, zeros)
	random := e.path("random.img")
	writeFile(t, random, randomBytes(16<<20))
	e.ok("restore", ba.Snapshot, random)

	// Partition tables are told apart by their disk GUID or signature.
	gpt := func(name, id, layout string) string {
		p := e.path(name)
		zeroFile(t, p, 16<<20)
		sfdisk(t, p, "label: gpt\nlabel-id: "+id+"\n"+layout)
		return p
	}
	g1 := gpt("g1.img", gptA, "start=2048, size=4MiB\n")
	bg := e.backup(g1)
	g2 := gpt("g2.img", gptB, "start=2048, size=8MiB\n")
	e.fail([]string{g2 + " holds a GPT disk " + gptB, "not the snapshot's disk (a GPT disk " + gptA, "add --force"}, "restore", bg.Snapshot, g2)
	// The same disk repartitioned: its GUID is unchanged.
	g3 := gpt("g3.img", gptA, "start=4096, size=2MiB\nsize=2MiB\n")
	e.ok("restore", bg.Snapshot, g3)
	sameFile(t, g1, g3)
	mbr := e.path("mbr.img")
	zeroFile(t, mbr, 16<<20)
	sfdisk(t, mbr, "label: dos\nlabel-id: 0xdeadbeef\nstart=2048, size=4MiB, type=83\n")
	e.fail([]string{mbr + " holds an MBR disk deadbeef", "add --force"}, "restore", bg.Snapshot, mbr)

	// A snapshot from a stream records no identifiers: any recognisable
	// target is another disk.
	r := e.runIn(bytes.NewReader(randomBytes(1<<20)), "backup", "-", "--json")
	var bs backupOut
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &bs) != nil {
		t.Fatalf("backup from stdin: %d %s", r.code, r.stderr)
	}
	e.fail([]string{"which records no partition table or filesystem", "add --force"}, "restore", bs.Snapshot, other)

	// On a terminal, sauve asks.
	ext4Image(t, other, uuidB, "data")
	before = fileHash(t, other, -1)
	stderr, code := e.runOnTerminal("n\n", "restore", ba.Snapshot, other)
	if code == 0 || !strings.Contains(stderr, "Overwrite it? [y/N]") || !strings.Contains(stderr, "not overwritten") || fileHash(t, other, -1) != before {
		t.Fatalf("answering no: exit %d\n%s", code, stderr)
	}
	// Ctrl-C at the question ends sauve, the target untouched.
	_, slave := openPTY(t)
	code, stderr = interruptAfter(t, e.cmd(slave, "restore", ba.Snapshot, other), syscall.SIGINT, time.Second, nil)
	if code != 130 || !strings.Contains(stderr, "Overwrite it?") || fileHash(t, other, -1) != before {
		t.Fatalf("Ctrl-C at the question: exit %d\n%s", code, stderr)
	}
	if stderr, code = e.runOnTerminal("y\n", "restore", ba.Snapshot, other); code != 0 {
		t.Fatalf("answering yes: exit %d\n%s", code, stderr)
	}
	sameFile(t, a, other)
}

// openPTY opens a pseudo-terminal; both ends close at the end.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { master.Close() })
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetUint32(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slave.Close() })
	return master, slave
}

// runOnTerminal runs sauve with a pseudo-terminal as standard input,
// typing input, and returns its stderr and exit status.
func (e *env) runOnTerminal(input string, args ...string) (string, int) {
	e.t.Helper()
	master, slave := openPTY(e.t)
	if _, err := master.WriteString(input); err != nil {
		e.t.Fatal(err)
	}
	c := e.cmd(slave, args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	err := c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return stderr.String(), ee.ExitCode()
	} else if err != nil {
		e.t.Fatal(err)
	}
	return stderr.String(), 0
}

func snapshotCount(t *testing.T, e *env) int {
	t.Helper()
	var sn []json.RawMessage
	e.okJSON(&sn, "snapshots")
	return len(sn)
}

// TestTargetsEmptySourceIsRefused: an empty file or an empty stdin (a
// failed pipeline) stores nothing and says so, unless --allow-empty;
// convert treats an empty source the same way.
func TestTargetsEmptySourceIsRefused(t *testing.T) {
	e := newEnv(t)
	empty := e.path("empty.img")
	writeFile(t, empty, nil)
	e.fail([]string{"source " + empty + " is empty (0 bytes)", "--allow-empty"}, "backup", empty)
	r := e.runIn(strings.NewReader(""), "backup", "-", "--stdin-name", "sdb.img")
	if r.code != 1 || !strings.Contains(r.stderr, "standard input) ended before its first byte") || !strings.Contains(r.stderr, "--allow-empty") {
		t.Fatalf("empty stdin: exit %d\n%s", r.code, r.stderr)
	}
	if n := snapshotCount(t, e); n != 0 {
		t.Fatalf("%d snapshots after refused empty backups", n)
	}
	b := e.backup(empty, "--allow-empty")
	if b.Size != 0 || snapshotCount(t, e) != 1 {
		t.Fatalf("--allow-empty: %+v", b)
	}
	out := e.path("out.qcow2")
	e.fail([]string{"source " + empty + " is empty", "refusing to write an empty disk image", "--allow-empty"}, "convert", empty, out)
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("a refused convert left %s", out)
	}
	e.ok("convert", empty, e.path("out.img"), "--allow-empty")
	if !strings.Contains(e.ok("backup", "--help"), "--allow-empty") || !strings.Contains(e.ok("convert", "--help"), "--allow-empty") {
		t.Fatal("--help does not document --allow-empty")
	}
}

// interruptAfter starts c, runs started, waits delay, sends sig and
// returns c's exit status and stderr, failing if it does not end with an
// error within 3 seconds of the signal.
func interruptAfter(t *testing.T, c *exec.Cmd, sig syscall.Signal, delay time.Duration, started func()) (int, string) {
	t.Helper()
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if started != nil {
		started()
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	time.Sleep(delay)
	c.Process.Signal(sig)
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), stderr.String()
		}
		t.Fatalf("sauve %v ended with %v after %v, expected an interruption", c.Args[1:], err, sig)
	case <-time.After(3 * time.Second):
		c.Process.Kill()
		<-done
		t.Fatalf("sauve %v did not end within 3s of %v", c.Args[1:], sig)
	}
	return 0, ""
}

// TestTargetsSignalsEndStalledSources: a FIFO without a writer and a
// stream that stalls (before or after its first bytes) end on SIGTERM or
// SIGINT with exit 130, and store nothing.
func TestTargetsSignalsEndStalledSources(t *testing.T) {
	e := newEnv(t)
	fifo := e.path("fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	check := func(what string, code int, stderr string) {
		t.Helper()
		if code != 130 || !strings.Contains(stderr, "interrupted") {
			t.Fatalf("%s: exit %d, want 130 and 'interrupted'\n%s", what, code, stderr)
		}
	}
	code, stderr := interruptAfter(t, e.cmd(nil, "backup", fifo), syscall.SIGTERM, time.Second, nil)
	check("FIFO without a writer, SIGTERM", code, stderr)
	code, stderr = interruptAfter(t, e.cmd(nil, "backup", fifo), syscall.SIGINT, time.Second, nil)
	check("FIFO without a writer, SIGINT", code, stderr)

	// A writer that sends 1 MiB, then stalls with the FIFO open.
	code, stderr = interruptAfter(t, e.cmd(nil, "backup", fifo), syscall.SIGTERM, time.Second, func() {
		w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { w.Close() })
		go w.Write(randomBytes(1 << 20))
	})
	check("FIFO stalled after 1 MiB", code, stderr)

	// Standard input: a pipe whose writer stays open, silent from the
	// start or after 1 MiB.
	for _, first := range []int{0, 1 << 20} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		c := e.cmd(nil, "backup", "-")
		c.Stdin = r
		code, stderr := interruptAfter(t, c, syscall.SIGTERM, time.Second, func() {
			r.Close()
			go w.Write(randomBytes(first))
		})
		w.Close()
		check(fmt.Sprintf("stdin stalled after %d bytes", first), code, stderr)
	}
	if n := snapshotCount(t, e); n != 0 {
		t.Fatalf("%d snapshots after interrupted backups", n)
	}
}

// allocated returns the bytes a file occupies on disk, 0 if it is absent.
func allocated(path string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// tempsOf lists the temporary files a restore to path writes under.
func tempsOf(path string) []string {
	m, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".sauve-*"))
	return m
}

// TestTargetsInterruptedRestoreLeavesNoFile: a restore to a new file
// writes it under a temporary name; killed (even with SIGKILL) or
// interrupted part-way, it leaves nothing under the final name.
func TestTargetsInterruptedRestoreLeavesNoFile(t *testing.T) {
	e := newEnv(t)
	src := e.path("big.img")
	randomFile(t, src, 128<<20) // incompressible: the restore takes a while
	b := e.backup(src)
	dst := e.path("restored.img")
	// partWay waits until the restore has written 8 MiB, under either name.
	partWay := func() {
		deadline := time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			n := allocated(dst)
			for _, tmp := range tempsOf(dst) {
				n += allocated(tmp)
			}
			if n >= 8<<20 {
				return
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatal("the restore wrote nothing within a minute")
	}
	killed := false
	for attempt := 0; attempt < 3 && !killed; attempt++ {
		c := e.cmd(nil, "restore", b.Snapshot, dst)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		partWay()
		c.Process.Kill()
		if c.Wait() == nil {
			os.Remove(dst) // finished before the kill: again
			continue
		}
		killed = true
		if _, err := os.Stat(dst); !os.IsNotExist(err) {
			t.Fatalf("a restore killed part-way left %s (%d bytes allocated)", dst, allocated(dst))
		}
	}
	if !killed {
		t.Fatal("three restores finished before they could be killed: make the image larger")
	}
	for _, tmp := range tempsOf(dst) {
		os.Remove(tmp) // what SIGKILL leaves behind
	}

	code, stderr := interruptAfter(t, e.cmd(nil, "restore", b.Snapshot, dst), syscall.SIGTERM, 0, partWay)
	if code != 130 || !strings.Contains(stderr, "interrupted") {
		t.Fatalf("interrupted restore: exit %d\n%s", code, stderr)
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) || len(tempsOf(dst)) != 0 {
		t.Fatalf("an interrupted restore left %s or its temporary file %v", dst, tempsOf(dst))
	}

	e.ok("restore", b.Snapshot, dst)
	sameFile(t, src, dst)
	if fi, _ := os.Stat(dst); fi.Mode().Perm() != 0o600 || len(tempsOf(dst)) != 0 {
		t.Fatalf("restored file: mode %v, temporary files %v", fi.Mode(), tempsOf(dst))
	}
}
