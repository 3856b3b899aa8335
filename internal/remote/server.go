package remote

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
)

// Target is what the remote end writes: a raw file or block device. One
// that is also a Booter can be test-booted there.
type Target interface {
	WriteAt(p []byte, off int64) (int, error)
	Zero(off, n int64) error
	Sync() error
	Close() error
}

// Opener opens the target at path, or, when it does not exist and create
// is above 0, makes a file of create bytes, all zeros. It refuses a
// target in use (mounted) as a local migration does.
type Opener func(path string, create int64) (Target, Info, error)

// Serve speaks the remote end of the protocol on r and w until the local
// end closes r, or a failure, which it sends as text before returning it.
func Serve(ctx context.Context, r io.Reader, w io.Writer, open Opener) error {
	br, bw := bufio.NewReaderSize(r, 256<<10), bufio.NewWriter(w)
	err := serve(ctx, br, bw, open)
	if err != nil && !errors.Is(err, errPeerGone) {
		writeFrame(bw, msgError, []byte(decodeText([]byte(err.Error()))))
		bw.Flush()
	}
	if errors.Is(err, errPeerGone) {
		return nil
	}
	return err
}

// errPeerGone is the local end closing the session: the end of a pass.
var errPeerGone = errors.New("the local end closed the session")

func serve(ctx context.Context, br *bufio.Reader, bw *bufio.Writer, open Opener) error {
	f, _, err := readFrame(br, nil)
	if err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	if f.typ != msgHello {
		return fmt.Errorf("the first message is of type %q, not a hello: is the other end sauve migrate?", f.typ)
	}
	h, err := decodeHello(f.payload)
	if err != nil {
		return err
	}
	if h.version != Version {
		return fmt.Errorf("the local sauve speaks protocol version %d, this one %d: install the same sauve version on both ends", h.version, Version)
	}
	t, info, err := open(h.path, h.create)
	if err != nil {
		return err
	}
	defer t.Close()
	if err := writeFrame(bw, msgInfo, encodeInfo(info)); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("answer hello: %w", err)
	}
	s := &session{t: t, size: info.Size, path: h.path}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(2*MaxWrite), zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		return err
	}
	defer dec.Close()
	s.dec = dec
	s.data = make([]byte, MaxWrite)
	var buf []byte
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		var f frame
		f, buf, err = readFrame(br, buf)
		if errors.Is(err, io.EOF) {
			return errPeerGone
		}
		if err != nil {
			return err
		}
		if f.typ == msgBoot {
			if err := s.serveBoot(ctx, br, bw, f.payload); err != nil {
				return err
			}
			continue
		}
		ack, err := s.handle(f)
		if err != nil {
			return err
		}
		if ack != nil {
			writeFrame(bw, msgAck, ack)
			if err := bw.Flush(); err != nil {
				return fmt.Errorf("acknowledge a sync: %w", err)
			}
		}
	}
}

// session is the remote end after the hello.
type session struct {
	t    Target
	size int64
	path string
	dec  *zstd.Decoder
	data []byte
}

// handle applies one message; a sync returns the ack's payload.
func (s *session) handle(f frame) ([]byte, error) {
	switch f.typ {
	case msgWrite:
		h, data, err := decodeWrite(f.payload)
		if err != nil {
			return nil, err
		}
		if err := s.inRange(h.off, int64(h.n)); err != nil {
			return nil, err
		}
		if h.enc == encZstd {
			out, err := s.dec.DecodeAll(data, s.data[:0:h.n])
			if err != nil {
				return nil, fmt.Errorf("decompress the write at %d: %w", h.off, err)
			}
			if len(out) != h.n {
				return nil, fmt.Errorf("the write at %d decompresses to %d bytes, %d declared", h.off, len(out), h.n)
			}
			data = out
		}
		if _, err := s.t.WriteAt(data, h.off); err != nil {
			return nil, fmt.Errorf("write %s at %d: %w", s.path, h.off, err)
		}
	case msgZero:
		off, n, err := decodeZero(f.payload)
		if err != nil {
			return nil, err
		}
		if err := s.inRange(off, n); err != nil {
			return nil, err
		}
		if err := s.t.Zero(off, n); err != nil {
			return nil, fmt.Errorf("zero %s at %d: %w", s.path, off, err)
		}
	case msgSync:
		seq, err := decodeSeq(f.payload, "sync")
		if err != nil {
			return nil, err
		}
		if err := s.t.Sync(); err != nil {
			return nil, fmt.Errorf("sync %s: %w", s.path, err)
		}
		return encodeSeq(seq), nil
	default:
		return nil, fmt.Errorf("unexpected message of type %q", f.typ)
	}
	return nil, nil
}

func (s *session) inRange(off, n int64) error {
	if off < 0 || n < 0 || off > s.size || n > s.size-off {
		return fmt.Errorf("%d bytes at %d lie beyond the end of %s (%d bytes)", n, off, s.path, s.size)
	}
	return nil
}
