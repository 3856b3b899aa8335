package main

// forget and prune end to end, on a local folder and through the test
// servers for S3 (versitygw) and Azure (Azurite): what prune frees, that
// kept snapshots restore byte-exact and check --read-data passes, kill -9
// at random moments, and a backup under a write-only key running in
// another process (another "host") while prune runs.

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pruneTargets are the repositories prune is tested on.
var pruneTargets = []struct {
	name  string
	start func(t *testing.T) *env
}{
	{"local", func(t *testing.T) *env { return newBareEnv(t) }},
	{"s3", func(t *testing.T) *env { return remoteEnv(t, s3Remote(t)) }},
	{"azure", func(t *testing.T) *env { return remoteEnv(t, azureRemote(t)) }},
}

type pruneOut struct {
	Snapshots int `json:"snapshots"`
	Stored    struct {
		Packs int   `json:"packs"`
		Bytes int64 `json:"bytes"`
	} `json:"stored"`
	Condemned, Repacked, Deleted, Waiting, After, Young struct {
		Packs int   `json:"packs"`
		Bytes int64 `json:"bytes"`
	}
	RepackedBlobs int   `json:"repacked_blobs"`
	BytesRead     int64 `json:"bytes_read"`
	BytesWritten  int64 `json:"bytes_written"`
	WaitingFor    []struct {
		Host string `json:"host"`
	} `json:"waiting_for"`
}

// threeDays backs up an image three times, changing half of it between
// the backups, and returns the snapshot IDs and the last image's bytes.
func threeDays(t *testing.T, e *env, src string) ([]string, []byte) {
	t.Helper()
	img := randomBytes(16 << 20)
	var ids []string
	for day := range 3 {
		if day > 0 {
			copy(img[(day-1)*(4<<20):], randomBytes(8<<20))
		}
		writeFile(t, src, img)
		ids = append(ids, e.backup(src).Snapshot)
	}
	// Object stores stamp whole seconds: packs stored in the second a
	// prune starts are left for the next one (they may be a running
	// backup's).
	time.Sleep(1100 * time.Millisecond)
	return ids, img
}

func TestForgetAndPrune(t *testing.T) {
	for _, tg := range pruneTargets {
		t.Run(tg.name, func(t *testing.T) {
			e := tg.start(t)
			e.ok("init", "--pack-size", "2M")
			src := e.path("disk.img")
			ids, last := threeDays(t, e, src)
			e.ok("forget", ids[0], ids[1])

			var dry pruneOut
			e.okJSON(&dry, "prune", "--dry-run")
			var p pruneOut
			e.okJSON(&p, "prune")
			if p.Deleted.Packs == 0 || p.Waiting.Packs != 0 || dry.Stored != p.Stored {
				t.Fatalf("prune: %+v (dry run %+v)", p, dry)
			}
			// The forgotten days alone held 16 MiB of random data: day 1's
			// first 12 MiB (overwritten on days 2 and 3) and the 4 MiB of
			// day 2 that day 3 overwrote.
			freed := p.Stored.Bytes - p.After.Bytes
			if freed < 15<<20 || freed > 17<<20 {
				t.Fatalf("prune freed %d bytes, the forgotten snapshots alone held 16 MiB: %+v", freed, p)
			}
			if size := repoBytes(t, e); size >= 0 && size > p.After.Bytes+1<<20 {
				t.Fatalf("repository holds %d bytes of packs, prune says %d", size, p.After.Bytes)
			}
			out := e.path("out.img")
			e.ok("restore", ids[2], out)
			if got, _ := os.ReadFile(out); !bytes.Equal(got, last) {
				t.Fatal("the kept snapshot does not restore byte-exact after prune")
			}
			e.ok("check", "--read-data")
			var again pruneOut
			e.okJSON(&again, "prune")
			if again.Deleted.Packs+again.Condemned.Packs != 0 || again.After != p.After {
				t.Fatalf("a second prune found work: %+v", again)
			}
			e.fail([]string{"snapshot"}, "restore", ids[0], e.path("gone.img"))
		})
	}
}

func TestPruneWriteOnlyKeyRefused(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(1<<20))
	e.backup(src)
	wkey := e.path("writer.key")
	e.ok("key", "export", "--write-only", "--name", "web1", wkey)
	w := newBareEnv(t)
	w.setenv("SAUVE_REPO", e.repo)
	w.setenv("SAUVE_KEY", wkey)
	before := strings.Join(treeOf(t, e.repo), "\n")
	stderr := w.fail([]string{"owner's key"}, "prune")
	if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
		t.Fatalf("more than one error line:\n%s", stderr)
	}
	if after := strings.Join(treeOf(t, e.repo), "\n"); after != before {
		t.Fatalf("a refused prune changed the repository:\n%s\n---\n%s", before, after)
	}
}

