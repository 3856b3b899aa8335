package repo_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// sparseDisk is a synthetic snapshot of a huge disk that is almost all
// zeros: some hundreds of distinct, compressible chunks at places spread
// over the disk cost storage and time only for what they hold, and one
// chunk repeated at many places makes hundreds of distinct chunk lists (a
// reader that kept them would hold hundreds of MiB).
type sparseDisk struct {
	d      *repo.Disk
	blocks [][]byte
	at     map[int64]place // chunk index: its content
}

// place is the content of a chunk: a repeated block, its first 8 bytes
// replaced by a stamp.
type place struct {
	block int
	stamp uint64
}

// chunk returns the content of a chunk.
func (sd *sparseDisk) chunk(p place) []byte {
	c := bytes.Repeat(sd.blocks[p.block], sd.d.ChunkSize/4096)
	binary.LittleEndian.PutUint64(c, p.stamp)
	return c
}

func makeSparseDisk(t *testing.T, tr *repotest.Repo, size int64, cs int) *sparseDisk {
	t.Helper()
	ctx := context.Background()
	sd := &sparseDisk{at: map[int64]place{}, d: &repo.Disk{ChunkSize: cs}}
	rng := mrand.New(mrand.NewPCG(16, 16))
	for range 16 {
		b := make([]byte, 4096)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		sd.blocks = append(sd.blocks, b)
	}
	var snID repo.ID
	if _, err := tr.WithWriter(ctx, "test", func(w *repo.Writer) error {
		// chunkAt stores the chunk of place p at chunk i.
		chunkAt := func(i int64, p place) repo.ID {
			sd.at[i] = p
			c := sd.chunk(p)
			id := tr.ChunkID(c)
			if _, err := w.SaveBlob(ctx, repo.DataBlob, id, c); err != nil {
				t.Fatal(err)
			}
			return id
		}
		lone := place{block: 0, stamp: 1 << 62}
		nchunks := (size + int64(cs) - 1) / int64(cs)
		nlists := (nchunks + repo.ListEntries - 1) / repo.ListEntries
		zeroList, _, err := w.SaveMeta(ctx, repo.EncodeChunkList(make([]repo.ID, repo.ListEntries)))
		if err != nil {
			t.Fatal(err)
		}
		d := &repo.Disk{Name: "huge", Source: "/dev/huge", Kind: "device", Size: size, ChunkSize: cs, ListEntries: repo.ListEntries}
		for li := int64(0); li < nlists; li++ {
			n := min(repo.ListEntries, nchunks-li*repo.ListEntries)
			if li%16 != 5 && li%32 != 3 && n == repo.ListEntries {
				d.ChunkLists = append(d.ChunkLists, zeroList)
				continue
			}
			list := make([]repo.ID, n)
			first := li * repo.ListEntries
			switch {
			case li%32 == 3:
				// A stretch of distinct chunks, and one alone.
				pos := first + rng.Int64N(n-8)
				for s := range int64(5) {
					list[pos+s-first] = chunkAt(pos+s, place{rng.IntN(len(sd.blocks)), uint64(pos + s)})
				}
				pos = first + rng.Int64N(n)
				list[pos-first] = chunkAt(pos, place{rng.IntN(len(sd.blocks)), uint64(pos)})
			case li%16 == 5:
				pos := first + rng.Int64N(n)
				list[pos-first] = chunkAt(pos, lone)
			}
			id, _, err := w.SaveMeta(ctx, repo.EncodeChunkList(list))
			if err != nil {
				t.Fatal(err)
			}
			d.ChunkLists = append(d.ChunkLists, id)
		}
		id, err := w.SaveSnapshot(ctx, &repo.Snapshot{Time: time.Now(), Host: "big", Program: "test", Disks: []repo.Disk{*d}})
		if err != nil {
			t.Fatal(err)
		}
		snID = id
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sn, err := tr.LoadSnapshot(ctx, snID)
	if err != nil {
		t.Fatal(err)
	}
	sd.d = &sn.Disks[0]
	return sd
}

// check reports whether p holds what the disk holds at off, without
// making a copy of it (the test's memory is measured with the reader's).
func (sd *sparseDisk) check(p []byte, off int64) bool {
	cs := int64(sd.d.ChunkSize)
	for len(p) > 0 {
		i := off / cs
		n := min(int64(len(p)), (i+1)*cs-off)
		if !sd.checkChunk(p[:n], i, off-i*cs) {
			return false
		}
		p, off = p[n:], off+n
	}
	return true
}

// zeros is a block of zeros to compare with.
var zeros = make([]byte, 4096)

// checkChunk compares p with chunk i from byte at of it, a block at a
// time.
func (sd *sparseDisk) checkChunk(p []byte, i, at int64) bool {
	c, ok := sd.at[i]
	block := zeros
	if ok {
		block = sd.blocks[c.block]
	}
	bs := int64(len(block))
	for len(p) > 0 {
		rel := at % bs
		n := min(int64(len(p)), bs-rel)
		want := block[rel : rel+n]
		if ok && at < 8 {
			var head [4096]byte
			copy(head[:], block)
			binary.LittleEndian.PutUint64(head[:], c.stamp)
			want = head[rel : rel+n]
		}
		if !bytes.Equal(p[:n], want) {
			return false
		}
		p, at = p[n:], at+n
	}
	return true
}

// heapPeak samples the heap until stop is closed and returns its peak.
func heapPeak(stop <-chan struct{}) <-chan uint64 {
	out := make(chan uint64, 1)
	go func() {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var peak uint64
		tick := time.NewTicker(200 * time.Microsecond)
		defer tick.Stop()
		for {
			metrics.Read(s)
			peak = max(peak, s[0].Value.Uint64())
			select {
			case <-stop:
				out <- peak
				return
			case <-tick.C:
			}
		}
	}()
	return out
}

// TestDiskReaderBoundedMemory: concurrent reads all over a sparse 16 TiB
// snapshot, sequential and random, and its data map, keep the heap under
// 256 MiB (the cache is 64 MiB): nothing the reader holds grows with the
// disk.
func TestDiskReaderBoundedMemory(t *testing.T) {
	const size = 16 << 40
	const cs = 256 << 10
	tr := repotest.New(t, repotest.Options{ChunkSize: cs, PackSize: 64 * cs})
	sd := makeSparseDisk(t, tr, size, cs)
	var places []int64
	for i := range sd.at {
		places = append(places, i*cs)
	}

	defer debug.SetMemoryLimit(debug.SetMemoryLimit(256 << 20))
	// A heap that grows little past what is live, so that the peak
	// measures what the reader holds, not the collector's slack.
	defer debug.SetGCPercent(debug.SetGCPercent(50))
	runtime.GC()
	base := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(base)
	stop := make(chan struct{})
	peak := heapPeak(stop)

	dr := newReader(t, tr, sd.d, repo.ReaderOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hugeReads(dr, sd, places, uint64(g)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	ranges, err := dr.Data(0, size)
	if err != nil {
		t.Fatal(err)
	}
	close(stop)
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	var mapped int64
	for _, r := range ranges {
		mapped += r.Len()
	}
	if mapped != int64(len(sd.at))*cs {
		t.Errorf("the data map covers %d bytes, the disk holds %d chunks of data", mapped, len(sd.at))
	}
	p := <-peak
	st := dr.Stats()
	t.Logf("peak heap %d MiB (%d MiB before reading); cache peak %d MiB, %d runs fetched, %d places with data", p>>20, base[0].Value.Uint64()>>20, st.PeakCached>>20, st.Runs, len(places))
	if p >= 256<<20 {
		t.Fatalf("peak heap %d MiB, bound 256 MiB", p>>20)
	}
	if st.PeakCached > repo.DefaultReaderCache || st.PeakCached < repo.DefaultReaderCache/2 {
		t.Fatalf("cache peaked at %d bytes, budget %d: not filled, or overfilled", st.PeakCached, repo.DefaultReaderCache)
	}
}

// hugeReads reads at random over the whole disk, at random places that
// hold data, and in order from them, checking every byte.
func hugeReads(dr *repo.DiskReader, sd *sparseDisk, places []int64, seed uint64) error {
	cs := int64(sd.d.ChunkSize)
	rng := mrand.New(mrand.NewPCG(seed, 17))
	buf := make([]byte, 512<<10)
	check := func(off int64, n int) error {
		n = int(min(int64(n), sd.d.Size-off))
		k, err := dr.ReadAt(buf[:n], off)
		if err != nil || k != n {
			return fmt.Errorf("ReadAt(%d at %d) = %d, %v", n, off, k, err)
		}
		if !sd.check(buf[:n], off) {
			return fmt.Errorf("ReadAt(%d at %d): wrong bytes", n, off)
		}
		return nil
	}
	for range 16 {
		if err := check(rng.Int64N(sd.d.Size), 1+rng.IntN(256<<10)); err != nil {
			return err
		}
		// At random places with data: what the cache keeps.
		for range 3 {
			if err := check(places[rng.IntN(len(places))]+rng.Int64N(cs), 1+rng.IntN(64<<10)); err != nil {
				return err
			}
		}
		// In order from a place with data, as a copy would read it (what
		// the cache lets go once read).
		off := places[rng.IntN(len(places))] - rng.Int64N(4)*cs
		for range 6 {
			if err := check(off, 512<<10); err != nil {
				return err
			}
			off += 512 << 10
		}
	}
	return nil
}
