package source

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func mkfifo(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// within runs fn and fails if it does not return within 5 seconds.
func within(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s did not return", what)
	}
}

// TestFIFOWithoutWriter: opening a FIFO does not wait for a writer, and
// the wait for the first byte ends when the context does.
func TestFIFOWithoutWriter(t *testing.T) {
	p := mkfifo(t)
	ctx, cancel := context.WithCancel(context.Background())
	var s *Source
	within(t, "OpenSource of a FIFO without a writer", func() {
		var err error
		if s, err = Open(ctx, p); err != nil {
			t.Error(err)
		}
	})
	if s == nil {
		t.FailNow()
	}
	defer s.Close()
	if s.Kind != Stream {
		t.Fatalf("a FIFO is a %s", s.Kind)
	}
	time.AfterFunc(100*time.Millisecond, cancel)
	within(t, "reading a FIFO without a writer after cancel", func() {
		if _, err := s.Empty(); !errors.Is(err, context.Canceled) {
			t.Errorf("Empty: %v, want context.Canceled", err)
		}
	})
}

// TestFIFOWriters: a writer that comes later is waited for and read to
// its end; one that closes without writing makes the stream empty; a
// writer that stalls is ended by the context.
func TestFIFOWriters(t *testing.T) {
	p := mkfifo(t)
	s, err := Open(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte("the disk, piped in late")
	go func() {
		time.Sleep(100 * time.Millisecond)
		w, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			t.Error(err)
			return
		}
		w.Write(want)
		w.Close()
	}()
	var got []byte
	within(t, "reading a FIFO", func() {
		if empty, err := s.Empty(); empty || err != nil {
			t.Errorf("Empty: %v %v", empty, err)
		}
		got, err = io.ReadAll(s.Stream)
	})
	s.Close()
	if err != nil || string(got) != string(want) {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}

	s, err = Open(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		if w, err := os.OpenFile(p, os.O_WRONLY, 0); err == nil {
			w.Close()
		}
	}()
	within(t, "a FIFO whose writer wrote nothing", func() {
		if empty, err := s.Empty(); !empty || err != nil {
			t.Errorf("Empty: %v %v, want true", empty, err)
		}
	})
	s.Close()

	ctx, cancel := context.WithCancel(context.Background())
	s, err = Open(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	w, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.Write([]byte("some"))
	time.AfterFunc(100*time.Millisecond, cancel)
	within(t, "reading a stalled FIFO after cancel", func() {
		_, err := io.ReadAll(s.Stream)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("read: %v, want context.Canceled", err)
		}
	})
}
