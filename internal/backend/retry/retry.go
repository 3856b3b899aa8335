// Package retry wraps a backend so that transient failures (timeouts,
// dropped connections, throttling, 5xx answers) are retried with capped
// exponential backoff and jitter, while errors that retrying cannot fix
// (missing objects, refused credentials, a full disk: backend.IsPermanent)
// fail at once.
//
// It also hides the seams that retries open: a download that breaks in the
// middle resumes where it stopped instead of failing the read; a listing is
// delivered only once it is complete, so a retried List never reports an
// object twice; a create-only save (the config) whose first attempt reached
// the server before the connection broke is recognised as done rather than
// reported as "already exists".
//
// Written here rather than taken from a library because the rules above are
// about the Backend contract, not about HTTP: the SDKs' own retry policies
// are turned off by the backends so that all three behave alike and every
// retry is reported the same way.
package retry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Options tune the retry policy. The zero value is a sensible default.
type Options struct {
	// MaxAttempts is how often one operation is tried in all (default 10).
	// A resumed download counts attempts since it last made progress.
	MaxAttempts int
	// InitialDelay is the first pause (default 250ms); each retry doubles
	// it up to MaxDelay (default 30s). The pause is jittered: a random
	// value between half and all of it, so that many clients that failed
	// together do not retry together.
	InitialDelay time.Duration
	MaxDelay     time.Duration
	// Warn, when set, is told of each retry.
	Warn func(format string, args ...any)
}

func (o Options) withDefaults() Options {
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 10
	}
	if o.InitialDelay <= 0 {
		o.InitialDelay = 250 * time.Millisecond
	}
	if o.MaxDelay <= 0 {
		o.MaxDelay = 30 * time.Second
	}
	if o.Warn == nil {
		o.Warn = func(string, ...any) {}
	}
	return o
}

// Delay returns the jittered pause before retry number n (1 is the first
// retry).
func (o Options) Delay(n int) time.Duration {
	o = o.withDefaults()
	d := o.InitialDelay
	for i := 1; i < n && d < o.MaxDelay; i++ {
		d *= 2
	}
	d = min(d, o.MaxDelay)
	return d/2 + rand.N(d/2+1)
}

