package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// env is a sandbox for running the command line in-process: a repository
// folder, key and cache directories of its own, no root needed.
type env struct {
	t    *testing.T
	dir  string
	repo string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	t.Setenv("XDG_CACHE_HOME", filepath.Join(dir, "cache"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	t.Setenv("SAUVE_PASSPHRASE", "test passphrase")
	for _, k := range []string{"SAUVE_REPO", "SAUVE_KEY", "SAUVE_CACHE_DIR", "SAUVE_PASSPHRASE_FILE"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	return &env{t: t, dir: dir, repo: filepath.Join(dir, "repo")}
}

// run runs sauve with args and returns its exit status and output.
func (e *env) run(args ...string) (int, string, string) {
	e.t.Helper()
	var out, errb bytes.Buffer
	code := Run(context.Background(), append([]string{"--progress", "never"}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

// ok runs sauve and fails the test unless it exits 0.
func (e *env) ok(args ...string) string {
	e.t.Helper()
	code, out, errs := e.run(args...)
	if code != 0 {
		e.t.Fatalf("sauve %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func (e *env) file(name string, data []byte) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestBackupRestoreFile(t *testing.T) {
	e := newEnv(t)
	e.ok("init", "--repo", e.repo)
	data := append(randomBytes(3<<20), make([]byte, 2<<20)...)
	img := e.file("disk.img", data)
	var res map[string]any
	if err := json.Unmarshal([]byte(e.ok("backup", "--repo", e.repo, "--json", img)), &res); err != nil {
		t.Fatal(err)
	}
	if res["size"].(float64) != float64(len(data)) || res["chunks_zero"].(float64) == 0 {
		t.Fatalf("backup reported %v", res)
	}
	out := filepath.Join(e.dir, "restored.img")
	e.ok("restore", "--repo", e.repo, "latest", out)
	got, err := os.ReadFile(out)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("restored image differs (%v)", err)
	}
	// A delta restore onto a changed copy rewrites only what changed.
	copy(got[1<<20:], randomBytes(4096))
	if err := os.WriteFile(out, got, 0o644); err != nil {
		t.Fatal(err)
	}
	var dr map[string]any
	if err := json.Unmarshal([]byte(e.ok("restore", "--repo", e.repo, "--json", "--delta", "latest", out)), &dr); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("delta restore did not bring the target back")
	}
	if w := dr["bytes_written"].(float64); w == 0 || w > 1<<20 {
		t.Fatalf("delta restore wrote %v bytes for one changed block", w)
	}
	e.ok("check", "--repo", e.repo, "--read-data")
}

func TestSnapshotsJSON(t *testing.T) {
	e := newEnv(t)
	e.ok("init", "--repo", e.repo)
	img := e.file("a.img", randomBytes(1<<20))
	e.ok("backup", "--repo", e.repo, "--host", "web1", "--tag", "nightly", img)
	e.ok("backup", "--repo", e.repo, "--host", "db1", img)
	var list []map[string]any
	if err := json.Unmarshal([]byte(e.ok("snapshots", "--repo", e.repo, "--json", "--host", "web1")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0]["host"] != "web1" {
		t.Fatalf("snapshots --host web1: %v", list)
	}
}

func TestErrors(t *testing.T) {
	e := newEnv(t)
	e.ok("init", "--repo", e.repo)
	empty := e.file("empty.img", nil)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown flag", []string{"backup", "--nope", empty}, 2, "unknown flag"},
		{"missing source", []string{"backup", "--repo", e.repo, filepath.Join(e.dir, "absent.img")}, 1, "absent.img"},
		{"empty source", []string{"backup", "--repo", e.repo, empty}, 1, "is empty"},
		{"no repository there", []string{"snapshots", "--repo", filepath.Join(e.dir, "nothing")}, 1, "nothing"},
		{"no such snapshot", []string{"restore", "--repo", e.repo, "deadbeef", filepath.Join(e.dir, "x.img")}, 1, "deadbeef"},
		{"restore args", []string{"restore", "--repo", e.repo, "latest"}, 2, "expects"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := e.run(tc.args...)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d (want %d), stderr %q (want %q); stdout %q", code, tc.code, errs, tc.want, out)
			}
			if lines := strings.Count(strings.TrimSpace(errs), "\n"); code == 1 && lines > 0 {
				t.Errorf("error took %d lines, want one: %q", lines+1, errs)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(e.dir, "x.img")); err == nil {
		t.Error("a failed restore left its target behind")
	}
}
