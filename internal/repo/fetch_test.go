package repo_test

import (
	mrand "math/rand/v2"
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
)

// planAll feeds chunks to a planner and returns its runs.
func planAll(cs int, chunks []repo.RunChunk) [][]repo.RunChunk {
	p := repo.NewRunPlanner(cs)
	var out [][]repo.RunChunk
	for _, c := range chunks {
		if run := p.Add(c); run != nil {
			out = append(out, run)
		}
	}
	if run := p.Flush(); run != nil {
		out = append(out, run)
	}
	return out
}

// layout makes n chunks of cs bytes at consecutive disk offsets, sealed
// to sealed bytes each, back to back in packs, with a new pack every
// perPack chunks and, with gaps, a hole in the disk now and then.
func layout(n, cs, sealed, perPack int, gaps bool) []repo.RunChunk {
	rng := mrand.New(mrand.NewPCG(uint64(n), uint64(sealed)))
	var out []repo.RunChunk
	var pack repo.ID
	off, at := int64(0), uint32(40)
	for i := range n {
		if i%perPack == 0 {
			pack[0], pack[1] = byte(i), byte(i>>8)
			at = 40
		}
		if gaps && rng.IntN(50) == 0 {
			off += int64(cs) // a zero chunk
		}
		out = append(out, repo.RunChunk{Loc: repo.Location{Pack: pack, Offset: at, Length: uint32(sealed)}, Off: off, N: cs})
		off += int64(cs)
		at += uint32(sealed)
	}
	return out
}

func TestRunPlanner(t *testing.T) {
	cases := []struct {
		name                   string
		n, cs, sealed, perPack int
		gaps                   bool
		runs, first            int // expected runs and chunks in the first; 0: any
	}{
		{"sealed cap binds", 3000, 4096, 4125, 5000, false, 3, repo.MaxRunSealed / 4125},
		{"plain cap binds", 3000, 4096, 100, 5000, false, 3, repo.MaxRunPlain / 4096},
		{"packs end runs", 160, 4096, 4125, 16, false, 10, 16},
		{"disk holes end runs", 3000, 65536, 40000, 100, true, 0, 0},
		{"chunks larger than a run", 5, 8 << 20, 8<<20 + 29, 100, false, 5, 1},
		{"one chunk", 1, 4096, 50, 1, false, 1, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := layout(tc.n, tc.cs, tc.sealed, tc.perPack, tc.gaps)
			runs := planAll(tc.cs, in)
			if tc.runs != 0 && len(runs) != tc.runs {
				t.Errorf("%d runs, want %d", len(runs), tc.runs)
			}
			if tc.first != 0 && len(runs[0]) != tc.first {
				t.Errorf("first run of %d chunks, want %d", len(runs[0]), tc.first)
			}
			k := 0
			for _, run := range runs {
				checkRun(t, tc.cs, run)
				for _, c := range run {
					if c != in[k] {
						t.Fatalf("chunk %d out of order", k)
					}
					k++
				}
			}
			if k != len(in) {
				t.Fatalf("%d chunks planned of %d", k, len(in))
			}
		})
	}
}

// checkRun checks what one ranged read of a run needs: one pack, blobs
// back to back, chunks next to each other on the disk, within the caps.
func checkRun(t *testing.T, cs int, run []repo.RunChunk) {
	t.Helper()
	var sealed, plain int64
	for k, c := range run {
		sealed += int64(c.Loc.Length)
		plain += int64(c.N)
		if k == 0 {
			continue
		}
		p := run[k-1]
		if c.Loc.Pack != p.Loc.Pack || c.Loc.Offset != p.Loc.Offset+p.Loc.Length || c.Off != p.Off+int64(p.N) {
			t.Fatalf("chunk %d of a run does not follow the one before it", k)
		}
	}
	if len(run) > 1 && (sealed > repo.MaxRunSealed || plain > max(repo.MaxRunPlain, int64(cs))) {
		t.Fatalf("run of %d chunks: %d sealed bytes, %d plain, over the caps", len(run), sealed, plain)
	}
}
