// Device-mapper is missing from the kernel these tests run on, so LVM
// cannot run here: these tests drive the LVM provider through its command
// runner with recorded outputs of lvs, lvcreate, lvchange and lvremove
// (testdata/lvm, in LVM2's JSON report format), and check the commands
// it runs. The test of LVM itself, real volumes snapshotted while written,
// is a script run inside a guest whose kernel has device-mapper.

package shadow

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/source"
)

const testSnap = "sauve-snap-4242-0123456789ab"

// fakeLVM answers LVM commands from testdata/lvm and records them.
type fakeLVM struct {
	t       *testing.T
	replies map[string]lvmReply // by command line
	calls   []string
}

type lvmReply struct {
	file string // testdata/lvm file printed on standard output
	err  error
}

func (f *fakeLVM) run(_ context.Context, cmd string, args ...string) ([]byte, error) {
	line := strings.Join(append([]string{cmd}, args...), " ")
	f.calls = append(f.calls, line)
	r, ok := f.replies[line]
	if !ok {
		f.t.Errorf("unexpected command %s", line)
		return nil, errors.New("unexpected command")
	}
	if r.err != nil {
		return nil, r.err
	}
	if r.file == "" {
		return nil, nil
	}
	return os.ReadFile(filepath.Join("testdata", "lvm", r.file))
}

func lvsOf(arg string) string {
	return "lvs --reportformat json -o " + lvsFields + " --units b --nosuffix " + arg
}

var lvsLeftovers = "lvs --reportformat json -o " + lvsFields + " --units b --nosuffix -S lv_name=~^sauve-snap-"

// lvmSetup is a planner whose commands fakeLVM answers: the origin
// /dev/vg0/root (or data) from originFile, no leftovers, and lvcreate,
// lvchange and lvremove succeeding. Snapshots open as a 1 MiB file.
func lvmSetup(t *testing.T, originFile string, o Options) (*fakeLVM, lvmPlanner, *source.Source) {
	f := &fakeLVM{t: t, replies: map[string]lvmReply{
		lvsOf("/dev/vg0/root"):        {file: originFile},
		lvsLeftovers:                  {file: "none.json"},
		"lvremove -f vg0/" + testSnap: {},
	}}
	img := filepath.Join(t.TempDir(), "snapshot-device")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	if o.Warn == nil {
		o.Warn = func(string) {}
	}
	p := lvmPlanner{lvm: f, o: o,
		name: func() (string, error) { return testSnap, nil },
		open: func(ctx context.Context, path string) (*source.Source, error) {
			if path != "/dev/vg0/"+testSnap {
				t.Errorf("opened %s, want /dev/vg0/%s", path, testSnap)
			}
			return source.Open(ctx, img)
		}}
	return f, p, open(t, img)
}

