package shadow

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The thaw guard is a process of its own that freezes filesystems and
// thaws them whatever happens to the sauve that started it: sauve asks
// (a "thaw" line on the guard's stdin), sauve dies (stdin reaches EOF:
// the kernel closes the pipe even on kill -9), or the freeze timeout
// passes. It writes nothing but its reports on stdout, a pipe: a write to
// a filesystem it froze would wait for the thaw it is there to make.
//
// Its reports, one line each:
//
//	sauve-thaw-guard 1     first, always
//	freezing N             before freezing mount N (sauve thaws 0..N itself if the guard dies)
//	frozen                 every mount is frozen
//	failed N MESSAGE       mount N could not be frozen (those frozen before are thawed)
//	thaw-failed N MESSAGE  FITHAW of mount N failed
//	error MESSAGE          bad arguments: nothing was frozen
//	done REASON NANOS      last: every mount it froze is thawed; REASON is thaw
//	                       (sauve asked), eof, timeout, signal or failed; NANOS is
//	                       the time from the first FIFREEZE to the last FITHAW

const guardHello = "sauve-thaw-guard 1"

// The ioctls of fsfreeze(8), from linux/fs.h: _IOWR('X', 119, int) and
// _IOWR('X', 120, int).
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// maxGuardMounts bounds the mounts one guard freezes (and so the indexes
// sauve accepts in its reports).
const maxGuardMounts = 256

// GuardMain runs the thaw guard (sauve's hidden thaw-guard command):
// args are "--timeout DURATION -- MOUNT...", or "--guest-agent SOCKET"
// for the guest's thaw guard (guestguard.go), stdin carries sauve's thaw
// request, stdout the reports. It returns the exit status: 0 when it froze
// and thawed every mount, 1 when a freeze failed, 2 for bad arguments.
func GuardMain(args []string, stdin io.Reader, stdout io.Writer) int {
	// A report written after sauve died must not kill the guard with
	// SIGPIPE before it thaws; and a signal meant for it thaws first.
	signal.Ignore(syscall.SIGPIPE)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sig)
	// Out of sauve's session, a Ctrl-C or a hang-up of sauve's terminal
	// does not reach it (freeze starts it so already; EPERM then).
	_, _ = unix.Setsid()

	if len(args) == 2 && args[0] == "--guest-agent" {
		return guestGuardMain(args[1], stdin, stdout)
	}
	out := guardOut{stdout}
	out.line(guardHello)
	timeout, mounts, err := parseGuardArgs(args)
	if err != nil {
		out.line("error " + guardText(err.Error()))
		return 2
	}
	asked := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdin)
		if sc.Scan() {
			asked <- "thaw"
			return
		}
		asked <- "eof"
	}()
	g := &guard{mounts: mounts, out: out}
	defer g.close()
	if !g.freezeAll() {
		return 1
	}
	out.line("frozen")
	reason := g.wait(asked, sig, timeout)
	g.thawAll(reason)
	return 0
}

// guardOut writes the guard's reports; their errors are ignored (sauve
// is gone, and thawing matters more).
type guardOut struct{ w io.Writer }

func (o guardOut) line(s string) { _, _ = io.WriteString(o.w, s+"\n") }

