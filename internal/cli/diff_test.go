package cli

import (
	"context"
	"fmt"
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
)

// fakeSide is a side of n chunks of 10 bytes (the last of last bytes)
// whose chunk i has ID byte ids[i].
func fakeSide(ids []byte, last int64) *diffSide {
	size := int64(len(ids)-1)*10 + last
	return &diffSide{name: "fake", disk: &repo.Disk{Size: size, ChunkSize: 10}, close: func() {},
		id: func(_ context.Context, i int64) (repo.ID, error) {
			var id repo.ID
			id[0] = ids[i]
			return id, nil
		}}
}

func TestDiffRanges(t *testing.T) {
	for _, c := range []struct {
		name   string
		a, b   []byte
		lastA  int64
		lastB  int64
		all    bool
		want   string
		nBytes int64
	}{
		{"same", []byte{1, 2, 3}, []byte{1, 2, 3}, 10, 10, false, "[]", 0},
		{"adjacent merge", []byte{1, 2, 3, 4}, []byte{1, 9, 9, 4}, 10, 10, false, "[{10 20}]", 20},
		{"apart", []byte{1, 2, 3, 4}, []byte{9, 2, 9, 4}, 10, 10, false, "[{0 10} {20 10}]", 20},
		{"short last chunk", []byte{1, 2}, []byte{1, 3}, 4, 4, false, "[{10 4}]", 4},
		{"b longer", []byte{1, 2}, []byte{1, 2, 3}, 10, 5, false, "[{20 5}]", 5},
		{"a longer, last differs", []byte{1, 2, 3}, []byte{1, 9}, 10, 7, false, "[{10 20}]", 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			rep, err := diffRanges(context.Background(), fakeSide(c.a, c.lastA), fakeSide(c.b, c.lastB), c.all)
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprint(rep.Ranges); got != c.want || rep.BytesDiffer != c.nBytes {
				t.Errorf("ranges %s (%d bytes), want %s (%d)", got, rep.BytesDiffer, c.want, c.nBytes)
			}
		})
	}
	// Every other chunk differs: 20 listed, all counted.
	a, b := make([]byte, 100), make([]byte, 100)
	for i := range b {
		b[i] = byte(i % 2)
	}
	rep, _ := diffRanges(context.Background(), fakeSide(a, 10), fakeSide(b, 10), false)
	if len(rep.Ranges) != maxListed || rep.RangesDiffer != 50 || rep.BytesDiffer != 500 {
		t.Errorf("%d listed, %d ranges, %d bytes; want %d, 50, 500", len(rep.Ranges), rep.RangesDiffer, rep.BytesDiffer, maxListed)
	}
	rep, _ = diffRanges(context.Background(), fakeSide(a, 10), fakeSide(b, 10), true)
	if len(rep.Ranges) != 50 {
		t.Errorf("--all-ranges listed %d of 50", len(rep.Ranges))
	}
	other := fakeSide(a, 10)
	other.disk.ChunkSize = 20
	if _, err := diffRanges(context.Background(), fakeSide(a, 10), other, false); err == nil {
		t.Error("sides of different chunk sizes compared")
	}
}
