// Package disk opens what sauve reads from and writes to: image files,
// block devices and standard streams. It finds a device's size from the
// device itself, refuses targets that are mounted or too small, and zeroes
// ranges the cheapest way the target allows (hole punching, BLKZEROOUT).
package disk

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kind is what a source or target is.
type Kind string

// Kinds.
const (
	File   Kind = "file"
	Device Kind = "device"
	Stream Kind = "stdin"
	Stdout Kind = "stdout"
)

// Source is something to back up.
type Source struct {
	Path string
	Kind Kind
	// Size is the size in bytes, -1 for a stream of unknown length.
	Size int64
	f    *os.File
	r    io.Reader // set for streams
}

// OpenSource opens path for reading; "-" is standard input.
func OpenSource(path string) (*Source, error) {
	if path == "-" {
		return &Source{Path: "-", Kind: Stream, Size: -1, f: os.Stdin, r: bufio.NewReaderSize(os.Stdin, 1<<20)}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open source: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat source %s: %w", path, err)
	}
	s := &Source{Path: path, f: f}
	switch {
	case fi.Mode().IsRegular():
		s.Kind, s.Size = File, fi.Size()
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		s.Kind = Device
		if s.Size, err = deviceSize(f); err != nil {
			f.Close()
			return nil, fmt.Errorf("size of device %s: %w", path, err)
		}
	case fi.Mode()&(os.ModeNamedPipe|os.ModeCharDevice) != 0:
		s.Kind, s.Size, s.r = Stream, -1, bufio.NewReaderSize(f, 1<<20)
	default:
		f.Close()
		return nil, fmt.Errorf("source %s is a %s, not a disk image, block device or stream", path, fi.Mode().Type())
	}
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	return s, nil
}

// File returns the open file (nil for standard input).
func (s *Source) File() *os.File { return s.f }

// ReadAt reads from a file or device source.
func (s *Source) ReadAt(p []byte, off int64) (int, error) { return s.f.ReadAt(p, off) }

// Read reads a stream source.
func (s *Source) Read(p []byte) (int, error) {
	if s.r == nil {
		return 0, errors.New("source is not a stream")
	}
	return s.r.Read(p)
}

// Close closes the source.
func (s *Source) Close() error {
	if s.f == os.Stdin {
		return nil
	}
	return s.f.Close()
}

// deviceSize asks the kernel for a block device's size (BLKGETSIZE64):
// stat reports 0 for devices.
func deviceSize(f *os.File) (int64, error) {
	var size uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
		return 0, e
	}
	return int64(size), nil
}

// Target is where a restore writes.
type Target struct {
	Path string
	Kind Kind
	// Size is the target's size before the restore (0 for a new file).
	Size int64
	// Created is true when the restore created the file, so its holes
	// are known zeros.
	Created bool
	f       *os.File
	direct  *os.File // the same file opened with O_DIRECT, or nil
	// noDirect is set when the file system refused an O_DIRECT write;
	// direct stays open (other goroutines may be writing) until Close.
	noDirect atomic.Bool
}

// directAlign is the alignment O_DIRECT needs of offsets, lengths and
// memory on the devices and file systems we write to.
const directAlign = 4096

// openDirect opens a second descriptor of t's file with O_DIRECT for the
// bulk of a restore: on the machines we measured, buffered writes cost more
// CPU in the kernel than everything else a restore does
// (docs/BENCHMARKS.md), and a restored disk has no use for the page cache.
// Unaligned writes still go through the buffered descriptor.
func (t *Target) openDirect() {
	if t.Kind != File && t.Kind != Device {
		return
	}
	flag := os.O_WRONLY | syscall.O_DIRECT
	if f, err := os.OpenFile(t.Path, flag, 0); err == nil {
		t.direct = f
	}
}

func aligned(p []byte, off int64) bool {
	return off%directAlign == 0 && len(p)%directAlign == 0 && len(p) > 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%directAlign == 0
}

// TargetOptions say how a target may be opened.
type TargetOptions struct {
	// ImageSize is the size the restore writes.
	ImageSize int64
	// ReadOnly opens an existing target only for comparing.
	ReadOnly bool
}

