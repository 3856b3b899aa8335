package repo

import (
	"bufio"
	"bytes"
	"container/heap"
	"errors"
	"fmt"
	"io"
	"os"
	"unsafe"
)

// Building the local index file on a cold cache (the first run on a
// machine, or after prune or repair rewrote the index) used to load every
// index object into memory at once: about 100 bytes a chunk, 4.9 GiB at
// 50 M chunks. It is an external merge sort instead: the index objects
// are loaded a batch of at most dbBuildEntries entries at a time; each
// batch, sorted and folded (compact), is spilled to a run file, and the
// file is written from the merge of its old version, the runs and the
// last batch. The pack and key tables stay in memory throughout (under a
// byte a chunk), so entries keep one numbering in every run.

// dbBuildEntries is how many entries a cold build holds in memory at once
// (about 96 MiB).
const dbBuildEntries = 2 << 20

// spilledRun is a batch of sorted entries written out while a local index
// file is built. Its file is unlinked as soon as it is made: it goes with
// the process, whatever the process dies of.
type spilledRun struct {
	f *os.File
	n int
}

// spill writes the sorted entries to a run file in dir and empties the
// in-memory array (keeping its capacity for the next batch); x.mu must
// not be held, and no fresh entries may be pending (finishBulk).
func (x *Index) spill(dir string) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if len(x.sorted) == 0 {
		return nil
	}
	f, err := os.CreateTemp(dir, ".tmp-index-run-")
	if err != nil {
		return fmt.Errorf("spill index entries: %w", err)
	}
	os.Remove(f.Name())
	if _, err := f.Write(bytesOf(x.sorted)); err != nil {
		f.Close()
		return fmt.Errorf("spill index entries: %w", err)
	}
	x.spilled = append(x.spilled, spilledRun{f: f, n: len(x.sorted)})
	clear(x.sorted)
	x.sorted = x.sorted[:0]
	clear(x.buckets)
	return nil
}

// dropSpilled closes the run files.
func (x *Index) dropSpilled() {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, r := range x.spilled {
		r.f.Close()
	}
	x.spilled = nil
}

// spilledLen counts the entries of the runs; x.mu is held.
func (x *Index) spilledLen() int {
	n := 0
	for _, r := range x.spilled {
		n += r.n
	}
	return n
}

// entrySource yields entries in blob ID order.
type entrySource interface {
	next() (indexEntry, bool, error)
}

type sliceSource struct{ es []indexEntry }

func (s *sliceSource) next() (indexEntry, bool, error) {
	if len(s.es) == 0 {
		return indexEntry{}, false, nil
	}
	e := s.es[0]
	s.es = s.es[1:]
	return e, true, nil
}

// runSource reads a spilled run.
type runSource struct {
	r    *bufio.Reader
	left int
}

func (s *runSource) next() (indexEntry, bool, error) {
	if s.left == 0 {
		return indexEntry{}, false, nil
	}
	var e indexEntry
	if _, err := io.ReadFull(s.r, unsafe.Slice((*byte)(unsafe.Pointer(&e)), unsafe.Sizeof(e))); err != nil {
		return indexEntry{}, false, fmt.Errorf("read spilled index entries: %w", err)
	}
	s.left--
	return e, true, nil
}

// baseSource reads the local index file's entries as the index holds
// them (fromBase), skipping those that name nothing of the file.
type baseSource struct {
	x      *Index
	buf    []indexEntry
	lo, at uint32 // buf holds entries [lo, lo+len(buf)); at is the next
}

func (s *baseSource) next() (indexEntry, bool, error) {
	db := s.x.base
	for {
		if int(s.at-s.lo) == len(s.buf) {
			s.lo = s.at
			if s.lo >= db.nent {
				return indexEntry{}, false, nil
			}
			s.buf = s.buf[:min(db.nent-s.lo, uint32(cap(s.buf)))]
			if !db.readEntries(s.buf, s.lo) {
				return indexEntry{}, false, errors.New("read the local index file failed")
			}
		}
		i := s.at
		raw := s.buf[i-s.lo]
		s.at++
		if e, ok := s.x.fromBase(i, raw); ok {
			return e, true, nil
		}
	}
}

// mergeHeap orders the head entries of the sources by blob ID.
type mergeHeap struct {
	heads []indexEntry
	srcs  []entrySource
}

func (h *mergeHeap) Len() int { return len(h.heads) }
func (h *mergeHeap) Less(i, j int) bool {
	return bytes.Compare(h.heads[i].id[:], h.heads[j].id[:]) < 0
}
func (h *mergeHeap) Swap(i, j int) {
	h.heads[i], h.heads[j] = h.heads[j], h.heads[i]
	h.srcs[i], h.srcs[j] = h.srcs[j], h.srcs[i]
}
func (h *mergeHeap) Push(any) {}
func (h *mergeHeap) Pop() any {
	n := len(h.heads) - 1
	h.heads, h.srcs = h.heads[:n], h.srcs[:n]
	return nil
}

// merged calls fn for every entry of the file, of the spilled runs and in
// sorted, in ID order, whatever the ledger says of its pack; x.mu is held.
// Entries of the same place for the same writer from several sources
// (two index objects of different batches stating it) are folded into
// one, as compact folds them within one.
func (x *Index) merged(fn func(e indexEntry)) error {
	srcs := []entrySource{&sliceSource{es: x.sorted}}
	if x.base != nil {
		srcs = append(srcs, &baseSource{x: x, buf: make([]indexEntry, 0, 1<<14)})
	}
	for _, r := range x.spilled {
		srcs = append(srcs, &runSource{r: bufio.NewReaderSize(io.NewSectionReader(r.f, 0, int64(r.n)*int64(unsafe.Sizeof(indexEntry{}))), 1<<20), left: r.n})
	}
	h := &mergeHeap{}
	for _, s := range srcs {
		e, ok, err := s.next()
		if err != nil {
			return err
		}
		if ok {
			h.heads, h.srcs = append(h.heads, e), append(h.srcs, s)
		}
	}
	heap.Init(h)
	var group []indexEntry // the entries of one blob ID, folded
	flush := func() {
		for _, e := range group {
			fn(e)
		}
		group = group[:0]
	}
	for h.Len() > 0 {
		e := h.heads[0]
		if len(group) > 0 && group[0].id != e.id {
			flush()
		}
		if i := samePlaceIn(group, e); i >= 0 {
			group[i].trust |= e.trust
		} else {
			group = append(group, e)
		}
		next, ok, err := h.srcs[0].next()
		if err != nil {
			return err
		}
		if ok {
			h.heads[0] = next
			heap.Fix(h, 0)
		} else {
			heap.Pop(h)
		}
	}
	flush()
	return nil
}

func samePlaceIn(es []indexEntry, e indexEntry) int {
	for i := range es {
		if samePlace(es[i], e) {
			return i
		}
	}
	return -1
}
