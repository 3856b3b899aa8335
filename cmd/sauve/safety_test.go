package main

import (
	"bytes"
	"encoding/json"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// packFiles lists the pack files of a repository.
func packFiles(t *testing.T, repo string) []string {
	t.Helper()
	var packs []string
	filepath.Walk(filepath.Join(repo, "data"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && !strings.HasPrefix(fi.Name(), ".") {
			packs = append(packs, p)
		}
		return nil
	})
	return packs
}

func TestKill9DuringBackup(t *testing.T) {
	e := newEnv(t, "--pack-size", "1M") // many packs, so kills land mid-stream
	src := e.path("disk.img")
	writeFile(t, src, append(randomBytes(64<<20), textBytes(10, 64<<20)...))
	rng := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 2))
	killed := 0
	versions := map[string]bool{}
	// How long a round's backup runs on this machine (fresh 32 MiB, the
	// rest deduplicated): kills land at random within it, whatever the
	// machine's speed.
	versions[fileHash(t, src, -1)] = true
	e.backup(src, "--tag", "calibration") // stores the part that never changes
	writeAt(t, src, 0, randomBytes(32<<20))
	versions[fileHash(t, src, -1)] = true
	t0 := time.Now()
	e.backup(src, "--tag", "calibration")
	span := time.Since(t0)
	for round := 0; round < 8; round++ {
		// Fresh data every round, so that each backup has work to be
		// killed in the middle of.
		writeAt(t, src, 0, randomBytes(32<<20))
		versions[fileHash(t, src, -1)] = true
		c := e.cmd(nil, "backup", src, "--tag", "killed")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(span/20 + time.Duration(rng.Int64N(int64(span)*8/10)))
		c.Process.Kill() // SIGKILL: no cleanup runs
		if err := c.Wait(); err != nil {
			killed++
		}
		// The repository passes check after every kill, whatever it
		// left behind.
		r := e.run("check")
		if r.code != 0 {
			t.Fatalf("round %d: check after kill -9 failed:\n%s%s", round, r.stdout, r.stderr)
		}
	}
	t.Logf("%d of 8 backups killed while running (a round's backup takes %s)", killed, span)
	if killed < 3 {
		t.Fatalf("only %d of 8 backups were killed while running (a backup takes %s here)", killed, span)
	}
	b := e.backup(src)
	e.ok("check", "--read-data")
	// Every snapshot there is, from a backup that finished before its
	// kill or from the last one, restores a version of the image exactly.
	var sn []struct{ ID string }
	e.okJSON(&sn, "snapshots")
	for _, s := range sn {
		out := e.path("out-" + s.ID[:8] + ".img")
		e.ok("restore", s.ID, out)
		if !versions[fileHash(t, out, -1)] {
			t.Fatalf("snapshot %s restores to none of the image's versions", s.ID[:8])
		}
		os.Remove(out)
	}
	out := e.path("out.img")
	e.ok("restore", b.Snapshot, out)
	sameFile(t, src, out)
	if len(sn) == 0 || sn[len(sn)-1].ID != b.Snapshot {
		t.Fatalf("the last backup is not the latest snapshot")
	}
}

// TestResumeAfterKill kills a backup once it has stored part of a disk and
// checks that the next run stores only the rest.
func TestResumeAfterKill(t *testing.T) {
	e := newEnv(t, "--pack-size", "1M")
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(96<<20)) // incompressible: one pack per ~4 chunks
	total := int64(96<<20) / chunk
	c := e.cmd(nil, "backup", src)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for len(packFiles(t, e.repo)) < 16 {
		if time.Now().After(deadline) {
			c.Process.Kill()
			t.Fatal("the backup wrote no packs within a minute")
		}
		time.Sleep(2 * time.Millisecond)
	}
	c.Process.Kill()
	if err := c.Wait(); err == nil {
		t.Fatal("the backup finished before it could be killed: make the image bigger")
	}
	stored := len(packFiles(t, e.repo))
	e.ok("check")
	b := e.backup(src)
	// Each pack holds at least 3 of the incompressible chunks.
	if b.ChunksNew > total-int64(3*stored) {
		t.Fatalf("after a kill with %d packs stored, the rerun stored %d of %d chunks again", stored, b.ChunksNew, total)
	}
	if b.ChunksReused < int64(3*stored) {
		t.Fatalf("the rerun reused only %d chunks of %d packs", b.ChunksReused, stored)
	}
	e.ok("check", "--read-data")
	out := e.path("out.img")
	e.ok("restore", b.Snapshot, out)
	sameFile(t, src, out)
}

