package main

import (
	"errors"
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

// qemuCheck fails unless qemu-img check finds the image clean, or, with
// leaks, finds nothing worse than leaked clusters.
func qemuCheck(t *testing.T, path, format string, leaks bool) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-f", format, path).CombinedOutput()
	var ee *exec.ExitError
	if err == nil || leaks && errors.As(err, &ee) && ee.ExitCode() == 3 {
		return
	}
	t.Fatalf("qemu-img check of %s: %v\n%s", path, err, out)
}

// qemuRaw converts an image to a raw file and returns its path.
func qemuRaw(t *testing.T, e *env, path, format string) string {
	t.Helper()
	raw := e.path(filepath.Base(path) + ".raw")
	sh(t, "qemu-img", "convert", "-f", format, "-O", "raw", path, raw)
	return raw
}

var vdiskTargets = []struct{ ext, format string }{{"qcow2", "qcow2"}, {"vmdk", "vmdk"}}

// Migrating a loop-mounted ext4 into a qcow2 or vmdk image, updated in
// place: the image checks clean after every pass, a delta pass writes
// much less than the first, and after --final the image holds the
// frozen source's files.
func TestMigrateVDiskLoopMountedExt4(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "qemu-img")
	for _, tc := range vdiskTargets {
		t.Run(tc.ext, func(t *testing.T) {
			e := newBareEnv(t)
			img, mnt := mountedExt4(t, e, "src", 128<<20, 32)
			target := e.path("target." + tc.ext)
			w := startWriter(mnt, 20*time.Millisecond)
			defer w.halt()
			first, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
			if first[0].BytesWritten < 32<<20 {
				t.Fatalf("first pass: %+v", first[0])
			}
			qemuCheck(t, target, tc.format, false)
			parseMigrate(t, e.ok("migrate", img, target, "--json"))
			qemuCheck(t, target, tc.format, false)
			w.halt()
			sh(t, "sync")
			parseMigrate(t, e.ok("migrate", img, target, "--json"))
			writeFile(t, filepath.Join(mnt, "small"), randomBytes(1<<20))
			sh(t, "sync")
			delta, _ := parseMigrate(t, e.ok("migrate", img, target, "--json"))
			t.Logf("first pass wrote %d bytes, the delta pass %d", first[0].BytesWritten, delta[0].BytesWritten)
			if d := delta[0]; d.BytesWritten == 0 || d.BytesWritten > first[0].BytesWritten/6 {
				t.Errorf("delta pass for a 1 MiB file: wrote %d bytes (first pass %d)", d.BytesWritten, first[0].BytesWritten)
			}
			qemuCheck(t, target, tc.format, false)
			passes, sum := parseMigrate(t, e.ok("migrate", img, target, "--final", "--json"))
			if !passes[len(passes)-1].Final || !sum.Final {
				t.Fatalf("final pass: %+v, summary %+v", passes, sum)
			}
			qemuCheck(t, target, tc.format, false)
			if info := sh(t, "qemu-img", "info", target); !strings.Contains(info, "file format: "+tc.format) {
				t.Fatalf("target is not %s:\n%s", tc.format, info)
			}
			checkTarget(t, qemuRaw(t, e, target, tc.format), hashTree(t, mnt))
		})
	}
}

// kill -9 of passes into an image: it still passes qemu-img check
// (qcow2: leaked clusters at worst), and the next passes make it exact.
func TestMigrateVDiskKill9(t *testing.T) {
	needTools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "qemu-img")
	for _, tc := range vdiskTargets {
		t.Run(tc.ext, func(t *testing.T) {
			e := newBareEnv(t)
			img, mnt := mountedExt4(t, e, "src", 64<<20, 16)
			target := e.path("target." + tc.ext)
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
			w := startWriter(mnt, 10*time.Millisecond)
			defer w.halt()
			for range soakRounds(2, 12) { // kills at random moments
				c := e.cmd(nil, "migrate", img, target, "--limit-rate", "16M")
				if err := c.Start(); err != nil {
					t.Fatal(err)
				}
				after := time.Duration(200+rng.IntN(600)) * time.Millisecond
				time.Sleep(after)
				c.Process.Signal(syscall.SIGKILL)
				if err := c.Wait(); err == nil {
					t.Fatalf("the pass ended before kill -9 after %s", after)
				}
				t.Logf("killed after %s", after)
				qemuCheck(t, target, tc.format, tc.format == "qcow2")
			}
			e.ok("migrate", img, target)
			qemuCheck(t, target, tc.format, tc.format == "qcow2")
			w.halt()
			e.ok("migrate", img, target, "--final")
			qemuCheck(t, target, tc.format, tc.format == "qcow2")
			checkTarget(t, qemuRaw(t, e, target, tc.format), hashTree(t, mnt))
		})
	}
}

// A bootable disk migrated into qcow2 and vmdk boots under QEMU, into a
// new image and into one qemu-img made.
func TestMigrateVDiskBoots(t *testing.T) {
	needTools(t, "qemu-img", "qemu-system-x86_64")
	for _, tc := range vdiskTargets {
		for _, made := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/qemu-made=%v", tc.ext, made), func(t *testing.T) {
				bootInto(t, tc.ext, tc.format, made)
			})
		}
	}
}

func bootInto(t *testing.T, ext, format string, made bool) {
	e := newBareEnv(t)
	src := e.path("boot.img")
	line := "sauve migrated " + ext
	bootDisk(t, src, line)
	target := e.path("boot." + ext)
	if made {
		fi, err := os.Stat(src)
		if err != nil {
			t.Fatal(err)
		}
		sh(t, "qemu-img", "create", "-f", format, target, fmt.Sprint(fi.Size()))
	}
	e.ok("migrate", src, target)
	e.ok("migrate", src, target, "--final")
	qemuCheck(t, target, format, false)
	boot(t, target, format, line)
}

