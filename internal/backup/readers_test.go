package backup_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// slowAt is a source whose every read waits, as one over NBD waits a
// round trip; it records how many reads were in flight at once and can
// fail the read at one offset.
type slowAt struct {
	data     []byte
	wait     time.Duration
	failAt   int64
	inFlight atomic.Int32
	most     atomic.Int32
}

func (s *slowAt) ReadAt(p []byte, off int64) (int, error) {
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		m := s.most.Load()
		if n <= m || s.most.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(s.wait)
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(p)) {
		return 0, errors.New("injected EIO")
	}
	return bytes.NewReader(s.data).ReadAt(p, off)
}

// With Readers, chunks are read several at once and still stored in
// order: the snapshot restores byte-exact, holes and all.
func TestReadersReadAtOnceInOrder(t *testing.T) {
	for _, readers := range []int{0, 1, 4} {
		tr := repotest.New(t, repotest.Options{})
		data := disk("rrzrarrrhrzzrrbr", 77)
		at := &slowAt{data: data, wait: 2 * time.Millisecond, failAt: -1}
		src := named("vda", data)
		src.At, src.Readers = at, readers
		// A hole in the map: chunk 5 is not read, and reads as zeros.
		src.Map = holes{{Start: 5 * cs, End: 6 * cs}}
		want := bytes.Clone(data)
		clear(want[5*cs : 6*cs])
		res, err := backup.Run(context.Background(), tr, src, backup.Options{})
		if err != nil {
			t.Fatalf("readers %d: %v", readers, err)
		}
		if got, _ := contents(t, tr, res.Snapshot.ID); !bytes.Equal(got, want) {
			t.Errorf("readers %d: snapshot does not restore byte-exact", readers)
		}
		most := at.most.Load()
		switch {
		case readers <= 1 && most != 1:
			t.Errorf("readers %d: %d reads at once, want 1", readers, most)
		case readers > 1 && (most < 2 || most > int32(readers)):
			t.Errorf("readers %d: %d reads at once, want 2 to %d", readers, most, readers)
		}
		if res.Stats.BytesRead != int64(len(data)-cs) {
			t.Errorf("readers %d: read %d bytes, want %d", readers, res.Stats.BytesRead, len(data)-cs)
		}
	}
}

// A read that fails stops the backup with its offset, whichever reader
// (of Readers) or worker (of a Concurrent source) had it, and stores
// nothing; the buffers the others held do not hang the other stages.
func TestParallelReadError(t *testing.T) {
	for _, c := range []struct {
		name       string
		readers    int
		concurrent bool
		workers    int
	}{{"4 readers", 4, false, 0}, {"concurrent, 3 workers", 0, true, 3}} {
		t.Run(c.name, func(t *testing.T) {
			tr := repotest.New(t, repotest.Options{})
			data := disk("rrrrrrrrrrrrrrrrrrrr", 0)
			src := named("vda", data)
			src.At = &slowAt{data: data, wait: time.Millisecond, failAt: 9*cs + 10}
			src.Readers, src.Concurrent = c.readers, c.concurrent
			done := make(chan error, 1)
			go func() {
				_, err := backup.Run(context.Background(), tr, src, backup.Options{Workers: c.workers})
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), "injected EIO") || !strings.Contains(err.Error(), fmt.Sprintf("offset %d:", 9*cs)) {
					t.Fatalf("err %v, want the injected error at chunk 9's offset", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("backup hangs after a read error")
			}
			if n := snapshotCount(t, tr); n != 0 {
				t.Errorf("%d snapshots stored after a failed read", n)
			}
		})
	}
}

// holes is a data map with the given ranges unmapped.
type holes []extent.Range

func (h holes) Data(off, n int64) ([]extent.Range, error) {
	out := []extent.Range{{Start: off, End: off + n}}
	for _, x := range h {
		var next []extent.Range
		for _, r := range out {
			if x.End <= r.Start || x.Start >= r.End {
				next = append(next, r)
				continue
			}
			if r.Start < x.Start {
				next = append(next, extent.Range{Start: r.Start, End: x.Start})
			}
			if x.End < r.End {
				next = append(next, extent.Range{Start: x.End, End: r.End})
			}
		}
		out = next
	}
	return out, nil
}

// A Concurrent source is read by the workers, several chunks at once (at
// most one per worker), and the snapshot still restores byte-exact, holes
// and all, with every byte read counted once.
func TestConcurrentSourceReadByWorkers(t *testing.T) {
	for _, workers := range []int{1, 3} {
		tr := repotest.New(t, repotest.Options{})
		data := disk("rrzrarrrhrzzrrbrrrrr", 78)
		at := &slowAt{data: data, wait: 2 * time.Millisecond, failAt: -1}
		src := named("vda", data)
		src.At, src.Concurrent = at, true
		src.Map = holes{{Start: 5 * cs, End: 6 * cs}, {Start: 7*cs + 512, End: 7*cs + 4096}}
		want := bytes.Clone(data)
		clear(want[5*cs : 6*cs])
		clear(want[7*cs+512 : 7*cs+4096])
		res, err := backup.Run(context.Background(), tr, src, backup.Options{Workers: workers})
		if err != nil {
			t.Fatalf("workers %d: %v", workers, err)
		}
		if got, _ := contents(t, tr, res.Snapshot.ID); !bytes.Equal(got, want) {
			t.Errorf("workers %d: snapshot does not restore byte-exact", workers)
		}
		most := at.most.Load()
		switch {
		case workers == 1 && most != 1:
			t.Errorf("workers 1: %d reads at once, want 1", most)
		case workers > 1 && (most < 2 || most > int32(workers)):
			t.Errorf("workers %d: %d reads at once, want 2 to %d", workers, most, workers)
		}
		if wantRead := int64(len(data) - cs - (4096 - 512)); res.Stats.BytesRead != wantRead {
			t.Errorf("workers %d: read %d bytes, want %d", workers, res.Stats.BytesRead, wantRead)
		}
	}
}
