package repo

import "sync"

// readAhead is a DiskReader's view of its reads: a read that starts at or
// a little after where the last one ended is sequential, and the chunks
// past it, up to the read-ahead distance, are fetched in the background.
type readAhead struct {
	mu    sync.Mutex
	next  int64  // offset where the last read ended
	from  int64  // first chunk not planned yet
	until int64  // read ahead up to this chunk (exclusive)
	gen   uint64 // bumped by a read that is not sequential
	wake  chan struct{}
}

// noteRead records a read of [off, end) and moves the read-ahead along.
// It says whether the read is sequential, and whether read-ahead has not
// planned it yet: the reader then plans it at once (planAhead), so that
// its chunks are fetched in runs too.
func (dr *DiskReader) noteRead(off, end int64) (seq, behind bool) {
	if dr.opts.ReadAhead <= 0 {
		return false, false
	}
	ra := &dr.ra
	ra.mu.Lock()
	// Forward jumps within the read-ahead distance are still sequential:
	// a reader that follows the data map skips holes.
	seq = off >= ra.next && off-ra.next <= dr.opts.ReadAhead
	ra.next = end
	if !seq {
		ra.gen++
		ra.from, ra.until = end/dr.cs, end/dr.cs
		ra.mu.Unlock()
		return false, false
	}
	ra.from = max(ra.from, off/dr.cs)
	ra.until = max(ra.until, min(dr.d.Chunks(), (end+dr.opts.ReadAhead+dr.cs-1)/dr.cs))
	behind = ra.from <= (end-1)/dr.cs
	more := ra.from < ra.until
	ra.mu.Unlock()
	if more {
		select {
		case ra.wake <- struct{}{}:
		default:
		}
	}
	return true, behind
}

// readAhead plans and starts the fetches of read-ahead, woken by
// sequential reads, until the reader is closed.
func (dr *DiskReader) readAhead() {
	for {
		select {
		case <-dr.ra.wake:
		case <-dr.ctx.Done():
			return
		}
		for dr.planAhead() {
		}
	}
}

// planAhead claims the missing chunks of the next stretch to read ahead
// (a run's worth of disk) and starts fetching them, a run at a time
// within the bound of fetches in flight. It returns false when there is
// nothing more to plan.
func (dr *DiskReader) planAhead() bool {
	runs, ok := dr.claimAhead()
	for k, run := range runs {
		select {
		case dr.sem <- struct{}{}:
		case <-dr.ctx.Done():
			for _, left := range runs[k:] {
				for _, e := range left.entries {
					dr.chunks.complete(e, nil, nil, dr.ctx.Err())
				}
			}
			return false
		}
		dr.spawn(func() {
			defer func() { <-dr.sem }()
			dr.fetch(run.chunks, run.entries)
		})
	}
	return ok
}

// claimAhead claims the chunks of the next stretch to read ahead that
// nobody has claimed, grouped in runs; false: nothing to plan.
func (dr *DiskReader) claimAhead() ([]claimedRun, bool) {
	// One planner at a time: two would split each other's runs.
	dr.planMu.Lock()
	defer dr.planMu.Unlock()
	ra := &dr.ra
	ra.mu.Lock()
	step := max(1, MaxRunPlain/dr.cs)
	from, until, gen := ra.from, min(ra.until, ra.from+step), ra.gen
	ra.mu.Unlock()
	if from >= until || dr.ctx.Err() != nil {
		return nil, false
	}
	var (
		chunks  []RunChunk
		entries []*chunkEntry
	)
	for i := from; i < until; i++ {
		id, err := dr.chunkID(i)
		if err != nil {
			break // a demand read of it says what is wrong
		}
		if id.IsZero() || dr.opts.Want != nil && !dr.opts.Want(i) {
			continue
		}
		e := dr.chunks.claim(id)
		if e == nil {
			continue
		}
		c, err := dr.runChunk(i, id)
		if err != nil {
			dr.chunks.complete(e, nil, nil, err)
			continue
		}
		chunks, entries = append(chunks, c), append(entries, e)
	}
	runs := planRuns(dr.d.ChunkSize, chunks, entries)
	end := until
	if n := len(runs); n > 0 {
		if last := &runs[n-1]; last.chunks[len(last.chunks)-1].Off/dr.cs == until-1 {
			end = dr.extend(last, until)
		}
	}
	ra.mu.Lock()
	if ra.gen == gen {
		ra.from = max(ra.from, end)
	}
	ra.mu.Unlock()
	return runs, true
}

// extend claims the chunks from i on that continue run, so that a
// stretch's last run is not cut where the stretch ends; it returns the
// first chunk it did not take.
func (dr *DiskReader) extend(run *claimedRun, i int64) int64 {
	p := NewRunPlanner(dr.d.ChunkSize)
	for _, c := range run.chunks {
		p.Add(c)
	}
	for ; i < dr.d.Chunks(); i++ {
		id, err := dr.chunkID(i)
		if err != nil || id.IsZero() || dr.opts.Want != nil && !dr.opts.Want(i) {
			break
		}
		c, err := dr.runChunk(i, id)
		if err != nil || !p.joins(c) {
			break
		}
		e := dr.chunks.claim(id)
		if e == nil {
			break
		}
		p.Add(c)
		run.chunks, run.entries = append(run.chunks, c), append(run.entries, e)
	}
	return i
}

// claimedRun is a run of chunks and the cache entries they fill.
type claimedRun struct {
	chunks  []RunChunk
	entries []*chunkEntry
}

// planRuns groups claimed chunks, in disk order, into runs (RunPlanner).
func planRuns(chunkSize int, chunks []RunChunk, entries []*chunkEntry) []claimedRun {
	var out []claimedRun
	p := NewRunPlanner(chunkSize)
	used := 0
	take := func(run []RunChunk) {
		if run != nil {
			out = append(out, claimedRun{chunks: run, entries: entries[used : used+len(run) : used+len(run)]})
			used += len(run)
		}
	}
	for _, c := range chunks {
		take(p.Add(c))
	}
	take(p.Flush())
	return out
}

// fetch fetches a run and completes its entries. When a chunk of it
// fails (not by cancellation), the chunks from there on are fetched one
// by one, so that an error is given to its own chunk only.
func (dr *DiskReader) fetch(run []RunChunk, entries []*chunkEntry) {
	bufs := make([]*[]byte, len(run))
	plains := make([][]byte, len(run))
	n, err := dr.r.FetchRun(dr.ctx, RunFetch{
		Disk: dr.d, Chunks: run, Warn: dr.opts.Warn,
		Into: func(k int) []byte {
			bufs[k] = dr.chunks.buffer()
			return (*bufs[k])[:0]
		},
	}, plains)
	dr.fetched.Add(n)
	dr.runs.Add(1)
	for k, e := range entries {
		switch {
		case plains[k] != nil:
			dr.chunks.complete(e, bufs[k], plains[k], nil)
			continue
		case bufs[k] != nil:
			dr.chunks.bufs.Put(bufs[k])
		}
		if err == nil {
			err = errNoRun
		}
		if len(run) > 1 && dr.ctx.Err() == nil {
			dr.fetch(run[k:k+1], entries[k:k+1])
			continue
		}
		dr.chunks.complete(e, nil, nil, err)
	}
}