// parseGuardArgs reads "--timeout DURATION [--] MOUNT...".
func parseGuardArgs(args []string) (time.Duration, []string, error) {
	fs := flag.NewFlagSet("thaw-guard", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	timeout := fs.Duration("timeout", DefaultFreezeTimeout, "longest freeze")
	if err := fs.Parse(args); err != nil {
		return 0, nil, fmt.Errorf("thaw-guard: %w", err)
	}
	if *timeout <= 0 || *timeout > time.Hour {
		return 0, nil, fmt.Errorf("thaw-guard: --timeout %s: choose more than 0 and at most 1h", *timeout)
	}
	mounts := fs.Args()
	if len(mounts) == 0 || len(mounts) > maxGuardMounts {
		return 0, nil, fmt.Errorf("thaw-guard: expects 1 to %d mount points, got %d", maxGuardMounts, len(mounts))
	}
	for _, m := range mounts {
		if !filepath.IsAbs(m) {
			return 0, nil, fmt.Errorf("thaw-guard: mount point %q is not an absolute path", m)
		}
	}
	return *timeout, mounts, nil
}

// guard holds the mounts it freezes: fds[i] is mount i's root directory,
// -1 for a mount it does not freeze itself (the same filesystem as an
// earlier one, or not opened).
type guard struct {
	mounts []string
	out    guardOut
	fds    []int
	frozen []int // indexes, in the order frozen
	start  time.Time
}

// freezeAll opens every mount, then freezes them in order. On failure it
// thaws what it froze, reports, and returns false.
func (g *guard) freezeAll() bool {
	devs := map[uint64]bool{}
	for i, m := range g.mounts {
		fd, dev, err := openMountRoot(m)
		if err != nil {
			g.fail(i, err)
			return false
		}
		if devs[dev] {
			// Another mount point of a filesystem already in the list: a
			// second FIFREEZE would say EBUSY.
			unix.Close(fd)
			fd = -1
		}
		devs[dev] = true
		g.fds = append(g.fds, fd)
	}
	for i, fd := range g.fds {
		if fd < 0 {
			continue
		}
		g.out.line("freezing " + strconv.Itoa(i))
		if g.start.IsZero() {
			g.start = time.Now()
		}
		if err := unix.IoctlSetInt(fd, ioctlFIFREEZE, 0); err != nil {
			g.fail(i, freezeError(err))
			return false
		}
		g.frozen = append(g.frozen, i)
	}
	return true
}

// fail thaws what is frozen, then reports that mount i failed.
func (g *guard) fail(i int, err error) {
	g.thawAll("")
	g.out.line("failed " + strconv.Itoa(i) + " " + guardText(err.Error()))
	g.out.line("done failed " + strconv.FormatInt(int64(g.took()), 10))
}

// wait returns why to thaw: sauve asked or died, a signal, or the
// timeout since the first FIFREEZE.
func (g *guard) wait(asked <-chan string, sig <-chan os.Signal, timeout time.Duration) string {
	timer := time.NewTimer(time.Until(g.start.Add(timeout)))
	defer timer.Stop()
	select {
	case r := <-asked:
		return r
	case <-sig:
		return "signal"
	case <-timer.C:
		// sauve's request, if it came by now, was made while everything
		// was still frozen: its copy is good.
		select {
		case r := <-asked:
			if r == "thaw" {
				return r
			}
		default:
		}
		return "timeout"
	}
}

// thawAll thaws in reverse order; with a reason, it reports each FITHAW
// that failed and the end.
func (g *guard) thawAll(reason string) {
	var failed []string
	for k := len(g.frozen) - 1; k >= 0; k-- {
		i := g.frozen[k]
		if err := unix.IoctlSetInt(g.fds[i], ioctlFITHAW, 0); err != nil {
			failed = append(failed, "thaw-failed "+strconv.Itoa(i)+" "+guardText(thawError(err).Error()))
		}
	}
	took := g.took()
	g.frozen = nil
	if reason == "" {
		return
	}
	for _, f := range failed {
		g.out.line(f)
	}
	g.out.line("done " + reason + " " + strconv.FormatInt(int64(took), 10))
}

func (g *guard) took() time.Duration {
	if g.start.IsZero() {
		return 0
	}
	return time.Since(g.start)
}

func (g *guard) close() {
	for _, fd := range g.fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// openMountRoot opens the root directory of the filesystem mounted at
// path and returns it with the filesystem's device number. A path that
// is not a mount point is refused: FIFREEZE of it would freeze whatever
// filesystem holds it.
func openMountRoot(path string) (int, uint64, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("open %s: %w", path, err)
	}
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS, &stx); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("stat %s: %w", path, err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 || stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("%s is not a mount point (any more?): not freezing the filesystem that holds it", path)
	}
	return fd, unix.Mkdev(stx.Dev_major, stx.Dev_minor), nil
}

// freezeError says what a FIFREEZE error means.
func freezeError(err error) error {
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("already frozen (by fsfreeze or another backup?): %w", err)
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTTY):
		return fmt.Errorf("its filesystem cannot be frozen: %w", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("freezing needs root (CAP_SYS_ADMIN): %w", err)
	}
	return fmt.Errorf("FIFREEZE: %w", err)
}

// thawError says what a FITHAW error means.
func thawError(err error) error {
	if errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("was thawed by someone else while frozen: %w", err)
	}
	return fmt.Errorf("FITHAW: %w", err)
}

// guardText keeps a message on one line of printable text.
func guardText(s string) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}