// Do runs fn until it succeeds, returns a permanent error, or has been
// tried MaxAttempts times. what names the operation in warnings.
func Do(ctx context.Context, o Options, what string, fn func() error) error {
	o = o.withDefaults()
	var err error
	for attempt := 1; ; attempt++ {
		if err = fn(); err == nil {
			return nil
		}
		if backend.IsPermanent(err) || ctx.Err() != nil {
			return err
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, what) {
			msg = what + ": " + msg
		}
		if attempt >= o.MaxAttempts {
			// Permanent now: a caller that retries a larger operation
			// must not multiply the attempts.
			return &backend.Permanent{Err: fmt.Errorf("%s (gave up after %d attempts): %w", msg, attempt, err)}
		}
		d := o.Delay(attempt)
		o.Warn("%s; retrying in %s (attempt %d of %d)", msg, d.Round(10*time.Millisecond), attempt+1, o.MaxAttempts)
		if err := sleep(ctx, d); err != nil {
			return err
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Backend is a backend whose operations are retried.
type Backend struct {
	be   backend.Backend
	opts Options
}

// New wraps be.
func New(be backend.Backend, opts Options) *Backend {
	return &Backend{be: be, opts: opts.withDefaults()}
}

// Unwrap returns the wrapped backend.
func (b *Backend) Unwrap() backend.Backend { return b.be }

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.be.Location() }

// Close implements backend.Backend.
func (b *Backend) Close() error { return b.be.Close() }

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	tried := false
	return Do(ctx, b.opts, "save "+h.String(), func() error {
		if tried {
			if _, err := rd.Seek(0, io.SeekStart); err != nil {
				return &backend.Permanent{Err: fmt.Errorf("save %s: rewind for retry: %w", h, err)}
			}
		}
		err := b.be.Save(ctx, h, rd, size)
		if tried && errors.Is(err, backend.ErrExists) && b.sameContent(ctx, h, rd, size) {
			// An earlier attempt got through before its answer was lost.
			return nil
		}
		tried = true
		return err
	})
}

// sameContent reports whether the stored object h holds exactly what rd
// holds (only used for the small, create-only config).
func (b *Backend) sameContent(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) bool {
	if size > 1<<20 {
		return false
	}
	if _, err := rd.Seek(0, io.SeekStart); err != nil {
		return false
	}
	want, err := io.ReadAll(io.LimitReader(rd, size))
	if err != nil {
		return false
	}
	var got []byte
	err = Do(ctx, b.opts, "read back "+h.String(), func() error {
		var err error
		got, err = backend.ReadAll(ctx, b.be, h)
		return err
	})
	return err == nil && bytes.Equal(got, want)
}

// Load implements backend.Backend. The reader it returns resumes after a
// broken connection: it asks for the rest of the range and carries on.
func (b *Backend) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	var rc io.ReadCloser
	err := Do(ctx, b.opts, "load "+h.String(), func() error {
		var err error
		rc, err = b.be.Load(ctx, h, off, length)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &resumer{b: b, ctx: ctx, h: h, off: off, length: length, rc: rc}, nil
}

// resumer reads a range and, when the stream breaks, opens the remainder.
type resumer struct {
	b      *Backend
	ctx    context.Context
	h      backend.Handle
	off    int64 // start of the range
	length int64 // 0: to the end
	done   int64 // bytes delivered
	rc     io.ReadCloser
	fails  int  // consecutive failures without progress
	fresh  bool // rc was reopened and has delivered nothing yet
}

func (r *resumer) Read(p []byte) (int, error) {
	for {
		if r.rc == nil {
			if err := r.reopen(); err != nil {
				return 0, err
			}
		}
		n, err := r.rc.Read(p)
		r.done += int64(n)
		if n > 0 {
			r.fails, r.fresh = 0, false
		}
		switch {
		case err == nil:
			return n, nil
		// Only the io.EOF sentinel ends a stream: transports wrap io.EOF
		// in their own errors when a connection drops ("failed to send
		// packet: EOF"), which is a break to resume, not an end.
		case err == io.EOF && (r.length == 0 || r.done >= r.length):
			return n, io.EOF
		case err == io.EOF && r.fresh && n == 0:
			// The remainder, asked for anew, is empty: the object is
			// shorter than the range, which no retry changes.
			return 0, &backend.Permanent{Err: fmt.Errorf("read %s: object ends at %d, before the %d bytes asked for at %d: %w",
				r.h, r.off+r.done, r.length, r.off, io.ErrUnexpectedEOF)}
		case err == io.EOF:
			err = fmt.Errorf("stream ended after %d of %d bytes: %w", r.done, r.length, io.ErrUnexpectedEOF)
		}
		if backend.IsPermanent(err) || r.ctx.Err() != nil {
			return n, err
		}
		r.rc.Close()
		r.rc = nil
		r.fails++
		if r.fails >= r.b.opts.MaxAttempts {
			return n, fmt.Errorf("read %s: %w (gave up after %d attempts)", r.h, err, r.fails)
		}
		d := r.b.opts.Delay(r.fails)
		r.b.opts.Warn("read %s at %d: %v; resuming in %s", r.h, r.off+r.done, err, d.Round(10*time.Millisecond))
		if err := sleep(r.ctx, d); err != nil {
			return n, err
		}
		if n > 0 {
			return n, nil
		}
	}
}

func (r *resumer) reopen() error {
	rest := int64(0)
	if r.length > 0 {
		rest = r.length - r.done
	}
	return Do(r.ctx, r.b.opts, "load "+r.h.String(), func() error {
		rc, err := r.b.be.Load(r.ctx, r.h, r.off+r.done, rest)
		if err != nil {
			return err
		}
		r.rc, r.fresh = rc, true
		return nil
	})
}

func (r *resumer) Close() error {
	if r.rc == nil {
		return nil
	}
	return r.rc.Close()
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	var fi backend.Info
	err := Do(ctx, b.opts, "stat "+h.String(), func() error {
		var err error
		fi, err = b.be.Stat(ctx, h)
		return err
	})
	return fi, err
}

// List implements backend.Backend. It gathers the whole listing before
// calling fn, so that a listing retried after a failure half-way does not
// report objects twice.
func (b *Backend) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	var all []backend.Info
	err := Do(ctx, b.opts, "list "+string(t), func() error {
		all = all[:0]
		return b.be.List(ctx, t, func(fi backend.Info) error {
			all = append(all, fi)
			return nil
		})
	})
	if err != nil {
		return err
	}
	for _, fi := range all {
		if err := fn(fi); err != nil {
			return err
		}
	}
	return nil
}

// Remove implements backend.Backend. An object that is gone when a retry
// comes was removed by the attempt whose answer was lost.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	tried := false
	return Do(ctx, b.opts, "remove "+h.String(), func() error {
		err := b.be.Remove(ctx, h)
		if tried && errors.Is(err, backend.ErrNotExist) {
			return nil
		}
		tried = true
		return err
	})
}
