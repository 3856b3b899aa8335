// Package disk opens what a restore writes to (image files, block
// devices, standard output) and holds the facts about files and devices
// that both sides need: a device's size and sector size from the device
// itself, and which mounted filesystems use a file or device (Mounts). It
// refuses targets that are mounted or too small, and zeroes ranges the
// cheapest way the target allows (hole punching, BLKZEROOUT). What is
// backed up is opened by package source, which uses these facts; disk
// imports nothing of sauve's.
package disk

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kind is what a target is.
type Kind string

// Kinds.
const (
	File   Kind = "file"
	Device Kind = "device"
	Stdout Kind = "stdout"
)

// DeviceSize asks the kernel for a block device's size (BLKGETSIZE64):
// stat reports 0 for devices.
func DeviceSize(f *os.File) (int64, error) {
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
	// borrowed: f belongs to the caller (NewFileTarget).
	borrowed bool
	direct   *os.File // the same file opened with O_DIRECT, or nil
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

// OpenTarget opens the existing file or device at path for a restore of
// opts.ImageSize bytes. "-" is standard output. It refuses a device
// smaller than the image, and a file or device that a mounted filesystem
// uses: mounted itself, a partition of it mounted, or a loop device (or a
// chain of them) built on it and mounted; and, unless opts.ReadOnly, one
// that a running QEMU has open (RefuseLocked). A new file is made with
// NewFileTarget.
func OpenTarget(path string, opts TargetOptions) (*Target, error) {
	if path == "-" {
		return &Target{Path: "-", Kind: Stdout, f: os.Stdout}, nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("target: %w", err)
	}
	isDevice := fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
	if !fi.Mode().IsRegular() && !isDevice {
		return nil, fmt.Errorf("target %s is a %s, not a file or block device", path, fi.Mode().Type())
	}
	size := fi.Size()
	if isDevice {
		size = 0 // Mounts reads it from sysfs
	}
	if ms := Mounts(path, size); len(ms) > 0 {
		return nil, mountedError(path, ms)
	}
	if !opts.ReadOnly {
		if err := RefuseLocked(path); err != nil {
			return nil, err
		}
	}
	if fi.Mode().IsRegular() {
		return openFileTarget(path, fi.Size(), opts)
	}
	return openDeviceTarget(path, opts)
}

// mountedError refuses a target that the mounts ms use.
func mountedError(path string, ms []Mount) error {
	m := ms[0]
	more := ""
	switch len(ms) {
	case 1:
	case 2:
		more = " (and 1 more mount)"
	default:
		more = fmt.Sprintf(" (and %d more mounts)", len(ms)-1)
	}
	if len(m.Via) == 0 && m.Within == "" {
		return fmt.Errorf("target %s is mounted at %s%s: unmount it first", path, m.Point, more)
	}
	return fmt.Errorf("target %s backs a mounted filesystem through %s, mounted at %s%s: unmount it first", path, m.Chain(), m.Point, more)
}

func openFileTarget(path string, size int64, opts TargetOptions) (*Target, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open target: %w", err)
	}
	t := &Target{Path: path, Kind: File, Size: size, f: f}
	if !opts.ReadOnly {
		t.openDirect()
	}
	return t, nil
}

func openDeviceTarget(path string, opts TargetOptions) (*Target, error) {
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
	size, err := DeviceSize(f)
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

// NewFileTarget makes a target of f, a new, empty file the caller created
// (and keeps: Close leaves f open): its holes are known zeros.
func NewFileTarget(f *os.File) *Target {
	t := &Target{Path: f.Name(), Kind: File, Created: true, f: f, borrowed: true}
	t.openDirect()
	return t
}

// SectorSize returns a device target's logical sector size, 0 for files.
func (t *Target) SectorSize() int {
	if t.Kind != Device {
		return 0
	}
	return SectorSize(t.f)
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

// Close closes the target (but not a file given to NewFileTarget).
func (t *Target) Close() error {
	if t.direct != nil {
		t.direct.Close()
	}
	if t.f == os.Stdout || t.borrowed {
		return nil
	}
	return t.f.Close()
}
