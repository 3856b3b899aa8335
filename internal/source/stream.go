package source

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// stream reads a pipe, FIFO or character device so that a read waiting
// for data ends with ctx's error once ctx is done: the file is in the
// runtime's poller, and ctx's end sets a read deadline in the past.
type stream struct {
	ctx context.Context
	f   *os.File
	// awaitWriter is set for a FIFO opened non-blocking: until a writer
	// has come, a read would return end-of-file at once.
	awaitWriter bool
	stop        func() bool
}

func newStream(ctx context.Context, f *os.File, awaitWriter bool) *stream {
	return &stream{ctx: ctx, f: f, awaitWriter: awaitWriter, stop: context.AfterFunc(ctx, func() {
		// A file outside the poller (ErrNoDeadline) keeps blocking reads.
		_ = f.SetReadDeadline(time.Unix(1, 0))
	})}
}

func (s *stream) close() { s.stop() }

// Read reads the stream.
func (s *stream) Read(p []byte) (int, error) {
	if s.awaitWriter {
		if err := s.waitWriter(); err != nil {
			return 0, err
		}
		s.awaitWriter = false
	}
	n, err := s.f.Read(p)
	return n, s.cancelled(err)
}

// cancelled turns the deadline set when ctx ended into ctx's error.
func (s *stream) cancelled(err error) error {
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && s.ctx.Err() != nil {
		return s.ctx.Err()
	}
	return err
}

// waitWriter waits until the FIFO has data or a writer came and went:
// Linux reports neither POLLIN nor POLLHUP to a non-blocking reader before
// a first writer has opened it, so the poller wakes for either.
func (s *stream) waitWriter() error {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return fmt.Errorf("wait for a writer on %s: %w", s.f.Name(), err)
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				perr = err
				return true
			}
			return n > 0
		}
	})
	if err = s.cancelled(err); err == nil {
		err = perr
	}
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("wait for a writer on %s: %w", s.f.Name(), err)
	}
	return err
}

// openStdin opens standard input as a stream. A pipe, FIFO or terminal
// on descriptor 0 is opened anew through /proc/self/fd/0, non-blocking:
// a blocking descriptor (as os.Stdin normally is) cannot be put in the
// poller, so no signal would end a read that waits, and making descriptor
// 0 itself non-blocking would change it for every process sharing it.
func openStdin(ctx context.Context) *Source {
	f := os.Stdin
	var st unix.Stat_t
	if unix.Fstat(0, &st) == nil && (st.Mode&unix.S_IFMT == unix.S_IFIFO || st.Mode&unix.S_IFMT == unix.S_IFCHR) {
		if g, err := os.OpenFile("/proc/self/fd/0", os.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			f = g
		}
	}
	return newStreamSource(ctx, "-", f, false)
}

// newStreamSource makes a stream source of f.
func newStreamSource(ctx context.Context, path string, f *os.File, awaitWriter bool) *Source {
	st := newStream(ctx, f, awaitWriter)
	br := bufio.NewReaderSize(st, 1<<20)
	return &Source{Path: path, Kind: Stream, Size: -1, Stream: br, f: f, st: st, br: br}
}

// Empty reports whether the source holds no byte: a size of 0, or a
// stream that ends before its first byte (it waits for that byte, until
// the source's context is done).
func (s *Source) Empty() (bool, error) {
	if s.Kind != Stream {
		return s.Size == 0, nil
	}
	_, err := s.br.Peek(1)
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", s.Path, err)
	}
	return false, nil
}
