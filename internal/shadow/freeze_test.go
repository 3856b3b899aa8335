package shadow

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

// The test binary is also the thaw guard (run as "TEST thaw-guard ...",
// as sauve's default Guard runs sauve itself) and the freezing process
// that a test kills (SAUVE_TEST_FREEZER=MOUNT).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "thaw-guard" {
		os.Exit(GuardMain(os.Args[2:], os.Stdin, os.Stdout))
	}
	if mnt := os.Getenv("SAUVE_TEST_FREEZER"); mnt != "" {
		os.Exit(testFreezer(mnt))
	}
	if socket := os.Getenv(guestFreezerEnv); socket != "" {
		os.Exit(testGuestFreezer(socket))
	}
	os.Exit(m.Run())
}

// testFreezer freezes mnt, says so, and waits to be killed.
func testFreezer(mnt string) int {
	if _, err := freeze(context.Background(), []string{mnt}, Options{FreezeTimeout: 30 * time.Second}); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("frozen")
	time.Sleep(time.Minute)
	return 0
}

func fzRun(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

func fzNeed(t *testing.T, progs ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices, mount and FIFREEZE (CI runs as root)")
	}
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed", p)
		}
	}
}

// fzMount makes a filesystem of kind (ext4, xfs) in an image file in dir,
// mounts it through a loop device and returns the mount point. At the
// end it thaws it, failing the test if it was left frozen, and unmounts.
func fzMount(t *testing.T, dir, kind string) string {
	t.Helper()
	fzNeed(t, "mkfs."+kind, "losetup", "mount")
	img, mnt := filepath.Join(dir, kind+".img"), filepath.Join(dir, kind)
	size := map[string]string{"ext4": "64M", "xfs": "320M"}[kind]
	fzRun(t, "truncate", "-s", size, img)
	fzRun(t, "mkfs."+kind, "-q", img)
	loop := fzRun(t, "losetup", "-f", "--show", img)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	os.Mkdir(mnt, 0o755)
	fzRun(t, "mount", loop, mnt)
	t.Cleanup(func() { fzUmount(t, mnt) })
	t.Cleanup(func() { fzThawLeft(t, mnt) })
	return mnt
}

// fzUmount unmounts mnt, waiting a little for whatever still holds it
// (a guard that has not exited yet), and fails the test if it must
// unmount it lazily.
func fzUmount(t *testing.T, mnt string) {
	for i := 0; ; i++ {
		out, err := exec.Command("umount", mnt).CombinedOutput()
		if err == nil {
			return
		}
		if i == 20 {
			t.Errorf("umount %s: %v: %s (unmounted lazily)", mnt, err, strings.TrimSpace(string(out)))
			exec.Command("umount", "-l", mnt).Run()
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fzThawLeft thaws mnt from the test and fails the test if it was frozen.
func fzThawLeft(t *testing.T, mnt string) {
	t.Helper()
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Errorf("open %s to check it is thawed: %v", mnt, err)
		return
	}
	defer unix.Close(fd)
	err = unix.IoctlSetInt(fd, ioctlFITHAW, 0)
	if err == nil {
		t.Errorf("%s was left frozen", mnt)
	} else if !errors.Is(err, unix.EINVAL) {
		t.Errorf("FITHAW %s: %v", mnt, err)
	}
}

func fzFreezeDirect(t *testing.T, mnt string) {
	t.Helper()
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, ioctlFIFREEZE, 0); err != nil {
		t.Fatalf("FIFREEZE %s: %v", mnt, err)
	}
}

// fzWrite starts writing a new file in mnt and returns a channel that
// gets the time the write ended.
func fzWrite(mnt string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		f, err := os.CreateTemp(mnt, "probe")
		if err == nil {
			f.Write([]byte("probe"))
			f.Close()
		}
		ch <- time.Now()
	}()
	return ch
}

// fzWritable says whether a write to mnt ends within d.
func fzWritable(mnt string, d time.Duration) bool {
	select {
	case <-fzWrite(mnt):
		return true
	case <-time.After(d):
		return false
	}
}

