package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// migratePass is a pass's --json line, migrateSummary the last line.
type migratePass struct {
	Pass          int     `json:"pass"`
	BytesRead     int64   `json:"bytes_read"`
	BytesWritten  int64   `json:"bytes_written"`
	BytesChanged  int64   `json:"bytes_changed"`
	ChunksChanged int64   `json:"chunks_changed"`
	ChunksFree    int64   `json:"chunks_free"`
	Seconds       float64 `json:"seconds"`
	ChangeRate    float64 `json:"change_rate"`
	CopyRate      float64 `json:"copy_rate"`
	NextSeconds   float64 `json:"next_seconds"`
	Final         bool    `json:"final"`
}

type migrateSummary struct {
	Summary       bool     `json:"summary"`
	Passes        int      `json:"passes"`
	Final         bool     `json:"final"`
	FrozenSeconds float64  `json:"frozen_seconds"`
	FrozenMounts  []string `json:"frozen_mounts"`
	BytesWritten  int64    `json:"bytes_written"`
}

// parseMigrate reads migrate's --json output: a line a pass, then the
// summary.
func parseMigrate(t *testing.T, out string) ([]migratePass, migrateSummary) {
	t.Helper()
	var passes []migratePass
	var sum migrateSummary
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, `{"error":`) {
			continue
		}
		if strings.Contains(line, `"summary":true`) {
			if err := jsonUnmarshal(line, &sum); err != nil {
				t.Fatal(err)
			}
			continue
		}
		var p migratePass
		if err := jsonUnmarshal(line, &p); err != nil {
			t.Fatalf("migrate --json line %q: %v", line, err)
		}
		passes = append(passes, p)
	}
	if !sum.Summary || len(passes) != sum.Passes {
		t.Fatalf("migrate --json: %d passes, summary %+v:\n%s", len(passes), sum, out)
	}
	return passes, sum
}

// mountedExt4 makes an ext4 image of size bytes, mounts it read-write
// through a loop device and fills it with data MiB of random files.
func mountedExt4(t *testing.T, e *env, name string, size int64, data int) (img, mnt string) {
	t.Helper()
	img = e.path(name + ".img")
	sh(t, "truncate", "-s", fmt.Sprint(size), img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	mnt = e.path(name)
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", "-o", "loop", img, mnt)
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", mnt).Run(); exec.Command("umount", mnt).Run() })
	for i := 0; i < data; i++ {
		writeFile(t, filepath.Join(mnt, fmt.Sprintf("data%02d", i)), randomBytes(1<<20))
	}
	sh(t, "sync")
	return img, mnt
}

// writer writes and rewrites files in dir until stopped, each synced so
// that passes see it (what stays in the page cache reaches the image
// only at the freeze).
type writer struct {
	stop atomic.Bool
	wg   sync.WaitGroup
	n    atomic.Int64
}

func startWriter(dir string, pause time.Duration) *writer {
	w := &writer{}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for i := 0; !w.stop.Load(); i++ {
			if f, err := os.Create(filepath.Join(dir, fmt.Sprintf("busy%d", i%16))); err == nil {
				f.Write(randomBytes(256 << 10))
				if i%2 == 0 {
					f.Sync()
				}
				f.Close()
			}
			w.n.Add(1)
			time.Sleep(pause)
		}
	}()
	return w
}

func (w *writer) halt() {
	w.stop.Store(true)
	w.wg.Wait()
}

// checkTarget checks that the target's filesystem is clean and, when
// want is set, holds the same files.
func checkTarget(t *testing.T, target string, want map[string]string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", target).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of the target: %v\n%s", err, out)
	}
	if want == nil {
		return
	}
	dir, err := os.MkdirTemp("", "sauve-mig")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	// noload: the frozen journal is flushed; nothing is replayed.
	sh(t, "mount", "-o", "ro,loop,noload", target, dir)
	got := hashTree(t, dir)
	sh(t, "umount", dir)
	sameTree(t, want, got)
}

