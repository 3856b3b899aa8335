package writer

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// PostgreSQL declares its data directory, its WAL (a symlink to another
// folder, as when it lives on its own disk) and its tablespaces, and a
// copy that holds the data directory but not the WAL is refused.
func TestPostgreSQLVolumes(t *testing.T) {
	dir := startPostgres(t)
	admin := pgAdmin(t, dir)
	space := filepath.Join(dir, "space")
	if err := os.Mkdir(space, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(space, uidOf(t, dir), gidOf(t, dir)); err != nil {
		t.Fatal(err)
	}
	pgExec(t, admin, "CREATE TABLESPACE extra LOCATION '"+space+"'")
	w, err := NewPostgreSQL(pgDSN(dir, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	vols, err := w.Volumes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, v := range vols {
		got[v.What] = v.Path
	}
	data, _ := filepath.EvalSymlinks(filepath.Join(dir, "data"))
	want := map[string]string{"data directory": data, "WAL": filepath.Join(data, "pg_wal"), "tablespace extra": space}
	for what, path := range want {
		if p, _ := filepath.EvalSymlinks(path); got[what] != p {
			t.Errorf("%s: declared %q, want %q (all: %+v)", what, got[what], p, vols)
		}
	}
	set := Set{Writers: []Writer{w}}
	if err := set.MissingVolume(t.Context(), func(string) (bool, error) { return true, nil }); err != nil {
		t.Errorf("every volume held: %v", err)
	}
	err = set.MissingVolume(t.Context(), func(p string) (bool, error) { return !strings.HasPrefix(p, space), nil })
	if err == nil || !strings.Contains(err.Error(), "tablespace extra") || !strings.Contains(err.Error(), "on no disk of this backup") {
		t.Errorf("a copy without the tablespace: %v", err)
	}
	// OnFilesystems: the test's folder is on the filesystem of its own
	// mount point, not on /proc's.
	if ok, err := OnFilesystems([]string{"/proc"})(data); ok || err != nil {
		t.Errorf("the data directory on /proc's filesystem: %v, %v", ok, err)
	}
	if ok, err := OnFilesystems([]string{"/proc", data})(filepath.Join(data, "base")); !ok || err != nil {
		t.Errorf("the data directory's base on its own filesystem: %v, %v", ok, err)
	}
}

func uidOf(t *testing.T, path string) int {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(statOf(fi).Uid)
}

func gidOf(t *testing.T, path string) int {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(statOf(fi).Gid)
}

func statOf(fi os.FileInfo) *syscall.Stat_t {
	st, _ := fi.Sys().(*syscall.Stat_t)
	return st
}
