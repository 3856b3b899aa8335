package repo

import (
	"bytes"
	"testing"
)

// FuzzParityHeader: a parity object's header is untrusted (anyone who can
// write to the repository can store one): any bytes give a group whose
// sizes are bounded and consistent with the object's size, or an error,
// never a panic or a huge allocation.
func FuzzParityHeader(f *testing.F) {
	ids := []ID{{1}, {2}, {3}}
	good := encodeParityHeader(ids, []int64{100, 300, 200})
	f.Add(good, int64(len(good))+300)
	f.Add(good[:20], int64(400))
	f.Add([]byte("SVPAR001\xff\xff\xff\xff"), int64(12))
	f.Fuzz(func(t *testing.T, b []byte, size int64) {
		const maxPack = 1 << 30
		g, err := decodeParityHeader("x", b, size, maxPack)
		if err != nil {
			return
		}
		if len(g.Packs) == 0 || len(g.Packs) > MaxParityGroup || len(g.Sizes) != len(g.Packs) {
			t.Fatalf("group of %d packs, %d sizes", len(g.Packs), len(g.Sizes))
		}
		for _, s := range g.Sizes {
			if s <= 0 || s > maxPack || s > g.Length {
				t.Fatalf("size %d (length %d)", s, g.Length)
			}
		}
		if g.headerLen()+g.Length != size {
			t.Fatal("accepted a size its header does not give")
		}
		if !bytes.Equal(encodeParityHeader(g.Packs, g.Sizes), b[:g.headerLen()]) {
			t.Fatal("header does not round-trip")
		}
	})
}
