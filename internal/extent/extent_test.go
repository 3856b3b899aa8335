package extent

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
)

func TestSparse(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "sparse.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 64 << 20
	// Data at 4 MiB (8 KiB), 10 MiB..12 MiB, and the last byte.
	f.WriteAt(bytes.Repeat([]byte{1}, 8192), 4<<20)
	f.WriteAt(bytes.Repeat([]byte{2}, 2<<20), 10<<20)
	f.WriteAt([]byte{3}, size-1)
	m := NewSparse(f, size)
	if m == nil {
		t.Skip("file system reports no holes")
	}
	const win = 1 << 20
	var got []Range
	for off := int64(0); off < size; off += win {
		rs, err := m.Data(off, win)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if r.Start < off || r.End > off+win || r.Len() <= 0 {
				t.Fatalf("window %d: range %+v outside it", off, r)
			}
			if n := len(got); n > 0 && got[n-1].End == r.Start {
				got[n-1].End = r.End
				continue
			}
			got = append(got, r)
		}
	}
	// File systems allocate in blocks, so extents are block-aligned
	// supersets of what was written.
	want := []Range{{Start: 4 << 20, End: 4<<20 + 8192}, {Start: 10 << 20, End: 12 << 20}, {Start: size - 4096, End: size}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("data ranges %v, want %v", got, want)
	}
	// Out of order, the windows map as they did in order.
	for _, w := range []Range{{size - win, size}, {10 << 20, 11 << 20}, {4 << 20, 5 << 20}, {0, size}, {4<<20 + 4096, 10<<20 + 1}} {
		rs, err := m.Data(w.Start, w.Len())
		if err != nil {
			t.Fatal(err)
		}
		var in []Range
		for _, r := range want {
			if s, e := max(r.Start, w.Start), min(r.End, w.End); s < e {
				in = append(in, Range{s, e})
			}
		}
		if !reflect.DeepEqual(rs, in) {
			t.Errorf("window %v asked out of order: %v, want %v", w, rs, in)
		}
	}
}

func TestReadRanges(t *testing.T) {
	src := bytes.NewReader([]byte("0123456789abcdefghij"))
	for _, tc := range []struct {
		off    int64
		n      int
		ranges []Range
		want   string
	}{
		{0, 10, []Range{{Start: 0, End: 10}}, "0123456789"},
		{0, 10, nil, "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"},
		{5, 10, []Range{{Start: 6, End: 8}, {Start: 12, End: 15}}, "\x0067\x00\x00\x00\x00cde"},
		{10, 10, []Range{{Start: 10, End: 11}}, "a\x00\x00\x00\x00\x00\x00\x00\x00\x00"},
	} {
		buf := bytes.Repeat([]byte{0xff}, tc.n) // stale content must be cleared
		n, err := ReadRanges(src, buf, tc.off, tc.ranges)
		if err != nil {
			t.Fatal(err)
		}
		if string(buf) != tc.want {
			t.Errorf("off %d ranges %v: %q, want %q", tc.off, tc.ranges, buf, tc.want)
		}
		var wantN int64
		for _, r := range tc.ranges {
			wantN += r.Len()
		}
		if n != wantN {
			t.Errorf("read %d bytes, want %d", n, wantN)
		}
	}
}

func TestUnion(t *testing.T) {
	r := func(s, e int64) Range { return Range{Start: s, End: e} }
	for _, c := range []struct {
		name string
		a, b []Range
		want []Range
	}{
		{"b empty", []Range{r(0, 4)}, nil, []Range{r(0, 4)}},
		{"a empty", nil, []Range{r(2, 3), r(5, 6)}, []Range{r(2, 3), r(5, 6)}},
		{"interleaved", []Range{r(0, 2), r(10, 12)}, []Range{r(4, 6), r(20, 22)}, []Range{r(0, 2), r(4, 6), r(10, 12), r(20, 22)}},
		{"touching joined", []Range{r(0, 4)}, []Range{r(4, 8)}, []Range{r(0, 8)}},
		{"overlap and inside", []Range{r(0, 10), r(20, 30)}, []Range{r(5, 22), r(24, 26)}, []Range{r(0, 30)}},
		{"b first", []Range{r(8, 9)}, []Range{r(1, 2)}, []Range{r(1, 2), r(8, 9)}},
	} {
		if got := Union(c.a, c.b); !slices.Equal(got, c.want) {
			t.Errorf("%s: Union(%v, %v) = %v, want %v", c.name, c.a, c.b, got, c.want)
		}
	}
}
