package vdiotest

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
)

// fake is a disk whose map and reads can be made to break the rules
// Exercise checks.
type fake struct {
	disk   []byte
	data   func(off, n int64) []extent.Range
	readAt func(p []byte, off int64) (int, error)
}

func (f *fake) ReadAt(p []byte, off int64) (int, error) {
	if f.readAt != nil {
		return f.readAt(p, off)
	}
	return bytes.NewReader(f.disk).ReadAt(p, off)
}

func (f *fake) Data(off, n int64) ([]extent.Range, error) {
	if f.data != nil {
		return f.data(off, n), nil
	}
	return []extent.Range{{Start: off, End: off + n}}, nil
}

// failure runs Exercise and returns its failure, "" if none.
func failure(t *testing.T, img Image, size int64) (msg string) {
	r := &recorder{TB: t}
	defer func() {
		if v := recover(); v != nil && v != errStop {
			panic(v)
		}
		msg = r.msg
	}()
	Exercise(r, img, size, 300000)
	return ""
}

type recorder struct {
	testing.TB
	msg string
}

var errStop = fmt.Errorf("stop")

func (r *recorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(errStop)
}

// TestExercise: Exercise passes a sound disk and catches each kind of
// broken one.
func TestExercise(t *testing.T) {
	disk := Disk(1<<20, 1)
	size := int64(len(disk))
	if msg := failure(t, &fake{disk: disk}, size); msg != "" {
		t.Fatalf("sound disk: %s", msg)
	}
	for _, c := range []struct {
		name, want string
		img        *fake
	}{
		{"data outside the map", "outside the map", &fake{disk: disk, data: func(off, n int64) []extent.Range { return nil }}},
		{"range outside its window", "outside the window", &fake{disk: disk, data: func(off, n int64) []extent.Range {
			return []extent.Range{{Start: off, End: off + n + 1}}
		}}},
		{"ranges out of order", "out of order", &fake{disk: disk, data: func(off, n int64) []extent.Range {
			return []extent.Range{{Start: off + 10, End: off + 20}, {Start: off, End: off + 5}}
		}}},
		{"short read without error", "no error", &fake{disk: disk, readAt: func(p []byte, off int64) (int, error) {
			return len(p) / 2, nil
		}}},
		{"io.EOF inside the disk", "io.EOF inside", &fake{disk: disk, readAt: func(p []byte, off int64) (int, error) {
			n, _ := bytes.NewReader(disk).ReadAt(p, off)
			return n, io.EOF
		}}},
		{"reads depend on their length", "differ from one read", &fake{disk: disk, readAt: func(p []byte, off int64) (int, error) {
			n, err := bytes.NewReader(disk).ReadAt(p, off)
			if len(p) < 1000 && n > 0 {
				p[0]++
			}
			return n, err
		}}},
		{"read at the end", "at the end", &fake{disk: disk, readAt: func(p []byte, off int64) (int, error) {
			if off >= size {
				return 0, nil
			}
			return bytes.NewReader(disk).ReadAt(p, off)
		}}},
	} {
		if msg := failure(t, c.img, size); !strings.Contains(msg, c.want) {
			t.Errorf("%s: Exercise said %q, want %q", c.name, msg, c.want)
		}
	}
}
