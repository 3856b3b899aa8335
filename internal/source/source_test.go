package source

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestOpenKinds: each kind of source opens with its kind and size, and
// reads either at any offset or as a stream, never both.
func TestOpenKinds(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(file, []byte("a disk of 21 bytes..."), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.img")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path string
		kind       Kind
		size       int64
		err        []string // what the error names, when it fails
	}{
		{"image file", file, File, 21, nil},
		{"empty file", empty, File, 0, nil},
		{"FIFO", fifo, Stream, -1, nil},
		{"character device", "/dev/null", Stream, -1, nil},
		{"folder", dir, "", 0, []string{dir, "not a disk image, block device or stream"}},
		{"missing", filepath.Join(dir, "gone.img"), "", 0, []string{"open source", "gone.img", "no such file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(context.Background(), tc.path)
			if tc.err != nil {
				if err == nil {
					s.Close()
					t.Fatalf("opened %s", tc.path)
				}
				for _, w := range tc.err {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("error %q does not say %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if s.Kind != tc.kind || s.Size != tc.size || s.Path != tc.path {
				t.Fatalf("%s: kind %s, size %d; want %s, %d", s.Path, s.Kind, s.Size, tc.kind, tc.size)
			}
			checkOneMode(t, s.Kind, s.At, s.Stream)
			if s.SectorSize != 0 {
				t.Fatalf("a %s has a sector size of %d", s.Kind, s.SectorSize)
			}
			v := Live(s)
			checkOneMode(t, s.Kind, v.At, v.Stream)
			if !v.Live || v.Of != s || v.Size != s.Size || (v.Holes != nil) != (s.Kind == File) {
				t.Fatalf("live view %+v of %+v", v, s)
			}
		})
	}
}

// checkOneMode fails unless exactly the mode of kind is offered.
func checkOneMode(t *testing.T, kind Kind, at io.ReaderAt, stream io.Reader) {
	t.Helper()
	isStream := kind == Stream
	if (at != nil) == isStream || (stream != nil) != isStream {
		t.Fatalf("a %s offers random access %v and a stream %v", kind, at != nil, stream != nil)
	}
}

// TestOpenDevice: a block device opens with its size and sector size.
// It needs root, for a loop device; the end-to-end tests cover devices
// too.
func TestOpenDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a loop device needs root")
	}
	need(t, "losetup", "mount")
	img := sparseFile(t, "dev.img", 8<<20)
	out, err := exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		t.Skipf("no loop device: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()
	s, err := Open(context.Background(), dev)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Kind != Device || s.Size != 8<<20 || s.SectorSize != 512 {
		t.Fatalf("%s: kind %s, size %d, sector size %d", dev, s.Kind, s.Size, s.SectorSize)
	}
	checkOneMode(t, s.Kind, s.At, s.Stream)
	if v := Live(s); v.Holes != nil || v.SectorSize != 512 {
		t.Fatalf("live view of a device: %+v", v)
	}
}

// TestStdinIsAStream: "-" reads standard input as a stream only, whole.
func TestStdinIsAStream(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var s *Source
	asStdin(t, r, func() {
		if s, err = Open(context.Background(), "-"); err != nil {
			t.Fatal(err)
		}
	})
	defer s.Close()
	if s.Kind != Stream || s.Size != -1 || s.Path != "-" {
		t.Fatalf("stdin: kind %s, size %d, path %q", s.Kind, s.Size, s.Path)
	}
	checkOneMode(t, s.Kind, s.At, s.Stream)
	want := strings.Repeat("the disk, piped in. ", 100000)
	go func() {
		io.WriteString(w, want)
		w.Close()
	}()
	if err := s.RefuseEmpty("store an empty snapshot", "--allow-empty stores one"); err != nil {
		t.Fatal(err)
	}
	var got []byte
	within(t, "reading stdin", func() { got, err = io.ReadAll(s.Stream) })
	if err != nil || string(got) != want {
		t.Fatalf("read %d bytes (%v), want %d: the peek at the first byte must not lose it", len(got), err, len(want))
	}
	d, err := OpenDisk(Live(s), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Format != "raw" || d.Size != -1 || d.At != nil || d.Stream != s.Stream {
		t.Fatalf("the disk of a stream: %+v", d)
	}
}

// TestRefuseEmpty: a source holding no byte is refused, saying what it
// is and how to go on anyway; one byte is enough.
func TestRefuseEmpty(t *testing.T) {
	const doing, hint = "store an empty snapshot", "--allow-empty stores one"
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		open func(t *testing.T) *Source
		want string // "" when not refused
	}{
		{"empty file", func(t *testing.T) *Source {
			p := filepath.Join(dir, "empty.img")
			os.WriteFile(p, nil, 0o600)
			return mustOpen(t, p)
		}, "source " + filepath.Join(dir, "empty.img") + " is empty (0 bytes): refusing to " + doing + " (" + hint + ")"},
		{"one byte", func(t *testing.T) *Source {
			p := filepath.Join(dir, "one.img")
			os.WriteFile(p, []byte{0}, 0o600)
			return mustOpen(t, p)
		}, ""},
		{"stdin closed before its first byte", func(t *testing.T) *Source {
			r, w, _ := os.Pipe()
			w.Close()
			defer r.Close()
			var s *Source
			asStdin(t, r, func() { s = mustOpen(t, "-") })
			return s
		}, "source - (standard input) ended before its first byte (did the command feeding it fail?): refusing to " + doing + " (" + hint + ")"},
		{"FIFO whose writer wrote nothing", func(t *testing.T) *Source {
			p := filepath.Join(dir, "fifo")
			syscall.Mkfifo(p, 0o600)
			s := mustOpen(t, p)
			w, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			w.Close()
			return s
		}, "source " + filepath.Join(dir, "fifo") + " ended before its first byte"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.open(t)
			defer s.Close()
			var err error
			within(t, "RefuseEmpty", func() { err = s.RefuseEmpty(doing, hint) })
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.want)):
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
}

func mustOpen(t *testing.T, path string) *Source {
	t.Helper()
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
