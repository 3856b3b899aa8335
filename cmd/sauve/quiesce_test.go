package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// reflinkXFS mounts a reflink-capable XFS from a loop device and returns
// its mount point: image files on it get point-in-time copies.
func reflinkXFS(t *testing.T, e *env) string {
	t.Helper()
	fsimg := e.path("xfs.img")
	sh(t, "truncate", "-s", "320M", fsimg)
	sh(t, "mkfs.xfs", "-q", "-m", "reflink=1", fsimg)
	dev := losetup(t, fsimg)
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

// xfsImage makes a small image file on a reflinkXFS, so that backups of
// it take a point-in-time copy.
func xfsImage(t *testing.T, e *env) string {
	t.Helper()
	img := filepath.Join(reflinkXFS(t, e), "vm.img")
	if err := os.WriteFile(img, []byte(strings.Repeat("sauve quiesce test ", 100000)), 0o644); err != nil {
		t.Fatal(err)
	}
	return img
}

// ext4OnXFS makes xfsImage's image an ext4 of size (a truncate size)
// and loop-mounts it on mnt, for a database to run on while sauve backs
// the image up with reflink copies. Its cleanup, registered after
// xfsImage's, unmounts the ext4 (thawed first, should a failure leave it
// frozen) before the XFS holding it, and its autoclear loop device goes
// with it.
func ext4OnXFS(t *testing.T, e *env, size, mnt string) string {
	t.Helper()
	img := xfsImage(t, e)
	sh(t, "truncate", "-s", "0", img)
	sh(t, "truncate", "-s", size, img)
	sh(t, "mkfs.ext4", "-q", "-F", img)
	sh(t, "mount", "-o", "loop", img, mnt)
	t.Cleanup(func() {
		exec.Command("fsfreeze", "-u", mnt).Run()
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", mnt, err, out)
		}
	})
	return img
}

type quiesceJSON struct {
	Consistency string `json:"consistency"`
	Reason      string `json:"reason"`
	Writers     []struct {
		Name   string `json:"name"`
		Frozen bool   `json:"frozen"`
		Detail string `json:"detail"`
		Error  string `json:"error"`
	} `json:"writers"`
	WindowSeconds float64 `json:"window_seconds"`
}

// Hooks run around the instant of the copy, with the disks and the
// provider in their environment; the snapshot records that it is
// application-consistent, and show and snapshots say so.
func TestBackupHooks(t *testing.T) {
	e := newEnv(t)
	img := xfsImage(t, e)
	pre, post := e.path("pre.txt"), e.path("post.txt")
	var res struct {
		Snapshot string       `json:"snapshot"`
		Copy     string       `json:"point_in_time_copy"`
		Quiesce  *quiesceJSON `json:"quiesce"`
	}
	hooks := e.path("hooks")
	os.WriteFile(hooks, []byte("# from a file, before the flags\npost-thaw echo \"$SAUVE_PHASE\" >> "+post+"\n"), 0o644)
	e.okJSON(&res, "backup", img, "--hooks-file", hooks,
		"--pre-freeze", `echo "$SAUVE_PHASE $SAUVE_PROVIDER $SAUVE_DISKS" > `+pre,
		"--post-thaw", `echo second >> `+post,
		"--post-backup", `echo "$SAUVE_PHASE $SAUVE_SNAPSHOT" > `+e.path("stored.txt"))
	if res.Copy != "reflink" {
		t.Fatalf("point_in_time_copy %q, want reflink", res.Copy)
	}
	if got := strings.TrimSpace(string(mustRead(t, pre))); got != "pre-freeze reflink "+img {
		t.Errorf("pre-freeze saw %q, want its phase, the provider and the disk", got)
	}
	if got := strings.TrimSpace(string(mustRead(t, e.path("stored.txt")))); got != "post-backup "+res.Snapshot {
		t.Errorf("post-backup saw %q, want its phase and the stored snapshot %s", got, res.Snapshot)
	}
	if got := string(mustRead(t, post)); got != "post-thaw\nsecond\n" {
		t.Errorf("post-thaw commands wrote %q, want both, in order", got)
	}
	q := res.Quiesce
	if q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != "hooks" || !q.Writers[0].Frozen || q.WindowSeconds <= 0 {
		t.Fatalf("backup --json quiesce %+v, want application-consistent through the hooks", q)
	}
	var sn struct {
		Quiesce *quiesceJSON `json:"quiesce"`
	}
	e.okJSON(&sn, "show", res.Snapshot)
	if sn.Quiesce == nil || sn.Quiesce.Consistency != "application" {
		t.Errorf("show --json quiesce %+v: the manifest does not record it", sn.Quiesce)
	}
	if out := e.ok("snapshots"); !strings.Contains(out, " app ") {
		t.Errorf("snapshots does not mark the application-consistent one:\n%s", out)
	}
	if out := e.ok("show", res.Snapshot); !strings.Contains(out, "application-consistent: hooks held for") {
		t.Errorf("show does not say the snapshot is application-consistent:\n%s", out)
	}
}

