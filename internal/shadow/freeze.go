package shadow

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/source"
)

// maxGuardLine bounds a line of the guard's reports.
const maxGuardLine = 4096

// guardGrace is how long sauve waits for the guard to report its thaw
// before killing it and thawing itself.
const guardGrace = 5 * time.Second

// frozen is a set of filesystems frozen under a thaw guard (guard.go).
// watch owns the state until done is closed.
type frozen struct {
	mounts  []string
	timeout time.Duration
	warn    func(string)
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	asked   atomic.Bool   // thaw was called: the copies are taken
	ready   chan struct{} // closed when the guard reports every mount frozen
	done    chan struct{} // closed when every mount is thawed again
	st      guardState
}

// guardState is what the guard reported, or what sauve did for it.
type guardState struct {
	announced  int    // mounts 0..announced-1 may have been frozen
	failed     string // why a mount could not be frozen
	thawFailed []string
	reason     string // the guard's done REASON; "" when it did not say
	took       time.Duration
	// died says the guard ended without reporting its thaw (or spoke
	// nonsense): sauve thawed the mounts itself; early says it did
	// before thaw was called.
	died  error
	early bool
}

// freeze freezes the filesystems mounted at mounts under a thaw guard,
// and returns once they all are frozen.
func freeze(ctx context.Context, mounts []string, o Options) (*frozen, error) {
	argv, err := guardCommand(o.Guard)
	if err != nil {
		return nil, err
	}
	timeout := o.FreezeTimeout
	if timeout <= 0 {
		timeout = DefaultFreezeTimeout
	}
	args := append(append(argv[1:len(argv):len(argv)], "--timeout", timeout.String(), "--"), mounts...)
	cmd := exec.Command(argv[0], args...)
	// Its own session: a Ctrl-C aimed at sauve's process group does not
	// stop the guard before it thaws.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start the thaw guard: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start the thaw guard: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the thaw guard %s: %w", argv[0], err)
	}
	warn := o.Warn
	if warn == nil {
		warn = func(string) {}
	}
	f := &frozen{mounts: mounts, timeout: timeout, warn: warn, cmd: cmd, stdin: stdin,
		ready: make(chan struct{}), done: make(chan struct{})}
	go f.watch(stdout)
	select {
	case <-f.ready:
		return f, nil
	case <-f.done:
		select {
		case <-f.ready:
			// Frozen, then thawed already (a timeout shorter than the
			// wait): thaw says so.
			return f, nil
		default:
		}
		return nil, f.freezeError()
	case <-ctx.Done():
		// The guard thaws as soon as it sees stdin's end, once frozen.
		stdin.Close()
		<-f.done
		return nil, fmt.Errorf("freeze %s: %w", f.names(), ctx.Err())
	}
}

// guardCommand is the command that runs the guard.
func guardCommand(guard []string) ([]string, error) {
	if len(guard) > 0 {
		return guard, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find sauve's executable to run the thaw guard: %w", err)
	}
	return []string{exe, "thaw-guard"}, nil
}

func (f *frozen) names() string { return strings.Join(f.mounts, ", ") }

// freezeError explains why the guard ended before reporting everything
// frozen.
func (f *frozen) freezeError() error {
	st := &f.st
	switch {
	case st.failed != "":
		return fmt.Errorf("freeze %s", st.failed)
	case st.died != nil:
		return fmt.Errorf("freeze %s: %w", f.names(), st.died)
	}
	return fmt.Errorf("freeze %s: the thaw guard thawed them (%s) before reporting them frozen", f.names(), st.reason)
}

// thaw thaws and says how long writes were frozen. It fails when the
// mounts were thawed before it was called: the copies taken meanwhile
// are not one instant.
func (f *frozen) thaw() (time.Duration, error) {
	f.asked.Store(true)
	_, _ = io.WriteString(f.stdin, "thaw\n")
	f.stdin.Close()
	select {
	case <-f.done:
	case <-time.After(guardGrace):
		// A guard that does not answer is killed; watch then thaws.
		_ = f.cmd.Process.Kill()
		<-f.done
	}
	st := &f.st
	if st.died != nil {
		if st.early {
			return st.took, fmt.Errorf("%s: sauve thawed %s itself, before the copy was taken: the copy is not one instant; nothing stored", st.died, f.names())
		}
		f.warn(fmt.Sprintf("%s after the copy was taken: sauve thawed %s itself", st.died, f.names()))
	}
	switch st.reason {
	case "", "thaw":
	case "timeout":
		return st.took, fmt.Errorf("writes to %s were thawed after the %s --freeze-timeout, before the copy was taken: the copy is not one instant; nothing stored", f.names(), f.timeout)
	default:
		return st.took, fmt.Errorf("the thaw guard thawed %s (%s) before the copy was taken: the copy is not one instant; nothing stored", f.names(), st.reason)
	}
	if len(st.thawFailed) > 0 {
		return st.took, fmt.Errorf("thaw %s", strings.Join(st.thawFailed, "; "))
	}
	return st.took, nil
}

