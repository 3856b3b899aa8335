package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// migrateImageFormats are the VM disk targets migrate updates in place
// with sauve's own updaters, by extension, with qemu's name for them and
// whether qemu-img check checks them.
var migrateImageFormats = []struct {
	ext, qemu string
	check     bool
	create    []string // qemu-img create options of a target made beforehand
}{
	{".vhd", "vpc", false, nil},
	{".vhd", "vpc", false, []string{"-o", "subformat=fixed,force_size=on"}},
	{".vdi", "vdi", true, nil},
	{".vdi", "vdi", true, []string{"-o", "static=on"}},
	{".vhdx", "vhdx", true, nil},
	{".vhdx", "vhdx", true, []string{"-o", "subformat=fixed,block_state_zero=off"}},
}

// checkImageTarget checks a target image with qemu-img (check where it
// checks the format, else a full read) and returns it converted to raw.
func checkImageTarget(t *testing.T, img, format string, check bool) string {
	t.Helper()
	if check {
		if out, err := exec.Command("qemu-img", "check", "-f", format, img).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", img, err, out)
		}
	}
	raw := img + ".raw"
	if out, err := exec.Command("qemu-img", "convert", "-f", format, "-O", "raw", img, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v\n%s", img, err, out)
	}
	return raw
}

// A loop-mounted ext4 written to during the passes, migrated into each
// VM disk format: the image checks after every pass, a delta pass
// writes much less than the first, and after --final the image holds
// the frozen filesystem's files.
func TestMigrateVHDFormats(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "qemu-img")
	for _, f := range migrateImageFormats {
		name := f.qemu
		if f.create != nil {
			name += "-premade"
		}
		t.Run(name, func(t *testing.T) {
			e := newBareEnv(t)
			const size = 96 << 20
			img, mnt := mountedExt4(t, e, "src", size, 24)
			target := e.path("target" + f.ext)
			if f.create != nil {
				args := append(append([]string{"create", "-f", f.qemu}, f.create...), target, fmt.Sprint(size))
				sh(t, "qemu-img", args...)
			}
			var premade int64
			if fi, err := os.Stat(target); err == nil {
				premade = fi.Size()
			}
			w := startWriter(mnt, 20*time.Millisecond)
			defer w.halt()
			first, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
			if first[0].BytesWritten < 24<<20 {
				t.Fatalf("first pass: %+v", first[0])
			}
			checkImageTarget(t, target, f.qemu, f.check)
			parseMigrate(t, e.ok("migrate", img, target, "--json"))
			checkImageTarget(t, target, f.qemu, f.check)
			w.halt()
			sh(t, "sync")
			parseMigrate(t, e.ok("migrate", img, target, "--json"))
			writeFile(t, filepath.Join(mnt, "small"), randomBytes(1<<20))
			sh(t, "sync")
			delta, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
			if d := delta[0]; d.BytesWritten == 0 || d.BytesWritten > first[0].BytesWritten/6 {
				t.Errorf("delta pass for a 1 MiB file: wrote %d bytes (first pass %d)", d.BytesWritten, first[0].BytesWritten)
			}
			checkImageTarget(t, target, f.qemu, f.check)
			writeFile(t, filepath.Join(mnt, "last"), []byte("before the cut-over"))
			passes, sum := parseMigrate(t, e.ok("migrate", img, target, "--final", "--json"))
			if len(passes) != 1 || !sum.Final {
				t.Fatalf("final pass: %+v, summary %+v", passes, sum)
			}
			raw := checkImageTarget(t, target, f.qemu, f.check)
			checkTarget(t, raw, hashTree(t, mnt))
			// A fixed image made beforehand was updated, not replaced.
			if fi, err := os.Stat(target); premade != 0 && (err != nil || fi.Size() != premade) {
				t.Errorf("fixed target of %d bytes is now %v, %v", premade, fi.Size(), err)
			}
		})
	}
}

