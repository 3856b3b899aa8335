package zstdenc

import (
	"bytes"
	"fmt"
	"math/rand"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// textLike is compressible, but not trivially: words drawn at random.
func textLike(n int, seed int64) []byte {
	words := []string{"backup ", "restore ", "chunk ", "pack ", "index ", "snapshot\n", "disk ", "zstd ", "level ", "sector "}
	rng := rand.New(rand.NewSource(seed))
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[rng.Intn(len(words))])
		fmt.Fprintf(&b, "%d ", rng.Intn(100000))
	}
	return b.Bytes()[:n]
}

func randomBytes(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// decode reads a frame as the repository does: with a decoder whose
// memory is bounded by maxSize, the largest input the encoder was made
// for, so that a frame whose window exceeds it fails here.
func decode(t testing.TB, frame []byte, size, maxSize int) []byte {
	t.Helper()
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(maxSize)+1))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var h zstd.Header
	if err := h.Decode(frame); err != nil {
		t.Fatalf("frame header: %v", err)
	}
	// Without cgo, frames of a few bytes state no size; the others must
	// (the repository sizes its output buffer by it), and none has a
	// checksum (the blob ID checks the plaintext).
	if (h.HasFCS || size > 64) && h.FrameContentSize != uint64(size) || h.HasCheckSum {
		t.Fatalf("frame header: content size %v %d, checksum %v; want %d without checksum", h.HasFCS, h.FrameContentSize, h.HasCheckSum, size)
	}
	out, err := d.DecodeAll(frame, nil)
	if err != nil {
		t.Fatalf("decode %d-byte frame of %d bytes: %v", len(frame), size, err)
	}
	return out
}

func TestRoundTrip(t *testing.T) {
	inputs := []struct {
		name string
		data []byte
	}{
		{"one byte", []byte{7}},
		{"text 1000", textLike(1000, 1)},
		{"text 256 KiB", textLike(256<<10, 2)},
		{"text odd 300001", textLike(300001, 3)},
		{"random 64 KiB", randomBytes(64<<10, 4)},
		{"zeros 1 MiB", make([]byte, 1<<20)},
		{"half random 4 MiB", append(randomBytes(2<<20, 5), textLike(2<<20, 6)...)},
	}
	for _, level := range []int{MinLevel, 3, 9, MaxLevel} {
		for _, in := range inputs {
			t.Run(fmt.Sprintf("level %d %s", level, in.name), func(t *testing.T) {
				e, err := New(level, 4<<20)
				if err != nil {
					t.Fatal(err)
				}
				frame, err := e.Encode(nil, in.data)
				if err != nil {
					t.Fatal(err)
				}
				if got := decode(t, frame, len(in.data), 4<<20); !bytes.Equal(got, in.data) {
					t.Fatalf("round trip changed the data (%d bytes in, %d out)", len(in.data), len(got))
				}
			})
		}
	}
}

// An empty input still makes a frame that decodes to nothing.
func TestEmpty(t *testing.T) {
	e, err := New(DefaultLevel, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	frame, err := e.Encode(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	defer d.Close()
	if out, err := d.DecodeAll(frame, nil); err != nil || len(out) != 0 {
		t.Fatalf("empty frame decodes to %d bytes, %v", len(out), err)
	}
}

// Encode appends: what dst holds stays, whether or not it has room.
func TestEncodeAppends(t *testing.T) {
	e, err := New(DefaultLevel, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	src := textLike(100<<10, 7)
	for _, room := range []int{0, 10, 200 << 10} {
		dst := make([]byte, 3, 3+room)
		copy(dst, "abc")
		out, err := e.Encode(dst, src)
		if err != nil {
			t.Fatal(err)
		}
		if string(out[:3]) != "abc" {
			t.Fatalf("room %d: prefix overwritten: %q", room, out[:3])
		}
		if got := decode(t, out[3:], len(src), 1<<20); !bytes.Equal(got, src) {
			t.Fatalf("room %d: round trip changed the data", room)
		}
	}
}

// Each encoder is reused, as the repository's pool does, and its frames
// do not depend on what it compressed before.
func TestReuseIsStateless(t *testing.T) {
	e, err := New(3, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	a, b := textLike(200<<10, 8), textLike(200<<10, 9)
	fa, _ := e.Encode(nil, a)
	_, _ = e.Encode(nil, b)
	fa2, _ := e.Encode(nil, a)
	if !bytes.Equal(fa, fa2) {
		t.Fatal("the same input compressed twice gave different frames")
	}
}

// What --compression max is for: fewer bytes than fast on text.
func TestHigherLevelsAreSmaller(t *testing.T) {
	src := textLike(1<<20, 10)
	size := func(level int) int {
		e, err := New(level, len(src))
		if err != nil {
			t.Fatal(err)
		}
		f, err := e.Encode(nil, src)
		if err != nil {
			t.Fatal(err)
		}
		return len(f)
	}
	fast, max := size(1), size(9)
	if max >= fast {
		t.Fatalf("level 9 wrote %d bytes, level 1 %d: want fewer", max, fast)
	}
	t.Logf("%s: level 1 %d bytes, level 9 %d bytes of %d", Implementation, fast, max, len(src))
}

func TestLevels(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"", DefaultLevel, true},
		{"fast", 1, true},
		{"better", 3, true},
		{"max", 9, true},
		{"1", 1, true},
		{"19", 19, true},
		{"0", 0, false},
		{"20", 0, false},
		{"-3", 0, false},
		{"07", 0, false},
		{"3x", 0, false},
		{"best", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseLevel(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseLevel(%q) = %d, %v; want %d, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
	for _, bad := range []int{0, -1, 20} {
		if _, err := New(bad, 1<<10); err == nil {
			t.Errorf("New(%d) succeeded", bad)
		}
	}
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("hello hello hello"), uint8(1))
	f.Add(textLike(5000, 11), uint8(3))
	f.Add(randomBytes(3000, 12), uint8(9))
	f.Fuzz(func(t *testing.T, data []byte, l uint8) {
		level := int(l)%MaxLevel + 1
		if level > 9 {
			level = 9 // the slow levels add nothing the fuzzer can find
		}
		maxSize := max(len(data), 1<<10) // zstd windows are 1 KiB or more
		e, err := New(level, maxSize)
		if err != nil {
			t.Fatal(err)
		}
		frame, err := e.Encode([]byte{1}, data)
		if err != nil {
			t.Fatal(err)
		}
		if frame[0] != 1 {
			t.Fatal("prefix overwritten")
		}
		if len(data) == 0 {
			return
		}
		if got := decode(t, frame[1:], len(data), maxSize); !bytes.Equal(got, data) {
			t.Fatal("round trip changed the data")
		}
	})
}
