package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
)

// chunk is the default chunk size, which these tests exercise.
const chunk = repo.DefaultChunkSize

func TestRoundTrips(t *testing.T) {
	e := newEnv(t)
	mixed := func(p string) {
		writeAt(t, p, 0, randomBytes(3*chunk+5))
		writeAt(t, p, 5*chunk, textBytes(1, 7*chunk))
		writeAt(t, p, 20*chunk+100, make([]byte, 2*chunk))     // written zeros
		writeAt(t, p, 40*chunk-3, randomBytes(10))             // straddles a chunk boundary
		if err := os.Truncate(p, 64*chunk+12345); err != nil { // a hole at the end
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		make   func(p string)
		sparse bool // restored file should have holes
	}{
		{"empty", func(p string) { writeFile(t, p, nil) }, false},
		{"one-byte", func(p string) { writeFile(t, p, []byte{0x42}) }, false},
		{"one-zero-byte", func(p string) { writeFile(t, p, []byte{0}) }, true},
		{"chunk-minus-one", func(p string) { writeFile(t, p, randomBytes(chunk-1)) }, false},
		{"chunk-plus-one", func(p string) { writeFile(t, p, randomBytes(chunk+1)) }, false},
		{"random", func(p string) { writeFile(t, p, randomBytes(3<<20+17)) }, false},
		{"compressible", func(p string) { writeFile(t, p, textBytes(2, 5<<20+1)) }, false},
		{"all-zero", func(p string) { writeFile(t, p, make([]byte, 4<<20)) }, true},
		{"sparse", func(p string) {
			writeAt(t, p, 1<<20, randomBytes(100))
			writeAt(t, p, 9<<20+7, textBytes(3, chunk))
			os.Truncate(p, 20<<20+3)
		}, true},
		{"mixed", mixed, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := e.path(tc.name + ".img")
			tc.make(src)
			fi, _ := os.Stat(src)
			b := e.backup(src, "--allow-empty") // an empty image is refused without it
			if b.Size != fi.Size() {
				t.Fatalf("snapshot size %d, file %d", b.Size, fi.Size())
			}
			dst := e.path(tc.name + ".restored")
			e.ok("restore", b.Snapshot[:12], dst)
			sameFile(t, src, dst)
			if tc.sparse {
				var st syscall.Stat_t
				syscall.Stat(dst, &st)
				if st.Blocks*512 > fi.Size()/2+chunk {
					t.Errorf("restored file is not sparse: %d bytes allocated of %d", st.Blocks*512, fi.Size())
				}
			}
			// And as a stream on stdout.
			c := e.cmd(nil, "restore", b.Snapshot, "-")
			var out bytes.Buffer
			c.Stdout = &out
			if err := c.Run(); err != nil {
				t.Fatalf("restore to stdout: %v", err)
			}
			want, _ := os.ReadFile(src)
			if !bytes.Equal(out.Bytes(), want) {
				t.Fatalf("stdout restore differs (%d bytes, want %d)", out.Len(), len(want))
			}
		})
	}
	e.ok("check", "--read-data")
}

func TestSparseSourceSkipsHoles(t *testing.T) {
	e := newEnv(t)
	src := e.path("sparse.img")
	writeAt(t, src, 512<<20, randomBytes(chunk)) // 512 MiB hole, then data
	os.Truncate(src, 1<<30)
	b := e.backup(src)
	if b.BytesRead > 2*chunk {
		t.Fatalf("read %d bytes of a 1 GiB file holding 64 KiB of data", b.BytesRead)
	}
	if b.ChunksNew != 1 || b.ChunksZero != (1<<30)/chunk-1 {
		t.Fatalf("chunks: %d new, %d zero", b.ChunksNew, b.ChunksZero)
	}
	dst := e.path("out.img")
	e.ok("restore", "latest", dst)
	sameFile(t, src, dst)
}

func TestStdin(t *testing.T) {
	e := newEnv(t)
	data := append(textBytes(4, 3<<20), randomBytes(chunk/2)...)
	r := e.runIn(bytes.NewReader(data), "backup", "-", "--stdin-name", "vda.img", "--tag", "piped", "--json")
	if r.code != 0 {
		t.Fatalf("backup from stdin: %s", r.stderr)
	}
	var sn []struct {
		Tags  []string
		Disks []struct {
			Name, Source, Kind string
			Size               int64
		}
	}
	e.okJSON(&sn, "snapshots")
	if len(sn) != 1 || sn[0].Disks[0].Name != "vda.img" || sn[0].Disks[0].Kind != "stdin" || sn[0].Disks[0].Size != int64(len(data)) || sn[0].Tags[0] != "piped" {
		t.Fatalf("snapshot: %+v", sn)
	}
	dst := e.path("vda.img")
	e.ok("restore", "latest", "--tag", "piped", dst)
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("stdin round trip differs")
	}
	// Piping the same stream again stores nothing new.
	var b backupOut
	r = e.runIn(bytes.NewReader(data), "backup", "-", "--stdin-name", "vda.img", "--json")
	if err := jsonUnmarshal(r.stdout, &b); err != nil || b.ChunksNew != 0 {
		t.Fatalf("second stdin backup: %+v %v %s", b, err, r.stderr)
	}
}