// repoBytes sums the packs of a local repository (-1 for a remote one).
func repoBytes(t *testing.T, e *env) int64 {
	dir := ""
	for _, kv := range e.vars {
		if v, ok := strings.CutPrefix(kv, "SAUVE_REPO="); ok && strings.HasPrefix(v, "/") {
			dir = v
		}
	}
	if dir == "" {
		return -1
	}
	var n int64
	filepath.Walk(filepath.Join(dir, "data"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestPruneKill9 kills prune (and forget) at random moments: every kept
// snapshot restores and check --read-data passes after each kill, and
// the next prune finishes the work.
func TestPruneKill9(t *testing.T) {
	for _, tg := range pruneTargets {
		t.Run(tg.name, func(t *testing.T) {
			e := tg.start(t)
			e.ok("init", "--pack-size", "1M")
			src := e.path("disk.img")
			ids, last := threeDays(t, e, src)
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
			kill := func(args ...string) bool {
				c := e.cmd(nil, args...)
				var stderr bytes.Buffer
				c.Stderr = &stderr
				if err := c.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(20+rng.IntN(200)) * time.Millisecond)
				c.Process.Signal(syscall.SIGKILL)
				err := c.Wait()
				if strings.Contains(stderr.String(), "panic:") {
					t.Fatalf("sauve %v panicked:\n%s", args, stderr.String())
				}
				return err != nil
			}
			killed := 0
			if kill("forget", ids[0]) {
				killed++
			}
			e.run("forget", ids[0]) // finish it, whatever the kill left
			e.ok("forget", ids[1])
			verify := func(when string) {
				t.Helper()
				if res := e.run("check", "--read-data"); res.code != 0 {
					t.Fatalf("%s: check --read-data: %s%s", when, res.stdout, res.stderr)
				}
				out := e.path("out.img")
				e.ok("restore", ids[2], out)
				if got, _ := os.ReadFile(out); !bytes.Equal(got, last) {
					t.Fatalf("%s: the kept snapshot does not restore byte-exact", when)
				}
			}
			if tg.name == "local" {
				// Once right after the condemnation (usually before the deletions;
				// the unit test stops at each point for sure).
				ledger := filepath.Join(e.repo, "ledger")
				n := len(treeOf(t, ledger))
				c := e.cmd(nil, "prune", "--max-unused", "0%")
				if err := c.Start(); err != nil {
					t.Fatal(err)
				}
				for deadline := time.Now().Add(20 * time.Second); len(treeOf(t, ledger)) == n && time.Now().Before(deadline); {
					time.Sleep(time.Millisecond)
				}
				c.Process.Signal(syscall.SIGKILL)
				c.Wait()
				if len(treeOf(t, ledger)) == n {
					t.Fatal("prune wrote no condemnation record")
				}
				if len(packFiles(t, e.repo)) == 0 {
					t.Fatal("no pack left")
				}
				verify("after a kill right after the condemnation")
			}
			for round := range 6 {
				if kill("prune", "--max-unused", "0%") {
					killed++
				}
				verify(fmt.Sprintf("after kill %d", round))
			}
			t.Logf("%d of 7 runs at random moments killed before they finished", killed)
			var p pruneOut
			e.okJSON(&p, "prune", "--max-unused", "0%")
			if p.Waiting.Packs != 0 {
				t.Fatalf("prune after the kills left work waiting: %+v", p)
			}
			verify("after the last prune")
			var again pruneOut
			e.okJSON(&again, "prune", "--max-unused", "0%")
			if again.Deleted.Packs+again.Condemned.Packs != 0 {
				t.Fatalf("work left after a finished prune: %+v", again)
			}
		})
	}
}

// TestPruneWithConcurrentBackup runs a backup under a write-only key in
// another process (host web2) while prune runs. The backup's image is
// the forgotten snapshot's, so it deduplicates against exactly the packs
// prune condemns. Whichever finishes first, the backup's snapshot
// restores byte-exact, before and after the next prune.
func TestPruneWithConcurrentBackup(t *testing.T) {
	for _, tg := range pruneTargets {
		t.Run(tg.name, func(t *testing.T) {
			e := tg.start(t)
			e.ok("init", "--pack-size", "1M")
			src := e.path("disk.img")
			old := randomBytes(24 << 20)
			writeFile(t, src, old)
			first := e.backup(src)
			writeFile(t, src, randomBytes(4<<20))
			e.backup(src)
			e.ok("forget", first.Snapshot)

			wkey := e.path("web2.key")
			e.ok("key", "export", "--write-only", "--name", "web2", wkey)
			w := newBareEnv(t)
			w.vars = append([]string(nil), e.vars...)
			w.dir = t.TempDir()
			w.setenv("HOME", w.dir)
			w.setenv("XDG_CACHE_HOME", filepath.Join(w.dir, "cache"))
			w.setenv("XDG_CONFIG_HOME", filepath.Join(w.dir, "config"))
			w.setenv("SAUVE_KEY", wkey)
			wsrc := w.path("web2.img")
			writeFile(t, wsrc, old)
			time.Sleep(1100 * time.Millisecond) // whole-second storage times

			waited := 0
			for round := range 3 {
				bk := w.cmd(nil, "backup", wsrc, "--host", "web2", "--json")
				var bout, berr bytes.Buffer
				bk.Stdout, bk.Stderr = &bout, &berr
				if err := bk.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(round*150) * time.Millisecond)
				var p pruneOut
				e.okJSON(&p, "prune")
				if err := bk.Wait(); err != nil {
					t.Fatalf("round %d: backup beside prune: %v\n%s", round, err, berr.String())
				}
				var b backupOut
				if err := jsonUnmarshal(bout.String(), &b); err != nil {
					t.Fatal(err)
				}
				t.Logf("round %d: prune condemned %d packs, deleted %d, %d wait for %d sessions; the backup reused %d chunks, stored %d", round, p.Condemned.Packs, p.Deleted.Packs, p.Waiting.Packs, len(p.WaitingFor), b.ChunksReused, b.ChunksNew)
				if p.Condemned.Packs > 0 {
					waited++
				}
				for _, when := range []string{"before", "after"} {
					if when == "after" {
						e.ok("prune")
					}
					out := e.path("out.img")
					e.ok("restore", b.Snapshot, out)
					if got, _ := os.ReadFile(out); !bytes.Equal(got, old) {
						t.Fatalf("round %d: web2's snapshot does not restore byte-exact %s the next prune", round, when)
					}
				}
				e.ok("check", "--read-data")
				e.ok("forget", b.Snapshot)
				time.Sleep(1100 * time.Millisecond) // whole-second storage times
			}
			// In round 0 at least, prune condemns the packs the backup
			// wants while it runs: the backup either reused them before
			// the condemnation (prune waits for it) or after it read the
			// condemnation (it stores the chunks again).
			if waited == 0 {
				t.Fatal("in no round did prune condemn packs while the backup ran: the race was not exercised")
			}
		})
	}
}

// TestForgetWithPrune: the nightly one-liner, forget --keep-last 1
// --prune, removes the old snapshots and their data in one command.
func TestForgetWithPrune(t *testing.T) {
	e := newEnv(t, "--pack-size", "2M")
	src := e.path("disk.img")
	ids, last := threeDays(t, e, src)
	before := repoBytes(t, e)
	out := e.ok("forget", "--keep-last", "1", "--prune")
	if !strings.Contains(out, "packs deleted") {
		t.Fatalf("forget --prune did not prune:\n%s", out)
	}
	if after := repoBytes(t, e); before-after < 15<<20 {
		t.Fatalf("forget --keep-last 1 --prune freed %d bytes of %d, want about 16 MiB", before-after, before)
	}
	img := e.path("out.img")
	e.ok("restore", ids[2], img)
	if got, _ := os.ReadFile(img); !bytes.Equal(got, last) {
		t.Fatal("the kept snapshot does not restore byte-exact")
	}
}

// TestPruneStopsOnUnreadableManifest: a damaged (or planted) manifest
// stops prune with nothing deleted; forget by its full ID removes it, and
// prune then runs.
func TestPruneStopsOnUnreadableManifest(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(2<<20))
	b := e.backup(src)
	writeFile(t, src, randomBytes(2<<20))
	e.backup(src)
	time.Sleep(1100 * time.Millisecond)
	manifest := filepath.Join(e.repo, "snapshots", b.Snapshot)
	data, _ := os.ReadFile(manifest)
	data[40] ^= 1
	os.WriteFile(manifest, data, 0o600)
	os.RemoveAll(filepath.Join(e.dir, "cache")) // no good copy to fall back on
	// Apart from its own session's announcements, nothing is written.
	objects := func() string {
		var out []string
		for _, p := range treeOf(t, e.repo) {
			if !strings.HasPrefix(p, "/sessions/") {
				out = append(out, p)
			}
		}
		return strings.Join(out, "\n")
	}
	before := objects()
	e.fail([]string{b.ShortID, "nothing was deleted", "sauve forget FULL-ID"}, "prune")
	if after := objects(); after != before {
		t.Fatalf("a prune that stopped changed the repository:\n%s\n---\n%s", before, after)
	}
	if out := e.ok("forget", b.Snapshot); !strings.Contains(out, "cannot be read") {
		t.Fatalf("forget of an unreadable manifest:\n%s", out)
	}
	var p pruneOut
	e.okJSON(&p, "prune")
	if p.Deleted.Packs == 0 {
		t.Fatalf("prune after the unreadable manifest went: %+v", p)
	}
	e.ok("check", "--read-data")
}
