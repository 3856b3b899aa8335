package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// snapPass is a pass's --json line from a snapshot source.
type snapPass struct {
	migratePass
	ChunksUnread   int64  `json:"chunks_unread"`
	BytesFetched   *int64 `json:"bytes_fetched"`
	FullRead       string `json:"full_read"`
	SourceSnapshot *struct {
		ID    string    `json:"id"`
		Short string    `json:"short_id"`
		Time  time.Time `json:"time"`
		Disk  string    `json:"disk"`
	} `json:"source_snapshot"`
}

// snapMigrate runs migrate --json and returns its one pass and the
// summary's state path.
func snapMigrate(t *testing.T, e *env, args ...string) (snapPass, string) {
	t.Helper()
	out := e.ok(append(append([]string{"migrate"}, args...), "--json")...)
	parseMigrate(t, out) // the lines and the summary
	var p snapPass
	var sum struct {
		State string `json:"state"`
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err := jsonUnmarshal(lines[0], &p); err != nil {
		t.Fatal(err)
	}
	if err := jsonUnmarshal(lines[len(lines)-1], &sum); err != nil {
		t.Fatal(err)
	}
	return p, sum.State
}

// snapDisk writes a disk image of size bytes (an MBR, an ext4 partition
// from 1 MiB) holding data MiB of random files.
func snapDisk(t *testing.T, e *env, name string, size int64, data int) string {
	t.Helper()
	img := e.path(name)
	detDisk(t, img, size)
	rewriteFiles(t, e, img, 0, data)
	return img
}

// rewriteFiles writes files from..to-1 (1 MiB each, random) into the
// ext4 partition of img.
func rewriteFiles(t *testing.T, e *env, img string, from, to int) {
	t.Helper()
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	sh(t, "mount", "-o", "loop,offset=1048576", img, mnt)
	defer exec.Command("umount", mnt).Run()
	for i := from; i < to; i++ {
		writeFile(t, filepath.Join(mnt, fmt.Sprintf("f%03d", i)), randomBytes(1<<20))
	}
	sh(t, "umount", mnt)
}

// restored restores snapshot id to a new raw file.
func restored(t *testing.T, e *env, id string) string {
	t.Helper()
	out := e.path("restored-" + id + ".raw")
	if _, err := os.Stat(out); err != nil {
		e.ok("restore", id, out)
	}
	return out
}

// sameImage fails unless target (of format) holds the raw image want,
// byte for byte, as qemu-img reads them.
func sameImage(t *testing.T, want, target, format string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", format, want, target).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", want, target, err, out)
	}
}

// partTree checks the ext4 partition of img with e2fsck -fn and returns
// its files' hashes.
func partTree(t *testing.T, img string) map[string]string {
	t.Helper()
	dev := losetup(t, img, "-r", "-o", "1048576")
	if out, err := exec.Command("e2fsck", "-fn", dev).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of %s: %v\n%s", img, err, out)
	}
	dir := t.TempDir()
	sh(t, "mount", "-o", "ro,noload", dev, dir)
	defer exec.Command("umount", dir).Run()
	tree := hashTree(t, dir)
	sh(t, "umount", dir)
	return tree
}

// diffBytes is what 'sauve diff' says differs between two snapshots.
func diffBytes(t *testing.T, e *env, a, b string) int64 {
	t.Helper()
	var rep struct {
		BytesDiffer int64 `json:"bytes_differ"`
	}
	r := e.run("diff", a, b, "--json")
	if err := jsonUnmarshal(r.stdout, &rep); err != nil {
		t.Fatalf("diff --json: %v\n%s%s", err, r.stdout, r.stderr)
	}
	return rep.BytesDiffer
}

