package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// guestRun is how to run the guest test by hand.
const guestRun = "SAUVE_GUEST=1 go test -run TestLVMInGuest -timeout 30m -v ./cmd/sauve (or test/guest/run.sh as root)"

// TestLVMInGuest runs test/guest/run.sh: it boots a Debian 12 guest
// under QEMU (TCG) with sauve inside, backs up a thick and a thin
// logical volume while a writer writes them and checks that what is
// restored is one point in time of the writes, that a snapshot whose
// COW space fills fails the backup, that a killed backup's snapshot is
// removed by the next one, and that --snapshot lvm refuses a device that
// is no logical volume.
func TestLVMInGuest(t *testing.T) {
	limit := guestTest(t, 8*time.Minute, guestRun, "the LVM snapshot provider is tested in a QEMU (TCG) guest by test/guest/run.sh, "+
		"because this machine's kernel has no device-mapper")
	bin := filepath.Join(t.TempDir(), "sauve")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build static sauve for the guest: %v\n%s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), limit+2*time.Minute)
	defer cancel()
	cmd := guestCommand(ctx, t, limit, "SAUVE_BIN="+bin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	console := out.String()
	t.Logf("guest console:\n%s", console)

	result, failed := guestResult(console)
	var ee *exec.ExitError
	switch {
	case err == nil && result == "PASS":
	case result == "FAIL":
		t.Fatalf("guest test FAILED:\n%s", strings.Join(failed, "\n"))
	case errors.As(err, &ee):
		t.Fatalf("guest test ended with no result (run.sh exit %d): see the console above", ee.ExitCode())
	default:
		t.Fatalf("guest test: run.sh: %v (result %q)", err, result)
	}
}

// guestTest skips a guest test unless SAUVE_GUEST=1 or SAUVE_SOAK=1
// (why says what it tests, run how to run it), or when what it needs is
// missing, and returns how long the guest may run: at most 15 minutes,
// less when go test's deadline is nearer, and at least need (the test
// fails at once when go test does not allow that).
func guestTest(t *testing.T, need time.Duration, run, why string) time.Duration {
	t.Helper()
	if os.Getenv("SAUVE_SOAK") != "1" && os.Getenv("SAUVE_GUEST") != "1" {
		t.Skip(why + "; it takes minutes: " + run)
	}
	requireRoot(t)
	for _, p := range []string{"qemu-system-x86_64", "mkfs.ext4", "go"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (the guest test needs it): %v", p, err)
		}
	}
	limit := 15 * time.Minute
	if d, ok := t.Deadline(); ok {
		// The first run also builds the guest image (a few minutes).
		left := time.Until(d) - time.Minute
		if left < need {
			t.Fatalf("the guest test needs more time than go test allows (%v left): %s", left.Round(time.Second), run)
		}
		limit = min(limit, left)
	}
	return limit
}

// guestCommand is test/guest/run.sh, which boots the guest for at most
// limit, with env added to the environment; it runs in a TempDir, and
// its QEMU goes with it when ctx ends.
func guestCommand(ctx context.Context, t *testing.T, limit time.Duration, env ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("..", "..", "test", "guest", "run.sh"))
	cmd.Env = append(os.Environ(), append(env, "TMPDIR="+t.TempDir(),
		"SAUVE_GUEST_TIMEOUT="+strconv.Itoa(int(limit.Seconds())))...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 30 * time.Second
	return cmd
}

var (
	guestResultLine = regexp.MustCompile(`(?m)^SAUVE-GUEST-RESULT: (PASS|FAIL)`)
	guestFailLine   = regexp.MustCompile(`(?m)^\[\d+s\] STEP .*: FAIL: .*$`)
)

// guestResult finds the guest's verdict and the steps that failed.
func guestResult(console string) (string, []string) {
	m := guestResultLine.FindAllStringSubmatch(console, -1)
	if len(m) == 0 {
		return "", nil
	}
	return m[len(m)-1][1], guestFailLine.FindAllString(console, -1)
}

func TestGuestResult(t *testing.T) {
	tests := []struct {
		console string
		result  string
		failed  int
	}{
		{"boot\n[3s] STEP env: PASS\nSAUVE-GUEST-RESULT: PASS\n", "PASS", 0},
		{"[3s] STEP env: PASS\n[9s] STEP thin-copy: FAIL: point_in_time_copy is \"none\"\nSAUVE-GUEST-RESULT: FAIL (thin-copy)\n", "FAIL", 1},
		{"kernel panic\n", "", 0},
		{"echo SAUVE-GUEST-RESULT: PASS\n", "", 0},
	}
	for _, tc := range tests {
		result, failed := guestResult(tc.console)
		if result != tc.result || len(failed) != tc.failed {
			t.Errorf("guestResult(%q) = %q, %d failed steps; want %q, %d", tc.console, result, len(failed), tc.result, tc.failed)
		}
	}
}
