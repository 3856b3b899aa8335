package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// benchDisk is 64 MiB that compresses about as the reference disk's files
// do: half words (text-like, about 3:1), a quarter random (stored raw), a
// quarter zeros.
func benchDisk() []byte {
	rng := rand.New(rand.NewPCG(16, 16))
	words := []string{"sauve ", "block ", "chunk ", "disk ", "pack ", "index ", "the ", "of ", "a ", "snapshot ", "zstd ", "restore\n"}
	const size = 64 << 20
	out := make([]byte, 0, size)
	for len(out) < size {
		switch rng.IntN(4) {
		case 0, 1:
			for n := len(out) + repo.DefaultChunkSize; len(out) < n; {
				out = append(out, words[rng.IntN(len(words))]...)
			}
			out = out[:len(out)/repo.DefaultChunkSize*repo.DefaultChunkSize]
		case 2:
			b := make([]byte, repo.DefaultChunkSize)
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			out = append(out, b...)
		default:
			out = append(out, make([]byte, repo.DefaultChunkSize)...)
		}
	}
	return out[:size]
}

// BenchmarkPipeline is a full backup of benchDisk into a fresh repository
// in memory with 256 KiB chunks and 32 MiB packs, read by one reader
// goroutine (serial) or by the workers (concurrent).
//
//	go test -run - -bench Pipeline -cpu 2 ./internal/backup
func BenchmarkPipeline(b *testing.B) {
	data := benchDisk()
	for _, concurrent := range []bool{false, true} {
		name := "serial"
		if concurrent {
			name = "concurrent"
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				b.StopTimer()
				tr := repotest.New(b, repotest.Options{ChunkSize: repo.DefaultChunkSize, PackSize: repo.DefaultPackSize})
				src := backup.Source{Name: "disk", Path: "/bench/disk.img", Kind: "file", Size: int64(len(data)), At: bytes.NewReader(data), Concurrent: concurrent}
				b.StartTimer()
				if _, err := backup.Run(context.Background(), tr, src, backup.Options{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