// Snapshots as SOURCE: a first pass onto a new raw file and onto a new
// qcow2 image makes each the restore of the snapshot; after a second
// backup, a pass from latest reads only the chunks whose IDs differ.
func TestMigrateSnapshotSource(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "qemu-img")
	requireRoot(t)
	e := newEnv(t)
	img := snapDisk(t, e, "web1.img", 64<<20, 12)
	b1 := e.backup(img)
	raw, qcow := e.path("t.raw"), e.path("t.qcow2")
	for _, tg := range []struct{ path, format string }{{raw, "raw"}, {qcow, "qcow2"}} {
		p, _ := snapMigrate(t, e, "latest", tg.path)
		if p.Pass != 1 || p.SourceSnapshot == nil || p.SourceSnapshot.ID != b1.Snapshot || p.SourceSnapshot.Disk != b1.Disk || p.BytesWritten < 12<<20 {
			t.Fatalf("first pass onto %s: %+v", tg.format, p)
		}
		sameImage(t, restored(t, e, b1.ShortID), tg.path, tg.format)
		if tg.format == "qcow2" {
			qemuCheck(t, tg.path, "qcow2", false)
		}
	}
	// A larger new VM image: the snapshot's disk, then zeros.
	big := e.path("big.qcow2")
	snapMigrate(t, e, "latest", big, "--size", "96M")
	sameImage(t, restored(t, e, b1.ShortID), big, "qcow2")
	qemuCheck(t, big, "qcow2", false)
	if info := sh(t, "qemu-img", "info", big); !strings.Contains(info, "96 MiB") {
		t.Errorf("--size 96M made:\n%s", info)
	}
	// The text output names the snapshot and its time.
	out := e.ok("migrate", b1.ShortID, raw)
	// No rate of change of the source: between snapshots it means
	// nothing.
	if !strings.Contains(out, "from snapshot "+b1.ShortID+" (") || !strings.Contains(out, "now holds disk "+b1.Disk+" of snapshot "+b1.ShortID) || strings.Contains(out, "source changed at") {
		t.Errorf("text output:\n%s", out)
	}

	rewriteFiles(t, e, img, 3, 5)
	b2 := e.backup(img)
	differ := diffBytes(t, e, b1.ShortID, b2.ShortID)
	if differ <= 0 {
		t.Fatal("the second backup changed nothing")
	}
	for _, tg := range []struct{ path, format string }{{raw, "raw"}, {qcow, "qcow2"}} {
		p, _ := snapMigrate(t, e, "latest", tg.path)
		if p.SourceSnapshot == nil || p.SourceSnapshot.ID != b2.Snapshot || p.FullRead != "" {
			t.Fatalf("delta pass onto %s: %+v", tg.format, p)
		}
		if p.BytesRead <= 0 || p.BytesRead > differ || p.ChunksUnread <= 0 || p.BytesWritten > differ {
			t.Fatalf("delta pass onto %s read %d bytes (%d chunks unread), wrote %d; the snapshots differ in %d", tg.format, p.BytesRead, p.ChunksUnread, p.BytesWritten, differ)
		}
		// Read-ahead fetches none of the chunks skipped: what is fetched
		// is the differing chunks, sealed (random data: no compression).
		if p.BytesFetched == nil || *p.BytesFetched <= 0 || *p.BytesFetched > differ+differ/64 {
			t.Fatalf("delta pass onto %s fetched %d bytes; the snapshots differ in %d", tg.format, ptrOr(p.BytesFetched), differ)
		}
		t.Logf("fetched %d, differ %d", *p.BytesFetched, differ)
		sameImage(t, restored(t, e, b2.ShortID), tg.path, tg.format)
		if tg.format == "qcow2" {
			qemuCheck(t, tg.path, "qcow2", false)
		}
	}
}

