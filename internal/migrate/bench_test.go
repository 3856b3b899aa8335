package migrate

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// nullTarget is a target that costs nothing: the benchmarks measure the
// source's side of a pass, reading and hashing.
type nullTarget struct{}

func (nullTarget) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (nullTarget) Zero(int64, int64) error                { return nil }
func (nullTarget) Sync() error                            { return nil }

// benchSource is the disk of the benchmarks: $SAUVE_BENCH_DISK (a file,
// such as the reference disk's day1.img, read through the page cache)
// or 256 MiB of random bytes in memory.
func benchSource(b *testing.B) (io.ReaderAt, int64) {
	if p := os.Getenv("SAUVE_BENCH_DISK"); p != "" {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		fi, err := f.Stat()
		if err != nil {
			b.Fatal(err)
		}
		return f, fi.Size()
	}
	data := make([]byte, 256<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(data); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			data[i+k] = byte(v >> (8 * k))
		}
	}
	return bytes.NewReader(data), int64(len(data))
}

// BenchmarkDeltaPass is a delta pass without change tracking at 2%
// churn: every chunk read and hashed, one in 50 written, with 1, 2 and
// the default number of hashers. Profile with -cpuprofile.
func BenchmarkDeltaPass(b *testing.B) {
	at, size := benchSource(b)
	h := Header{ChunkSize: DefaultChunkSize, Source: Identity{Size: size}, Target: Identity{Size: size}}
	for _, hashers := range []int{1, 2, 0} {
		b.Run(fmt.Sprintf("hashers=%d", hashers), func(b *testing.B) {
			st, err := Create(filepath.Join(b.TempDir(), "s"), h, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			src := Source{At: at, Size: size}
			if _, err := Run(context.Background(), src, nullTarget{}, st, Options{}); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				// 2% of the chunks made unknown: written again.
				b.StopTimer()
				var idx []int64
				for i := int64(0); i < h.Chunks(); i += 50 {
					idx = append(idx, i)
				}
				if err := st.Set(idx, make([]Hash, len(idx))); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				p, err := Run(context.Background(), src, nullTarget{}, st, Options{Hashers: hashers})
				if err != nil {
					b.Fatal(err)
				}
				if p.ChunksChanged != int64(len(idx)) {
					b.Fatalf("%d chunks changed, want %d", p.ChunksChanged, len(idx))
				}
			}
		})
	}
}
