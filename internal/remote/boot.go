package remote

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"time"
)

// A test boot runs on the remote end, where the target is: the local end
// sends a boot request after its last sync and waits; the remote end
// boots the target and answers with the verdict, or with why it could
// not boot it, and the session goes on (a failure to boot is not a
// failure of the session).
const (
	msgBoot       = 'B' // local → remote: a BootRequest
	msgBootResult = 'R' // remote → local: a BootResult, or why none
)

// Bounds of a boot request's fields.
const (
	maxBootField = 255
	// MaxBootTimeout bounds how long a test boot may be asked to last.
	MaxBootTimeout = 24 * time.Hour
	// maxBootTail bounds the console tail a result carries.
	maxBootTail = 16 << 10
)

// BootRequest is what the local end asks the remote end to boot with.
type BootRequest struct {
	Marker   string
	Timeout  time.Duration
	Memory   string
	Accel    string // "" lets the remote end choose (KVM when it has it)
	Firmware string // a UEFI firmware on the remote machine; "" boots the BIOS
}

// BootResult is the verdict of a test boot on the remote end.
type BootResult struct {
	Reached bool
	Seconds float64
	Tail    string // the serial console's last bytes
}

// Booter is a Target that can be test-booted where it is. A Target that
// is not one answers boot requests with a refusal.
type Booter interface {
	Boot(ctx context.Context, req BootRequest) (*BootResult, error)
}

func encodeBoot(r BootRequest) []byte {
	var e encoder
	e.u64(uint64(r.Timeout / time.Millisecond))
	e.str(r.Marker, maxPath)
	e.str(r.Memory, maxBootField)
	e.str(r.Accel, maxBootField)
	e.str(r.Firmware, maxPath)
	return e.b
}

func decodeBoot(p []byte) (BootRequest, error) {
	d := decoder{b: p}
	ms := d.u64()
	r := BootRequest{Marker: d.str(maxPath), Memory: d.str(maxBootField), Accel: d.str(maxBootField), Firmware: d.str(maxPath)}
	if err := d.end("boot"); err != nil {
		return BootRequest{}, err
	}
	if ms == 0 || ms > uint64(MaxBootTimeout/time.Millisecond) {
		return BootRequest{}, fmt.Errorf("bad boot message: a timeout of %d ms (1 ms to %v)", ms, MaxBootTimeout)
	}
	r.Timeout = time.Duration(ms) * time.Millisecond
	if r.Marker == "" {
		return BootRequest{}, errors.New("bad boot message: no marker")
	}
	return r, nil
}

// encodeBootResult encodes a result, or, with res nil, the failure why.
func encodeBootResult(res *BootResult, why error) []byte {
	var e encoder
	if res == nil {
		e.u8(2)
		e.u64(0)
		e.str(why.Error(), maxBootTail)
		return e.b
	}
	reached := byte(0)
	if res.Reached {
		reached = 1
	}
	e.u8(reached)
	e.u64(uint64(max(0, res.Seconds) * 1000))
	tail := res.Tail
	if len(tail) > maxBootTail {
		tail = tail[len(tail)-maxBootTail:]
	}
	e.str(tail, maxBootTail)
	return e.b
}

// decodeBootResult decodes a result; a failure on the remote end is a
// *RemoteError.
func decodeBootResult(p []byte) (*BootResult, error) {
	d := decoder{b: p}
	state := d.u8()
	ms := d.u64()
	text := d.str(maxBootTail)
	if err := d.end("boot result"); err != nil {
		return nil, err
	}
	switch state {
	case 0, 1:
		return &BootResult{Reached: state == 1, Seconds: float64(ms) / 1000, Tail: text}, nil
	case 2:
		return nil, &RemoteError{text}
	}
	return nil, fmt.Errorf("bad boot result message: state %d", state)
}

// serveBoot runs a boot request: the target boots while a watcher waits
// for the local end's next message, and a local end that goes away ends
// the boot. The watcher only peeks, and is waited for before the session
// reads on, so that one goroutine reads br at a time.
func (s *session) serveBoot(ctx context.Context, br *bufio.Reader, bw *bufio.Writer, payload []byte) error {
	req, err := decodeBoot(payload)
	if err != nil {
		return err
	}
	b, ok := s.t.(Booter)
	var res *BootResult
	var berr error
	if !ok {
		berr = fmt.Errorf("the target %s cannot be test-booted by this end", s.path)
	} else {
		bctx, cancel := context.WithCancel(ctx)
		watched := make(chan struct{})
		go func() {
			defer close(watched)
			if _, err := br.Peek(1); err != nil {
				cancel()
			}
		}()
		res, berr = b.Boot(bctx, req)
		if bctx.Err() != nil {
			// The local end went away (or this end is stopping): no
			// one waits for the verdict.
			cancel()
			<-watched
			if err := ctx.Err(); err != nil {
				return err
			}
			return errPeerGone
		}
		defer func() { cancel(); <-watched }()
	}
	if berr != nil {
		res = nil
		berr = fmt.Errorf("test boot: %w", berr)
	}
	writeFrame(bw, msgBootResult, encodeBootResult(res, berr))
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("send the test boot's result: %w", err)
	}
	return nil
}

// Boot asks the remote end to test-boot its target, once every write
// sent is durable, and waits for the verdict: at most the request's
// timeout and a minute more, or until ctx ends. An error the remote end
// gives for not booting is a *RemoteError; the session goes on after it.
func (c *Client) Boot(ctx context.Context, req BootRequest) (*BootResult, error) {
	if req.Timeout <= 0 || req.Timeout > MaxBootTimeout {
		return nil, fmt.Errorf("test boot timeout %v: 1 ms to %v", req.Timeout, MaxBootTimeout)
	}
	if req.Marker == "" {
		return nil, errors.New("test boot: no marker")
	}
	if err := c.Sync(); err != nil {
		return nil, err
	}
	c.booting.Store(true)
	if err := writeFrame(c.w, msgBoot, encodeBoot(req)); err != nil {
		return nil, c.sendErr(err)
	}
	if err := c.w.Flush(); err != nil {
		return nil, c.sendErr(err)
	}
	timer := time.NewTimer(req.Timeout + time.Minute)
	defer timer.Stop()
	select {
	case r := <-c.boots:
		return r.res, r.err
	case <-c.done:
		return nil, c.failure()
	case <-timer.C:
		return nil, fmt.Errorf("the remote end gave no test boot result in %v", req.Timeout+time.Minute)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// bootAnswer is a boot result as the reader passes it on.
type bootAnswer struct {
	res *BootResult
	err error
}