// OpenTarget opens path for a restore of opts.ImageSize bytes. "-" is
// standard output. It refuses a mounted device and a device smaller than
// the image.
func OpenTarget(path string, opts TargetOptions) (*Target, error) {
	if path == "-" {
		return &Target{Path: "-", Kind: Stdout, f: os.Stdout}, nil
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("create target: %w", err)
		}
		t := &Target{Path: path, Kind: File, Created: true, f: f}
		t.openDirect()
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("target: %w", err)
	}
	switch {
	case fi.Mode().IsRegular():
		flag := os.O_RDWR
		if opts.ReadOnly {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return nil, fmt.Errorf("open target: %w", err)
		}
		t := &Target{Path: path, Kind: File, Size: fi.Size(), f: f}
		if !opts.ReadOnly {
			t.openDirect()
		}
		return t, nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		if where := mountedAt(path); where != "" {
			return nil, fmt.Errorf("target %s is mounted at %s: unmount it first", path, where)
		}
		flag := os.O_RDWR | syscall.O_EXCL
		if opts.ReadOnly {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			if errors.Is(err, syscall.EBUSY) {
				return nil, fmt.Errorf("target %s is in use (mounted, or held by another program): refusing to write to it", path)
			}
			return nil, fmt.Errorf("open target: %w", err)
		}
		size, err := deviceSize(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size of device %s: %w", path, err)
		}
		if size < opts.ImageSize {
			f.Close()
			return nil, fmt.Errorf("target %s holds %d bytes, the image needs %d: refusing a restore that would not fit", path, size, opts.ImageSize)
		}
		t := &Target{Path: path, Kind: Device, Size: size, f: f}
		if !opts.ReadOnly {
			t.openDirect()
		}
		return t, nil
	}
	return nil, fmt.Errorf("target %s is a %s, not a file or block device", path, fi.Mode().Type())
}

// mountedAt returns where the device path, or a partition on it, is
// mounted, or "".
func mountedAt(path string) string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return ""
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	major, minor := unix.Major(st.Rdev), unix.Minor(st.Rdev)
	parts := partitionsOf(major, minor)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		var ma, mi uint32
		if _, err := fmt.Sscanf(fields[2], "%d:%d", &ma, &mi); err != nil {
			continue
		}
		if (ma == major && mi == minor) || parts[[2]uint32{ma, mi}] {
			return fields[4]
		}
	}
	return ""
}

// partitionsOf lists the device numbers of the partitions of a disk, from
// sysfs.
func partitionsOf(major, minor uint32) map[[2]uint32]bool {
	out := map[[2]uint32]bool{}
	dir := fmt.Sprintf("/sys/dev/block/%d:%d", major, minor)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return out
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "dev"))
		if err != nil {
			continue
		}
		var ma, mi uint32
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &ma, &mi); err == nil {
			out[[2]uint32{ma, mi}] = true
		}
	}
	return out
}

// WriteAt writes to a file or device target.
func (t *Target) WriteAt(p []byte, off int64) (int, error) {
	if t.direct != nil && !t.noDirect.Load() && aligned(p, off) {
		n, err := t.direct.WriteAt(p, off)
		if err == nil || n != 0 || !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
		// EINVAL before anything was written: this file system or device
		// wants another alignment; stay buffered from now on.
		t.noDirect.Store(true)
	}
	return t.f.WriteAt(p, off)
}

// ReadAt reads the target (for delta restores).
func (t *Target) ReadAt(p []byte, off int64) (int, error) { return t.f.ReadAt(p, off) }

// Write writes to a stream target.
func (t *Target) Write(p []byte) (int, error) { return t.f.Write(p) }

// Zero makes [off, off+n) read as zeros: a hole in a file, BLKZEROOUT on a
// device (which thin and loop devices turn into discards), and written
// zeros where neither works.
func (t *Target) Zero(off, n int64, zeros []byte) error {
	switch t.Kind {
	case File:
		err := unix.Fallocate(int(t.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
	case Device:
		rng := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, t.f.Fd(), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&rng))); e == 0 {
			return nil
		}
	}
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := t.f.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Finish sets a file target's size to size and syncs the target.
func (t *Target) Finish(size int64) error {
	if t.Kind == Stdout {
		return nil
	}
	if t.Kind == File {
		if err := t.f.Truncate(size); err != nil {
			return fmt.Errorf("set size of %s: %w", t.Path, err)
		}
	}
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", t.Path, err)
	}
	return nil
}

// Close closes the target.
func (t *Target) Close() error {
	if t.f == os.Stdout {
		return nil
	}
	if t.direct != nil {
		t.direct.Close()
	}
	return t.f.Close()
}

// Remove deletes a target the restore created (after a failure).
func (t *Target) Remove() {
	if t.Created {
		os.Remove(t.Path)
	}
}
