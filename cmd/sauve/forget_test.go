package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// dated is one snapshot a forget test made: its ID, time and a copy of
// the image it holds.
type dated struct {
	id   string
	at   time.Time
	copy string
}

// datedBackups backs up n versions of one small image as host web1,
// a day apart, the newest two days ago.
func datedBackups(t *testing.T, e *env, n int) []dated {
	t.Helper()
	base := time.Now().UTC().Truncate(time.Hour).Add(-time.Duration(n+1) * 24 * time.Hour)
	src := e.path("disk.img")
	var out []dated
	for i := range n {
		data := randomBytes(300 << 10)
		writeFile(t, src, data)
		cp := e.path(fmt.Sprintf("v%d.img", i))
		writeFile(t, cp, data)
		at := base.Add(time.Duration(i) * 24 * time.Hour)
		b := e.backup(src, "--host", "web1", "--time", at.Format(time.RFC3339))
		out = append(out, dated{id: b.Snapshot, at: at, copy: cp})
	}
	return out
}

// listIDs returns the IDs 'sauve snapshots' lists, oldest first.
func listIDs(t *testing.T, e *env, args ...string) []string {
	t.Helper()
	var list []struct {
		ID string `json:"id"`
	}
	e.okJSON(&list, append([]string{"snapshots"}, args...)...)
	var ids []string
	for _, s := range list {
		ids = append(ids, s.ID)
	}
	return ids
}

func idsOf(ds ...dated) []string {
	var ids []string
	for _, d := range ds {
		ids = append(ids, d.id)
	}
	return ids
}

type forgetOut struct {
	DryRun bool `json:"dry_run"`
	Groups []struct {
		Host string `json:"host"`
		Keep []struct {
			ID      string
			Reasons []string
		}
		Remove   []struct{ ID string }
		Verified bool `json:"verified"`
	} `json:"groups"`
	Marked []struct {
		ID string `json:"id"`
	} `json:"marked"`
	Removed, Kept int
}

// The old img_1/img_2/img_3 rotation: --keep-last 3 keeps exactly the
// three newest, each restores byte for byte; --dry-run removes nothing.
func TestForgetKeepLast(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 5)

	out := e.ok("forget", "--keep-last", "3", "--dry-run")
	for _, want := range []string{"host web1, source " + e.path("disk.img"), "last 1/3", "would remove 2 snapshots", "would remove 2 snapshots, keep 3"} {
		if !strings.Contains(out, want) {
			t.Fatalf("forget --dry-run output lacks %q:\n%s", want, out)
		}
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps...)) {
		t.Fatalf("--dry-run removed snapshots: %d left", len(got))
	}

	var rep forgetOut
	e.okJSON(&rep, "forget", "--keep-last", "3")
	if rep.DryRun || rep.Removed != 2 || rep.Kept != 3 || len(rep.Groups) != 1 {
		t.Fatalf("forget --keep-last 3: %+v", rep)
	}
	for i, k := range rep.Groups[0].Keep {
		if want := snaps[4-i].id; k.ID != want || !slices.Contains(k.Reasons, fmt.Sprintf("last %d/3", i+1)) {
			t.Fatalf("kept #%d: %s %v, want %s (last %d/3)", i, k.ID, k.Reasons, want, i+1)
		}
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps[2:]...)) {
		t.Fatalf("after forget: %v, want the three newest", got)
	}
	for i, s := range snaps[2:] {
		dst := e.path(fmt.Sprintf("r%d.img", i))
		e.ok("restore", s.id[:12], dst)
		sameFile(t, dst, s.copy)
	}
	e.ok("check", "--read-data")
	// Forgetting again changes nothing.
	e.okJSON(&rep, "forget", "--keep-last", "3")
	if rep.Removed != 0 || rep.Kept != 3 {
		t.Fatalf("second forget: %+v", rep)
	}
}

// No rule and no SNAPSHOT: refused with a usage error, nothing removed;
// rules and IDs together are refused too.
func TestForgetWithoutRuleRefuses(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 2)
	for _, args := range [][]string{
		{"forget"},
		{"forget", "--dry-run"},
		{"forget", "--host", "web1"},
		{"forget", "--keep-last", "1", snaps[0].id},
		{"forget", "--keep-last", "-1"},
		{"forget", "--keep-within", "soon"},
		{"forget", "--keep-last", "1", "--group-by", "planet"},
	} {
		r := e.run(args...)
		if r.code != 2 {
			t.Fatalf("sauve %v: exit %d, want 2\n%s", args, r.code, r.stderr)
		}
	}
	if r := e.run("forget"); !strings.Contains(r.stderr, "no keep rule given") {
		t.Fatalf("forget without rule: %s", r.stderr)
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps...)) {
		t.Fatalf("a refused forget removed snapshots: %v", got)
	}
}

// forget SNAPSHOT... removes exactly those.
func TestForgetByID(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 4)
	out := e.ok("forget", snaps[1].id[:8], snaps[3].id)
	if !strings.Contains(out, "removed 2 snapshots, kept 2") {
		t.Fatalf("forget by ID:\n%s", out)
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps[0], snaps[2])) {
		t.Fatalf("after forget by ID: %v", got)
	}
	e.fail([]string{"no snapshot"}, "forget", snaps[1].id[:8])
	dst := e.path("r.img")
	e.ok("restore", snaps[2].id, dst)
	sameFile(t, dst, snaps[2].copy)
}