// A loop-mounted ext4 written to during the passes: the first pass
// copies it, a delta pass writes much less for a small change, --final
// freezes it (the target then checks clean though the writer runs), and
// once writes stop a last --final leaves every file equal.
func TestMigrateLoopMountedExt4(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img, mnt := mountedExt4(t, e, "src", 96<<20, 24)
	target := e.path("target.img")
	// 40 MiB of the image file allocated, and free in the filesystem.
	writeFile(t, filepath.Join(mnt, "freed"), randomBytes(40<<20))
	sh(t, "sync")
	os.Remove(filepath.Join(mnt, "freed"))
	sh(t, "sync")
	w := startWriter(mnt, 20*time.Millisecond)
	defer w.halt()
	first, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
	if first[0].BytesWritten < 24<<20 || first[0].Pass != 1 {
		t.Fatalf("first pass: %+v", first[0])
	}
	second, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
	if second[0].Pass != 2 || second[0].ChangeRate <= 0 || second[0].CopyRate <= 0 || second[0].NextSeconds <= 0 {
		t.Errorf("second pass while written: %+v", second[0])
	}
	w.halt()
	sh(t, "sync")
	// Let the journal commit what the writer left, then change 1 MiB.
	parseMigrate(t, e.ok("migrate", img, target, "--json"))
	writeFile(t, filepath.Join(mnt, "small"), randomBytes(1<<20))
	sh(t, "sync")
	delta, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
	if d := delta[0]; d.BytesWritten == 0 || d.BytesWritten > first[0].BytesWritten/6 || d.BytesRead < 24<<20 {
		t.Errorf("delta pass for a 1 MiB file: wrote %d bytes (first pass %d), read %d", d.BytesWritten, first[0].BytesWritten, d.BytesRead)
	}
	// The final pass while the writer runs: the target is the frozen
	// filesystem, consistent.
	w = startWriter(mnt, 5*time.Millisecond)
	passes, sum := parseMigrate(t, e.ok("migrate", img, target, "--final", "--json"))
	w.halt()
	if len(passes) != 1 || !passes[0].Final || !sum.Final || sum.FrozenSeconds <= 0 || sum.FrozenSeconds > 10 || len(sum.FrozenMounts) != 1 || sum.FrozenMounts[0] != mnt {
		t.Fatalf("final pass: %+v, summary %+v", passes, sum)
	}
	// Frozen, the filesystem's free space stands still: skipped.
	if p := passes[0]; p.BytesRead > delta[0].BytesRead-32<<20 {
		t.Errorf("final pass of a frozen filesystem: read %d bytes, the pass before it (not frozen: read in full) %d: want its free space skipped", p.BytesRead, delta[0].BytesRead)
	}
	before := w.n.Load()
	checkTarget(t, target, nil)
	// Thawed: writes go on.
	writeFile(t, filepath.Join(mnt, "after"), []byte("after the cut-over"))
	out := e.ok("migrate", img, target, "--final")
	if !strings.Contains(out, "cut-over: writes to "+mnt+" were frozen for ") {
		t.Errorf("final pass output:\n%s", out)
	}
	checkTarget(t, target, hashTree(t, mnt))
	if before == 0 {
		t.Error("the writer wrote nothing")
	}
}

// TestMigrateKill9Resume kills passes (-9) at random moments, copy and
// final ones, while a writer writes: the filesystem is thawed after each
// killed final pass, and the next --final leaves an exact target.
func TestMigrateKill9Resume(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img, mnt := mountedExt4(t, e, "src", 64<<20, 16)
	target := e.path("target.img")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	w := startWriter(mnt, 10*time.Millisecond)
	defer w.halt()
	kill := func(args ...string) {
		t.Helper()
		c := e.cmd(nil, append([]string{"migrate", img, target, "--limit-rate", "16M"}, args...)...)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		after := time.Duration(100+rng.IntN(700)) * time.Millisecond // a pass takes over 1 s at 16M/s
		time.Sleep(after)
		c.Process.Signal(syscall.SIGKILL)
		if err := c.Wait(); err == nil {
			t.Fatalf("the pass ended before kill -9 after %s", after)
		}
		t.Logf("killed %v after %s", args, after)
	}
	// One round here; 8 with SAUVE_SOAK=1, each killing a copy pass
	// twice and a final pass once at random moments.
	for round := range soakRounds(1, 8) {
		kill()
		if round == 0 {
			e.ok("migrate", img, target)
		}
		kill()
		kill("--final")
		// The guard thawed the filesystem.
		done := make(chan error, 1)
		go func() { done <- os.WriteFile(filepath.Join(mnt, "thawed"), []byte("x"), 0o644) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: the filesystem stayed frozen after the final pass was killed", round)
		}
	}
	w.halt()
	e.ok("migrate", img, target, "--final")
	checkTarget(t, target, hashTree(t, mnt))
}

