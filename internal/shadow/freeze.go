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
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/source"
)

// Filesystems are frozen by a separate process, the thaw guard (GuardMain,
// sauve's hidden thaw-guard command), so that they are thawed whatever
// happens to sauve: the guard thaws when sauve asks, when its standard
// input closes (sauve died, even by kill -9), or when the freeze timeout
// passes, whichever comes first. It runs in its own session, so a Ctrl-C
// aimed at sauve's process group does not kill it before it thaws, and it
// writes nothing but its two status lines to a pipe.

// The freeze ioctls (linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int)).
const (
	fifreeze = 0xc0045877
	fithaw   = 0xc0045878
)

// frozen is a set of filesystems frozen under a thaw guard.
type frozen struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	mounts []string
}

// freeze freezes the filesystems mounted at mounts under a thaw guard.
func freeze(ctx context.Context, mounts []string, o Options) (*frozen, error) {
	argv := o.Guard
	if len(argv) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find sauve's executable to run the thaw guard: %w", err)
		}
		argv = []string{exe, "thaw-guard"}
	}
	args := append(append([]string{}, argv[1:]...), "--timeout", o.FreezeTimeout.String(), "--")
	cmd := exec.Command(argv[0], append(args, mounts...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the thaw guard: %w", err)
	}
	f := &frozen{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout), mounts: mounts}
	line, err := f.out.ReadString('\n')
	if strings.TrimSpace(line) != "frozen" {
		stdin.Close()
		cmd.Wait()
		if msg, ok := strings.CutPrefix(strings.TrimSpace(line), "error: "); ok {
			return nil, errors.New(msg)
		}
		return nil, fmt.Errorf("the thaw guard did not freeze %s: %q %v", strings.Join(mounts, ", "), line, err)
	}
	return f, nil
}

// thaw has the guard thaw and says how long writes were frozen. It fails
// when the guard thawed before it was asked (the timeout passed): the
// copies taken may not be of one instant.
func (f *frozen) thaw() (time.Duration, error) {
	io.WriteString(f.stdin, "thaw\n")
	f.stdin.Close()
	line, _ := f.out.ReadString('\n')
	f.cmd.Wait()
	fields := strings.Fields(line)
	if len(fields) != 3 || fields[0] != "thawed" {
		// The guard died while the filesystems were frozen: thaw them
		// from here.
		for _, m := range f.mounts {
			thawMount(m)
		}
		return 0, fmt.Errorf("the thaw guard ended without thawing %s (%q): thawed by sauve", strings.Join(f.mounts, ", "), strings.TrimSpace(line))
	}
	ns, _ := strconv.ParseInt(fields[1], 10, 64)
	d := time.Duration(ns)
	if fields[2] != "asked" {
		return d, fmt.Errorf("writes to %s were thawed after the %s freeze timeout, before every copy was taken: the copies are not of one instant; nothing stored", strings.Join(f.mounts, ", "), d.Round(time.Millisecond))
	}
	return d, nil
}

// mountsToFreeze lists the mount points of the filesystems mounted
// read-write from src (itself, or through loop devices and partitions):
// read-only ones are not written, and need no freeze.
func mountsToFreeze(src *source.Source) ([]string, error) {
	var out []string
	for _, m := range disk.Mounts(src.Path, src.Size) {
		if m.ReadWrite && !contains(out, m.Point) {
			out = append(out, m.Point)
		}
	}
	return out, nil
}

// GuardMain is the thaw guard: sauve thaw-guard --timeout D -- MOUNT...
// It freezes every MOUNT, prints "frozen", and thaws them all when a line
// or EOF arrives on stdin or after D, then prints "thawed NANOSECONDS
// asked|eof|timeout". On a failure to freeze it thaws what it froze and
// prints "error: ...". It returns the exit status.
func GuardMain(args []string, stdin io.Reader, stdout io.Writer) int {
	timeout, mounts, err := guardArgs(args)
	if err != nil {
		fmt.Fprintf(stdout, "error: thaw guard: %v\n", err)
		return 2
	}
	start := time.Now()
	var done []string
	for _, m := range mounts {
		if err := freezeMount(m); err != nil {
			for i := len(done) - 1; i >= 0; i-- {
				thawMount(done[i])
			}
			fmt.Fprintf(stdout, "error: %v\n", err)
			return 1
		}
		done = append(done, m)
	}
	fmt.Fprintln(stdout, "frozen")
	why := make(chan string, 2)
	go func() {
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil && line == "" {
			why <- "eof"
			return
		}
		why <- "asked"
	}()
	timer := time.NewTimer(timeout)
	reason := ""
	select {
	case reason = <-why:
	case <-timer.C:
		reason = "timeout"
	}
	for i := len(done) - 1; i >= 0; i-- {
		thawMount(done[i])
	}
	fmt.Fprintf(stdout, "thawed %d %s\n", time.Since(start).Nanoseconds(), reason)
	return 0
}

func guardArgs(args []string) (time.Duration, []string, error) {
	timeout := DefaultFreezeTimeout
	for len(args) > 0 && args[0] != "--" {
		if args[0] != "--timeout" || len(args) < 2 {
			return 0, nil, fmt.Errorf("unexpected argument %q", args[0])
		}
		d, err := time.ParseDuration(args[1])
		if err != nil || d <= 0 {
			return 0, nil, fmt.Errorf("--timeout %q", args[1])
		}
		timeout, args = d, args[2:]
	}
	if len(args) < 2 {
		return 0, nil, errors.New("no mount point to freeze")
	}
	return timeout, args[1:], nil
}

// freezeMount freezes the filesystem mounted at m (FIFREEZE).
func freezeMount(m string) error {
	fd, err := unix.Open(m, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("freeze %s: %w", m, err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, fifreeze, 0); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("freeze %s: it is frozen already (by another program, or a backup that was interrupted: 'fsfreeze -u %s' thaws it)", m, m)
		}
		return fmt.Errorf("freeze %s: %w", m, err)
	}
	return nil
}

// thawMount thaws the filesystem mounted at m (FITHAW); a filesystem that
// is not frozen is left as it is.
func thawMount(m string) {
	fd, err := unix.Open(m, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	unix.IoctlSetInt(fd, fithaw, 0)
}