// The lvcreate command a plan runs: a size chosen from the origin and
// --snapshot-size for a thick volume, none for a thin one, and the errors
// and warnings of what cannot be snapshotted.
func TestLVMPlan(t *testing.T) {
	const gib = 1 << 30
	for _, tc := range []struct {
		name, origin, size string
		mode               Mode
		vgFree             int64 // replaces the origin's vg_free when set
		originSize         int64 // replaces the origin's lv_size when set
		lvcreate           string
		err                string
		unsupported        bool
		warn               string
	}{
		{name: "thick, a tenth", origin: "thick-origin.json", lvcreate: "-s -n " + testSnap + " -L 2147483648b vg0/root"},
		{name: "thick, at least 1 GiB", origin: "thick-origin.json", originSize: 4 * gib, lvcreate: "-s -n " + testSnap + " -L 1073741824b vg0/root"},
		{name: "thick, at most the origin", origin: "thick-origin.json", originSize: 512 << 20, lvcreate: "-s -n " + testSnap + " -L 536870912b vg0/root"},
		{name: "thick, what the VG has free", origin: "thick-origin.json", vgFree: gib + 4194304 + 1000, lvcreate: "-s -n " + testSnap + " -L 1077936128b vg0/root", warn: "has only 1.0 GiB free"},
		{name: "thick, VG full, auto", origin: "thick-origin-vg-full.json", mode: Auto, unsupported: true, err: "volume group vg0 has no free space", warn: "is read as it is"},
		{name: "thick, VG full, named", origin: "thick-origin-vg-full.json", mode: LVM, unsupported: true, err: "volume group vg0 has no free space"},
		{name: "given size", origin: "thick-origin.json", size: "5G", lvcreate: "-s -n " + testSnap + " -L 5G vg0/root"},
		{name: "given fraction", origin: "thick-origin.json", size: "1.5g", lvcreate: "-s -n " + testSnap + " -L 1.5g vg0/root"},
		{name: "given share", origin: "thick-origin.json", size: "20%ORIGIN", lvcreate: "-s -n " + testSnap + " -l 20%ORIGIN vg0/root"},
		{name: "given size over the VG's free", origin: "thick-origin.json", size: "60G", err: "volume group vg0 has only 50.0 GiB free"},
		{name: "given option", origin: "thick-origin.json", size: "-rf", err: `--snapshot-size "-rf": give a size`},
		{name: "given nonsense", origin: "thick-origin.json", size: "10 G", err: `--snapshot-size "10 G"`},
		{name: "thin", origin: "thin-origin.json", size: "5G", lvcreate: "-s -n " + testSnap + " vg0/data"},
		{name: "one row a segment", origin: "thick-origin-segments.json", lvcreate: "-s -n " + testSnap + " -L 2147483648b vg0/root"},
		{name: "json_std report", origin: "thick-origin-json-std.json", lvcreate: "-s -n " + testSnap + " -L 2147483648b vg0/root"},
		{name: "snapshot of a snapshot", origin: "origin-is-snapshot.json", unsupported: true, err: "is itself an LVM snapshot (vg0/snap0)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var warnings []string
			f, p, src := lvmSetup(t, tc.origin, Options{Mode: tc.mode, SnapshotSize: tc.size, Warn: func(s string) { warnings = append(warnings, s) }})
			if tc.vgFree != 0 || tc.originSize != 0 {
				p.lvm = editLVs(f, tc.vgFree, tc.originSize)
			}
			f.replies["lvcreate "+tc.lvcreate] = lvmReply{}
			f.replies["lvchange -ay -K vg0/"+testSnap] = lvmReply{}
			pl, err := p.plan(context.Background(), src, "/dev/vg0/root")
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || isUnsupported(err) != tc.unsupported {
					t.Fatalf("plan: %v, want %q (unsupported %v)", err, tc.err, tc.unsupported)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if pl.mode != LVM || pl.freeze == nil || len(pl.freeze) != 0 {
					t.Errorf("plan mode %q, freeze %#v: want lvm and an empty, non-nil freeze", pl.mode, pl.freeze)
				}
				if slices.ContainsFunc(f.calls, func(c string) bool { return strings.HasPrefix(c, "lvcreate") }) {
					t.Error("plan ran lvcreate: only take may")
				}
				v, err := pl.take(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if err := v.Release(); err != nil {
					t.Fatal(err)
				}
				if !slices.Contains(f.calls, "lvcreate "+tc.lvcreate) {
					t.Errorf("commands %q, want lvcreate %s", f.calls, tc.lvcreate)
				}
			}
			if (tc.warn == "") != (len(warnings) == 0) || (tc.warn != "" && !strings.Contains(warnings[0], tc.warn)) {
				t.Errorf("warnings %q, want %q", warnings, tc.warn)
			}
		})
	}
}

// editLVs answers lvs for the origin with its vg_free or lv_size changed.
func editLVs(f *fakeLVM, vgFree, size int64) lvmRunner {
	return runnerFunc(func(ctx context.Context, cmd string, args ...string) ([]byte, error) {
		out, err := f.run(ctx, cmd, args...)
		if err != nil || cmd != "lvs" || args[len(args)-1] != "/dev/vg0/root" {
			return out, err
		}
		s := string(out)
		if vgFree != 0 {
			s = strings.Replace(s, `"vg_free":"53687091200"`, fmt.Sprintf(`"vg_free":"%d"`, vgFree), 1)
		}
		if size != 0 {
			s = strings.Replace(s, `"lv_size":"21474836480"`, fmt.Sprintf(`"lv_size":"%d"`, size), 1)
		}
		return []byte(s), nil
	})
}

type runnerFunc func(ctx context.Context, cmd string, args ...string) ([]byte, error)

func (r runnerFunc) run(ctx context.Context, cmd string, args ...string) ([]byte, error) {
	return r(ctx, cmd, args...)
}

