package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

type diffOut struct {
	BytesDiffer int64 `json:"bytes_differ"`
	Ranges      []struct {
		Start, Length int64
	}
	Partitions []struct {
		Skipped string
		Changes []struct{ Path, Change string }
	}
}

func (d diffOut) changes() string {
	var out []string
	for _, p := range d.Partitions {
		if p.Skipped != "" {
			out = append(out, "skipped: "+p.Skipped)
		}
		for _, c := range p.Changes {
			out = append(out, c.Change+" "+c.Path)
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// TestDiff compares two snapshots of an ext4 filesystem changed between
// them (the kernel's changes, through a loop mount), a snapshot with
// itself, and a snapshot with a restore of it whose free space holds
// garbage and then one of whose files changed.
func TestDiff(t *testing.T) {
	requireRoot(t)
	needTools(t, "mkfs.ext4", "mount", "umount")
	e := newEnv(t)
	img := e.path("fs.img")
	writeFile(t, img, nil)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh := func(script string) {
		t.Helper()
		if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
			t.Fatalf("mount: %v\n%s", err, out)
		}
		out, err := exec.Command("sh", "-ec", "cd "+mnt+"\n"+script).CombinedOutput()
		if uerr := exec.Command("umount", mnt).Run(); uerr != nil {
			t.Fatalf("umount: %v", uerr)
		}
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
	}
	sh(`echo one > a; echo two > b; mkdir dir; echo three > dir/c; ln -s a link; mkdir gone; echo x > gone/f
		dd if=/dev/urandom of=big bs=1M count=3 2>/dev/null`)
	b1 := e.backup(img)
	sh(`echo more >> a; rm b; echo new > added; chmod 600 dir/c; rm link; echo file > link; rm -r gone
		dd if=/dev/urandom of=big bs=4k count=1 seek=100 conv=notrunc 2>/dev/null`)
	b2 := e.backup(img)

	diff := func(wantCode int, args ...string) diffOut {
		t.Helper()
		r := e.run(append([]string{"diff", "--json"}, args...)...)
		if r.code != wantCode {
			t.Fatalf("diff %v: exit %d, want %d\n%s\n%s", args, r.code, wantCode, r.stdout, r.stderr)
		}
		var d diffOut
		if err := json.Unmarshal([]byte(r.stdout), &d); err != nil {
			t.Fatalf("diff %v --json: %v\n%s", args, err, r.stdout)
		}
		return d
	}
	d := diff(1, b1.ShortID, b2.ShortID)
	want := strings.Join([]string{"added /added", "metadata /dir/c", "modified /a", "modified /big", "removed /b", "removed /gone", "type /link"}, "\n")
	if got := d.changes(); got != want {
		t.Errorf("diff of the snapshots:\n%s\nwant\n%s", got, want)
	}
	if d.BytesDiffer == 0 || len(d.Ranges) == 0 {
		t.Errorf("diff of the snapshots: no range differs: %+v", d)
	}
	if d := diff(0, b1.ShortID, b1.ShortID); d.BytesDiffer != 0 || d.changes() != "" {
		t.Errorf("a snapshot against itself: %+v", d)
	}
	// The human output names each change with its mark.
	r := e.run("diff", b1.ShortID, b2.ShortID)
	for _, line := range []string{"+ /added", "- /b", "M /a", "T /link", "U /dir/c", "ranges differ"} {
		if !strings.Contains(r.stdout, line) {
			t.Errorf("diff output lacks %q:\n%s", line, r.stdout)
		}
	}

	// A restore with garbage in its free space (the end of the
	// filesystem) is the snapshot's disk, unless free space is compared.
	restored := e.path("restored.img")
	e.ok("restore", b2.ShortID, restored)
	writeAt(t, restored, 31<<20, randomBytes(1<<20-4096))
	if d := diff(0, b2.ShortID, restored); d.BytesDiffer != 0 || d.changes() != "" {
		t.Errorf("a restore with garbage in free space: %+v", d)
	}
	if d := diff(1, b2.ShortID, restored, "--no-fs-skip", "--no-files"); d.BytesDiffer == 0 {
		t.Error("--no-fs-skip: garbage in free space not seen")
	}
	// A file changed in place, its size and modification time kept:
	// its change time moved (U), --content finds the bytes (M), and the
	// ranges differ.
	img = restored
	ref := e.path("ref")
	sh(`touch -r a ` + ref + `; printf X | dd of=a bs=1 seek=1 conv=notrunc 2>/dev/null; touch -r ` + ref + ` a`)
	if got := diff(1, b2.ShortID, restored).changes(); got != "metadata /a" {
		t.Errorf("a file rewritten with its time put back, without --content: %q", got)
	}
	d = diff(1, b2.ShortID, restored, "--content")
	if got := d.changes(); got != "modified /a" || d.BytesDiffer == 0 {
		t.Errorf("a file changed on the restored disk: %q, %d bytes differ", got, d.BytesDiffer)
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"diff", b1.ShortID, filepath.Join(e.dir, "nothing.img")}, "nothing.img"},
		{[]string{"diff", b1.ShortID + ":7", b2.ShortID}, "no partition table"},
		{[]string{"diff", b1.ShortID + ":/etc", b2.ShortID}, "not a PATH"},
		{[]string{"diff", b1.ShortID, "ffffffff"}, "ffffffff"},
	} {
		r := e.run(c.args...)
		if r.code != 2 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q, want exit 2 naming %q", c.args, r.code, r.stderr, c.want)
		}
	}
}