// --until-delta stops once a pass changes little, and exits 3 when the
// source changes faster than the copy.
func TestMigrateUntilDelta(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img, mnt := mountedExt4(t, e, "src", 64<<20, 8)
	target := e.path("target.img")
	passes, _ := parseMigrate(t, e.ok("migrate", img, target, "--until-delta", "4M", "--json"))
	if len(passes) < 2 || passes[len(passes)-1].BytesChanged > 4<<20 {
		t.Fatalf("--until-delta 4M on an idle source: %+v", passes)
	}
	// With --final: passes until the goal, then the frozen one.
	writeFile(t, filepath.Join(mnt, "more"), randomBytes(8<<20))
	sh(t, "sync")
	passes, sum := parseMigrate(t, e.ok("migrate", img, target, "--until-delta", "4M", "--final", "--json"))
	if n := len(passes); n < 2 || passes[0].BytesChanged < 8<<20 || passes[n-2].BytesChanged > 4<<20 || !passes[n-1].Final || passes[n-2].Final || sum.FrozenSeconds <= 0 {
		t.Fatalf("--until-delta 4M --final: %+v, %+v", passes, sum)
	}
	// A writer rewriting 4 MiB every 40 ms outruns passes throttled to
	// about 2 s each.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f, err := os.Create(filepath.Join(mnt, fmt.Sprintf("churn%d", i%4)))
			if err == nil {
				f.Write(randomBytes(4 << 20))
				f.Sync()
				f.Close()
			}
			time.Sleep(40 * time.Millisecond)
		}
	}()
	r := e.run("migrate", img, target, "--until-delta", "1M", "--limit-rate", "48M", "--max-passes", "7", "--json")
	close(stop)
	wg.Wait()
	if r.code != 3 || !strings.Contains(r.stderr, "--until-delta") && !strings.Contains(r.stderr, "faster than the copy") {
		t.Fatalf("a source changing faster than the copy: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	passes, sum = parseMigrate(t, r.stdout)
	if len(passes) < 4 || sum.Final {
		t.Errorf("non-convergence after %d passes: %+v", len(passes), sum)
	}
}

// Bad input: a one-line error, a non-zero exit, and nothing written.
func TestMigrateRefusals(t *testing.T) {
	needTools(t, "mkfs.ext4")
	e := newBareEnv(t)
	src := e.path("src.img")
	randomFile(t, src, 8<<20)
	other := e.path("other.img")
	randomFile(t, other, 8<<20)
	small := e.path("small.img")
	randomFile(t, small, 4<<20)
	_, mnt := mountedExt4(t, e, "busy", 16<<20, 0)
	busy := e.path("busy.img")
	_ = mnt
	loop := losetup(t, src)
	state := e.path("s.state")
	done := e.path("done.img")
	e.ok("migrate", other, done, "--state", state)
	doneHash := fileHash(t, done, -1)
	fifo := e.path("fifo")
	syscall.Mkfifo(fifo, 0o600)
	for _, c := range []struct {
		name   string
		args   []string
		target string // must be left as it was (or not created)
		want   string
	}{
		{"smaller target", []string{src, small}, small, "would not fit"},
		{"mounted target", []string{src, busy}, busy, "mounted"},
		{"target is the source", []string{src, src}, src, "is the source"},
		{"loop device over the source", []string{src, loop}, src, "loop device over the source"},
		{"state of another source", []string{src, done, "--state", state}, done, "of another source"},
		{"stream source", []string{fifo, e.path("new1.img")}, e.path("new1.img"), "is a stream"},
		{"remote target out of reach", []string{src, "ssh://root@127.0.0.1:1/dev/vdb"}, "", "target ssh://root@127.0.0.1:1/dev/vdb: "},
	} {
		t.Run(c.name, func(t *testing.T) {
			var before string
			if _, err := os.Stat(c.target); err == nil {
				before = fileHash(t, c.target, -1)
			}
			stderr := e.fail([]string{c.want}, append([]string{"migrate"}, c.args...)...)
			if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
				t.Errorf("a %d-line error:\n%s", n+1, stderr)
			}
			if c.target == "" {
				return
			}
			if _, err := os.Stat(c.target); before == "" && err == nil {
				t.Errorf("%s was created", c.target)
			} else if before != "" && fileHash(t, c.target, -1) != before {
				t.Errorf("%s was written", c.target)
			}
		})
	}
	if fileHash(t, done, -1) != doneHash {
		t.Error("the migrated target was written by a refused command")
	}
	// A state in use by another migration.
	lock, err := os.OpenFile(state+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	e.fail([]string{"in use by another sauve migrate"}, "migrate", other, done, "--state", state)
	if fileHash(t, done, -1) != doneHash {
		t.Error("the target was written while its state was locked")
	}
}

// A block device target (a loop device over a larger file of old
// bytes): its zero chunks are zeroed at the first pass, and the final
// pass leaves the same files; a source whose filesystem was made again
// (another UUID, the same file) is refused with the state of the old one.
func TestMigrateOntoBlockDevice(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img, mnt := mountedExt4(t, e, "src", 32<<20, 4)
	back := e.path("disk.raw")
	randomFile(t, back, 40<<20)
	dev := losetup(t, back)
	passes, _ := parseMigrate(t, e.ok("migrate", img, dev, "--json"))
	if p := passes[0]; p.BytesChanged != 32<<20 {
		t.Errorf("first pass onto a device of old bytes changed %d bytes, want all %d", p.BytesChanged, 32<<20)
	}
	writeFile(t, filepath.Join(mnt, "late"), randomBytes(300<<10))
	// A state on the filesystem to freeze would block the final pass.
	before := fileHash(t, dev, -1)
	e.fail([]string{"which the final pass freezes"}, "migrate", img, dev, "--final", "--state", filepath.Join(mnt, "s.state"))
	if fileHash(t, dev, -1) != before {
		t.Error("the target was written by a refused final pass")
	}
	e.ok("migrate", img, dev, "--final")
	checkTarget(t, dev, hashTree(t, mnt))
	sh(t, "umount", mnt)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	before = fileHash(t, dev, -1)
	e.fail([]string{"of another source", "filesystem UUIDs"}, "migrate", img, dev)
	if fileHash(t, dev, -1) != before {
		t.Error("the target was written with the state of another filesystem")
	}
	e.ok("migrate", img, dev, "--reset")
	checkTarget(t, dev, nil)
	sameUsedBlocks(t, e, img, dev)
}

// sameUsedBlocks fails unless the ext4 filesystems at a and b hold the
// same used blocks, metadata and data (e2image -ra copies those alone,
// free space as zeros): what a migration must copy, free space being
// anything.
func sameUsedBlocks(t *testing.T, e *env, a, b string) {
	t.Helper()
	ra, rb := e.path("used-a.raw"), e.path("used-b.raw")
	defer os.Remove(ra)
	defer os.Remove(rb)
	sh(t, "e2image", "-ra", a, ra)
	sh(t, "e2image", "-ra", b, rb)
	if out, err := exec.Command("cmp", ra, rb).CombinedOutput(); err != nil {
		t.Errorf("the used blocks of %s and %s differ: %v %s", a, b, err, out)
	}
}

// A block device source mounted read-write, and an image file mounted
// through a loop device that writes around the file's page cache: each
// pass reads what the filesystem wrote since the previous one, not the
// page cache of the previous pass.
func TestMigrateMountedDevice(t *testing.T) {
	for _, c := range []struct {
		name   string
		device bool
	}{{"device", true}, {"image under a direct-io loop device", false}} {
		t.Run(c.name, func(t *testing.T) { testMigrateMounted(t, c.device) })
	}
}

func testMigrateMounted(t *testing.T, device bool) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img := e.path("src.img")
	sh(t, "truncate", "-s", "48M", img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	dev := losetup(t, img, "--direct-io=on")
	src := img
	if device {
		src = dev
	}
	mnt := e.path("src")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", mnt).Run(); exec.Command("umount", mnt).Run() })
	for i := 0; i < 8; i++ {
		writeFile(t, filepath.Join(mnt, fmt.Sprintf("f%d", i)), randomBytes(1<<20))
	}
	sh(t, "sync")
	target := e.path("target.img")
	e.ok("migrate", src, target)
	// Rewrite the files in place: the same blocks, new bytes.
	for i := 0; i < 8; i++ {
		writeAt(t, filepath.Join(mnt, fmt.Sprintf("f%d", i)), 0, randomBytes(1<<20))
	}
	sh(t, "sync")
	passes, _ := parseMigrate(t, e.ok("migrate", src, target, "--json"))
	if passes[0].BytesChanged < 8<<20 {
		t.Errorf("8 MiB rewritten in place, the pass found %d bytes changed", passes[0].BytesChanged)
	}
	for i := 0; i < 4; i++ {
		writeAt(t, filepath.Join(mnt, fmt.Sprintf("f%d", i)), 4096, randomBytes(64<<10))
	}
	out := e.ok("migrate", src, target, "--final")
	if !strings.Contains(out, "frozen for") {
		t.Errorf("final pass:\n%s", out)
	}
	checkTarget(t, target, hashTree(t, mnt))
}

// TestMigrateTestBoot migrates the serial-printing boot disk and boots
// the target under QEMU (TCG) with --test-boot: the guest's line is
// seen, the target is left as it was; a target that does not boot
// exits 4 with the console's tail.
func TestMigrateTestBoot(t *testing.T) {
	needTools(t, "qemu-system-x86_64")
	e := newBareEnv(t)
	src := e.path("boot.img")
	line := "SAUVE MIGRATED BOOT " + hex.EncodeToString(randomBytes(4))
	bootDisk(t, src, line)
	target := e.path("target.img")
	out := e.ok("migrate", src, target, "--test-boot", "--boot-marker", line, "--boot-accel", "tcg", "--boot-memory", "32", "--boot-timeout", "60s")
	if !strings.Contains(out, "test boot: "+target+" reached") {
		t.Fatalf("--test-boot did not report the boot:\n%s", out)
	}
	before := fileHash(t, target, -1)
	r := e.run("migrate", src, target, "--test-boot", "--boot-marker", "never printed", "--boot-accel", "tcg", "--boot-memory", "32", "--boot-timeout", "5s")
	if r.code != 4 || !strings.Contains(r.stdout, "did not reach") || !strings.Contains(r.stdout, line) {
		t.Errorf("a marker never printed: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if fileHash(t, target, -1) != before {
		t.Error("the test boot wrote the target")
	}
}

// TestMigrateSize migrates a GPT disk onto a larger new raw target: after
// --final the backup GPT is at the target's end and the last partition
// grown (sgdisk -v clean), the other partitions as the source; the state
// is gone, so a later pass copies everything again. Growth needs --final
// and a raw target.
func TestMigrateSize(t *testing.T) {
	needTools(t, "sfdisk", "sgdisk", "mkfs.ext4")
	e := newEnv(t)
	src, fs := partDisk(t, e)
	target := e.path("bigger.img")
	out := e.ok("migrate", src, target, "--size", "48M", "--final", "--grow-last-partition")
	if !strings.Contains(out, "moved the backup GPT") || !strings.Contains(out, "grew partition 3") {
		t.Errorf("migrate --size did not say what it grew:\n%s", out)
	}
	if fi, err := os.Stat(target); err != nil || fi.Size() != 48<<20 {
		t.Fatalf("target: %v, %v", fi, err)
	}
	if o, err := exec.Command("sgdisk", "-v", target).CombinedOutput(); err != nil || !strings.Contains(string(o), "No problems found") {
		t.Errorf("sgdisk -v of the grown target: %v\n%s", err, o)
	}
	got, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[2<<20:10<<20], fs) {
		t.Error("partition 2 differs from the source's")
	}
	sf := sh(t, "sfdisk", "-J", target)
	var p struct {
		PartitionTable struct {
			Partitions []struct{ Start, Size int64 }
		}
	}
	if err := json.Unmarshal([]byte(sf), &p); err != nil || len(p.PartitionTable.Partitions) != 3 {
		t.Fatalf("sfdisk -J: %v\n%s", err, sf)
	}
	if last := p.PartitionTable.Partitions[2]; (last.Start+last.Size)*512 < 47<<20 {
		t.Errorf("the last partition ends at %d, not near the target's end", (last.Start+last.Size)*512)
	}
	// The state is gone: the next pass copies the whole disk again.
	var passes []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(e.ok("migrate", src, target, "--json")), "\n") {
		var v map[string]any
		if json.Unmarshal([]byte(line), &v) == nil && v["summary"] == nil {
			passes = append(passes, v)
		}
	}
	if len(passes) != 1 || passes[0]["bytes_written"].(float64) < float64(len(fs)) {
		t.Errorf("the pass after growth: %v", passes)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"migrate", src, e.path("x.img"), "--grow-last-partition"}, "add --final"},
		{[]string{"migrate", src, e.path("x.qcow2"), "--size", "64M", "--final", "--grow-last-partition", "--grow-fs"}, "grow it inside the VM"},
		{[]string{"migrate", src, e.path("x.img"), "--size", "lots"}, "want a size"},
	} {
		r := e.run(c.args...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, %q", c.args, r.code, r.stderr)
		}
	}
}