func TestIncremental(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, append(textBytes(5, 16<<20), randomBytes(16<<20)...))
	v1 := fileHash(t, src, -1)
	first := e.backup(src)
	if first.ChunksNew != 32<<20/chunk {
		t.Fatalf("first backup: %d new chunks, want %d", first.ChunksNew, 32<<20/chunk)
	}
	repoSize := dirSize(t, e.repo)

	again := e.backup(src)
	if again.ChunksNew != 0 || again.BytesNew != 0 || again.Packs != 0 {
		t.Fatalf("unchanged backup stored %d chunks, %d bytes, %d packs", again.ChunksNew, again.BytesNew, again.Packs)
	}
	if grown := dirSize(t, e.repo) - repoSize; grown > 4096 {
		t.Fatalf("unchanged backup grew the repository by %d bytes", grown)
	}

	// Change 1 MiB at an unaligned offset: the chunks it touches, no more.
	writeAt(t, src, 20<<20+1000, randomBytes(1<<20))
	third := e.backup(src)
	if third.ChunksNew != 1<<20/chunk+1 || third.BytesNew != 1<<20+chunk {
		t.Fatalf("1 MiB change stored %d chunks, %d bytes", third.ChunksNew, third.BytesNew)
	}
	if third.ChunksReused != 32<<20/chunk-third.ChunksNew {
		t.Fatalf("reused %d chunks", third.ChunksReused)
	}
	// Both points in time restore.
	old := e.path("old.img")
	e.ok("restore", first.Snapshot, old)
	if fileHash(t, old, -1) != v1 {
		t.Fatal("first snapshot no longer restores its content")
	}
	cur := e.path("cur.img")
	e.ok("restore", "latest", cur)
	sameFile(t, src, cur)
}

func TestRestoreOverExistingFileAndDelta(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeAt(t, src, 0, textBytes(6, 4<<20))
	writeAt(t, src, 6<<20, randomBytes(2<<20))
	os.Truncate(src, 12<<20) // zero tail
	b := e.backup(src)

	// A larger target full of garbage ends equal, size included.
	dst := e.path("target.img")
	writeFile(t, dst, randomBytes(16<<20))
	e.ok("restore", b.Snapshot, dst)
	sameFile(t, src, dst)

	// Damage three chunks (one in the zero tail), then --delta repairs
	// exactly those.
	writeAt(t, dst, 100, []byte("garbage"))
	writeAt(t, dst, 6<<20+chunk*3, []byte("more garbage"))
	writeAt(t, dst, 11<<20, []byte("tail"))
	var res struct {
		ChunksWritten   int64 `json:"chunks_written"`
		ChunksUnchanged int64 `json:"chunks_unchanged"`
		BytesWritten    int64 `json:"bytes_written"`
	}
	e.okJSON(&res, "restore", b.Snapshot, dst, "--delta")
	sameFile(t, src, dst)
	if res.ChunksWritten != 2 || res.BytesWritten != 3*chunk {
		t.Fatalf("delta wrote %d data chunks, %d bytes; want 2 chunks and 3 chunks' bytes", res.ChunksWritten, res.BytesWritten)
	}
	// A delta onto an identical target writes nothing.
	e.okJSON(&res, "restore", b.Snapshot, dst, "--delta")
	if res.BytesWritten != 0 {
		t.Fatalf("delta onto an identical target wrote %d bytes", res.BytesWritten)
	}
}