// Seeded from snapshots, finished live with --final from the image with
// the same state: the live pass reads every used block, the target's
// filesystem is the source's; a copy of the image is another source
// (refused) once a live pass has run; a snapshot pass after the live one
// reads in full and says why.
func TestMigrateSnapshotThenLive(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "e2fsck")
	requireRoot(t)
	e := newEnv(t)
	img := snapDisk(t, e, "web1.img", 64<<20, 10)
	e.backup(img)
	target := e.path("web1-new.img")
	_, state := snapMigrate(t, e, "latest", target)
	rewriteFiles(t, e, img, 2, 4)
	e.backup(img)
	snapMigrate(t, e, "latest", target)
	rewriteFiles(t, e, img, 6, 8)

	// A copy of the image, not backed up: another file, same layout.
	clone := e.path("clone.img")
	sh(t, "cp", img, clone)

	// No --state: the snapshots are of this path, the default state is
	// theirs.
	out := e.ok("migrate", img, target, "--final", "--json")
	passes, sum := parseMigrate(t, out)
	if len(passes) != 1 || !passes[0].Final || !sum.Final || passes[0].Pass != 3 || passes[0].BytesRead < 10<<20 || passes[0].BytesWritten < 2<<20 {
		t.Fatalf("final live pass: %+v", passes)
	}
	if !strings.Contains(out, `"state":"`+state+`"`) {
		t.Fatalf("the live pass used another state than %s:\n%s", state, out)
	}
	sameTree(t, partTree(t, img), partTree(t, target))

	tgtBefore, stBefore := fileHash(t, target, -1), fileHash(t, state, -1)
	e.fail([]string{"another source", clone}, "migrate", clone, target, "--state", state)
	if fileHash(t, target, -1) != tgtBefore || fileHash(t, state, -1) != stBefore {
		t.Fatal("a refused pass changed the target or the state")
	}

	p, _ := snapMigrate(t, e, "latest", target, "--state", state)
	if !strings.Contains(p.FullRead, "did not read a snapshot") || p.ChunksUnread != 0 {
		t.Fatalf("snapshot pass after a live one: %+v", p)
	}
	// The snapshot is older than the live pass: the target is it again.
	sameImage(t, restored(t, e, "latest"), target, "raw")
}

// A previous snapshot forgotten and pruned: the next pass reads in full,
// says why, and leaves the target exact.
func TestMigrateSnapshotForgotten(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk", "qemu-img")
	requireRoot(t)
	e := newEnv(t)
	img := snapDisk(t, e, "web1.img", 48<<20, 8)
	b1 := e.backup(img)
	target := e.path("t.qcow2")
	snapMigrate(t, e, "latest", target)
	rewriteFiles(t, e, img, 0, 8)
	b2 := e.backup(img)
	e.ok("forget", b1.ShortID, "--prune")
	p, _ := snapMigrate(t, e, "latest", target)
	if !strings.Contains(p.FullRead, b1.ShortID) || !strings.Contains(p.FullRead, "no longer in the repository") || p.ChunksUnread != 0 || p.SourceSnapshot.ID != b2.Snapshot {
		t.Fatalf("pass after the previous snapshot was forgotten: %+v", p)
	}
	sameImage(t, restored(t, e, b2.ShortID), target, "qcow2")
	qemuCheck(t, target, "qcow2", false)
}