// Images that cannot be updated in place are refused with one line and
// left as they were.
func TestMigrateVDiskRefuses(t *testing.T) {
	needTools(t, "qemu-img")
	e := newBareEnv(t)
	src := e.path("src.img")
	randomFile(t, src, 4<<20)
	base := e.path("base.qcow2")
	sh(t, "qemu-img", "create", "-f", "qcow2", base, "4M")
	overlay := e.path("overlay.qcow2")
	sh(t, "qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
	stream := e.path("stream.vmdk")
	sh(t, "qemu-img", "create", "-f", "vmdk", "-o", "subformat=streamOptimized", stream, "4M")
	small := e.path("small.qcow2")
	sh(t, "qemu-img", "create", "-f", "qcow2", small, "2M")
	for _, c := range []struct{ name, target, want string }{
		{"backing file", overlay, "backing file"},
		{"streamOptimized", stream, "streamOptimized"},
		{"smaller image", small, "would not fit"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := fileHash(t, c.target, -1)
			stderr := e.fail([]string{c.want}, "migrate", src, c.target)
			if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
				t.Errorf("a %d-line error:\n%s", n+1, stderr)
			}
			if fileHash(t, c.target, -1) != before {
				t.Errorf("%s was written", c.target)
			}
		})
	}
}

// --subformat fixed makes a new VHD or VDI target fixed (its file holds
// the whole disk); every pass leaves it valid and the final one equal to
// the source (qemu-img compare). An existing target of another
// subformat, and --subformat on formats without any, are refused with
// nothing written.
func TestMigrateSubformatFixed(t *testing.T) {
	needTools(t, "qemu-img")
	e := newBareEnv(t)
	src := e.path("src.img")
	const size = 24 << 20
	randomFile(t, src, size)
	f, err := os.OpenFile(src, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(make([]byte, 8<<20), 8<<20) // zeros, skipped in a dynamic image
	for _, tc := range []struct {
		ext, qemu string
		check     bool
	}{{".vhd", "vpc", false}, {".vdi", "vdi", true}} {
		t.Run(tc.qemu, func(t *testing.T) {
			fixed := e.path("fixed" + tc.ext)
			e.ok("migrate", src, fixed, "--subformat", "fixed")
			if fi, err := os.Stat(fixed); err != nil || fi.Size() < size {
				t.Fatalf("a fixed %s of a %d-byte disk: %v, %v", tc.ext, size, fi.Size(), err)
			}
			// A fixed VHD is the disk then its 512-byte footer (Azure
			// checks it so); qemu-img reads that virtual size.
			if fi, _ := os.Stat(fixed); tc.qemu == "vpc" && fi.Size() != size+512 {
				t.Errorf("a fixed VHD of %d bytes is %d bytes, want %d", size, fi.Size(), size+512)
			}
			if tc.qemu == "vpc" && !strings.Contains(sh(t, "qemu-img", "info", "-f", "vpc", fixed), fmt.Sprintf("(%d bytes)", size)) {
				t.Error("qemu-img info does not read the fixed VHD's virtual size as the source's")
			}
			checkImageTarget(t, fixed, tc.qemu, tc.check)
			f.WriteAt(randomBytes(3<<20), 9<<20)
			e.ok("migrate", src, fixed, "--subformat", "fixed") // an existing fixed image: accepted
			checkImageTarget(t, fixed, tc.qemu, tc.check)
			e.ok("migrate", src, fixed, "--final")
			checkImageTarget(t, fixed, tc.qemu, tc.check)
			if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", tc.qemu, src, fixed).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
			// A new dynamic image (the default) is not preallocated; one
			// given --subformat fixed is refused then.
			dyn := e.path("dynamic" + tc.ext)
			e.ok("migrate", src, dyn, "--subformat", "dynamic")
			if fi, err := os.Stat(dyn); err != nil || fi.Size() >= size {
				t.Fatalf("a dynamic %s: %v, %v", tc.ext, fi.Size(), err)
			}
			before := fileHash(t, dyn, -1)
			e.fail([]string{"dynamic", "not --subformat fixed"}, "migrate", src, dyn, "--subformat", "fixed")
			if fileHash(t, dyn, -1) != before {
				t.Error("the refused migration wrote the target")
			}
			e.fail([]string{"fixed", "not --subformat dynamic"}, "migrate", src, fixed, "--subformat", "dynamic")
		})
	}
	for _, c := range []struct{ target, sub, want string }{
		{e.path("x.img"), "fixed", "no subformats"},
		{e.path("x.qcow2"), "fixed", "no subformats"},
		{e.path("x.vhdx"), "fixed", "no subformats"},
		{"ssh://root@127.0.0.1/dev/vdb", "fixed", "no subformats"},
		{e.path("x.vhd"), "sparse", "unknown vhd subformat"},
		{e.path("x.vmdk"), "streamOptimized", "cannot be updated in place"},
	} {
		e.fail([]string{c.want}, "migrate", src, c.target, "--subformat", c.sub)
		if strings.HasPrefix(c.target, "/") && fileExists(c.target) {
			t.Errorf("%s was created", c.target)
		}
	}
	if fi, err := os.Stat(e.path("x.vmdk")); err == nil {
		t.Errorf("x.vmdk exists: %v", fi.Size())
	}
	e.ok("migrate", src, e.path("ok.vmdk"), "--subformat", "monolithicSparse")
	qemuCheck(t, e.path("ok.vmdk"), "vmdk", false)
}