func TestRestoreToBlockDevice(t *testing.T) {
	requireRoot(t)
	e := newEnv(t)
	src := e.path("disk.img")
	writeAt(t, src, 0, randomBytes(2<<20))
	writeAt(t, src, 5<<20, textBytes(7, 3<<20))
	os.Truncate(src, 20<<20+4096)
	b := e.backup(src)

	backing := e.path("device.bin")
	writeFile(t, backing, randomBytes(32<<20))
	dev := losetup(t, backing)
	e.ok("restore", b.Snapshot, dev)
	if fileHash(t, dev, 20<<20+4096) != fileHash(t, src, -1) {
		t.Fatal("device content differs from the image")
	}
	// Rollback with --delta after changing the device.
	f, _ := os.OpenFile(dev, os.O_WRONLY, 0)
	f.WriteAt(randomBytes(4096), 5<<20+3*chunk)
	f.Close()
	var res struct {
		ChunksWritten int64 `json:"chunks_written"`
	}
	e.okJSON(&res, "restore", b.Snapshot, dev, "--delta")
	if res.ChunksWritten != 1 {
		t.Fatalf("delta wrote %d chunks, want 1", res.ChunksWritten)
	}
	if fileHash(t, dev, 20<<20+4096) != fileHash(t, src, -1) {
		t.Fatal("device differs after delta restore")
	}

	// Too small a device is refused, untouched.
	smallFile := e.path("small.bin")
	writeFile(t, smallFile, bytes.Repeat([]byte{0xAA}, 8<<20))
	small := losetup(t, smallFile)
	e.fail([]string{small, "the image needs"}, "restore", b.Snapshot, small)
	if !bytes.Equal(mustRead(t, smallFile), bytes.Repeat([]byte{0xAA}, 8<<20)) {
		t.Fatal("refused restore changed the small device")
	}

	// A mounted device is refused, untouched.
	fsFile := e.path("fs.bin")
	writeFile(t, fsFile, nil)
	os.Truncate(fsFile, 32<<20)
	fsDev := losetup(t, fsFile)
	sh(t, "mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", fsDev) // no background init writes while mounted
	mnt := e.path("mnt")
	os.Mkdir(mnt, 0o755)
	sh(t, "mount", fsDev, mnt)
	defer exec.Command("umount", mnt).Run()
	before := fileHash(t, fsDev, -1)
	e.fail([]string{fsDev, "mounted"}, "restore", b.Snapshot, fsDev)
	if fileHash(t, fsDev, -1) != before {
		t.Fatal("refused restore changed the mounted device")
	}
}

func TestBackupBlockDevice(t *testing.T) {
	requireRoot(t)
	e := newEnv(t)
	img := e.path("dev.img")
	writeAt(t, img, 0, textBytes(8, 3<<20))
	os.Truncate(img, 10<<20+512)
	dev := losetup(t, img)
	b := e.backup(dev)
	if b.Size != 10<<20+512 {
		t.Fatalf("device backed up as %d bytes, want %d (size must come from the device)", b.Size, 10<<20+512)
	}
	out := e.path("out.img")
	e.ok("restore", "latest", out)
	sameFile(t, img, out)
}

func TestConcurrentBackups(t *testing.T) {
	e := newEnv(t)
	common := randomBytes(8 << 20)
	a, b := e.path("a.img"), e.path("b.img")
	writeFile(t, a, append(append([]byte{}, common...), randomBytes(8<<20)...))
	writeFile(t, b, append(append([]byte{}, common...), textBytes(9, 8<<20)...))
	ca := e.cmd(nil, "backup", a, "--json")
	cb := e.cmd(nil, "backup", b, "--json")
	var ea, eb bytes.Buffer
	ca.Stderr, cb.Stderr = &ea, &eb
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	if err := cb.Start(); err != nil {
		t.Fatal(err)
	}
	if err := ca.Wait(); err != nil {
		t.Fatalf("backup a: %v %s", err, ea.String())
	}
	if err := cb.Wait(); err != nil {
		t.Fatalf("backup b: %v %s", err, eb.String())
	}
	e.ok("check", "--read-data")
	for _, src := range []string{a, b} {
		var sn []struct{ ID string }
		e.okJSON(&sn, "snapshots")
		out := e.path(filepath.Base(src) + ".out")
		// Find the snapshot of this source by restoring latest per path.
		found := false
		for _, s := range sn {
			os.Remove(out)
			e.ok("restore", s.ID, out)
			if fileHash(t, out, -1) == fileHash(t, src, -1) {
				found = true
			}
		}
		if !found {
			t.Fatalf("no snapshot restores %s", src)
		}
	}
}

func TestErrorsAreClear(t *testing.T) {
	e := newBareEnv(t)
	e.fail([]string{"no sauve repository here", "sauve init"}, "snapshots")
	e.ok("init")
	e.fail([]string{"already holds a repository"}, "init")
	e.fail([]string{"open source", "nothing.img"}, "backup", e.path("nothing.img"))
	e.fail([]string{"no snapshot"}, "restore", "deadbeef", e.path("x.img"))
	e.fail([]string{"no snapshot matches"}, "restore", "latest", e.path("x.img"))
	e.fail([]string{"expects SNAPSHOT and TARGET"}, "restore", "latest")
	e.fail([]string{"not a disk image, block device or stream"}, "backup", e.dir)
	r := e.run("restore", "latest")
	if r.code != 2 {
		t.Fatalf("usage error exit %d, want 2", r.code)
	}
}

