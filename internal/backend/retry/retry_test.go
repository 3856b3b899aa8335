package retry_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/local"
	"github.com/sauve-backup/sauve/internal/backend/retry"
)

// flaky wraps a backend and fails operations on a schedule: the real
// local backend underneath does the work.
type flaky struct {
	backend.Backend
	mu sync.Mutex
	// fail[op] is how many of the next calls of op fail.
	fail map[string]int
	err  error
	// cut makes readers stop with cutErr (ErrUnexpectedEOF when nil)
	// after this many bytes.
	cut    int64
	cutErr error
	calls  map[string]int
	// afterSave, when set, makes the next Save succeed but report err
	// (the answer lost on the way back).
	afterSave bool
}

func newFlaky(t *testing.T) *flaky {
	be, err := local.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &flaky{Backend: be, fail: map[string]int{}, calls: map[string]int{}, err: syscall.ECONNRESET}
}

func (f *flaky) failing(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	if f.fail[op] > 0 {
		f.fail[op]--
		return fmt.Errorf("%s: %w", op, f.err)
	}
	return nil
}

func (f *flaky) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	if err := f.failing("save"); err != nil {
		io.CopyN(io.Discard, rd, size/2) // a partial upload that must not count
		return err
	}
	err := f.Backend.Save(ctx, h, rd, size)
	f.mu.Lock()
	lost := f.afterSave
	f.afterSave = false
	f.mu.Unlock()
	if err == nil && lost {
		return fmt.Errorf("save: answer lost: %w", syscall.ECONNRESET)
	}
	return err
}

type cutReader struct {
	r    io.ReadCloser
	left int64
	err  error
}

func (c *cutReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		return 0, c.err
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

func (c *cutReader) Close() error { return c.r.Close() }

func (f *flaky) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	if err := f.failing("load"); err != nil {
		return nil, err
	}
	rc, err := f.Backend.Load(ctx, h, off, length)
	if err != nil || f.cut == 0 {
		return rc, err
	}
	cerr := f.cutErr
	if cerr == nil {
		cerr = io.ErrUnexpectedEOF
	}
	return &cutReader{r: rc, left: f.cut, err: cerr}, nil
}

func (f *flaky) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	n := 0
	err := f.Backend.List(ctx, t, func(fi backend.Info) error {
		n++
		if n == 2 {
			if err := f.failing("list"); err != nil {
				return err
			}
		}
		return fn(fi)
	})
	return err
}

func (f *flaky) Remove(ctx context.Context, h backend.Handle) error {
	err := f.Backend.Remove(ctx, h)
	if err == nil {
		if ferr := f.failing("remove"); ferr != nil {
			return ferr // removed, but the answer was lost
		}
	}
	return err
}

var fast = retry.Options{MaxAttempts: 5, InitialDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond}

func TestSaveRetriesAndRewinds(t *testing.T) {
	f := newFlaky(t)
	f.fail["save"] = 3
	be := retry.New(f, fast)
	data, name := backendtest.Payload(100 << 10)
	h := backend.Handle{Type: backend.PackFile, Name: name}
	if err := be.Save(context.Background(), h, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	got, err := backend.ReadAll(context.Background(), f, h)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("stored object differs after retries: %v", err)
	}
	if f.calls["save"] != 4 {
		t.Fatalf("%d save attempts, want 4", f.calls["save"])
	}
}

func TestGivesUp(t *testing.T) {
	f := newFlaky(t)
	f.fail["save"] = 100
	be := retry.New(f, fast)
	err := be.Save(context.Background(), backend.Handle{Type: backend.IndexFile, Name: "x"}, bytes.NewReader([]byte("x")), 1)
	if err == nil || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("err = %v", err)
	}
	if f.calls["save"] != fast.MaxAttempts {
		t.Fatalf("%d attempts, want %d", f.calls["save"], fast.MaxAttempts)
	}
}

func TestPermanentErrorsAreNotRetried(t *testing.T) {
	for _, perm := range []error{backend.ErrPermission, backend.ErrNotExist, &backend.Permanent{Err: errors.New("disk full")}, context.Canceled} {
		f := newFlaky(t)
		f.fail["load"] = 100
		f.err = perm
		be := retry.New(f, fast)
		_, err := be.Load(context.Background(), backend.Handle{Type: backend.IndexFile, Name: "x"}, 0, 0)
		if err == nil || f.calls["load"] != 1 {
			t.Errorf("%v: %d attempts (err %v), want 1", perm, f.calls["load"], err)
		}
	}
}

