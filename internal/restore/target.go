package restore

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// targetWriter is the deliver stage of ToTarget: it writes fetched runs
// and zeroes runs of zero chunks, as the compare stage (if any) left them.
type targetWriter struct {
	t     Target
	fresh bool
	c     *counters
}

func (w *targetWriter) write(j *job, f *fetched, s *scratch) error {
	if j.zero {
		return w.zero(j, s.zeros)
	}
	if all, ok := f.contiguous(); ok && len(all) > 0 {
		// One write for the run: fewer, larger writes go to a device (or
		// O_DIRECT file) at a better rate.
		if _, err := w.t.WriteAt(all, j.off); err != nil {
			return fmt.Errorf("write target at %d: %w", j.off, err)
		}
		w.c.written.Add(int64(len(all)))
		w.c.chunksWritten.Add(int64(len(j.chunks)))
		return nil
	}
	for k, c := range j.chunks {
		if k >= len(f.chunks) || f.chunks[k] == nil {
			continue
		}
		if _, err := w.t.WriteAt(f.chunks[k], c.Off); err != nil {
			return fmt.Errorf("write target at %d: %w", c.Off, err)
		}
		w.c.written.Add(int64(c.N))
		w.c.chunksWritten.Add(1)
	}
	return nil
}

// zero makes a run of zero chunks read as zeros: all of it, or the pieces
// the compare stage found not zero, each stretch of them with one call. A
// fresh target reads as zeros already.
func (w *targetWriter) zero(j *job, zeros []byte) error {
	if w.fresh {
		return nil
	}
	if j.want == nil {
		return w.zeroRange(j.off, j.len, zeros)
	}
	cs := int64(len(zeros))
	for k := 0; k < len(j.want); {
		if !j.want[k] {
			k++
			continue
		}
		e := k
		for e < len(j.want) && j.want[e] {
			e++
		}
		off := j.off + int64(k)*cs
		if err := w.zeroRange(off, min(j.off+j.len, j.off+int64(e)*cs)-off, zeros); err != nil {
			return err
		}
		k = e
	}
	return nil
}

func (w *targetWriter) zeroRange(off, n int64, zeros []byte) error {
	if err := w.t.Zero(off, n, zeros); err != nil {
		return fmt.Errorf("zero target at %d: %w", off, err)
	}
	w.c.written.Add(n)
	return nil
}

// comparer is the compare stage of a delta restore: it reads the target
// under a job and keeps only the chunks that differ from the snapshot's
// (a zero run: the chunk-sized pieces that are not zero).
type comparer struct {
	t  Target
	r  Repository
	cs int
	c  *counters
}

func (cm *comparer) compare(j *job, s *scratch) (bool, error) {
	if j.zero {
		return cm.zeros(j, s)
	}
	buf, valid, err := cm.read(s, j.off, j.len)
	if err != nil {
		return false, err
	}
	j.want = make([]bool, len(j.chunks))
	need := false
	for k, c := range j.chunks {
		rel := c.Off - j.off
		if rel+int64(c.N) <= valid && cm.r.ChunkID(buf[rel:rel+int64(c.N)]) == c.ID {
			cm.c.same.Add(1)
			continue
		}
		j.want[k], need = true, true
	}
	return need, nil
}

// zeros marks the pieces of a zero run that are not zero, reading the
// target a run's worth at a time.
func (cm *comparer) zeros(j *job, s *scratch) (bool, error) {
	cs := int64(cm.cs)
	piece := max(cs, repo.MaxRunPlain/cs*cs)
	j.want = make([]bool, (j.len+cs-1)/cs)
	need := false
	for off := j.off; off < j.off+j.len; off += piece {
		n := min(piece, j.off+j.len-off)
		buf, _, err := cm.read(s, off, n)
		if err != nil {
			return false, err
		}
		for rel := int64(0); rel < n; rel += cs {
			b := buf[rel:min(rel+cs, n)]
			if !bytes.Equal(b, s.zeros[:len(b)]) {
				j.want[(off-j.off+rel)/cs], need = true, true
			}
		}
	}
	return need, nil
}

// read returns the target's n bytes at off and how many of them it holds.
// Bytes past the end of a shorter file read as zeros, as they will once
// it is cut to size (a chunk of data there is written all the same).
func (cm *comparer) read(s *scratch, off, n int64) ([]byte, int64, error) {
	if int64(cap(s.buf)) < n {
		s.buf = make([]byte, n)
	}
	buf := s.buf[:n]
	k, err := cm.t.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, 0, fmt.Errorf("read target at %d: %w", off, err)
	}
	clear(buf[k:])
	return buf, int64(k), nil
}

// windowTarget is a target restored within some ranges of the disk
// only, at the disk's offsets less shift: writes and zeros outside them
// are dropped, reads there give zeros (a delta compare of a chunk that
// spans a range's edge then matches only if the snapshot's bytes outside
// are zeros too, which is what it would have written).
type windowTarget struct {
	t     Target
	only  []extent.Range
	shift int64
}

// pieces calls fn for each part of [off, off+n) inside the ranges.
func (w *windowTarget) pieces(off, n int64, fn func(s, e int64) error) error {
	for _, r := range w.only {
		s, e := max(r.Start, off), min(r.End, off+n)
		if s >= e {
			continue
		}
		if err := fn(s, e); err != nil {
			return err
		}
	}
	return nil
}

func (w *windowTarget) WriteAt(p []byte, off int64) (int, error) {
	return len(p), w.pieces(off, int64(len(p)), func(s, e int64) error {
		_, err := w.t.WriteAt(p[s-off:e-off], s-w.shift)
		return err
	})
}

func (w *windowTarget) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), w.pieces(off, int64(len(p)), func(s, e int64) error {
		_, err := w.t.ReadAt(p[s-off:e-off], s-w.shift)
		return err
	})
}

func (w *windowTarget) Zero(off, n int64, zeros []byte) error {
	return w.pieces(off, n, func(s, e int64) error { return w.t.Zero(s-w.shift, e-s, zeros) })
}
