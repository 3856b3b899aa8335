// Package source opens what sauve backs up or converts and says which of
// its bytes hold data: a block device, a disk image file, a VM disk image
// (qcow2, vmdk, vhd, vhdx, vdi, the disk of an ova) read as the virtual
// disk it holds, or a stream (standard input, a FIFO, a character
// device). It refuses what it cannot read faithfully (empty sources,
// image formats sauve does not read) with one error naming the source,
// and prints nothing: warnings go to a callback the caller gives.
//
// Preparing a source takes four calls, in this order:
//
//	src, err := source.Open(ctx, path)         // random access (At) or a stream (Stream), never both
//	v := source.Live(src)                      // or a Provider's point-in-time copy of src
//	d, err := source.OpenDisk(v, opts)         // the disk v holds: itself, or an image's virtual disk
//	m, err := d.Map(source.MapOptions{...})    // partition table, filesystems, free space, mounts
//
// The caller then reads d.At with m.Map() (or d.Stream, whole), adds
// m.Describe to the snapshot's disk entry once it is read, and calls
// m.WarnLate. src.RefuseEmpty and d.RefuseEmpty refuse a source, or an
// image's disk, that holds no byte.
//
// Point-in-time copies (internal/shadow) plug in between Open and
// OpenDisk. A Provider is given the opened sources of one backup (path,
// kind, size, open file) and returns a View of each, all taken at one
// instant: an LVM or btrfs snapshot, a reflink copy, a frozen filesystem,
// a QEMU fleecing export. Everything after it reads the view: the image
// format is detected, the layout and used-block map are read, and the
// backup reads its data, from the copy; names and paths come from the
// Source. A view that nothing writes to while it is read (View.Live
// false) is not checked for read-write mounts, since a copy of a mounted
// filesystem is consistent. The provider releases its copies through
// View.Release once the backup is done.
package source

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/disk"
)

// Kind is what a source is.
type Kind string

// Kinds, as backups record them.
const (
	File   Kind = "file"
	Device Kind = "device"
	Stream Kind = "stdin"
)

// Source is an opened device, file or stream. It reads either at any
// offset (At, for a file or a device, whose Size is known) or once in
// order (Stream, Size -1): never both, so that nothing has to fake the
// other.
type Source struct {
	Path string
	Kind Kind
	// Size is the size in bytes, -1 for a stream.
	Size int64
	// At reads a file or device; nil for a stream.
	At io.ReaderAt
	// Stream reads a stream; nil for a file or device. A read waiting
	// for data ends when the context given to Open is done.
	Stream io.Reader
	// SectorSize is a device's logical sector size, 0 for other kinds.
	SectorSize int

	f      *os.File
	direct *directReader // devices: At, unless O_DIRECT is refused
	st     *stream       // streams
	br     *bufio.Reader // streams: Stream, peeked by Empty
}

// Open opens path for reading; "-" is standard input. A stream (a pipe,
// FIFO or character device) is read so that ctx ends a read that waits
// for data, and a FIFO is opened without waiting for a writer: its first
// read waits, until ctx is done.
func Open(ctx context.Context, path string) (*Source, error) {
	if path == "-" {
		return openStdin(ctx), nil
	}
	flag := os.O_RDONLY
	fifo := false
	if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeNamedPipe != 0 {
		// open(2) of a FIFO waits for a writer, and no signal ends that
		// wait: open it non-blocking, and let the first read wait.
		flag |= syscall.O_NONBLOCK
		fifo = true
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open source: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat source %s: %w", path, err)
	}
	var s *Source
	switch {
	case fi.Mode().IsRegular():
		s = &Source{Path: path, Kind: File, Size: fi.Size(), At: f, f: f}
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		size, err := disk.DeviceSize(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size of device %s: %w", path, err)
		}
		s = &Source{Path: path, Kind: Device, Size: size, At: f, SectorSize: disk.SectorSize(f), f: f}
		if s.direct, err = openDirect(f, size); err == nil {
			s.At = s.direct
		}
	case fi.Mode()&(os.ModeNamedPipe|os.ModeCharDevice) != 0:
		s = newStreamSource(ctx, path, f, fifo && fi.Mode()&os.ModeNamedPipe != 0)
	default:
		f.Close()
		return nil, fmt.Errorf("source %s is a %s, not a disk image, block device or stream", path, fi.Mode().Type())
	}
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	return s, nil
}

// File returns the open file: for a Provider (a reflink copy, a device
// to snapshot), or to find a sparse file's holes.
func (s *Source) File() *os.File { return s.f }

// Close closes the source.
func (s *Source) Close() error {
	if s.st != nil {
		s.st.close()
	}
	if s.f == os.Stdin {
		return nil
	}
	if s.direct != nil {
		s.direct.Close()
	}
	return s.f.Close()
}

// RefuseEmpty returns an error if the source holds no byte (see Empty):
// an empty stream is most often a pipeline whose first command failed,
// and an empty file a mistake. doing says what would have been done
// ("store an empty snapshot"), hint how to do it anyway ("--allow-empty
// stores one").
func (s *Source) RefuseEmpty(doing, hint string) error {
	empty, err := s.Empty()
	if err != nil || !empty {
		return err
	}
	what := fmt.Sprintf("source %s is empty (0 bytes)", s.Path)
	if s.Kind == Stream {
		what = fmt.Sprintf("source %s ended before its first byte (did the command feeding it fail?)", streamName(s.Path))
	}
	return fmt.Errorf("%s: refusing to %s (%s)", what, doing, hint)
}

func streamName(path string) string {
	if path == "-" {
		return "- (standard input)"
	}
	return path
}