// Refused with nothing written: a snapshot of another disk onto a
// target with a state; --final and the hold flags with a snapshot
// SOURCE; --host with a device. A damaged pack fails the pass naming it;
// once the pack is whole again, the next pass leaves the target exact.
func TestMigrateSnapshotRefusals(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk")
	requireRoot(t)
	e := newEnv(t)
	img := snapDisk(t, e, "web1.img", 48<<20, 6)
	b1 := e.backup(img, "--host", "web1")
	other := snapDisk(t, e, "db1.img", 48<<20, 2) // another disk ID and filesystem
	bo := e.backup(other, "--host", "db1")
	target := e.path("t.raw")
	_, state := snapMigrate(t, e, b1.ShortID, target)
	tb, sb := fileHash(t, target, -1), fileHash(t, state, -1)
	check := func(what string) {
		t.Helper()
		if fileHash(t, target, -1) != tb || fileHash(t, state, -1) != sb {
			t.Fatalf("%s changed the target or the state", what)
		}
	}
	stderr := e.fail([]string{"another source", "disk ID"}, "migrate", bo.ShortID, target, "--state", state)
	detOneError(t, stderr)
	check("a snapshot of another disk")
	e.fail([]string{"--final", "live SOURCE"}, "migrate", "latest", "--host", "web1", target, "--state", state, "--final")
	check("--final")
	e.fail([]string{"--pre-freeze", "live SOURCE"}, "migrate", "latest", "--host", "web1", target, "--state", state, "--pre-freeze", "true")
	e.fail([]string{"--host", "not one"}, "migrate", img, target, "--state", state, "--host", "web1")
	check("flags refused")
	// A snapshot of two disks: --disk names the one to migrate.
	two := e.backup(img, other, "--host", "pair")
	e.fail([]string{"holds 2 disks", "--disk"}, "migrate", two.ShortID, e.path("pair.raw"))
	if _, err := os.Stat(e.path("pair.raw")); err == nil {
		t.Fatal("a refused migration created its target")
	}
	snapMigrate(t, e, two.ShortID, e.path("pair.raw"), "--disk", "db1.img")
	sameFile(t, other, e.path("pair.raw"))
	// A write-only key reads no snapshot: restore's refusal.
	wkey := e.path("writer.key")
	e.ok("key", "export", "--write-only", "--name", "web1", wkey)
	w := newBareEnv(t)
	w.setenv("SAUVE_REPO", e.repo)
	w.setenv("SAUVE_KEY", wkey)
	detOneError(t, w.fail([]string{"migrate of snapshot " + b1.ShortID, "write-only"}, "migrate", b1.ShortID, target, "--state", state))
	check("a write-only key")

	// A damaged pack of the second backup: the pass fails naming it,
	// exit non-zero.
	before := map[string]bool{}
	for _, p := range packFiles(t, e.repo) {
		before[p] = true
	}
	rewriteFiles(t, e, img, 0, 6)
	b2 := e.backup(img, "--host", "web1")
	var damaged, name string
	for _, p := range packFiles(t, e.repo) {
		if fi, _ := os.Stat(p); !before[p] && fi.Size() > 1<<20 {
			damaged, name = p, filepath.Base(p)
		}
	}
	if damaged == "" {
		t.Fatal("no pack of the second backup")
	}
	saved := mustRead(t, damaged)
	bad := bytes.Clone(saved)
	for i := len(bad) / 3; i < len(bad)/3+64; i++ {
		bad[i] ^= 0x5a
	}
	os.Chmod(damaged, 0o600)
	writeFile(t, damaged, bad)
	r := e.run("migrate", "latest", "--host", "web1", target, "--state", state)
	if r.code == 0 || !strings.Contains(r.stderr, name[:8]) {
		t.Fatalf("pass over a damaged pack: exit %d\n%s", r.code, r.stderr)
	}
	detOneError(t, r.stderr)
	writeFile(t, damaged, saved)
	snapMigrate(t, e, "latest", "--host", "web1", target, "--state", state)
	sameImage(t, restored(t, e, b2.ShortID), target, "raw")
}