func TestLoadResumes(t *testing.T) {
	f := newFlaky(t)
	data, name := backendtest.Payload(1 << 20)
	h := backend.Handle{Type: backend.PackFile, Name: name}
	if err := f.Backend.Save(context.Background(), h, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	f.cut = 100 << 10 // every stream breaks after 100 KiB
	var warned int
	o := fast
	o.Warn = func(string, ...any) { warned++ }
	be := retry.New(f, o)
	got, err := backend.ReadRange(context.Background(), be, h, 1000, 700<<10)
	if err != nil || !bytes.Equal(got, data[1000:1000+700<<10]) {
		t.Fatalf("resumed read: %v", err)
	}
	got, err = backend.ReadAll(context.Background(), be, h)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("resumed whole read: %v", err)
	}
	if warned < 10 {
		t.Fatalf("%d resumptions reported", warned)
	}
	// Transports wrap io.EOF when a connection drops (pkg/sftp: "failed
	// to send packet: EOF"): a break to resume, not the end of the data.
	f.cutErr = fmt.Errorf("failed to send packet: %w", io.EOF)
	got, err = backend.ReadAll(context.Background(), be, h)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("whole read broken by a wrapped EOF: %d of %d bytes, %v", len(got), len(data), err)
	}
	// A range past the end fails (once the remainder comes back empty)
	// instead of retrying for ever.
	f.cut = 0
	start := time.Now()
	if _, err := backend.ReadRange(context.Background(), be, h, int64(len(data))-10, 100); err == nil || !backend.IsPermanent(err) {
		t.Fatalf("read past the end: %v", err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("read past the end took too long")
	}
}

func TestListIsDeliveredOnce(t *testing.T) {
	f := newFlaky(t)
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		data, name := backendtest.Payload(100 + i)
		f.Backend.Save(ctx, backend.Handle{Type: backend.IndexFile, Name: name}, bytes.NewReader(data), int64(len(data)))
	}
	f.fail["list"] = 2
	be := retry.New(f, fast)
	seen := map[string]int{}
	if err := be.List(ctx, backend.IndexFile, func(fi backend.Info) error { seen[fi.Name]++; return nil }); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 5 {
		t.Fatalf("listed %d objects, want 5", len(seen))
	}
	for n, c := range seen {
		if c != 1 {
			t.Fatalf("%s listed %d times", n, c)
		}
	}
}

func TestLostAnswers(t *testing.T) {
	ctx := context.Background()
	f := newFlaky(t)
	be := retry.New(f, fast)
	cfg := backend.Handle{Type: backend.ConfigFile}
	// The config's save went through but its answer was lost: the retry
	// finds it exists with the same content and reports success.
	f.afterSave = true
	if err := be.Save(ctx, cfg, bytes.NewReader([]byte("config v1")), 9); err != nil {
		t.Fatalf("config save with a lost answer: %v", err)
	}
	// Someone else's config is still refused.
	if err := be.Save(ctx, cfg, bytes.NewReader([]byte("config v2")), 9); !errors.Is(err, backend.ErrExists) {
		t.Fatalf("second config: %v", err)
	}
	// A remove whose answer was lost: the retry finds nothing and is done.
	data, name := backendtest.Payload(10)
	h := backend.Handle{Type: backend.IndexFile, Name: name}
	be.Save(ctx, h, bytes.NewReader(data), 10)
	f.fail["remove"] = 1
	if err := be.Remove(ctx, h); err != nil {
		t.Fatalf("remove with a lost answer: %v", err)
	}
	// A remove of an object that never existed still says so.
	if err := be.Remove(ctx, backend.Handle{Type: backend.IndexFile, Name: "nosuch"}); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("remove of a missing object: %v", err)
	}
}

func TestDelayIsCappedAndJittered(t *testing.T) {
	o := retry.Options{InitialDelay: 100 * time.Millisecond, MaxDelay: 2 * time.Second}
	seen := map[time.Duration]bool{}
	for n := 1; n <= 20; n++ {
		d := o.Delay(n)
		if d > 2*time.Second {
			t.Fatalf("delay %d = %s exceeds the cap", n, d)
		}
		if n == 1 && (d < 50*time.Millisecond || d > 100*time.Millisecond) {
			t.Fatalf("first delay %s, want 50-100ms", d)
		}
		seen[d] = true
	}
	if len(seen) < 10 {
		t.Fatal("delays are not jittered")
	}
}