// The serial-printing boot disk migrated into each format boots.
func TestMigrateVHDBoot(t *testing.T) {
	requireTool(t, "qemu-system-x86_64")
	needTools(t, "qemu-img")
	e := newBareEnv(t)
	line := "SAUVE MIGRATED BOOT " + hex.EncodeToString(randomBytes(4))
	src := e.path("boot.raw")
	bootDisk(t, src, line)
	for _, ext := range []string{".vhd", ".vdi", ".vhdx"} {
		target := e.path("boot" + ext)
		e.ok("migrate", src, target, "--final")
		format := map[string]string{".vhd": "vpc", ".vdi": "vdi", ".vhdx": "vhdx"}[ext]
		boot(t, target, format, line)
	}
}

// Images that cannot be updated in place are refused with one line
// that says why, and are left as they were.
func TestMigrateVHDRefusals(t *testing.T) {
	needTools(t, "qemu-img")
	e := newBareEnv(t)
	src := e.path("src.raw")
	bootDisk(t, src, "x")
	vhdType := func(b []byte) {
		// A differencing disk: the footer copy's type, its checksum.
		binary.BigEndian.PutUint32(b[60:], 4)
		var s uint32
		for i, c := range b[:512] {
			if i < 64 || i >= 68 {
				s += uint32(c)
			}
		}
		binary.BigEndian.PutUint32(b[64:], ^s)
	}
	for _, c := range []struct {
		name, format, ext, want string
		mod                     func(b []byte)
	}{
		{"differencing vhd", "vpc", ".vhd", "differencing disks", vhdType},
		{"differencing vdi", "vdi", ".vdi", "differencing images", func(b []byte) { binary.LittleEndian.PutUint32(b[76:], 4) }},
		{"damaged vdi", "vdi", ".vdi", "no VDI signature", func(b []byte) { b[64] ^= 0xff }},
		{"damaged vhd", "vpc", ".vhd", "dynamic header checksum", func(b []byte) { b[512+40] ^= 0xff }},
		{"damaged vhdx", "vhdx", ".vhdx", "neither header is valid", func(b []byte) { b[64<<10+100] ^= 0xff; b[128<<10+100] ^= 0xff }},
	} {
		img := e.path(strings.ReplaceAll(c.name, " ", "-") + c.ext)
		sh(t, "qemu-img", "create", "-f", c.format, img, "16M")
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		c.mod(b)
		writeFile(t, img, b)
		r := e.run("migrate", src, img)
		after, _ := os.ReadFile(img)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 || !bytes.Equal(after, b) {
			t.Errorf("%s: exit %d, stderr %q, image changed %v", c.name, r.code, r.stderr, !bytes.Equal(after, b))
		}
	}
}

// kill -9 of passes into each format at random instants: the next pass
// opens the image (repairing what the killed one left half done), and
// after --final the image checks clean and holds the source's files.
func TestMigrateVHDKill9(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "qemu-img")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for _, f := range []struct{ ext, qemu string }{{".vhd", "vpc"}, {".vdi", "vdi"}, {".vhdx", "vhdx"}} {
		t.Run(f.qemu, func(t *testing.T) {
			e := newBareEnv(t)
			img, mnt := mountedExt4(t, e, "src", 48<<20, 12)
			target := e.path("target" + f.ext)
			w := startWriter(mnt, 10*time.Millisecond)
			defer w.halt()
			for range soakRounds(3, 12) { // kills at random moments
				c := e.cmd(nil, "migrate", img, target, "--limit-rate", "16M")
				if err := c.Start(); err != nil {
					t.Fatal(err)
				}
				after := time.Duration(100+rng.IntN(500)) * time.Millisecond
				time.Sleep(after)
				c.Process.Signal(syscall.SIGKILL)
				if err := c.Wait(); err == nil {
					t.Fatalf("the pass ended before kill -9 after %s", after)
				}
				t.Logf("killed after %s", after)
			}
			e.ok("migrate", img, target)
			checkImageTarget(t, target, f.qemu, f.qemu != "vpc")
			w.halt()
			e.ok("migrate", img, target, "--final")
			raw := checkImageTarget(t, target, f.qemu, f.qemu != "vpc")
			checkTarget(t, raw, hashTree(t, mnt))
		})
	}
}