func TestCorruptPackIsFound(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, textBytes(11, 6<<20))
	b := e.backup(src)
	packs := packFiles(t, e.repo)
	if len(packs) != 1 {
		t.Fatalf("%d packs", len(packs))
	}
	pack := packs[0]
	name := filepath.Base(pack)
	e.ok("check", "--read-data")

	data := mustRead(t, pack)
	data[len(data)/2] ^= 0x40
	os.Chmod(pack, 0o600)
	writeFile(t, pack, data)

	// Structure alone cannot see a flipped byte; reading the data does.
	e.ok("check")
	stderr := e.fail([]string{name, "damaged", b.ShortID}, "check", "--read-data")
	if !strings.Contains(stderr, "disk.img") {
		t.Errorf("check does not name the damaged disk:\n%s", stderr)
	}
	var rep struct {
		Errors  []string
		Damaged []struct {
			Snapshot string
			Ranges   []struct{ Offset, Length int64 }
		}
	}
	r := e.run("check", "--read-data", "--json")
	if r.code == 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil || len(rep.Damaged) != 1 || rep.Damaged[0].Snapshot != b.Snapshot || len(rep.Damaged[0].Ranges) == 0 {
		t.Fatalf("check --json: exit %d, %s", r.code, r.stdout)
	}

	// Restore refuses to write a wrong byte, names the pack, and leaves no
	// half-written new file.
	out := e.path("out.img")
	e.fail([]string{name}, "restore", "latest", out)
	if _, err := os.Stat(out); err == nil {
		t.Fatal("failed restore left a partial file")
	}
}

func TestMissingPackIsFound(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(3<<20))
	b := e.backup(src)
	for _, p := range packFiles(t, e.repo) {
		os.Remove(p)
	}
	e.fail([]string{"missing from the repository", b.ShortID}, "check")
}

func TestWriteOnlyKey(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, textBytes(12, 4<<20))
	first := e.backup(src)
	wkey := e.path("writer.key")
	e.ok("key", "export", "--write-only", "--name", "web1", wkey)
	if fi, _ := os.Stat(wkey); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}

	w := newBareEnv(t)
	w.setenv("SAUVE_REPO", e.repo)
	w.setenv("SAUVE_KEY", wkey)
	// The writer deduplicates against what the owner stored.
	b := w.backup(src)
	if b.ChunksNew != 0 {
		t.Fatalf("write-only backup stored %d chunks the repository had", b.ChunksNew)
	}
	writeAt(t, src, 0, randomBytes(chunk))
	b = w.backup(src)
	if b.ChunksNew != 1 {
		t.Fatalf("write-only backup stored %d new chunks, want 1", b.ChunksNew)
	}
	w.fail([]string{"write-only", "cannot decrypt"}, "restore", "latest", w.path("x.img"))
	w.fail([]string{"write-only"}, "restore", first.Snapshot, w.path("x.img"))
	if _, err := os.Stat(w.path("x.img")); err == nil {
		t.Fatal("refused restore created the target")
	}
	w.ok("check", "--read-data") // verifies what a write-only key can

	// The owner restores the writer's snapshot; its signature names web1.
	var sn []struct {
		ID, Signer string
	}
	e.okJSON(&sn, "snapshots")
	if len(sn) != 3 || sn[2].Signer != "web1" || sn[0].Signer != "owner" {
		t.Fatalf("signers: %+v", sn)
	}
	out := e.path("out.img")
	e.ok("restore", b.Snapshot, out)
	sameFile(t, src, out)
}

