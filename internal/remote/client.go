package remote

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sauve-backup/sauve/internal/zstdenc"
)

// Client is the local end: a migration's target whose writes go to the
// remote end. It is used by one goroutine (a pass writes in order).
type Client struct {
	w    *bufio.Writer
	enc  *zstdenc.Encoder
	buf  []byte
	seq  uint64
	info Info

	acks  chan uint64
	boots chan bootAnswer
	// booting says a boot request waits for its result: a result
	// unasked for is a protocol error, not a blocked reader.
	booting atomic.Bool
	done    chan struct{} // closed when the remote end failed or went away
	mu      sync.Mutex
	err     error

	// Data counts the bytes written, Wire the bytes of the frames sent.
	Data, Wire atomic.Int64
}

// Dial says hello on w, the remote end's input, and reads its answer on
// r: path is the target there; create, when above 0, is the size of the
// file to make when it does not exist.
func Dial(r io.Reader, w io.Writer, path string, create int64) (*Client, error) {
	if len(path) > maxPath {
		return nil, fmt.Errorf("target path of %d bytes: at most %d", len(path), maxPath)
	}
	c := &Client{w: bufio.NewWriterSize(w, 256<<10), acks: make(chan uint64, 1), boots: make(chan bootAnswer, 1), done: make(chan struct{})}
	br := bufio.NewReaderSize(r, 64<<10)
	if err := writeFrame(c.w, msgHello, encodeHello(hello{version: Version, create: create, path: path})); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	if err := c.w.Flush(); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	f, _, err := readFrame(br, nil)
	if err != nil {
		return nil, fmt.Errorf("read the remote end's answer: %w", err)
	}
	switch f.typ {
	case msgError:
		return nil, &RemoteError{decodeText(f.payload)}
	case msgInfo:
		if c.info, err = decodeInfo(f.payload); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("the remote end answered with a message of type %q: is it sauve migrate-receive?", f.typ)
	}
	c.enc, err = zstdenc.New(zstdenc.DefaultLevel, MaxWrite)
	if err != nil {
		return nil, err
	}
	go c.read(br)
	return c, nil
}

// RemoteError is a failure the remote end reported.
type RemoteError struct{ Text string }

func (e *RemoteError) Error() string { return "remote end: " + e.Text }

// Info is what the remote end said of its target.
func (c *Client) Info() Info { return c.info }

// read takes the remote end's acks and its failure.
func (c *Client) read(br *bufio.Reader) {
	var buf []byte
	for {
		var f frame
		var err error
		f, buf, err = readFrame(br, buf)
		if err == nil {
			switch f.typ {
			case msgAck:
				var seq uint64
				if seq, err = decodeSeq(f.payload, "ack"); err == nil {
					c.acks <- seq
					continue
				}
			case msgBootResult:
				if !c.booting.Swap(false) {
					err = errors.New("the remote end sent a test boot result unasked")
					break
				}
				res, berr := decodeBootResult(f.payload)
				var re *RemoteError
				if berr == nil || errors.As(berr, &re) {
					c.boots <- bootAnswer{res, berr}
					continue
				}
				err = berr
			case msgError:
				err = &RemoteError{decodeText(f.payload)}
			default:
				err = fmt.Errorf("unexpected message of type %q from the remote end", f.typ)
			}
		} else if errors.Is(err, io.EOF) {
			err = errors.New("the connection to the remote end was lost (closed, reset, or silent for the idle timeout)")
		} else {
			err = fmt.Errorf("connection to the remote end lost: %w", err)
		}
		c.fail(err)
		return
	}
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		close(c.done)
	}
}

func (c *Client) failure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// sendErr is the error of a send that failed: the remote end's own
// reason when it gave one (it stops and closes on a failure).
func (c *Client) sendErr(err error) error {
	select {
	case <-c.done:
	case <-time.After(2 * time.Second):
	}
	if e := c.failure(); e != nil {
		return e
	}
	return fmt.Errorf("send to the remote end: %w", err)
}

// WriteAt sends p, compressed, in writes of at most MaxWrite; it does
// not wait for them (Sync does).
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.failure(); err != nil {
		return 0, err
	}
	for k := 0; k < len(p); k += MaxWrite {
		q := p[k:min(len(p), k+MaxWrite)]
		h := writeHeader{off: off + int64(k), n: len(q), enc: encZstd}
		var err error
		c.buf, err = c.enc.Encode(c.buf[:0], q)
		data := c.buf
		if err != nil || len(data) >= len(q) {
			h.enc, data = encRaw, q
		}
		if err := writeFrame(c.w, msgWrite, encodeWriteHeader(h), data); err != nil {
			return k, c.sendErr(err)
		}
		c.Data.Add(int64(len(q)))
		c.Wire.Add(int64(5 + writeHeaderLen + len(data)))
	}
	return len(p), nil
}

// Zero makes [off, off+n) zeros on the remote end.
func (c *Client) Zero(off, n int64) error {
	if err := c.failure(); err != nil {
		return err
	}
	if err := writeFrame(c.w, msgZero, encodeZero(off, n)); err != nil {
		return c.sendErr(err)
	}
	c.Wire.Add(5 + 16)
	return nil
}

// Sync waits until every write sent is durable on the remote end.
func (c *Client) Sync() error {
	if err := c.failure(); err != nil {
		return err
	}
	c.seq++
	if err := writeFrame(c.w, msgSync, encodeSeq(c.seq)); err != nil {
		return c.sendErr(err)
	}
	if err := c.w.Flush(); err != nil {
		return c.sendErr(err)
	}
	c.Wire.Add(5 + 8)
	for {
		select {
		case seq := <-c.acks:
			if seq == c.seq {
				return nil
			}
			if seq > c.seq {
				return fmt.Errorf("the remote end acknowledged sync %d, only %d were sent", seq, c.seq)
			}
		case <-c.done:
			return c.failure()
		}
	}
}

// Close does nothing of its own (the encoder's memory goes with the
// client); the caller closes the connection, which ends the remote end.
func (c *Client) Close() error {
	return nil
}