// A thin snapshot is activated (LVM creates it with the activation-skip
// flag) and reads through its device; LVM tells no COW use of its own.
func TestLVMThinTake(t *testing.T) {
	f, p, src := lvmSetup(t, "thin-origin.json", Options{})
	f.replies["lvcreate -s -n "+testSnap+" vg0/data"] = lvmReply{}
	f.replies["lvchange -ay -K vg0/"+testSnap] = lvmReply{}
	f.replies[lvsOf("vg0/"+testSnap)] = lvmReply{file: "thin-snapshot.json"}
	pl, err := p.plan(context.Background(), src, "/dev/vg0/root")
	if err != nil {
		t.Fatal(err)
	}
	v, err := pl.take(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{lvsOf("/dev/vg0/root"), lvsLeftovers, "lvcreate -s -n " + testSnap + " vg0/data", "lvchange -ay -K vg0/" + testSnap}
	if !slices.Equal(f.calls, want) {
		t.Errorf("commands\n%q\nwant\n%q", f.calls, want)
	}
	if v.Copy != "lvm" || v.Live || v.Size != 1<<20 || v.Of != src || v.CopyUsed != nil {
		t.Errorf("view: copy %q, live %v, size %d, CopyUsed set %v", v.Copy, v.Live, v.Size, v.CopyUsed != nil)
	}
	if err := v.Verify(); err != nil {
		t.Errorf("Verify of a healthy thin snapshot: %v", err)
	}
	f.replies[lvsOf("vg0/"+testSnap)] = lvmReply{file: "thin-snapshot-failed.json"}
	if err := v.Verify(); err == nil || !strings.Contains(err.Error(), "pool vg0/pool0 failed") {
		t.Errorf("Verify of a failed thin snapshot: %v", err)
	}
	if err := v.Release(); err != nil {
		t.Fatal(err)
	}
}

// Verify fails a backup whose thick snapshot filled its COW space (LVM
// then invalidates it) or was about to, and one whose snapshot lvs cannot
// report; CopyUsed is the snapshot's use of its COW space.
func TestLVMVerify(t *testing.T) {
	for _, tc := range []struct {
		report string
		err    string
		used   int64
	}{
		{report: "snapshot-ok.json", used: 75591424}, // 3.52% of 2 GiB
		{report: "snapshot-ok-with-log.json", used: 75591424},
		{report: "snapshot-invalid.json", err: "the LVM snapshot vg0/" + testSnap + " filled its COW space (2.0 GiB) during the backup: nothing stored; give --snapshot-size more", used: 2 << 30},
		{report: "snapshot-full.json", err: "filled its COW space (2.0 GiB)", used: 2 << 30},
		{report: "none.json", err: "check the LVM snapshot vg0/" + testSnap + " after reading it: lvs vg0/" + testSnap + " reported 0 volumes", used: -1},
		{err: "check the LVM snapshot vg0/" + testSnap + " after reading it: lvs: exit status 5", used: -1},
	} {
		t.Run(tc.report, func(t *testing.T) {
			f, p, src := lvmSetup(t, "thick-origin.json", Options{})
			f.replies["lvcreate -s -n "+testSnap+" -L 2147483648b vg0/root"] = lvmReply{}
			f.replies[lvsOf("vg0/"+testSnap)] = lvmReply{file: tc.report}
			if tc.report == "" {
				f.replies[lvsOf("vg0/"+testSnap)] = lvmReply{err: errors.New("lvs: exit status 5")}
			}
			pl, err := p.plan(context.Background(), src, "/dev/vg0/root")
			if err != nil {
				t.Fatal(err)
			}
			v, err := pl.take(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer v.Release()
			err = v.Verify()
			if (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("Verify: %v, want %q", err, tc.err)
			}
			if got := v.CopyUsed(); got != tc.used {
				t.Errorf("CopyUsed %d, want %d", got, tc.used)
			}
		})
	}
}

// Release removes the snapshot once, even after a read of it failed, and
// says how to remove it by hand when lvremove fails; a take that fails
// after lvcreate removes what it made.
func TestLVMRelease(t *testing.T) {
	lvremove := "lvremove -f vg0/" + testSnap
	count := func(calls []string, c string) int {
		n := 0
		for _, x := range calls {
			if x == c {
				n++
			}
		}
		return n
	}
	take := func(t *testing.T, f *fakeLVM, p lvmPlanner, src *source.Source) (*source.View, error) {
		f.replies["lvcreate -s -n "+testSnap+" -L 2147483648b vg0/root"] = lvmReply{}
		pl, err := p.plan(context.Background(), src, "/dev/vg0/root")
		if err != nil {
			t.Fatal(err)
		}
		return pl.take(context.Background())
	}

	f, p, src := lvmSetup(t, "thick-origin.json", Options{})
	v, err := take(t, f, p, src)
	if err != nil {
		t.Fatal(err)
	}
	v.At.(*os.File).Close() // the device goes away under the backup
	if _, err := v.At.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a read of a closed device succeeded: the test proves nothing")
	}
	if err := v.Release(); err != nil {
		t.Errorf("Release after a failed read: %v", err)
	}
	v.Release()
	if n := count(f.calls, lvremove); n != 1 {
		t.Errorf("%s ran %d times, want once: %q", lvremove, n, f.calls)
	}

	f, p, src = lvmSetup(t, "thick-origin.json", Options{})
	f.replies[lvremove] = lvmReply{err: errors.New("lvremove: exit status 5: Logical volume vg0/" + testSnap + " in use")}
	v, err = take(t, f, p, src)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Release(); err == nil || !strings.Contains(err.Error(), "in use (remove it with lvremove vg0/"+testSnap+")") {
		t.Errorf("Release when lvremove fails: %v", err)
	}

	f, p, src = lvmSetup(t, "thick-origin.json", Options{})
	p.open = func(context.Context, string) (*source.Source, error) { return nil, errors.New("no such device") }
	if _, err := take(t, f, p, src); err == nil || !strings.Contains(err.Error(), "open the LVM snapshot /dev/vg0/"+testSnap+": no such device") {
		t.Errorf("take when the snapshot does not open: %v", err)
	}
	if n := count(f.calls, lvremove); n != 1 {
		t.Errorf("take that failed to open the snapshot ran %s %d times, want once", lvremove, n)
	}

	f, p, src = lvmSetup(t, "thin-origin.json", Options{})
	f.replies["lvcreate -s -n "+testSnap+" vg0/data"] = lvmReply{}
	f.replies["lvchange -ay -K vg0/"+testSnap] = lvmReply{err: errors.New("lvchange: exit status 5")}
	pl, err := p.plan(context.Background(), src, "/dev/vg0/root")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pl.take(context.Background()); err == nil || !strings.Contains(err.Error(), "activate the LVM snapshot vg0/"+testSnap) {
		t.Errorf("take when activation fails: %v", err)
	}
	if n := count(f.calls, lvremove); n != 1 {
		t.Errorf("take that failed to activate the snapshot ran %s %d times, want once", lvremove, n)
	}
}

// The snapshots that backups killed before their Release left are removed
// (thick and thin, in every VG) and reported; those of running processes,
// and volumes that are not sauve's snapshots, are left alone.
func TestLVMLeftovers(t *testing.T) {
	f, p, src := lvmSetup(t, "thick-origin.json", Options{})
	var warnings []string
	p.o.Warn = func(s string) { warnings = append(warnings, s) }
	f.replies[lvsLeftovers] = lvmReply{file: "leftovers.json"}
	f.replies["lvremove -f vg0/sauve-snap-2147483646-0a1b2c3d4e5f"] = lvmReply{}
	f.replies["lvremove -f vg1/sauve-snap-2147483645-00112233aabb"] = lvmReply{err: errors.New("lvremove: exit status 5: Logical volume vg1/sauve-snap-2147483645-00112233aabb in use")}
	if _, err := p.plan(context.Background(), src, "/dev/vg0/root"); err != nil {
		t.Fatal(err)
	}
	var removed []string
	for _, c := range f.calls {
		if strings.HasPrefix(c, "lvremove") {
			removed = append(removed, c)
		}
	}
	want := []string{"lvremove -f vg0/sauve-snap-2147483646-0a1b2c3d4e5f", "lvremove -f vg1/sauve-snap-2147483645-00112233aabb"}
	if !slices.Equal(removed, want) {
		t.Errorf("removed %q, want %q", removed, want)
	}
	if len(warnings) != 2 || !strings.HasPrefix(warnings[0], "removed vg0/sauve-snap-2147483646-0a1b2c3d4e5f, the LVM snapshot an interrupted backup (process 2147483646) left") ||
		!strings.HasPrefix(warnings[1], "cannot remove vg1/sauve-snap-2147483645-00112233aabb") || !strings.Contains(warnings[1], "in use") {
		t.Errorf("warnings %q", warnings)
	}
}

// A device that is no logical volume, and a host without LVM, have no
// LVM snapshot: errUnsupported, naming why.
func TestLVMUnsupported(t *testing.T) {
	_, p, src := lvmSetup(t, "thick-origin.json", Options{})
	stderr, _ := os.ReadFile("testdata/lvm/not-lv.stderr")
	p.lvm = runnerFunc(func(context.Context, string, ...string) ([]byte, error) {
		return nil, fmt.Errorf("lvs /dev/sda: exit status 5: %s", oneLine(string(stderr)))
	})
	if _, err := p.plan(context.Background(), src, "/dev/sda"); !isUnsupported(err) || !strings.Contains(err.Error(), `is not an LVM logical volume: lvs /dev/sda: exit status 5: Volume group "sda" not found; Cannot process volume group sda`) {
		t.Errorf("plan of a device lvs does not know: %v", err)
	}

	t.Setenv("PATH", t.TempDir())
	p.lvm = lvmTool{}
	if _, err := lvmPath("lvs"); err == nil {
		t.Skip("LVM2 is installed in /usr/sbin or /sbin: no host without LVM to test")
	}
	if _, err := p.plan(context.Background(), src, "/dev/vg0/root"); !isUnsupported(err) || !strings.Contains(err.Error(), "lvs is not installed") {
		t.Errorf("plan without LVM installed: %v", err)
	}

	if _, err := planLVM(context.Background(), src, Options{}); !isUnsupported(err) || !strings.Contains(err.Error(), "is not a block device") {
		t.Errorf("planLVM of a file: %v", err)
	}
}

// A block device that is not a device-mapper device is not asked about.
func TestLVMLoopDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices (CI runs as root)")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if _, err := planLVM(context.Background(), open(t, loop), Options{}); !isUnsupported(err) || !strings.Contains(err.Error(), "is not a device-mapper device") {
		t.Errorf("planLVM of %s: %v", loop, err)
	}
	views, err := New(Options{Mode: Auto}).Views(context.Background(), []*source.Source{open(t, loop)})
	if err != nil || views[0].Copy != "" || !views[0].Live {
		t.Errorf("auto on a loop device: %v, %+v", err, views)
	}
	if _, err := New(Options{Mode: LVM}).Views(context.Background(), []*source.Source{open(t, loop)}); err == nil || !strings.Contains(err.Error(), "--snapshot lvm: no lvm copy of "+loop) {
		t.Errorf("--snapshot lvm of a loop device: %v", err)
	}
}

