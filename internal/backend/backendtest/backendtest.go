// Package backendtest is the conformance test that every backend passes:
// the contract of backend.Backend (atomic, create-only config, ranged
// reads, listing, removal, concurrency) checked against a real instance.
//
// It is imported by tests only.
package backendtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/faultproxy"
	"github.com/sauve-backup/sauve/internal/backend/retry"
)

// Options tune the suite for a backend.
type Options struct {
	// LargeSize is the size of the object that must go up in several
	// blocks or parts (bigger than the backend's block size).
	LargeSize int
	// Secrets must not appear in Location().
	Secrets []string
	// Faults, for RunUnderFaults, replaces the default mix.
	Faults *faultproxy.Faults
}

// Payload returns n random bytes and their hex SHA-256 (a
// content-addressed name).
func Payload(n int) ([]byte, string) {
	b := make([]byte, n)
	rand.Read(b)
	s := sha256.Sum256(b)
	return b, hex.EncodeToString(s[:])
}

// Run checks be. be must be empty.
func Run(t *testing.T, be backend.Backend, o Options) {
	ctx := context.Background()
	if o.LargeSize == 0 {
		o.LargeSize = 9 << 20
	}
	for _, s := range o.Secrets {
		if s != "" && strings.Contains(be.Location(), s) {
			t.Fatalf("Location() %q shows a secret", be.Location())
		}
	}

	t.Run("Config", func(t *testing.T) {
		cfg := backend.Handle{Type: backend.ConfigFile}
		if _, err := be.Stat(ctx, cfg); !errors.Is(err, backend.ErrNotExist) {
			t.Fatalf("Stat of a missing config: %v, want ErrNotExist", err)
		}
		if _, err := backend.ReadAll(ctx, be, cfg); !errors.Is(err, backend.ErrNotExist) {
			t.Fatalf("Load of a missing config: %v, want ErrNotExist", err)
		}
		data := []byte(`{"version":1,"test":"first"}`)
		if err := be.Save(ctx, cfg, bytes.NewReader(data), int64(len(data))); err != nil {
			t.Fatalf("Save config: %v", err)
		}
		other := []byte(`{"version":1,"test":"second writer"}`)
		err := be.Save(ctx, cfg, bytes.NewReader(other), int64(len(other)))
		if !errors.Is(err, backend.ErrExists) {
			t.Fatalf("second Save of config: %v, want ErrExists (the config is create-only)", err)
		}
		got, err := backend.ReadAll(ctx, be, cfg)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("config reads back %q, %v; want the first version %q", got, err, data)
		}
		fi, err := be.Stat(ctx, cfg)
		if err != nil || fi.Size != int64(len(data)) {
			t.Fatalf("Stat config: %+v %v", fi, err)
		}
	})

	t.Run("SmallObjects", func(t *testing.T) {
		data, name := Payload(100 << 10)
		h := backend.Handle{Type: backend.IndexFile, Name: name}
		before := time.Now()
		if err := be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
			t.Fatal(err)
		}
		// Saving the same content-addressed object again is harmless.
		if err := be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
			t.Fatalf("second Save of the same index object: %v", err)
		}
		checkRanges(t, ctx, be, h, data)
		n := 0
		if err := be.List(ctx, backend.IndexFile, func(fi backend.Info) error {
			if fi.Name == name {
				n++
				if fi.Size != int64(len(data)) {
					t.Errorf("List: size %d, want %d", fi.Size, len(data))
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("List reports the object %d times", n)
		}
		checkModTime(t, ctx, be, h, before)
	})

	t.Run("Sessions", func(t *testing.T) {
		// A repository made before write sessions has no sessions/
		// folder: listing it finds nothing, and the first announcement
		// creates it.
		if err := be.List(ctx, backend.SessionFile, func(fi backend.Info) error {
			return fmt.Errorf("empty sessions/ lists %s", fi.Name)
		}); err != nil {
			t.Fatalf("List of sessions/ before any: %v", err)
		}
		data, name := Payload(300)
		h := backend.Handle{Type: backend.SessionFile, Name: name}
		before := time.Now()
		if err := be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
			t.Fatalf("Save into sessions/ of a repository without it: %v", err)
		}
		checkRanges(t, ctx, be, h, data)
		checkModTime(t, ctx, be, h, before)
	})

	t.Run("LargeObject", func(t *testing.T) {
		data, name := Payload(o.LargeSize)
		h := backend.Handle{Type: backend.PackFile, Name: name}
		if err := be.Save(ctx, h, backend.NewByteReader(data), int64(len(data))); err != nil {
			t.Fatal(err)
		}
		checkRanges(t, ctx, be, h, data)
		if _, err := backend.ReadRange(ctx, be, h, int64(len(data))-10, 20); err == nil {
			t.Fatal("a range past the end of the object reads without error")
		}
	})

	t.Run("PacksAcrossDirectories", func(t *testing.T) {
		want := map[string]int64{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		errs := make(chan error, 12)
		for i := 0; i < 12; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				data, name := Payload(1000 + i*4099)
				mu.Lock()
				want[name] = int64(len(data))
				mu.Unlock()
				if err := be.Save(ctx, backend.Handle{Type: backend.PackFile, Name: name}, backend.NewByteReader(data), int64(len(data))); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("concurrent Save: %v", err)
		}
		got := map[string]int64{}
		if err := be.List(ctx, backend.PackFile, func(fi backend.Info) error {
			if _, dup := got[fi.Name]; dup {
				t.Errorf("List reports %s twice", fi.Name)
			}
			got[fi.Name] = fi.Size
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		for name, size := range want {
			if got[name] != size {
				t.Errorf("pack %s: listed with size %d, want %d", name[:8], got[name], size)
			}
		}
		for name := range got {
			if strings.HasPrefix(name, ".") {
				t.Errorf("List reports a temporary object %s", name)
			}
		}
	})

	t.Run("RemoveAndMissing", func(t *testing.T) {
		data, name := Payload(5000)
		h := backend.Handle{Type: backend.SnapshotFile, Name: name}
		if err := be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
			t.Fatal(err)
		}
		if err := be.Remove(ctx, h); err != nil {
			t.Fatalf("Remove: %v", err)
		}
		if _, err := be.Stat(ctx, h); !errors.Is(err, backend.ErrNotExist) {
			t.Fatalf("Stat after Remove: %v, want ErrNotExist", err)
		}
		if _, err := be.Load(ctx, h, 0, 0); !errors.Is(err, backend.ErrNotExist) {
			t.Fatalf("Load after Remove: %v, want ErrNotExist", err)
		}
		if err := be.List(ctx, backend.SnapshotFile, func(fi backend.Info) error {
			if fi.Name == name {
				return fmt.Errorf("removed object %s still listed", name[:8])
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := be.List(ctx, backend.LockFile, func(backend.Info) error { return nil }); err != nil {
			t.Fatalf("List of an empty kind: %v", err)
		}
	})
}

// modSlack is how far a storage time may be from the test's clock: the
// servers run on this machine, but HTTP dates and SFTP times count whole
// seconds.
const modSlack = 3 * time.Second

// checkModTime checks that Stat and List give h the same storage time,
// between saved (just before it was saved) and now.
func checkModTime(t *testing.T, ctx context.Context, be backend.Backend, h backend.Handle, saved time.Time) {
	t.Helper()
	fi, err := be.Stat(ctx, h)
	if err != nil {
		t.Fatalf("Stat %s: %v", h, err)
	}
	now := time.Now()
	if fi.ModTime.IsZero() || fi.ModTime.Before(saved.Add(-modSlack)) || fi.ModTime.After(now.Add(modSlack)) {
		t.Fatalf("Stat %s: storage time %v, want between %v and %v", h, fi.ModTime, saved, now)
	}
	var listed time.Time
	if err := be.List(ctx, h.Type, func(li backend.Info) error {
		if li.Name == h.Name {
			listed = li.ModTime
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if d := listed.Sub(fi.ModTime).Abs(); listed.IsZero() || d > modSlack {
		t.Fatalf("%s: List gives storage time %v, Stat %v", h, listed, fi.ModTime)
	}
}

// checkRanges reads data back whole and in ranges (across block
// boundaries, to the end, single bytes).
func checkRanges(t *testing.T, ctx context.Context, be backend.Backend, h backend.Handle, data []byte) {
	t.Helper()
	got, err := backend.ReadAll(ctx, be, h)
	if err != nil {
		t.Fatalf("read %s: %v", h, err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("%s reads back %d bytes that differ from the %d saved", h, len(got), len(data))
	}
	n := int64(len(data))
	for _, r := range [][2]int64{{0, 1}, {1, 100}, {n / 3, n / 3}, {n - 1, 1}, {n / 2, 0}, {0, n}} {
		off, length := r[0], r[1]
		rd, err := be.Load(ctx, h, off, length)
		if err != nil {
			t.Fatalf("Load(%d, %d): %v", off, length, err)
		}
		b, err := io.ReadAll(rd)
		rd.Close()
		want := data[off:]
		if length > 0 {
			want = data[off : off+length]
		}
		if err != nil || !bytes.Equal(b, want) {
			t.Fatalf("Load(%d, %d) of %s: %d bytes (%v), want %d matching bytes", off, length, h, len(b), err, len(want))
		}
	}
	fi, err := be.Stat(ctx, h)
	if err != nil || fi.Size != n {
		t.Fatalf("Stat %s: %+v %v, want size %d", h, fi, err, n)
	}
}

// Faults is the mix of network faults the suites run under: every 4 MiB
// of traffic or so, a connection is reset, stalled past the idle timeout,
// or has its response cut short.
func Faults(seed uint64) faultproxy.Faults {
	return faultproxy.Faults{Every: 4 << 20, Drop: 2, Stall: 1, Truncate: 2, StallFor: 3 * time.Second, Seed: seed}
}

// RetryOptions is a retry policy with short pauses for tests.
var RetryOptions = retry.Options{MaxAttempts: 30, InitialDelay: 10 * time.Millisecond, MaxDelay: 300 * time.Millisecond}

// Retry retries with RetryOptions, for the backends' per-block retries.
func Retry(ctx context.Context, what string, fn func() error) error {
	return retry.Do(ctx, RetryOptions, what, fn)
}

// RunUnderFaults runs the suite on a backend that reaches its server at
// target through a fault-injecting proxy; open must return the backend
// for a proxy address (host:port), with an idle timeout shorter than the
// stalls (a second or two). It fails unless faults were injected.
func RunUnderFaults(t *testing.T, target string, o Options, open func(addr string) backend.Backend) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("fault seed %d", seed)
	f := Faults(seed)
	if o.Faults != nil {
		f = *o.Faults
		f.Seed = seed
	}
	p, err := faultproxy.Start(target, f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	be := retry.New(open(p.Addr), RetryOptions)
	t.Cleanup(func() { be.Close() })
	Run(t, be, o)
	st := p.Stats()
	t.Logf("proxy: %d connections, %d faults struck, %d bytes up, %d down", st.Conns, st.Struck, st.Up, st.Down)
	if st.Struck == 0 {
		t.Errorf("no fault struck in %d connections", st.Conns)
	}
}

// RunPartialUpload checks that an upload cut off in the middle (the
// request body ended early, no retry) leaves no visible object: neither Stat nor
// List may find it, small object or large. open must return the backend
// for a proxy address, without retries.
func RunPartialUpload(t *testing.T, target string, o Options, open func(addr string) backend.Backend) {
	ctx := context.Background()
	p, err := faultproxy.Start(target, faultproxy.Faults{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	be := open(p.Addr)
	t.Cleanup(func() { be.Close() })
	if o.LargeSize == 0 {
		o.LargeSize = 9 << 20
	}
	// Warm up: sessions, directories, buckets.
	d0, n0 := Payload(1000)
	if err := be.Save(ctx, backend.Handle{Type: backend.PackFile, Name: n0}, backend.NewByteReader(d0), 1000); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{512 << 10, o.LargeSize} {
		for _, cut := range []int64{int64(size) / 3, int64(size) * 9 / 10} {
			data, name := Payload(size)
			h := backend.Handle{Type: backend.PackFile, Name: name}
			// Cut: the server sees a FIN mid-body, as when sauve is
			// killed; Drop would reset the connection instead.
			p.SetFaults(faultproxy.Faults{First: cut, Cut: 1})
			err := be.Save(ctx, h, backend.NewByteReader(data), int64(size))
			p.SetFaults(faultproxy.Faults{})
			if err == nil {
				t.Fatalf("save of %d bytes cut after %d: no error", size, cut)
			}
			if _, err := be.Stat(ctx, h); !errors.Is(err, backend.ErrNotExist) {
				t.Fatalf("save of %d bytes cut after %d: the object is visible (Stat: %v)", size, cut, err)
			}
			if err := be.List(ctx, backend.PackFile, func(fi backend.Info) error {
				if fi.Name == name {
					return fmt.Errorf("save of %d bytes cut after %d: List shows the object (%d bytes)", size, cut, fi.Size)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
}
