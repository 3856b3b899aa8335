package writer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// logFile is a file that hook commands append lines to ("echo x >> $LOG"),
// and lines reads them back.
type logFile string

func newLog(t *testing.T) logFile {
	return logFile(filepath.Join(t.TempDir(), "log"))
}

func (l logFile) env() string { return "LOG=" + string(l) }

func (l logFile) lines(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(string(l))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(string(b), " ", "_"))
}

func (l logFile) want(t *testing.T, want ...string) {
	t.Helper()
	if got := l.lines(t); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the hooks ran %q, want %q", got, want)
	}
}

// gone waits until process pid has gone (or is a zombie nobody has reaped
// yet: it runs no more).
func gone(t *testing.T, pid int) bool {
	t.Helper()
	for range 100 {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		// pid (comm) STATE ...; comm may hold spaces, not ')'.
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i >= 0 && strings.HasPrefix(s[i+1:], " Z") {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	for range 100 {
		b, err := os.ReadFile(path)
		if err == nil && strings.HasSuffix(string(b), "\n") {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatal(err)
			}
			return pid
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no pid in %s", path)
	return 0
}

func TestHooksOrderEnvironmentStdin(t *testing.T) {
	log := newLog(t)
	h := &Hooks{
		PreFreeze: []string{
			`echo "pre1 $SAUVE_PHASE $SAUVE_DISKS $SAUVE_PROVIDER $X" >> "$LOG"`,
			`echo "pre2 $(readlink /proc/self/fd/0)" >> "$LOG"`,
		},
		PostThaw: []string{
			`echo "post1 $SAUVE_PHASE" >> "$LOG"`,
			`echo post2 >> "$LOG"`,
		},
		// A caller's SAUVE_PHASE loses to the phase; a later entry wins.
		Env: []string{log.env(), EnvDisks + "=/dev/vda,/dev/vdb", EnvProvider + "=lvm", EnvPhase + "=bogus", "X=1", "X=2"},
	}
	if h.Name() != "hooks" {
		t.Errorf("Name = %q", h.Name())
	}
	if err := h.Freeze(t.Context()); err != nil {
		t.Fatal(err)
	}
	log.want(t, "pre1_pre-freeze_/dev/vda,/dev/vdb_lvm_2", "pre2_/dev/null")
	if err := h.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	log.want(t, "pre1_pre-freeze_/dev/vda,/dev/vdb_lvm_2", "pre2_/dev/null", "post1_post-thaw", "post2")
	// Thawed: again does nothing; and a Thaw with no Freeze runs nothing.
	if err := h.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := (&Hooks{PostThaw: []string{`echo never >> "$LOG"`}, Env: []string{log.env()}}).Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	log.want(t, "pre1_pre-freeze_/dev/vda,/dev/vdb_lvm_2", "pre2_/dev/null", "post1_post-thaw", "post2")
	// Reusable: a second round runs everything again.
	if err := h.Freeze(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := h.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := len(log.lines(t)); n != 8 {
		t.Errorf("two rounds ran %d commands, want 8", n)
	}
}

// TestHooksPreFreezeFails covers every way a pre-freeze command fails: the
// commands after it do not run, the error says which and how and quotes
// its output, and Thaw runs the post-thaw commands all the same.
func TestHooksPreFreezeFails(t *testing.T) {
	for _, tc := range []struct {
		name    string
		command string
		timeout time.Duration // Hooks.Timeout
		ctx     func(context.Context) (context.Context, context.CancelFunc)
		// cancelOnChild cancels the context once the command has started.
		cancelOnChild bool
		want          string // in the error
		is            error
	}{{
		name:    "exit status",
		command: `echo out-line; echo err-line >&2; exit 3`,
		want:    "pre-freeze hook `echo out-line; echo err-line >&2; exit 3` failed (exit 3): out-line\nerr-line",
	}, {
		name:    "signal",
		command: `echo dying; kill -SEGV $$`,
		want:    "failed (killed by signal segmentation fault): dying",
	}, {
		name:    "no such command",
		command: `/nonexistent/cmd`,
		want:    "failed (exit 127): /bin/sh", // and how the shell says "not found"
	}, {
		name:    "hook timeout",
		command: `echo waiting; sleep 30 & echo $! > "$CHILD"; wait`,
		timeout: time.Second, // long enough for the first hook on a loaded machine
		want:    "timed out after 1s (process group killed): waiting",
		is:      context.DeadlineExceeded,
	}, {
		name:    "freeze deadline",
		command: `echo waiting; sleep 30 & echo $! > "$CHILD"; wait`,
		ctx: func(ctx context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(ctx, time.Second)
		},
		want: "did not finish by the freeze deadline (process group killed): waiting",
		is:   context.DeadlineExceeded,
	}, {
		name:    "cancelled",
		command: `echo waiting; sleep 30 & echo $! > "$CHILD"; wait`,
		// Cancelled once the command runs (its child's pid is written),
		// not after a fixed time that a loaded machine may spend on the
		// first hook.
		cancelOnChild: true,
		want:          "cancelled (process group killed): waiting",
		is:            context.Canceled,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			log := newLog(t)
			child := filepath.Join(t.TempDir(), "child")
			h := &Hooks{
				PreFreeze: []string{`echo pre1 >> "$LOG"`, tc.command, `echo pre3 >> "$LOG"`},
				PostThaw:  []string{`echo post1 >> "$LOG"`, `echo post2 >> "$LOG"`},
				Timeout:   tc.timeout,
				Env:       []string{log.env(), "CHILD=" + child},
			}
			ctx, cancel := t.Context(), context.CancelFunc(func() {})
			if tc.ctx != nil {
				ctx, cancel = tc.ctx(ctx)
			}
			if tc.cancelOnChild {
				ctx, cancel = context.WithCancel(ctx)
				go func() {
					for range 1000 {
						if b, err := os.ReadFile(child); err == nil && len(b) > 0 {
							break
						}
						time.Sleep(10 * time.Millisecond)
					}
					cancel()
				}()
			}
			defer cancel()
			t0 := time.Now()
			err := h.Freeze(ctx)
			took := time.Since(t0)
			if err == nil {
				t.Fatal("Freeze succeeded")
			}
			t.Logf("%v (%.2f s)", err, took.Seconds())
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			var he *HookError
			if !errors.As(err, &he) || he.What != "pre-freeze hook `"+tc.command+"`" {
				t.Errorf("error %#v is not the HookError of the command", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %q is not %v", err, tc.is)
			}
			if took > 3*time.Second {
				t.Errorf("Freeze took %s", took)
			}
			if _, err := os.Stat(child); err == nil {
				// The command's background child was in its group:
				// the kill took it too.
				if pid := readPid(t, child); !gone(t, pid) {
					syscall.Kill(pid, syscall.SIGKILL)
					t.Errorf("the command's child %d outlived the kill of its process group", pid)
				}
			} else if tc.is != nil {
				t.Error("the command never started its child")
			}
			log.want(t, "pre1")
			// post-thaw runs after every failure, on a fresh context,
			// and also on a cancelled one.
			done, stop := context.WithCancel(context.Background())
			stop()
			if err := h.Thaw(done); err != nil {
				t.Fatal(err)
			}
			log.want(t, "pre1", "post1", "post2")
		})
	}
}

func TestHooksOutputBounded(t *testing.T) {
	h := &Hooks{PreFreeze: []string{`head -c 100000 /dev/zero | tr '\0' x; echo; echo TAIL-MARK >&2; exit 4`}}
	err := h.Freeze(t.Context())
	if err == nil {
		t.Fatal("Freeze succeeded")
	}
	msg := err.Error()
	if !strings.HasSuffix(msg, "xxx\nTAIL-MARK") || !strings.Contains(msg, "failed (exit 4): ...xxx") {
		t.Errorf("error does not end with the output's end: ...%q", msg[max(0, len(msg)-200):])
	}
	if len(msg) > hookOutputMax+200 {
		t.Errorf("error is %d bytes long", len(msg))
	}
	if err := (&Hooks{PreFreeze: []string{"exit 1"}}).Freeze(t.Context()); err == nil || !strings.HasSuffix(err.Error(), "failed (exit 1): (no output)") {
		t.Errorf("silent failure: %v", err)
	}
}

// TestHooksPostThawAll: every post-thaw command runs, each under its own
// timeout, even when others fail or time out.
func TestHooksPostThawAll(t *testing.T) {
	log := newLog(t)
	h := &Hooks{
		Label:     "app",
		PreFreeze: []string{`echo pre >> "$LOG"`},
		PostThaw: []string{
			`echo a >> "$LOG"; echo a-failed; exit 1`,
			`echo b >> "$LOG"; sleep 30`,
			`echo c >> "$LOG"`,
			`echo d >> "$LOG"; exit 2`,
		},
		Timeout: 300 * time.Millisecond,
		Env:     []string{log.env()},
	}
	if h.Name() != "hooks (app)" {
		t.Errorf("Name = %q", h.Name())
	}
	if err := h.Freeze(t.Context()); err != nil {
		t.Fatal(err)
	}
	// A Thaw context shorter than the commands cuts none of them short.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Millisecond)
	defer cancel()
	err := h.Thaw(ctx)
	log.want(t, "pre", "a", "b", "c", "d")
	if err == nil {
		t.Fatal("Thaw succeeded")
	}
	t.Log(err)
	for _, want := range []string{
		"post-thaw hook `echo a >> \"$LOG\"; echo a-failed; exit 1` failed (exit 1): a-failed",
		"post-thaw hook `echo b >> \"$LOG\"; sleep 30` timed out after 300ms",
		"post-thaw hook `echo d >> \"$LOG\"; exit 2` failed (exit 2)",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q", want)
		}
	}
	if strings.Contains(err.Error(), "echo c") {
		t.Error("error names a command that succeeded")
	}
}

// TestHooksBackgroundChild: a command that leaves a process behind holding
// its output succeeds once it exits, within waitDelay, and its child lives.
func TestHooksBackgroundChild(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	h := &Hooks{PreFreeze: []string{`sleep 30 & echo $! > "$PIDFILE"`}, Env: []string{"PIDFILE=" + pidFile}}
	t0 := time.Now()
	if err := h.Freeze(t.Context()); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took > waitDelay+time.Second {
		t.Errorf("Freeze took %s", took)
	}
	pid := readPid(t, pidFile)
	defer syscall.Kill(pid, syscall.SIGKILL)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Errorf("the background child is gone: %v", err)
	}
	if err := h.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
}