// lvmTool runs real programs: it says what failed with their standard
// error, and bounds what they print and how long they run.
func TestLVMTool(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) {
		os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755)
	}
	script("lvs", `echo '  Volume group "sda" not found' >&2; echo '  Cannot process volume group sda' >&2; exit 5`)
	script("lvcreate", `head -c 5000000 /dev/zero`)
	script("lvchange", `echo "$LC_ALL $LVM_SUPPRESS_FD_WARNINGS $*"`)
	script("lvremove", `exec sleep 30`)
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	ctx := context.Background()
	if _, err := (lvmTool{}).run(ctx, "lvs", "/dev/sda"); err == nil || err.Error() != `lvs /dev/sda: exit status 5: Volume group "sda" not found; Cannot process volume group sda` {
		t.Errorf("failing command: %v", err)
	}
	if _, err := (lvmTool{}).run(ctx, "lvcreate"); err == nil || !strings.Contains(err.Error(), "printed more than 4194304 bytes") {
		t.Errorf("command printing 5 MB: %v", err)
	}
	if out, err := (lvmTool{}).run(ctx, "lvchange", "-ay", "vg0/x"); err != nil || string(out) != "C 1 -ay vg0/x\n" {
		t.Errorf("lvchange: %q, %v", out, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := (lvmTool{}).run(ctx, "lvremove"); err == nil || time.Since(start) > 10*time.Second {
		t.Errorf("hung command: %v after %v", err, time.Since(start))
	}
}

func TestParseLVs(t *testing.T) {
	for _, tc := range []struct {
		file, in string
		want     []logicalVolume
		err      string
	}{
		{file: "thick-origin.json", want: []logicalVolume{{name: "root", vg: "vg0", attr: "-wi-ao----", seg: "linear", path: "/dev/vg0/root", size: 21474836480, vgFree: 53687091200, extent: 4194304, snapPercent: -1}}},
		{file: "thick-origin-json-std.json", want: []logicalVolume{{name: "root", vg: "vg0", attr: "-wi-ao----", seg: "linear", path: "/dev/vg0/root", size: 21474836480, vgFree: 53687091200, extent: 4194304, snapPercent: -1}}},
		{file: "thin-snapshot.json", want: []logicalVolume{{name: testSnap, vg: "vg0", attr: "Vwi-a-tz-k", seg: "thin", pool: "pool0", origin: "data", path: "/dev/vg0/" + testSnap, size: 107374182400, vgFree: 0, extent: 4194304, snapPercent: -1}}},
		{file: "snapshot-invalid.json", want: []logicalVolume{{name: testSnap, vg: "vg0", attr: "swi-I-s---", seg: "linear", origin: "root", path: "/dev/vg0/" + testSnap, size: 2147483648, vgFree: 51539607552, extent: 4194304, snapPercent: 100}}},
		{file: "snapshot-ok-with-log.json", want: []logicalVolume{{name: testSnap, vg: "vg0", attr: "swi-a-s---", seg: "linear", origin: "root", path: "/dev/vg0/" + testSnap, size: 2147483648, vgFree: 51539607552, extent: 4194304, snapPercent: 3.52}}},
		{file: "none.json"},
		{file: "thick-origin-segments.json", want: []logicalVolume{{name: "root", vg: "vg0", attr: "-wi-ao----", seg: "linear", path: "/dev/vg0/root", size: 21474836480, vgFree: 53687091200, extent: 4194304, snapPercent: -1}}},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-wi-a-----","lv_size":"1048576B"}]}]}`, want: []logicalVolume{{name: "a", vg: "v", attr: "-wi-a-----", size: 1 << 20, vgFree: -1, extent: -1, snapPercent: -1}}},
		{in: `{"report":[{"lv":[{"lv_name":"-rf","vg_name":"v","lv_attr":"-","lv_size":"1"}]}]}`, err: `name "-rf" is not an LVM name`},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"..","lv_attr":"-","lv_size":"1"}]}]}`, err: `name ".." is not an LVM name`},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v/w","lv_attr":"-","lv_size":"1"}]}]}`, err: "not an LVM name"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"","lv_size":"1"}]}]}`, err: "lv_attr"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":"-1"}]}]}`, err: "lv_size"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":"99999999999999999999"}]}]}`, err: "lv_size"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":""}]}]}`, err: "lv_size"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":"1","snap_percent":"NaN"}]}]}`, err: "snap_percent"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":"1","snap_percent":"100.01"}]}]}`, err: "snap_percent"},
		{in: `{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_attr":"-","lv_size":"1","vg_free":[1]}]}]}`, err: "read lvs' report"},
		{in: `{"log":[]}`, err: `it has no "report"`},
		{in: `  Volume group "sda" not found`, err: "read lvs' report"},
		{in: ``, err: "read lvs' report"},
	} {
		name := tc.file
		in := []byte(tc.in)
		if tc.file != "" {
			var err error
			if in, err = os.ReadFile(filepath.Join("testdata", "lvm", tc.file)); err != nil {
				t.Fatal(err)
			}
		} else {
			name = tc.in
		}
		got, err := parseLVs(in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: error %v, want %q", name, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%s:\n%+v, %v\nwant\n%+v", name, got, err, tc.want)
		}
	}
}

func TestLVMSizeText(t *testing.T) {
	for n, want := range map[int64]string{0: "0 bytes", 1023: "1023 bytes", 1 << 30: "1.0 GiB", 3 << 29: "1.5 GiB", 50 << 30: "50.0 GiB"} {
		if got := sizeText(n); got != want {
			t.Errorf("sizeText(%d) = %q, want %q", n, got, want)
		}
	}
}

// FuzzParseLVs: whatever lvs prints, parsing it does not panic, and what
// it accepts is fit to use (names that are no options, sizes and
// percentages in range).
func FuzzParseLVs(f *testing.F) {
	names, _ := filepath.Glob(filepath.Join("testdata", "lvm", "*"))
	for _, n := range names {
		b, _ := os.ReadFile(n)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		lvs, err := parseLVs(b)
		if err != nil {
			return
		}
		for _, lv := range lvs {
			if !lvmName.MatchString(lv.name) || !lvmName.MatchString(lv.vg) || lv.attr == "" ||
				lv.size < 0 || lv.snapPercent < -1 || lv.snapPercent > 100 {
				t.Fatalf("accepted %+v", lv)
			}
		}
	})
}
