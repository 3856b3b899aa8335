package fuzzimg

import (
	"bytes"
	"errors"
	"io"
	mrand "math/rand/v2"
	"testing"
)

// sparse returns a file of size bytes with short runs of random bytes,
// runs of one repeated byte and zeros.
func sparse(size int, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, 1))
	b := make([]byte, size)
	for i := 0; i < size; {
		n := min(size-i, r.IntN(100)+1)
		switch r.IntN(3) {
		case 0:
			for k := range n {
				b[i+k] = byte(r.Uint32())
			}
		case 1:
			c := byte(r.Uint32())
			for k := range n {
				b[i+k] = c
			}
		}
		i += n
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	for _, size := range []int{0, 1, 7, 8, 9, 100, 5000, 70000, 200000} {
		b := sparse(size, uint64(size))
		in := Encode(b)
		img := Decode(in, 1<<30, 1<<30)
		if img.Size() != int64(size) {
			t.Fatalf("size %d decoded as %d", size, img.Size())
		}
		got := make([]byte, size+10)
		n, err := img.ReadAt(got, 0)
		if n != size || err != io.EOF || !bytes.Equal(got[:n], b) {
			t.Fatalf("size %d: read %d, %v, equal %v", size, n, err, bytes.Equal(got[:n], b))
		}
		// Pieces at odd offsets read the same.
		for off := 0; off < size; off += 777 {
			p := got[:min(1000, size-off)]
			if n, err := img.ReadAt(p, int64(off)); n != len(p) || (err != nil && err != io.EOF) || !bytes.Equal(p, b[off:off+len(p)]) {
				t.Fatalf("size %d: read at %d: %d, %v", size, off, n, err)
			}
		}
		if nz := len(bytes.ReplaceAll(b, []byte{0}, nil)); size > 1000 && len(in) > nz+nz/4+100 {
			t.Errorf("size %d: %d non-zero bytes encoded in %d", size, nz, len(in))
		}
	}
	// A run of one byte costs a few bytes, whatever its length.
	if in := Encode(bytes.Repeat([]byte{0xFF}, 100000)); len(in) > 4+4*7 {
		t.Errorf("100000 bytes of 0xFF encoded in %d bytes", len(in))
	}
}

func TestLimits(t *testing.T) {
	in := Encode(sparse(10000, 3))
	if img := Decode(in, 4095, 1<<20); img.Size() != 10000%4096 {
		t.Fatalf("size %d with a maximum of 4095", img.Size())
	}
	img := Decode(in, 1<<20, 6000)
	p := make([]byte, 4000)
	if n, err := img.ReadAt(p, 0); n != 4000 || err != nil {
		t.Fatalf("first read: %d, %v", n, err)
	}
	if n, err := img.ReadAt(p, 4000); n != 0 || !errors.Is(err, ErrBudget) {
		t.Fatalf("read beyond the budget: %d, %v", n, err)
	}
	if _, err := img.ReadAt(p[:1], 0); !errors.Is(err, ErrBudget) {
		t.Fatalf("read after the budget ran out: %v", err)
	}
	// Any input decodes; truncated segments are cut short.
	for _, in := range [][]byte{nil, {1}, {1, 2, 3, 4}, {10, 0, 0, 0, 0, 0, 0, 0, 5, 0, 'a'}, {10, 0, 0, 0, 2, 0, 0, 0, 3, 0x80}} {
		img := Decode(in, 100, 100)
		img.ReadAt(make([]byte, 20), 0)
	}
	img = Decode([]byte{10, 0, 0, 0, 2, 0, 0, 0, 3, 0x80, 'x', 4, 0, 0, 0, 9, 0, 'a', 'b'}, 100, 100)
	got := make([]byte, 10)
	if n, _ := img.ReadAt(got, 0); n != 10 || string(got) != "\x00\x00xxab\x00\x00\x00\x00" {
		t.Fatalf("decoded %q", got[:n])
	}
}

func TestTrace(t *testing.T) {
	b := sparse(3000, 5)
	tr := &Trace{R: bytes.NewReader(b)}
	tr.ReadAt(make([]byte, 100), 50)
	tr.ReadAt(make([]byte, 100), 2950)
	k := tr.Keep(b)
	if !bytes.Equal(k[50:150], b[50:150]) || !bytes.Equal(k[2950:], b[2950:]) {
		t.Fatal("read bytes not kept")
	}
	if bytes.ContainsFunc(k[150:2950], func(r rune) bool { return r != 0 }) || bytes.ContainsFunc(k[:50], func(r rune) bool { return r != 0 }) {
		t.Fatal("bytes not read were kept")
	}
}