// finalPassJSON is what the final pass's --json line and the summary say
// of its instant and of the applications held around it.
type finalPassJSON struct {
	Pass    int          `json:"pass"`
	Final   bool         `json:"final"`
	Start   time.Time    `json:"start"`
	Seconds float64      `json:"seconds"`
	Summary bool         `json:"summary"`
	Frozen  float64      `json:"frozen_seconds"`
	Quiesce *quiesceJSON `json:"quiesce"`
}

// parseFinal returns the final pass's line and the summary of a
// migrate --final --json.
func parseFinal(t *testing.T, out string) (pass, sum finalPassJSON) {
	t.Helper()
	parseMigrate(t, out)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var v finalPassJSON
		if err := jsonUnmarshal(line, &v); err != nil {
			t.Fatalf("migrate --json line %q: %v", line, err)
		}
		switch {
		case v.Summary:
			sum = v
		case v.Final:
			pass = v
		}
	}
	if !pass.Final {
		t.Fatalf("no final pass:\n%s", out)
	}
	return pass, sum
}

// hookLog reads the hooks' log: a line per command run, its phase and
// the time it ran (date +%s.%N).
func hookLog(t *testing.T, path string) (phases []string, at []time.Time) {
	t.Helper()
	for _, line := range strings.Split(strings.TrimSpace(string(mustRead(t, path))), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			t.Fatalf("hook log line %q", line)
		}
		var sec, nsec int64
		if _, err := fmt.Sscanf(f[len(f)-1], "%d.%d", &sec, &nsec); err != nil {
			t.Fatalf("hook log line %q: %v", line, err)
		}
		phases = append(phases, strings.Join(f[:len(f)-1], " "))
		at = append(at, time.Unix(sec, nsec))
	}
	return phases, at
}