// kill -9 during passes from snapshots: the first pass, then a delta
// pass from a second snapshot, each killed once a batch of its writes is
// durable and recorded (the state's journal holds their hashes); a pass
// from the first snapshot again then leaves the target the first
// snapshot exactly (what the killed pass wrote of the second is read
// again, though the state knows it), and one from latest the second.
func TestMigrateSnapshotKill9(t *testing.T) {
	needTools(t, "mkfs.ext4", "sfdisk")
	requireRoot(t)
	e := newEnv(t)
	img := snapDisk(t, e, "big.img", 160<<20, 100)
	b1 := e.backup(img)
	target, state := e.path("t.raw"), e.path("t.state")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	kill := func(snap string) {
		t.Helper()
		c := e.cmd(nil, "migrate", snap, target, "--state", state, "--limit-rate", "32M", "--progress", "always")
		var stderr bytes.Buffer
		c.Stderr = &stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		// A batch is 64 MiB: 256 chunks of 256 KiB marked unknown, then
		// their hashes, 48 bytes a record after a 40-byte header.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if fi, err := os.Stat(state + ".journal"); err == nil && fi.Size() > 40+256*48 {
				break
			}
			if time.Now().After(deadline) {
				c.Process.Kill()
				t.Fatalf("no batch recorded by the pass from %s", snap)
			}
		}
		time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
		c.Process.Signal(syscall.SIGKILL)
		if err := c.Wait(); err == nil {
			t.Fatalf("the pass from %s ended before kill -9", snap)
		}
		if !strings.Contains(stderr.String(), "pass snapshot "+snap) {
			t.Errorf("progress of the pass from %s:\n%s", snap, stderr.String())
		}
	}
	kill(b1.ShortID)
	snapMigrate(t, e, b1.ShortID, target, "--state", state)
	sameImage(t, restored(t, e, b1.ShortID), target, "raw")
	// One round here, 6 with SAUVE_SOAK=1.
	prev := b1
	for range soakRounds(1, 6) {
		rewriteFiles(t, e, img, 0, 100)
		next := e.backup(img)
		kill(next.ShortID)
		p, _ := snapMigrate(t, e, prev.ShortID, target, "--state", state)
		if p.FullRead != "" || p.ChunksUnread == 0 {
			t.Errorf("pass from %s after a killed one from %s: %+v", prev.ShortID, next.ShortID, p)
		}
		sameImage(t, restored(t, e, prev.ShortID), target, "raw")
		snapMigrate(t, e, "latest", target, "--state", state)
		sameImage(t, restored(t, e, next.ShortID), target, "raw")
		prev = next
	}
}

func ptrOr(p *int64) int64 {
	if p == nil {
		return -1
	}
	return *p
}

// --test-boot after a pass from a snapshot boots the VM image made of it.
func TestMigrateSnapshotTestBoot(t *testing.T) {
	needTools(t, "qemu-system-x86_64", "qemu-img")
	e := newEnv(t)
	src := e.path("boot.img")
	line := "SAUVE SNAPSHOT BOOT " + fmt.Sprintf("%x", randomBytes(4))
	bootDisk(t, src, line)
	b := e.backup(src)
	target := e.path("target.qcow2")
	out := e.ok("migrate", b.ShortID, target, "--test-boot", "--boot-marker", line, "--boot-accel", "tcg", "--boot-memory", "32", "--boot-timeout", "60s")
	if !strings.Contains(out, "test boot: "+target+" reached") {
		t.Fatalf("--test-boot did not report the boot:\n%s", out)
	}
	sameImage(t, restored(t, e, b.ShortID), target, "qcow2")
}

// A snapshot migrated onto an ssh:// target, then a delta from a later
// snapshot: the remote file is each snapshot's restore.
func TestMigrateSnapshotSSH(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "sfdisk")
	s := startSSHTarget(t)
	e := s.e
	e.ok("init")
	img := snapDisk(t, e, "web1.img", 48<<20, 6)
	b1 := e.backup(img)
	target := filepath.Join(t.TempDir(), "web1.img")
	snapMigrate(t, e, "latest", s.url(target))
	sameImage(t, restored(t, e, b1.ShortID), target, "raw")
	rewriteFiles(t, e, img, 1, 2)
	b2 := e.backup(img)
	p, _ := snapMigrate(t, e, "latest", s.url(target))
	if differ := diffBytes(t, e, b1.ShortID, b2.ShortID); p.ChunksUnread == 0 || p.BytesRead > differ || p.BytesWritten > differ {
		t.Errorf("delta pass over SSH: %+v (the snapshots differ in %d bytes)", p, differ)
	}
	sameImage(t, restored(t, e, b2.ShortID), target, "raw")
}