// The newest snapshot check --read-data verified survives a rule that
// would drop it; without any verified snapshot forget warns once.
func TestForgetKeepsNewestVerified(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 2)
	r := e.run("forget", "--keep-last", "1", "--dry-run")
	if r.code != 0 || strings.Count(r.stderr, "check --read-data") != 1 {
		t.Fatalf("forget with nothing verified: exit %d, stderr:\n%s", r.code, r.stderr)
	}
	e.ok("check", "--read-data")
	// Two more backups after the check: the newest verified is snaps[1].
	src := e.path("disk.img")
	for i := range 2 {
		writeFile(t, src, randomBytes(300<<10))
		at := time.Now().UTC().Add(-time.Duration(2-i) * time.Hour)
		b := e.backup(src, "--host", "web1", "--time", at.Format(time.RFC3339))
		snaps = append(snaps, dated{id: b.Snapshot, at: at})
	}
	var rep forgetOut
	e.okJSON(&rep, "forget", "--keep-last", "1")
	if rep.Removed != 2 || rep.Kept != 2 || !rep.Groups[0].Verified {
		t.Fatalf("forget --keep-last 1: %+v", rep)
	}
	keep := rep.Groups[0].Keep
	if keep[0].ID != snaps[3].id || keep[1].ID != snaps[1].id || !slices.Contains(keep[1].Reasons, "newest verified by check --read-data") {
		t.Fatalf("kept %+v, want %s (last) and %s (verified)", keep, snaps[3].id[:8], snaps[1].id[:8])
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps[1], snaps[3])) {
		t.Fatalf("after forget: %v", got)
	}
	if r := e.run("forget", "--keep-last", "1", "--dry-run"); strings.Contains(r.stderr, "check --read-data") {
		t.Fatalf("warned with a verified snapshot:\n%s", r.stderr)
	}
	dst := e.path("r.img")
	e.ok("restore", snaps[1].id, dst)
	sameFile(t, dst, snaps[1].copy)
}

// A write-only key cannot forget: one clear error line, nothing removed.
func TestForgetWriteOnlyKeyRefused(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 2)
	key := e.path("web1.key")
	e.ok("key", "export", "--write-only", "--name", "web1", key)
	w := e.as(key)
	for _, args := range [][]string{{"forget", "--keep-last", "1"}, {"forget", snaps[0].id}} {
		r := w.run(args...)
		if r.code != 1 || !strings.Contains(r.stderr, "owner's key") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("sauve %v with a write-only key: exit %d, stderr:\n%s", args, r.code, r.stderr)
		}
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps...)) {
		t.Fatalf("a write-only key removed snapshots: %v", got)
	}
}

// A snapshot dated next year is marked: it takes no --keep-last slot and
// is kept, so the real snapshots it would have pushed out stay.
func TestForgetFutureSnapshotTakesNoSlot(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 3)
	future := e.backup(e.path("disk.img"), "--host", "web1", "--time", time.Now().AddDate(1, 0, 0).UTC().Format(time.RFC3339))
	var rep forgetOut
	e.okJSON(&rep, "forget", "--keep-last", "2")
	if rep.Removed != 1 || len(rep.Marked) != 1 || rep.Marked[0].ID != future.Snapshot {
		t.Fatalf("forget with a future snapshot: %+v", rep)
	}
	if got := listIDs(t, e); !slices.Equal(got, append(idsOf(snaps[1:]...), future.Snapshot)) {
		t.Fatalf("after forget: %v", got)
	}
}

// --before and --after select by date for forget and restore; 'latest'
// among them is the newest that matches.
func TestForgetBeforeAfter(t *testing.T) {
	e := newEnv(t)
	snaps := datedBackups(t, e, 4)
	mid := snaps[2].at.Format(time.RFC3339)

	dst := e.path("before.img")
	e.ok("restore", "latest", "--before", mid, dst)
	sameFile(t, dst, snaps[1].copy)
	dst = e.path("after.img")
	e.ok("restore", "latest", "--after", snaps[1].at.Format(time.RFC3339), "--before", mid, dst)
	sameFile(t, dst, snaps[1].copy)
	e.fail([]string{"no snapshot matches"}, "restore", "latest", "--before", snaps[0].at.Format(time.RFC3339), e.path("none.img"))
	e.fail([]string{"--before"}, "restore", "latest", "--before", "someday", e.path("none.img"))
	// A date in local time: the day after the newest snapshot selects all.
	dst = e.path("day.img")
	e.ok("restore", "latest", "--before", snaps[3].at.Local().AddDate(0, 0, 1).Format("2006-01-02"), dst)
	sameFile(t, dst, snaps[3].copy)
	// A time ago: the snapshots are 5, 4, 3 and 2 days old (less up to
	// an hour), so 3½ days ago falls between the second and the third.
	dst = e.path("ago.img")
	e.ok("restore", "latest", "--before", "3d12h", dst)
	sameFile(t, dst, snaps[1].copy)

	// forget --keep-last 1 --before mid: only snaps[0] and snaps[1] are
	// considered; snaps[1] stays as the last of them.
	var rep forgetOut
	e.okJSON(&rep, "forget", "--keep-last", "1", "--before", mid)
	if rep.Removed != 1 || rep.Kept != 1 {
		t.Fatalf("forget --before: %+v", rep)
	}
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps[1:]...)) {
		t.Fatalf("after forget --before: %v", got)
	}
	e.okJSON(&rep, "forget", "--keep-last", "1", "--after", mid)
	if got := listIDs(t, e); !slices.Equal(got, idsOf(snaps[1], snaps[3])) {
		t.Fatalf("after forget --after: %v", got)
	}
}
