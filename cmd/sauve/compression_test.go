package main

import (
	"testing"
)

// --compression trades CPU for space and nothing else: a backup at max
// stores fewer bytes than at fast, both restore the same image, check
// reads every chunk back, and a bad level is refused before anything is
// stored.
func TestBackupCompressionLevels(t *testing.T) {
	img := t.TempDir() + "/disk.img"
	data := append(textBytes(1, 6<<20), randomBytes(1<<20)...)
	writeFile(t, img, data)
	coded := map[string]int64{}
	for _, how := range []struct {
		name string
		args []string
		env  string
	}{
		{"fast", nil, ""},
		{"max", []string{"--compression", "max"}, ""},
		{"env 9", nil, "9"},
	} {
		t.Run(how.name, func(t *testing.T) {
			e := newEnv(t)
			if how.env != "" {
				e.setenv("SAUVE_COMPRESSION", how.env)
			}
			b := e.backup(append(how.args, img)...)
			if b.BytesNew != int64(len(data)) {
				t.Fatalf("backup stored %d new bytes of %d", b.BytesNew, len(data))
			}
			coded[how.name] = b.BytesNewCoded
			e.ok("check", "--read-data")
			out := e.path("restored.img")
			e.ok("restore", b.Snapshot, out)
			sameFile(t, img, out)
		})
	}
	t.Logf("compressed: fast %d, max %d, SAUVE_COMPRESSION=9 %d bytes of %d", coded["fast"], coded["max"], coded["env 9"], len(data))
	if coded["max"] >= coded["fast"] {
		t.Errorf("--compression max stored %d compressed bytes, fast %d: want fewer", coded["max"], coded["fast"])
	}
	if coded["env 9"] != coded["max"] {
		t.Errorf("SAUVE_COMPRESSION=9 stored %d compressed bytes, --compression max %d: want the same", coded["env 9"], coded["max"])
	}

	e := newEnv(t)
	for _, bad := range []string{"0", "20", "best"} {
		if r := e.run("backup", "--compression", bad, img); r.code != 2 {
			t.Errorf("--compression %s: exit %d, want 2 (stderr %q)", bad, r.code, r.stderr)
		}
	}
	e.setenv("SAUVE_COMPRESSION", "fastest")
	e.fail([]string{`compression "fastest"`, "fast, better, max"}, "backup", img)
	e.setenv("SAUVE_COMPRESSION", "")
	var snaps []any
	if e.okJSON(&snaps, "snapshots"); len(snaps) != 0 {
		t.Errorf("refused backups left %d snapshots", len(snaps))
	}
}
