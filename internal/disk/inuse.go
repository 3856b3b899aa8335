package disk

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// RefuseLocked refuses a target file or device that another process
// holds a byte-range lock on. QEMU locks every image it opens
// (its image locking: shared locks on a few bytes of the file, OFD
// locks on Linux), so a target a running VM uses is found here even
// when nothing is mounted from it; writing under a running guest would
// corrupt both. A lock taken with flock(2) is not seen: QEMU does not
// use it.
func RefuseLocked(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		// A filesystem without byte-range locks cannot say: go on, as
		// QEMU does when it cannot lock.
		return nil
	}
	if lk.Type == unix.F_UNLCK {
		return nil
	}
	pid := int(lk.Pid)
	if pid <= 0 { // an OFD lock names no process: find one that has it open
		pid = openerOf(f)
	}
	who := "another process"
	if pid > 0 {
		who = fmt.Sprintf("process %d", pid)
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil && len(b) > 1 {
			who += " (" + string(b[:len(b)-1]) + ")"
		}
	}
	return fmt.Errorf("target %s is in use: %s holds a lock on it at byte %d (a running QEMU locks the images it opens): stop it, or write another target", path, who, lk.Start)
}

// openerOf returns a process other than this one that has f's file
// open, 0 when none is found (another PID namespace, no permission).
func openerOf(f *os.File) int {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil || pid == os.Getpid() {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join(p, "fd"))
		for _, fd := range fds {
			if o, err := os.Stat(filepath.Join(p, "fd", fd.Name())); err == nil && os.SameFile(o, fi) {
				return pid
			}
		}
	}
	return 0
}