func TestDefaultRepository(t *testing.T) {
	e := newBareEnv(t)
	e.vars = e.vars[:len(e.vars)-1] // no SAUVE_REPO
	e.fail([]string{"no sauve repository here", "--repo"}, "snapshots")
	src := e.path("disk.img")
	writeFile(t, src, textBytes(13, 1<<20))
	r := e.run("backup", src)
	def := filepath.Join(e.dir, ".local", "share", "sauve", "repo")
	if r.code != 0 || !strings.Contains(r.stderr, "created the default repository "+def) {
		t.Fatalf("first backup to the default repository: exit %d\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "the key has no passphrase") {
		t.Errorf("the first backup does not say its new key has no passphrase:\n%s", r.stderr)
	}
	if _, err := os.Stat(filepath.Join(def, "config")); err != nil {
		t.Fatal(err)
	}
	out := e.path("out.img")
	e.ok("restore", "latest", out)
	sameFile(t, src, out)
	// A repository named explicitly is never created implicitly.
	e.fail([]string{"no sauve repository here"}, "backup", src, "--repo", e.path("elsewhere"))
}

func TestHelpShowsExamples(t *testing.T) {
	e := newBareEnv(t)
	for _, c := range []string{"init", "backup", "snapshots", "restore", "check", "key export"} {
		out := e.ok(append(strings.Fields(c), "--help")...)
		if !strings.Contains(out, "Examples:") || !strings.Contains(out, "sauve "+strings.Fields(c)[0]) {
			t.Errorf("sauve %s --help shows no example:\n%s", c, out)
		}
	}
}

func dirSize(t *testing.T, dir string) int64 {
	var n int64
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func mustRead(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestProgressOnlyWhenAsked(t *testing.T) {
	e := newEnv(t)
	src := e.path("disk.img")
	writeFile(t, src, textBytes(14, 64<<20))
	// Piped (as here), sauve prints the result and no progress bar (a
	// warning that the image holds no filesystem it can map is fine).
	noBar := func(stderr string) bool {
		return !strings.Contains(stderr, "backup disk.img") && !strings.Contains(stderr, "\x1b[")
	}
	r := e.run("backup", src)
	if r.code != 0 || !noBar(r.stderr) || !strings.Contains(r.stdout, "snapshot ") {
		t.Fatalf("piped backup: exit %d, stderr %q", r.code, r.stderr)
	}
	r = e.run("backup", src, "--json")
	var b backupOut
	if r.code != 0 || !noBar(r.stderr) || jsonUnmarshal(r.stdout, &b) != nil {
		t.Fatalf("--json backup: exit %d, stderr %q, stdout %q", r.code, r.stderr, r.stdout)
	}
	// Asked for, the bar shows the disk, bytes done of total and the rate.
	r = e.run("backup", src, "--progress", "always")
	if r.code != 0 || !strings.Contains(r.stderr, "backup disk.img") || !strings.Contains(r.stderr, "/0.1 GiB") {
		t.Fatalf("progress bar missing: %q", r.stderr)
	}
}

// TestBackupDeviceRecordsMachine: a backup of one of this machine's
// block devices records this machine; one of an image file records none.
func TestBackupDeviceRecordsMachine(t *testing.T) {
	requireRoot(t)
	e := newEnv(t)
	img := e.path("d.img")
	writeFile(t, img, randomBytes(1<<20))
	type machineOut struct {
		Machine *struct {
			Kind      string
			CPUs      int   `json:"cpus"`
			MemoryMiB int64 `json:"memory_mib"`
			Firmware  string
		}
	}
	b := e.backup(img)
	var sn machineOut
	e.okJSON(&sn, "show", b.ShortID)
	if sn.Machine != nil {
		t.Errorf("an image file's snapshot records a machine: %+v", sn.Machine)
	}
	dev := losetup(t, img)
	b = e.backup(dev)
	sn = machineOut{}
	e.okJSON(&sn, "show", b.ShortID)
	m := sn.Machine
	if m == nil || m.Kind != "physical" || m.CPUs < 1 || m.MemoryMiB < 64 || (m.Firmware != "bios" && m.Firmware != "uefi") {
		t.Fatalf("a device's snapshot: machine %+v", m)
	}
	if _, err := os.Stat("/sys/firmware/efi"); (err == nil) != (m.Firmware == "uefi") {
		t.Errorf("firmware %q, /sys/firmware/efi: %v", m.Firmware, err)
	}
}