// writable fails the test unless a file can be written on mnt within
// 10 s: the filesystem is not left frozen.
func writable(t *testing.T, mnt, what string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(mnt, "thawed"), []byte(what), 0o644) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: %s stayed frozen", what, mnt)
	}
}

// --final runs the pre-freeze hooks before the filesystem is frozen for
// the final pass and the post-thaw ones after it is thawed: what a
// pre-freeze command writes on the source is in the target, what a
// post-thaw one writes is not (and it could write: the filesystem was
// thawed), and the hooks' times frame the pass's. A failing pre-freeze
// command runs no final pass: exit non-zero, post-thaw run, the
// filesystem writable, the target and the state as they were; with
// --hook-failure continue the final pass runs and the summary says the
// cut-over is crash-consistent, and why. A final pass that fails while
// frozen (its freeze outlasted) still runs post-thaw.
func TestMigrateFinalHooks(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	e := newBareEnv(t)
	img, mnt := mountedExt4(t, e, "src", 48<<20, 4)
	target := e.path("target.img")
	e.ok("migrate", img, target)
	log := e.path("hooks.log")
	stamp := `"$SAUVE_PHASE $SAUVE_DISKS $(date +%s.%N)" >> ` + log
	post := "echo " + stamp

	// A failing pre-freeze command.
	before := fileHash(t, target, -1)
	r := e.run("migrate", img, target, "--final", "--pre-freeze", "echo 'the service would not stop' >&2; exit 3", "--post-thaw", post)
	if r.code == 0 || !strings.Contains(r.stderr, "the service would not stop") || !strings.Contains(r.stderr, "no final pass was run") {
		t.Fatalf("a failing pre-freeze: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if phases, _ := hookLog(t, log); len(phases) != 1 || phases[0] != "post-thaw "+img {
		t.Fatalf("after a failing pre-freeze the hooks ran %q, want post-thaw once", phases)
	}
	writable(t, mnt, "after a failing pre-freeze")
	if fileHash(t, target, -1) != before {
		t.Error("the target was written though the pre-freeze command failed")
	}
	os.Remove(log)

	// The same under --hook-failure continue.
	_, sum := parseFinal(t, e.ok("migrate", img, target, "--final", "--json", "--pre-freeze", "exit 3", "--post-thaw", post, "--hook-failure", "continue"))
	if q := sum.Quiesce; q == nil || q.Consistency != "crash" || !strings.Contains(q.Reason, "`exit 3` failed") || sum.Frozen <= 0 {
		t.Fatalf("--hook-failure continue: summary %+v, quiesce %+v", sum, sum.Quiesce)
	}
	os.Remove(log)

	// Hooks that work, timed around the frozen pass.
	pre := "echo " + stamp + " && echo held > " + filepath.Join(mnt, "prefreeze")
	post2 := "echo late > " + filepath.Join(mnt, "postthaw") + " && echo " + stamp
	out := e.ok("migrate", img, target, "--final", "--json", "--pre-freeze", pre, "--post-thaw", post2, "--hook-timeout", "5s")
	pass, sum := parseFinal(t, out)
	phases, at := hookLog(t, log)
	if len(phases) != 2 || phases[0] != "pre-freeze "+img || phases[1] != "post-thaw "+img {
		t.Fatalf("hooks ran %q", phases)
	}
	end := pass.Start.Add(time.Duration(pass.Seconds * float64(time.Second)))
	if !at[0].Before(pass.Start) || !at[1].After(end) {
		t.Errorf("pre-freeze at %s, post-thaw at %s: not around the final pass, %s to %s", at[0], at[1], pass.Start, end)
	}
	if q := sum.Quiesce; q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != "hooks" || !q.Writers[0].Frozen || q.WindowSeconds < sum.Frozen {
		t.Errorf("summary %+v, quiesce %+v: want application-consistent through hooks, held at least as long as frozen", sum, sum.Quiesce)
	}
	checkTarget(t, target, nil)
	dir, err := os.MkdirTemp("", "sauve-mig")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	sh(t, "mount", "-o", "ro,loop,noload", target, dir)
	got, err := os.ReadFile(filepath.Join(dir, "prefreeze"))
	_, lerr := os.Stat(filepath.Join(dir, "postthaw"))
	sh(t, "umount", dir)
	if err != nil || string(got) != "held\n" {
		t.Errorf("the pre-freeze command's file in the target: %q, %v", got, err)
	}
	if lerr == nil {
		t.Error("the post-thaw command's file is in the target: it ran before the final pass")
	}
	// The text summary says how the applications were held.
	os.Remove(log)
	if out := e.ok("migrate", img, target, "--final", "--post-thaw", post); !strings.Contains(out, "application-consistent: hooks held for") {
		t.Errorf("text summary:\n%s", out)
	}

	// A final pass whose freeze outlasts --freeze-timeout fails, and
	// post-thaw still runs once the filesystem is thawed.
	os.Remove(log)
	writeFile(t, filepath.Join(mnt, "more"), randomBytes(2<<20))
	r = e.run("migrate", img, target, "--final", "--post-thaw", post, "--freeze-timeout", "300ms", "--limit-rate", "8M")
	if r.code == 0 || !strings.Contains(r.stderr, "--freeze-timeout") {
		t.Fatalf("a final pass outlasting its freeze: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if phases, _ := hookLog(t, log); len(phases) != 1 || phases[0] != "post-thaw "+img {
		t.Errorf("after a failed final pass the hooks ran %q, want post-thaw once", phases)
	}
	writable(t, mnt, "after a final pass outlasting its freeze")

	// Holding flags without --final, and post-backup lines, are refused.
	hooks := e.path("hooks")
	writeFile(t, hooks, []byte("post-backup echo x\n"))
	for _, args := range [][]string{
		{"--pre-freeze", "true"},
		{"--final", "--hooks-file", hooks},
		{"--final", "--post-backup", "true"},
	} {
		if r := e.run(append([]string{"migrate", img, target}, args...)...); r.code == 0 {
			t.Errorf("migrate %v: exit 0", args)
		}
	}
}

// PostgreSQL under pgbench load, its PGDATA on a loop-mounted ext4
// migrated by passes: --final --writer postgresql checkpoints and holds
// it around the freeze; the summary says so; the target checks clean,
// and PostgreSQL started on it recovers by crash recovery alone to a
// state between the transactions committed before the final pass and
// after it, pgbench's balances agreeing.
func TestMigrateFinalPostgreSQL(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze")
	pi := pgInstalled(t) // skips, saying why, when PostgreSQL is absent
	e := newBareEnv(t)
	img := e.path("pg.img")
	sh(t, "truncate", "-s", "192M", img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	inner := pi.dir(t, "migsrc")
	sh(t, "mount", "-o", "loop", img, inner)
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", inner).Run(); exec.Command("umount", inner).Run() })
	data := pi.initCluster(t, inner, "48MB")
	src := pi.startPG(t, data, 6571)
	sh(t, pi.tool("pgbench"), append(src.conn(), "-i", "-q", "-s", "1", "postgres")...)
	src.psql(t, "postgres", "CHECKPOINT")

	bench := pi.startBench(t, src, e.path("pgbench.log"))
	target := e.path("target.img")
	e.ok("migrate", img, target)
	spec := fmt.Sprintf("postgresql:host=%s port=%d user=postgres dbname=postgres", src.sock, src.port)
	before := src.history(t)
	_, sum := parseFinal(t, e.ok("migrate", img, target, "--final", "--json", "--writer", spec))
	after := src.history(t)
	bench.stillRunning(t, "the migration")
	bench.stop()
	name := fmt.Sprintf("postgresql (%s:%d)", src.sock, src.port)
	if q := sum.Quiesce; q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != name || !q.Writers[0].Frozen || sum.Frozen <= 0 {
		t.Fatalf("summary %+v, quiesce %+v: want application-consistent through %s", sum, sum.Quiesce, name)
	}
	if after <= before {
		t.Fatal("no transaction committed during the final pass: it was not under load")
	}
	checkTarget(t, target, nil)
	withMount(t, "ext4", target, true, func(dir string) {
		tdata := filepath.Join(dir, "pgdata")
		// The copy names the live server's PID (see checkPGSnapshot).
		os.Remove(filepath.Join(tdata, "postmaster.pid"))
		s := pi.startPG(t, tdata, 6572)
		defer s.stop(t, syscall.SIGQUIT)
		if log := s.logText(); !strings.Contains(log, "automatic recovery in progress") {
			t.Errorf("the migrated cluster did not go through crash recovery:\n%s", log)
		}
		sums := s.psql(t, "postgres", `SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
			(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)`)
		if f := strings.Split(sums, "|"); len(f) != 4 || f[0] != f[1] || f[1] != f[2] || f[2] != f[3] {
			t.Errorf("accounts|branches|tellers|history sums %s: pgbench's invariant is broken", sums)
		}
		if n := s.history(t); n < before || n > after {
			t.Errorf("%d history rows, want between %d (committed before the final pass) and %d (after it)", n, before, after)
		}
		t.Logf("migrated cluster: %d transactions (%d before the final pass, %d after), frozen %.3f s, held %.3f s", s.history(t), before, after, sum.Frozen, sum.Quiesce.WindowSeconds)
		s.stop(t, syscall.SIGINT)
	})
}

// soakRounds is short rounds of a kill -9 loop, or long ones with
// SAUVE_SOAK=1.
func soakRounds(short, long int) int {
	if os.Getenv("SAUVE_SOAK") == "1" {
		return long
	}
	return short
}
