package shadow

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as the thaw guard (SAUVE_TEST_GUARD=1) and as a
// process that freezes and is then killed (SAUVE_TEST_FREEZER=MOUNT).
func TestMain(m *testing.M) {
	if os.Getenv("SAUVE_TEST_GUARD") == "1" {
		os.Exit(GuardMain(os.Args[1:], os.Stdin, os.Stdout))
	}
	if mnt := os.Getenv("SAUVE_TEST_FREEZER"); mnt != "" {
		if _, err := freeze(context.Background(), []string{mnt}, testGuardOptions(30*time.Second)); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println("frozen")
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testGuardOptions(timeout time.Duration) Options {
	os.Setenv("SAUVE_TEST_GUARD", "1")
	return Options{FreezeTimeout: timeout, Guard: []string{os.Args[0]}}
}

// mounted makes a filesystem of kind (ext4, xfs) in an image file, mounts
// it through a loop device, and thaws and unmounts it at the end whatever
// the test did.
func mounted(t *testing.T, kind string) (img, mnt string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices, mount and FIFREEZE (CI runs as root)")
	}
	if _, err := exec.LookPath("mkfs." + kind); err != nil {
		t.Skipf("mkfs.%s is not installed", kind)
	}
	dir := t.TempDir()
	img, mnt = filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 320<<20); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(mnt, 0o755)
	args := map[string][]string{"ext4": {"-q", "-F"}, "xfs": {"-q", "-f"}}[kind]
	for _, c := range [][]string{append(append([]string{"mkfs." + kind}, args...), img), {"mount", "-o", "loop", img, mnt}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	t.Cleanup(func() {
		thawMount(mnt)
		// A write the freeze held may still be closing its file.
		for i := 0; i < 50; i++ {
			if exec.Command("umount", mnt).Run() == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		exec.Command("umount", "-l", mnt).Run()
	})
	return img, mnt
}

// writeWithin writes a file in dir and reports whether it completed within d.
func writeWithin(dir string, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		f, err := os.CreateTemp(dir, "w")
		if err == nil {
			f.Write(make([]byte, 4096))
			f.Sync()
			f.Close()
		}
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

func TestFreezeBlocksWritesUntilThaw(t *testing.T) {
	for _, kind := range []string{"ext4", "xfs"} {
		t.Run(kind, func(t *testing.T) {
			_, mnt := mounted(t, kind)
			f, err := freeze(context.Background(), []string{mnt}, testGuardOptions(10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if writeWithin(mnt, 300*time.Millisecond) {
				f.thaw()
				t.Fatal("a write completed while the filesystem was frozen")
			}
			d, err := f.thaw()
			if err != nil {
				t.Fatal(err)
			}
			if held := time.Since(start); d < 300*time.Millisecond || d > held+time.Second {
				t.Errorf("frozen for %v, held for %v", d, held)
			}
			if !writeWithin(mnt, 5*time.Second) {
				t.Fatal("writes still blocked after thaw")
			}
		})
	}
}

func TestFreezeTimeoutThaws(t *testing.T) {
	_, mnt := mounted(t, "ext4")
	f, err := freeze(context.Background(), []string{mnt}, testGuardOptions(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if !writeWithin(mnt, 4*time.Second) {
		f.thaw()
		t.Fatal("the guard did not thaw after its timeout")
	}
	if _, err := f.thaw(); err == nil || !strings.Contains(err.Error(), "freeze timeout") {
		t.Fatalf("thaw after the timeout: %v", err)
	}
}

// kill -9 of the process that froze: the guard thaws at once.
func TestFreezerKilledThaws(t *testing.T) {
	_, mnt := mounted(t, "xfs")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "SAUVE_TEST_FREEZER="+mnt, "SAUVE_TEST_GUARD=")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "frozen" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("freezer: %q", line)
	}
	if writeWithin(mnt, 200*time.Millisecond) {
		t.Fatal("not frozen")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if !writeWithin(mnt, 3*time.Second) {
		t.Fatal("the filesystem stayed frozen after kill -9 of sauve")
	}
}

func TestFreezeAlreadyFrozen(t *testing.T) {
	_, mnt := mounted(t, "ext4")
	_, mnt2 := mounted(t, "ext4")
	if err := freezeMount(mnt2); err != nil {
		t.Fatal(err)
	}
	defer thawMount(mnt2)
	_, err := freeze(context.Background(), []string{mnt, mnt2}, testGuardOptions(10*time.Second))
	if err == nil || !strings.Contains(err.Error(), "frozen already") || !strings.Contains(err.Error(), mnt2) {
		t.Fatalf("err %v", err)
	}
	if !writeWithin(mnt, 3*time.Second) {
		t.Fatal("the first filesystem was left frozen")
	}
}

// A loop-mounted image's filesystem is what its copy freezes; a
// read-only mount is not frozen.
func TestMountsToFreeze(t *testing.T) {
	img, mnt := mounted(t, "ext4")
	got, err := mountsToFreeze(open(t, img))
	if err != nil || len(got) != 1 || got[0] != mnt {
		t.Fatalf("mounts %v, %v; want [%s]", got, err, mnt)
	}
	if out, err := exec.Command("mount", "-o", "remount,ro", mnt).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v\n%s", err, out)
	}
	if got, _ := mountsToFreeze(open(t, img)); len(got) != 0 {
		t.Errorf("a read-only mount to freeze: %v", got)
	}
}