// A failing pre-freeze hook stores nothing by default, names the hook and
// what it printed, and still runs post-thaw; with --hook-failure continue
// the snapshot is stored as crash-consistent.
func TestBackupHookFailure(t *testing.T) {
	e := newEnv(t)
	img := xfsImage(t, e)
	post := e.path("post.txt")
	e.fail([]string{"pre-freeze", "exit 3", "database refuses"}, "backup", img,
		"--pre-freeze", "echo database refuses; exit 3", "--post-thaw", "echo ran > "+post)
	if _, err := os.Stat(post); err != nil {
		t.Errorf("post-thaw did not run after a failed pre-freeze: %v", err)
	}
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored after a failed pre-freeze hook (--hook-failure abort)", n)
	}
	e.fail([]string{"post-thaw", "exit 4"}, "backup", img, "--post-thaw", "exit 4")
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored after a failed post-thaw hook (--hook-failure abort)", n)
	}

	var res struct {
		Quiesce *quiesceJSON `json:"quiesce"`
	}
	e.okJSON(&res, "backup", img, "--pre-freeze", "exit 3", "--hook-failure", "continue")
	if q := res.Quiesce; q == nil || q.Consistency != "crash" || !strings.Contains(q.Reason, "exit 3") {
		t.Fatalf("quiesce %+v, want crash-consistent saying why", q)
	}
	if out := e.ok("snapshots"); !strings.Contains(out, "1 snapshots") || !strings.Contains(out, "crash!") {
		t.Errorf("snapshots after --hook-failure continue does not show the crash-consistent one:\n%s", out)
	}

	e.fail([]string{"--hook-failure", "abort or continue"}, "backup", img, "--pre-freeze", "true", "--hook-failure", "maybe")
	bad := e.path("bad-hooks")
	os.WriteFile(bad, []byte("# hooks\npre-freeze true\nprefreeze oops\n"), 0o644)
	e.fail([]string{"--hooks-file", "line 3", "prefreeze oops"}, "backup", img, "--hooks-file", bad)
	e.fail([]string{"--writer", "oracle"}, "backup", img, "--writer", "oracle")
}

// A post-backup command runs once the snapshot is stored, also with no
// copy; when it fails the snapshot stays and sauve exits 1 saying so.
func TestBackupPostBackupFails(t *testing.T) {
	e := newEnv(t)
	img := e.path("plain.img")
	if err := os.WriteFile(img, []byte(strings.Repeat("x", 1<<20)), 0o644); err != nil {
		t.Fatal(err)
	}
	e.fail([]string{"is stored, but post-backup hook", "exit 5", "archive full"}, "backup", img, "--post-backup", "echo archive full; exit 5")
	if n := snapshotsOf(t, e); n != 1 {
		t.Errorf("%d snapshots after a failed post-backup command, want the one stored before it", n)
	}
}

// Hooks need an instant: a source read as it is gets a clear refusal
// and the hooks do not run.
func TestBackupHooksNeedACopy(t *testing.T) {
	e := newEnv(t)
	img := e.path("plain.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	pre := e.path("pre.txt")
	e.fail([]string{"no point-in-time copy", img}, "backup", "--snapshot", "none", img, "--pre-freeze", "touch "+pre)
	if _, err := os.Stat(pre); err == nil {
		t.Error("the pre-freeze hook ran with no copy to take")
	}
}

// snapshotsOf counts the repository's snapshots.
func snapshotsOf(t *testing.T, e *env) int {
	t.Helper()
	var list []json.RawMessage
	e.okJSON(&list, "snapshots")
	return len(list)
}