func TestPassphrase(t *testing.T) {
	e := newBareEnv(t)
	e.setenv("SAUVE_PASSPHRASE", "correct horse")
	e.ok("init")
	keys, _ := filepath.Glob(filepath.Join(e.dir, "config", "sauve", "keys", "*.key"))
	if len(keys) != 1 {
		t.Fatalf("key files: %v", keys)
	}
	if fi, _ := os.Stat(keys[0]); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(1<<20))
	e.backup(src)

	e.setenv("SAUVE_PASSPHRASE", "wrong horse")
	e.fail([]string{"wrong passphrase"}, "snapshots")
	e.fail([]string{"wrong passphrase"}, "restore", "latest", e.path("x.img"))
	var kept []string
	for _, kv := range e.vars {
		if !strings.HasPrefix(kv, "SAUVE_PASSPHRASE=") {
			kept = append(kept, kv)
		}
	}
	e.vars = kept
	e.fail([]string{"protected by a passphrase", "SAUVE_PASSPHRASE"}, "snapshots")

	e.setenv("SAUVE_PASSPHRASE", "correct horse")
	e.setenv("SAUVE_NEW_PASSPHRASE", "battery staple")
	e.ok("key", "passwd")
	e.fail([]string{"wrong passphrase"}, "snapshots")
	e.setenv("SAUVE_PASSPHRASE", "battery staple")
	out := e.path("out.img")
	e.ok("restore", "latest", out)
	sameFile(t, src, out)
}

func TestTamperedManifest(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(1<<20))
	b := e.backup(src)
	snap := filepath.Join(e.repo, "snapshots", b.Snapshot)
	data := mustRead(t, snap)
	data[len(data)-20] ^= 1
	os.WriteFile(snap, data, 0o600)
	// check reads the repository, never the cache; a restore from a
	// machine without a cached copy must refuse it too.
	e.fail([]string{b.ShortID, "failed verification"}, "check")
	e.fail([]string{b.ShortID, "failed verification"}, "restore", b.Snapshot, e.path("x.img"), "--no-cache")

	// A manifest made by another repository's key, under this one's
	// name, is refused too.
	other := newEnv(t)
	writeFile(t, other.path("d.img"), randomBytes(1000))
	ob := other.backup(other.path("d.img"))
	os.WriteFile(filepath.Join(e.repo, "snapshots", ob.Snapshot), mustRead(t, filepath.Join(other.repo, "snapshots", ob.Snapshot)), 0o600)
	e.fail([]string{ob.ShortID, "failed verification"}, "restore", ob.Snapshot, e.path("y.img"))
	e.fail([]string{ob.ShortID, "failed verification"}, "check")
}

func TestWrongKey(t *testing.T) {
	a, b := newEnv(t), newEnv(t)
	keys, _ := filepath.Glob(filepath.Join(b.dir, "config", "sauve", "keys", "*.key"))
	a.setenv("SAUVE_KEY", keys[0])
	a.fail([]string{"belongs to repository"}, "snapshots")
	a.setenv("SAUVE_KEY", a.path("none.key"))
	a.fail([]string{"none.key", "does not exist"}, "snapshots")
	writeFile(t, a.path("junk.key"), []byte("not a key"))
	a.setenv("SAUVE_KEY", a.path("junk.key"))
	a.fail([]string{"junk.key", "not a sauve key file"}, "snapshots")
}

func TestFullDiskFailsCleanly(t *testing.T) {
	requireRoot(t)
	e := newBareEnv(t)
	mnt := e.path("small")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt)
	defer exec.Command("umount", mnt).Run()
	e.repo = filepath.Join(mnt, "repo")
	e.setenv("SAUVE_REPO", e.repo)
	e.ok("init", "--pack-size", "1M")
	small := e.path("small.img")
	writeFile(t, small, randomBytes(1<<20))
	first := e.backup(small)

	big := e.path("big.img")
	writeFile(t, big, randomBytes(12<<20))
	stderr := e.fail([]string{"no space left on device"}, "backup", big)
	if strings.Count(strings.TrimSpace(stderr), "\n") > 2 {
		t.Errorf("a full disk should give a short error, got:\n%s", stderr)
	}
	// Nothing already stored is lost, and check passes.
	e.ok("check", "--read-data")
	out := e.path("out.img")
	e.ok("restore", first.Snapshot, out)
	sameFile(t, small, out)
	var sn []json.RawMessage
	e.okJSON(&sn, "snapshots")
	if len(sn) != 1 {
		t.Fatalf("%d snapshots after a failed backup", len(sn))
	}
}

var _ = bytes.Equal