// fzWriter keeps writing to a file in mnt and counts the writes done.
type fzWriter struct {
	n    atomic.Int64
	stop atomic.Bool
	wg   sync.WaitGroup
}

func fzStartWriter(t *testing.T, mnt string) *fzWriter {
	w := &fzWriter{}
	f, err := os.Create(filepath.Join(mnt, "busy"))
	if err != nil {
		t.Fatal(err)
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer f.Close()
		b := make([]byte, 4096)
		for i := int64(0); !w.stop.Load(); i++ {
			if _, err := f.WriteAt(b, (i%256)*4096); err != nil {
				return
			}
			w.n.Add(1)
		}
	}()
	// Registered after fzMount's cleanups, so run before them: thaw
	// first, or the writer never ends.
	t.Cleanup(func() {
		fzThawLeft(t, mnt)
		w.stop.Store(true)
		w.wg.Wait()
	})
	return w
}

// The filesystems every freeze test runs on: the two that a loop-mounted
// VM image most often holds.
var fzKinds = []string{"ext4", "xfs"}

// Writes to a frozen filesystem wait for the thaw, and thaw says for how
// long they were held back.
func TestFreezeHoldsWrites(t *testing.T) {
	for _, kind := range fzKinds {
		t.Run(kind, func(t *testing.T) {
			mnt := fzMount(t, t.TempDir(), kind)
			w := fzStartWriter(t, mnt)
			time.Sleep(50 * time.Millisecond)
			before := time.Now()
			f, err := freeze(context.Background(), []string{mnt}, Options{FreezeTimeout: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if sid, _ := unix.Getsid(f.cmd.Process.Pid); sid != f.cmd.Process.Pid {
				t.Errorf("the guard is in session %d, not its own: a Ctrl-C at sauve would reach it", sid)
			}
			probe := fzWrite(mnt)
			time.Sleep(50 * time.Millisecond) // a write that ended as freeze returned is counted
			n := w.n.Load()
			time.Sleep(400 * time.Millisecond)
			if got := w.n.Load(); got != n {
				t.Errorf("%d writes done while frozen", got-n)
			}
			select {
			case <-probe:
				t.Error("a write started while frozen ended before the thaw")
			default:
			}
			thawAt := time.Now()
			d, err := f.thaw()
			after := time.Now()
			if err != nil {
				t.Fatal(err)
			}
			select {
			case end := <-probe:
				if end.Before(thawAt) {
					t.Errorf("the held write ended %v before the thaw", thawAt.Sub(end))
				}
			case <-time.After(time.Second):
				t.Fatal("a write is still held a second after the thaw")
			}
			t.Logf("%s frozen %v (freeze call to thaw return %v)", kind, d, after.Sub(before))
			if d < 450*time.Millisecond || d > after.Sub(before) {
				t.Errorf("thaw says writes were frozen %v; they were for at least 450ms, at most %v", d, after.Sub(before))
			}
			time.Sleep(50 * time.Millisecond)
			if w.n.Load() == n {
				t.Error("the writer made no progress after the thaw")
			}
		})
	}
}

// A guard left alone thaws after its timeout, and thaw then says the copy
// is not one instant.
func TestFreezeTimeout(t *testing.T) {
	for _, kind := range fzKinds {
		t.Run(kind, func(t *testing.T) {
			mnt := fzMount(t, t.TempDir(), kind)
			start := time.Now()
			f, err := freeze(context.Background(), []string{mnt}, Options{FreezeTimeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			probe := fzWrite(mnt)
			var end time.Time
			select {
			case end = <-probe:
			case <-time.After(5 * time.Second):
				t.Fatal("still frozen 5s after a freeze with a 1s timeout")
			}
			if held := end.Sub(start); held < 900*time.Millisecond || held > 2500*time.Millisecond {
				t.Errorf("writes were held %v with a 1s timeout", held)
			}
			d, err := f.thaw()
			want := "writes to " + mnt + " were thawed after the 1s --freeze-timeout, before the copy was taken: the copy is not one instant; nothing stored"
			if err == nil || err.Error() != want {
				t.Errorf("thaw after the timeout: %v\nwant %s", err, want)
			}
			if d < 900*time.Millisecond || d > 2*time.Second {
				t.Errorf("thaw says %v frozen, the timeout was 1s", d)
			}
		})
	}
}

// sauve killed while the filesystem is frozen (kill -9, or a Ctrl-C at its
// process group): the guard sees its stdin end and thaws.
func TestFreezeThawsWhenSauveDies(t *testing.T) {
	for _, kind := range fzKinds {
		for _, tc := range []struct {
			name string
			kill func(p *os.Process) error
		}{
			{"kill -9", func(p *os.Process) error { return p.Kill() }},
			{"Ctrl-C", func(p *os.Process) error { return syscall.Kill(-p.Pid, syscall.SIGINT) }},
		} {
			t.Run(kind+"/"+tc.name, func(t *testing.T) {
				mnt := fzMount(t, t.TempDir(), kind)
				cmd := exec.Command(os.Args[0])
				cmd.Env = append(os.Environ(), "SAUVE_TEST_FREEZER="+mnt)
				cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
				out, _ := cmd.StdoutPipe()
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
				said := make(chan string, 1)
				go func() {
					line, _ := bufio.NewReader(out).ReadString('\n')
					said <- strings.TrimSpace(line)
				}()
				select {
				case s := <-said:
					if s != "frozen" {
						t.Fatalf("the freezing process said %q", s)
					}
				case <-time.After(20 * time.Second):
					t.Fatal("the freezing process did not freeze within 20s")
				}
				probe := fzWrite(mnt)
				time.Sleep(200 * time.Millisecond)
				select {
				case <-probe:
					t.Fatal("not frozen: a write ended")
				default:
				}
				killed := time.Now()
				if err := tc.kill(cmd.Process); err != nil {
					t.Fatal(err)
				}
				select {
				case end := <-probe:
					t.Logf("writable %v after %s", end.Sub(killed), tc.name)
					if end.Sub(killed) > time.Second {
						t.Errorf("writable only %v after sauve died", end.Sub(killed))
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("still frozen 5s after %s of the freezing process (its timeout is 30s)", tc.name)
				}
			})
		}
	}
}

// A guard killed while frozen: sauve notices and thaws from its own
// process, and thaw says the copy is not one instant.
func TestFreezeGuardKilled(t *testing.T) {
	mnt := fzMount(t, t.TempDir(), "ext4")
	f, err := freeze(context.Background(), []string{mnt}, Options{FreezeTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if fzWritable(mnt, 200*time.Millisecond) {
		t.Fatal("not frozen")
	}
	f.cmd.Process.Kill()
	if !fzWritable(mnt, time.Second) {
		t.Fatal("still frozen a second after the guard was killed")
	}
	_, err = f.thaw()
	if err == nil || !strings.Contains(err.Error(), "thaw guard died") || !strings.Contains(err.Error(), "not one instant") {
		t.Errorf("thaw after the guard died: %v", err)
	}
}

// A filesystem frozen by someone else is not frozen again, nor thawed by
// the guard; the others it froze first are thawed.
func TestFreezeAlreadyFrozen(t *testing.T) {
	dir := t.TempDir()
	free, taken := fzMount(t, dir, "xfs"), fzMount(t, dir, "ext4")
	fzFreezeDirect(t, taken)
	_, err := freeze(context.Background(), []string{free, taken}, Options{})
	if err == nil || !strings.Contains(err.Error(), taken) || !strings.Contains(err.Error(), "already frozen") {
		t.Errorf("freeze of a frozen filesystem: %v", err)
	}
	t.Log(err)
	if !fzWritable(free, time.Second) {
		t.Error("the filesystem frozen before the failure was left frozen")
	}
	fd, _ := unix.Open(taken, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, ioctlFITHAW, 0); err != nil {
		t.Errorf("the other freeze of %s was undone by the guard: FITHAW %v", taken, err)
	}
}

// What cannot be frozen fails with the mount point named, and leaves
// nothing frozen: a folder that is not a mount point (FIFREEZE would
// freeze the filesystem holding it), a tmpfs, a missing folder.
func TestFreezeRefuses(t *testing.T) {
	dir := t.TempDir()
	mnt := fzMount(t, dir, "ext4")
	sub := filepath.Join(mnt, "sub")
	os.Mkdir(sub, 0o755)
	tmpfs := filepath.Join(dir, "tmpfs")
	os.Mkdir(tmpfs, 0o755)
	fzRun(t, "mount", "-t", "tmpfs", "none", tmpfs)
	t.Cleanup(func() { fzUmount(t, tmpfs) })
	for _, tc := range []struct {
		mounts []string
		bad    string
		want   string
	}{
		{[]string{mnt, sub}, sub, "is not a mount point"},
		{[]string{mnt, tmpfs}, tmpfs, "cannot be frozen"},
		{[]string{mnt, filepath.Join(dir, "gone")}, filepath.Join(dir, "gone"), "no such file"},
	} {
		_, err := freeze(context.Background(), tc.mounts, Options{})
		if err == nil || !strings.Contains(err.Error(), tc.bad) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("freeze %v: %v, want %q", tc.mounts, err, tc.want)
		}
		if !fzWritable(mnt, time.Second) {
			t.Fatalf("freeze %v left %s frozen", tc.mounts, mnt)
		}
	}
}

// Two mount points of one filesystem (a bind mount) are one freeze: a
// second FIFREEZE would fail as if someone else froze it.
func TestFreezeBindMountOnce(t *testing.T) {
	dir := t.TempDir()
	mnt := fzMount(t, dir, "ext4")
	bind := filepath.Join(dir, "bind")
	os.Mkdir(bind, 0o755)
	fzRun(t, "mount", "--bind", mnt, bind)
	t.Cleanup(func() { fzUmount(t, bind) })
	f, err := freeze(context.Background(), []string{mnt, bind}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if fzWritable(bind, 200*time.Millisecond) {
		t.Error("not frozen")
	}
	if _, err := f.thaw(); err != nil {
		t.Fatal(err)
	}
	if !fzWritable(mnt, time.Second) {
		t.Error("still frozen after thaw")
	}
}

// A freeze that the caller gives up on (Ctrl-C) leaves nothing frozen.
func TestFreezeCanceled(t *testing.T) {
	mnt := fzMount(t, t.TempDir(), "ext4")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := freeze(ctx, []string{mnt}, Options{}); !errors.Is(err, context.Canceled) {
		t.Errorf("freeze with a canceled context: %v", err)
	}
	if !fzWritable(mnt, time.Second) {
		t.Error("left frozen")
	}
}

// A guard command that is not sauve's guard is refused; nothing hangs.
func TestFreezeNotAGuard(t *testing.T) {
	for _, tc := range []struct {
		guard []string
		want  string
	}{
		{[]string{"/bin/echo", "hello"}, "did not introduce itself"},
		{[]string{"/bin/true"}, "thaw guard died"},
		{[]string{"/nonexistent/guard"}, "start the thaw guard"},
	} {
		_, err := freeze(context.Background(), []string{"/nonexistent-mount"}, Options{Guard: tc.guard})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("guard %v: %v, want %q", tc.guard, err, tc.want)
		}
	}
}

// An ext4 loop-mounted from an image file on XFS, written to: the reflink
// copy is taken frozen, so it is a filesystem at rest (its journal
// committed) rather than one mounted mid-write; the report says for how
// long and what was frozen.
func TestViewsFreezeLoopMountedImage(t *testing.T) {
	fzNeed(t, "mkfs.ext4", "dumpe2fs")
	dir := xfsDir(t)
	inner := fzMount(t, dir, "ext4")
	w := fzStartWriter(t, inner)
	img := filepath.Join(dir, "ext4.img")
	for _, tc := range []struct {
		noFreeze bool
		clean    bool
	}{{false, true}, {true, false}} {
		p := New(Options{Mode: Reflink, NoFreeze: tc.noFreeze})
		views, err := p.Views(context.Background(), []*source.Source{open(t, img)})
		if err != nil {
			t.Fatal(err)
		}
		rep := p.Report()
		if !tc.noFreeze && (!slices.Equal(rep.Mounts, []string{inner}) || rep.Frozen <= 0 || rep.Frozen > 5*time.Second) {
			t.Errorf("report %+v: want %s frozen a while", rep, inner)
		}
		t.Logf("no-freeze %v: frozen %v", tc.noFreeze, rep.Frozen)
		copyPath := filepath.Join(t.TempDir(), "copy.img")
		out, _ := os.Create(copyPath)
		_, err = io.Copy(out, io.NewSectionReader(views[0].At, 0, views[0].Size))
		out.Close()
		Release(views)
		if err != nil {
			t.Fatal(err)
		}
		feats := fzRun(t, "dumpe2fs", "-h", copyPath)
		if clean := !strings.Contains(feats, "needs_recovery"); clean != tc.clean {
			t.Errorf("no-freeze %v: the copy's journal is clean: %v, want %v", tc.noFreeze, clean, tc.clean)
		}
	}
	n := w.n.Load()
	time.Sleep(50 * time.Millisecond)
	if w.n.Load() == n {
		t.Error("the writer is stuck after the backup's copies")
	}
}

// mountsToFreeze lists the read-write mounts of an image, through a loop
// device and its partitions, once per filesystem; read-only mounts are
// left out.
func TestMountsToFreeze(t *testing.T) {
	fzNeed(t, "sfdisk", "losetup", "mkfs.ext4", "mount")
	dir := t.TempDir()
	mk := func(name string) string {
		p := filepath.Join(dir, name)
		os.Mkdir(p, 0o755)
		return p
	}
	parted := filepath.Join(dir, "parted.img")
	fzRun(t, "truncate", "-s", "64M", parted)
	sfd := exec.Command("sfdisk", "-q", parted)
	sfd.Stdin = strings.NewReader("label: gpt\nsize=24M\nsize=24M\n")
	if out, err := sfd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	loop := fzRun(t, "losetup", "-f", "--show", "-P", parted)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if _, err := os.Stat(loop + "p2"); err != nil {
		fzRun(t, "partx", "-a", loop)
	}
	rw, bind, ro := mk("p1"), mk("p1-bind"), mk("p2")
	for _, c := range [][]string{
		{"mkfs.ext4", "-q", loop + "p1"}, {"mkfs.ext4", "-q", loop + "p2"},
		{"mount", loop + "p1", rw}, {"mount", "--bind", rw, bind}, {"mount", "-o", "ro", loop + "p2", ro},
	} {
		fzRun(t, c...)
	}
	for _, m := range []string{rw, bind, ro} {
		t.Cleanup(func() { fzUmount(t, m) })
	}
	plain := filepath.Join(dir, "plain.img")
	fzRun(t, "truncate", "-s", "32M", plain)
	fzRun(t, "mkfs.ext4", "-q", plain)
	plainMnt := mk("plain")
	ploop := fzRun(t, "losetup", "-f", "--show", plain)
	t.Cleanup(func() { exec.Command("losetup", "-d", ploop).Run() })
	fzRun(t, "mount", ploop, plainMnt)
	t.Cleanup(func() { fzUmount(t, plainMnt) })
	idle := filepath.Join(dir, "idle.img")
	fzRun(t, "truncate", "-s", "1M", idle)

	for _, tc := range []struct {
		img  string
		want []string
	}{
		{parted, []string{rw}},
		{plain, []string{plainMnt}},
		{idle, nil},
	} {
		got, err := mountsToFreeze(open(t, tc.img))
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("mountsToFreeze(%s) = %q, %v; want %q", filepath.Base(tc.img), got, err, tc.want)
		}
	}
}

func TestParseGuardArgs(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		timeout time.Duration
		mounts  []string
		err     string
	}{
		{[]string{"--timeout", "2s", "--", "/a", "/b"}, 2 * time.Second, []string{"/a", "/b"}, ""},
		{[]string{"/a"}, DefaultFreezeTimeout, []string{"/a"}, ""},
		{[]string{"--timeout", "0s", "--", "/a"}, 0, nil, "--timeout 0s"},
		{[]string{"--timeout", "2h", "--", "/a"}, 0, nil, "at most 1h"},
		{[]string{"--timeout", "x", "--", "/a"}, 0, nil, "invalid value"},
		{[]string{"--", "a"}, 0, nil, "not an absolute path"},
		{[]string{"--timeout", "1s", "--"}, 0, nil, "expects 1 to 256 mount points, got 0"},
		{[]string{"--bogus", "--", "/a"}, 0, nil, "bogus"},
	} {
		d, m, err := parseGuardArgs(tc.args)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: %v, want %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || d != tc.timeout || !slices.Equal(m, tc.mounts) {
			t.Errorf("%q: %v %q %v", tc.args, d, m, err)
		}
	}
}

// The guard's answers when it cannot start freezing: it always says who
// it is, then why, and exits non-zero.
func TestGuardMainRefuses(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"--timeout", "-1s", "--", "/x"}, 2, guardHello + "\nerror thaw-guard: --timeout -1s: choose more than 0 and at most 1h\n"},
		{[]string{"--", "/nonexistent-sauve-test"}, 1, guardHello + "\nfailed 0 open /nonexistent-sauve-test: no such file or directory\ndone failed 0\n"},
	} {
		var out strings.Builder
		if code := GuardMain(tc.args, strings.NewReader(""), &out); code != tc.code || out.String() != tc.out {
			t.Errorf("%q: exit %d, said %q; want %d, %q", tc.args, code, out.String(), tc.code, tc.out)
		}
	}
}

func TestParseGuardLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		want guardMsg
		err  string
	}{
		{guardHello, guardMsg{kind: "hello"}, ""},
		{"freezing 1", guardMsg{kind: "freezing", n: 1}, ""},
		{"frozen", guardMsg{kind: "frozen"}, ""},
		{"failed 0 already frozen", guardMsg{kind: "failed", text: "already frozen"}, ""},
		{"thaw-failed 1 x\x1by", guardMsg{kind: "thaw-failed", n: 1, text: "x y"}, ""},
		{"done timeout 1000", guardMsg{kind: "done", reason: "timeout", took: time.Microsecond}, ""},
		{"error bad", guardMsg{kind: "error", text: "bad"}, ""},
		{"freezing 2", guardMsg{}, "named mount"},
		{"freezing -1", guardMsg{}, "named mount"},
		{"freezing 0 extra", guardMsg{}, "said"},
		{"frozen now", guardMsg{}, "said"},
		{"done later 5", guardMsg{}, "unknown reason"},
		{"done thaw -5", guardMsg{}, "ns"},
		{"done thaw 99999999999999999999", guardMsg{}, "ns"},
		{"=== RUN TestX", guardMsg{}, "said"},
		{"", guardMsg{}, "said"},
	} {
		got, err := parseGuardLine(tc.line, 2)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: %+v %v, want %q", tc.line, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: %+v %v, want %+v", tc.line, got, err, tc.want)
		}
	}
}

func FuzzParseGuardLine(f *testing.F) {
	for _, s := range []string{guardHello, "freezing 0", "frozen", "failed 1 EBUSY", "thaw-failed 0 x", "done thaw 12345", "error x", "done eof 0", "freezing 9999999999999999999"} {
		f.Add(s, 2)
	}
	f.Fuzz(func(t *testing.T, line string, mounts int) {
		mounts = min(max(mounts, 0), maxGuardMounts)
		m, err := parseGuardLine(line, mounts)
		if err != nil {
			return
		}
		switch m.kind {
		case "freezing", "failed", "thaw-failed":
			if m.n < 0 || m.n >= mounts {
				t.Fatalf("%q: mount %d of %d", line, m.n, mounts)
			}
		case "done":
			if m.took < 0 {
				t.Fatalf("%q: took %v", line, m.took)
			}
		}
		if strings.ContainsFunc(m.text, func(r rune) bool { return r < ' ' }) {
			t.Fatalf("%q: text %q has control characters", line, m.text)
		}
	})
}
