package writer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The environment variables of hook commands. The caller sets EnvDisks and
// EnvProvider through Hooks.Env; Hooks sets EnvPhase itself.
const (
	// EnvDisks names the disks of the snapshot.
	EnvDisks = "SAUVE_DISKS"
	// EnvProvider names the point-in-time provider (fsfreeze, lvm, btrfs,
	// reflink, qemu...).
	EnvProvider = "SAUVE_PROVIDER"
	// EnvPhase is "pre-freeze", "post-thaw" or "post-backup", so that one
	// script can serve as every hook.
	EnvPhase = "SAUVE_PHASE"
	// EnvSnapshot is the stored snapshot's ID, for post-backup commands.
	EnvSnapshot = "SAUVE_SNAPSHOT"
)

// The phases, as EnvPhase and errors name them.
const (
	PhasePreFreeze  = "pre-freeze"
	PhasePostThaw   = "post-thaw"
	PhasePostBackup = "post-backup"
)

// DefaultHookTimeout is how long one hook command may run when
// Hooks.Timeout is 0.
const DefaultHookTimeout = 10 * time.Second

// hookOutputMax is how much of a command's output an error quotes: its
// end, where a failing command says why.
const hookOutputMax = 4 << 10

// waitDelay is how long a command's output may stay open once the command
// has exited or been killed: a background process it left behind holding
// its output must not hold up the freeze.
const waitDelay = time.Second

// Hooks is the writer of --pre-freeze and --post-thaw: commands run by
// /bin/sh -c, with stdin from /dev/null, each in a process group of its own.
//
// Freeze runs PreFreeze in order and stops at the first failure. Thaw runs
// every PostThaw command in order, each even if another failed, once Freeze
// has been called, whatever happened to it: it failed, timed out, or its
// context was cancelled. Set the fields before the first Freeze.
type Hooks struct {
	// Label, if set, goes into Name, to tell several Hooks apart (one per
	// application, say).
	Label string
	// PreFreeze and PostThaw are shell commands.
	PreFreeze []string
	PostThaw  []string
	// Timeout bounds each command (DefaultHookTimeout when 0). When it
	// passes, the command's whole process group is killed (SIGKILL).
	// Pre-freeze commands are also bounded by Freeze's context.
	// Post-thaw commands are bounded by Timeout alone, each from its own
	// start: Thaw's context does not cut them short, since a post-thaw
	// command skipped leaves the application stopped.
	Timeout time.Duration
	// Env is added to sauve's own environment for every command, as
	// "KEY=VALUE" (EnvDisks, EnvProvider); a later entry wins over an
	// earlier one, and EnvPhase wins over all.
	Env []string

	mu      sync.Mutex
	started bool // Freeze was called and Thaw has not run since
}

// Name is "hooks", or "hooks (Label)".
func (h *Hooks) Name() string {
	if h.Label != "" {
		return "hooks (" + h.Label + ")"
	}
	return "hooks"
}

// Freeze runs the pre-freeze commands in order and stops at the first that
// fails, returning an error that quotes the end of its output.
func (h *Hooks) Freeze(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.started = true
	for _, c := range h.PreFreeze {
		if err := h.run(ctx, PhasePreFreeze, c); err != nil {
			return err
		}
	}
	return nil
}

// Thaw runs every post-thaw command if Freeze was called since the last
// Thaw, and joins the errors of those that failed.
func (h *Hooks) Thaw(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.started {
		return nil
	}
	h.started = false
	// Detached from ctx: see Timeout.
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, c := range h.PostThaw {
		if err := h.run(ctx, PhasePostThaw, c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// PostBackup runs the post-backup commands (the third role of a VSS
// writer: what may happen only once the snapshot is stored, such as
// dropping WAL an archive no longer needs), in order, stopping at the
// first that fails. Env should carry EnvSnapshot.
func PostBackup(ctx context.Context, commands, env []string, timeout time.Duration) error {
	h := &Hooks{Env: env, Timeout: timeout}
	for _, c := range commands {
		if err := h.run(ctx, PhasePostBackup, c); err != nil {
			return err
		}
	}
	return nil
}

func (h *Hooks) timeout() time.Duration {
	if h.Timeout <= 0 {
		return DefaultHookTimeout
	}
	return h.Timeout
}

// run runs one command and says, if it fails, which, how, and what it
// printed last.
func (h *Hooks) run(ctx context.Context, phase, command string) error {
	timeout := h.timeout()
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, "/bin/sh", "-c", command)
	cmd.Env = append(append(os.Environ(), h.Env...), EnvPhase+"="+phase)
	// Stdin stays nil: /dev/null, so a command that reads never waits for
	// the terminal of whoever runs sauve.
	out := &tail{max: hookOutputMax}
	cmd.Stdout, cmd.Stderr = out, out
	// A group of its own: the timeout kills the command's children too,
	// and the terminal's Ctrl-C (sent to the foreground group) reaches
	// sauve only, which then thaws in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = waitDelay
	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) && cctx.Err() == nil {
		// It exited with success, only something it started in the
		// background still holds its output: that is the command's
		// business, not a failure.
		err = nil
	}
	if err == nil {
		return nil
	}
	what := fmt.Sprintf("%s hook `%s`", phase, command)
	var how string
	switch {
	case ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded):
		err = ctx.Err()
		how = "did not finish by the freeze deadline (process group killed)"
	case ctx.Err() != nil:
		err = ctx.Err()
		how = "cancelled (process group killed)"
	case cctx.Err() != nil:
		err = cctx.Err()
		how = fmt.Sprintf("timed out after %s (process group killed)", timeout)
	default:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				how = fmt.Sprintf("failed (killed by signal %s)", ws.Signal())
			} else {
				how = fmt.Sprintf("failed (exit %d)", ee.ExitCode())
			}
		} else {
			how = "failed"
		}
	}
	return &HookError{What: what, How: how, Output: out.String(), Err: err}
}

// HookError is how a hook command failed.
type HookError struct {
	// What is the phase and the command: "pre-freeze hook `CMD`".
	What string
	// How is "failed (exit 3)", "timed out after 10s (process group
	// killed)", and so on.
	How string
	// Output is the end of what the command printed, stdout and stderr
	// together.
	Output string
	// Err is the error underneath: an *exec.ExitError, or the context's.
	Err error
}

// Error is "pre-freeze hook `CMD` failed (exit 3): OUTPUT".
func (e *HookError) Error() string {
	o := strings.TrimSpace(e.Output)
	if o == "" {
		o = "(no output)"
	}
	return e.What + " " + e.How + ": " + o
}

// Unwrap returns Err, so errors.Is sees context.DeadlineExceeded.
func (e *HookError) Unwrap() error { return e.Err }

// tail keeps the last max bytes written to it. exec.Cmd writes to it from
// one goroutine at a time when it is both Stdout and Stderr.
type tail struct {
	max       int
	buf       []byte
	truncated bool
}

func (t *tail) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	// Trim only once twice the size is reached, so appends stay cheap.
	if len(t.buf) > 2*t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
		t.truncated = true
	}
	return len(p), nil
}

func (t *tail) String() string {
	b := t.buf
	cut := t.truncated
	if len(b) > t.max {
		b = b[len(b)-t.max:]
		cut = true
	}
	s := strings.ToValidUTF8(string(b), "?")
	if cut {
		s = "..." + s
	}
	return s
}