// watch reads the guard's reports until its last. If the guard ends
// without it, sauve kills it and thaws whatever it may have frozen.
func (f *frozen) watch(stdout io.Reader) {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 512), maxGuardLine)
	var start time.Time
	finished, hello, ready := false, false, false
	for !finished && sc.Scan() {
		line := sc.Text()
		if !hello && line != guardHello {
			f.st.died = fmt.Errorf("the thaw guard %s did not introduce itself as %q: it said %.80q", f.cmd.Path, guardHello, line)
			break
		}
		m, err := parseGuardLine(line, len(f.mounts))
		if err != nil {
			f.st.died = fmt.Errorf("the thaw guard %s: %w", f.cmd.Path, err)
			break
		}
		switch m.kind {
		case "hello":
			hello = true
		case "freezing":
			if start.IsZero() {
				start = time.Now()
			}
			f.st.announced = max(f.st.announced, m.n+1)
		case "frozen":
			if f.st.announced > 0 && !ready {
				ready = true
				close(f.ready)
			}
		case "failed":
			f.st.failed = f.mounts[m.n] + ": " + m.text
		case "thaw-failed":
			f.st.thawFailed = append(f.st.thawFailed, f.mounts[m.n]+": "+m.text)
		case "error":
			f.st.died = fmt.Errorf("the thaw guard refused: %s", m.text)
		case "done":
			f.st.reason, f.st.took, finished = m.reason, m.took, true
		}
	}
	// The guard is gone before done is closed: it holds the mount points
	// open, and whoever waits on done may unmount them next.
	if finished {
		f.reap()
	} else {
		f.thawForGuard(sc.Err(), start)
	}
	close(f.done)
}

// thawForGuard kills a guard that ended (or broke its protocol) without
// reporting its thaw, waits until it is gone (it could still freeze),
// then thaws what it announced.
func (f *frozen) thawForGuard(readErr error, start time.Time) {
	_ = f.cmd.Process.Kill()
	werr := f.cmd.Wait()
	if f.st.died == nil {
		why := "exited"
		if readErr != nil {
			why = readErr.Error()
		} else if werr != nil {
			why = werr.Error()
		}
		f.st.died = fmt.Errorf("the thaw guard died (%s)", why)
	}
	f.st.early = !f.asked.Load()
	var failed []string
	for i := f.st.announced - 1; i >= 0; i-- {
		if err := thawMount(f.mounts[i]); err != nil {
			failed = append(failed, err.Error())
		}
	}
	if !start.IsZero() {
		f.st.took = time.Since(start)
	}
	f.st.thawFailed = append(f.st.thawFailed, failed...)
}

// reap waits for a guard that reported its thaw to exit.
func (f *frozen) reap() {
	exited := make(chan struct{})
	go func() {
		_ = f.cmd.Wait()
		close(exited)
	}()
	select {
	case <-exited:
	case <-time.After(guardGrace):
		_ = f.cmd.Process.Kill()
		<-exited
	}
}

// ThawMount thaws the filesystem mounted at path, for a caller that
// recovers the freeze of a process that died (the agent's restart); one
// that is not frozen is no error, and a path that is no mount point is
// refused rather than thawing the filesystem holding it.
func ThawMount(path string) error { return thawMount(path) }

// thawMount thaws the filesystem mounted at path from sauve's own
// process; one that is not frozen is no error.
func thawMount(path string) error {
	fd, _, err := openMountRoot(path)
	if err != nil {
		return fmt.Errorf("thaw %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, ioctlFITHAW, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("thaw %s: %w", path, err)
	}
	return nil
}

// guardMsg is one line of the guard's reports.
type guardMsg struct {
	kind   string
	n      int // freezing, failed, thaw-failed: the mount's index
	text   string
	reason string
	took   time.Duration
}

// parseGuardLine reads one report of a guard freezing mounts mount
// points.
func parseGuardLine(line string, mounts int) (guardMsg, error) {
	if line == guardHello {
		return guardMsg{kind: "hello"}, nil
	}
	kind, rest, _ := strings.Cut(line, " ")
	m := guardMsg{kind: kind}
	switch kind {
	case "frozen":
		if rest != "" {
			return m, fmt.Errorf("said %.80q", line)
		}
	case "freezing", "failed", "thaw-failed":
		num, text, _ := strings.Cut(rest, " ")
		n, err := strconv.Atoi(num)
		if err != nil || n < 0 || n >= mounts {
			return m, fmt.Errorf("named mount %.20q of %d", num, mounts)
		}
		if kind == "freezing" && text != "" {
			return m, fmt.Errorf("said %.80q", line)
		}
		m.n, m.text = n, guardText(text)
	case "error":
		m.text = guardText(rest)
	case "done":
		reason, num, _ := strings.Cut(rest, " ")
		ns, err := strconv.ParseInt(num, 10, 64)
		if err != nil || ns < 0 {
			return m, fmt.Errorf("reported a freeze of %.30q ns", num)
		}
		switch reason {
		case "thaw", "eof", "timeout", "signal", "failed":
		default:
			return m, fmt.Errorf("thawed for an unknown reason %.30q", reason)
		}
		m.reason, m.took = reason, time.Duration(ns)
	default:
		return m, fmt.Errorf("said %.80q", line)
	}
	return m, nil
}

// mountsToFreeze lists the mount points of the filesystems mounted
// read-write from src (through loop devices and partitions), one per
// filesystem. Read-only mounts take no writes to hold back.
func mountsToFreeze(src *source.Source) ([]string, error) {
	path := src.Path
	if f := src.File(); f != nil {
		// The file open, whatever its path now names.
		path = "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	}
	var out []string
	devices := map[string]bool{}
	for _, m := range disk.Mounts(path, src.Size) {
		if !m.ReadWrite || devices[m.Device] || contains(out, m.Point) {
			continue
		}
		devices[m.Device] = true
		out = append(out, m.Point)
	}
	return out, nil
}
