// Package copier copies snapshots from one repository into another ('sauve
// copy'): every chunk is read and verified in the source, opened with the
// source's full key and stored sealed for the target, which stores only
// the chunks it lacks; each copy gets a manifest signed by the target's
// key that records where it came from (copied_from), so that a snapshot
// is never copied twice and an interrupted copy resumes where it stopped.
//
// How chunks travel depends on how the two repositories name them. With
// the same chunk size and ID key (a target made with 'sauve init
// --from-repo'), a chunk has the same ID on both sides: chunk lists carry
// over unchanged and only chunks the target cannot reuse are read. With
// another ID key the disk is read through the source's disk reader and
// every chunk hashed again with the target's key; with another chunk size
// it is cut again too. Both of those run the backup pipeline over the
// source's disk reader.
//
// Everything happens in one write session of the target; its manifests
// are written one snapshot at a time, as soon as each is complete.
package copier

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Mode is how chunks travel from one repository to the other.
type Mode int

// The modes, from cheapest to dearest.
const (
	// SameIDs: same chunk size and ID key; chunk IDs carry over.
	SameIDs Mode = iota
	// Rehash: same chunk size, another ID key; every chunk is read and
	// hashed again.
	Rehash
	// Rechunk: another chunk size; disks are read and cut again.
	Rechunk
)

// String is the mode's name in --json output.
func (m Mode) String() string {
	switch m {
	case SameIDs:
		return "same-ids"
	case Rehash:
		return "rehash"
	}
	return "rechunk"
}

// Describe says, for people, which path a copy takes.
func (m Mode) Describe() string {
	switch m {
	case SameIDs:
		return "same chunk IDs: chunks copied without re-hashing"
	case Rehash:
		return "different ID key: re-hashed"
	}
	return "different chunk size: re-chunked"
}

// ModeOf says how chunks travel from src to dst.
func ModeOf(src, dst *repo.Repository) Mode {
	switch {
	case src.Config().ChunkSize != dst.Config().ChunkSize:
		return Rechunk
	case src.Keys().IDKey != dst.Keys().IDKey:
		return Rehash
	}
	return SameIDs
}

// Options tune a copy.
type Options struct {
	// Program is recorded in the manifests written.
	Program string
	// Readers bounds the chunks read from the source at once on the
	// same-ID path (default 8): each is one ranged read, which on an
	// object store waits a round trip.
	Readers int
	// Progress, when set, is updated as the copy runs: Total is the size
	// of the disks to copy, Done what was gone through, Read the bytes of
	// chunks read from the source, New and Stored what the target stored.
	Progress *backup.Progress
	// Warn hears of problems that do not stop the copy.
	Warn func(string)
}

// Pair is a source snapshot and its copy in the target.
type Pair struct {
	Source, Target repo.ID
	Host           string
	Time           time.Time
	Size           int64 // of its disks
}

// Result says what a copy did.
type Result struct {
	Mode Mode
	// Copied are the snapshots copied by this run, in order; Skipped
	// those the target holds a copy of already.
	Copied, Skipped []Pair
	// Adopted counts packs an interrupted copy (or backup) left that
	// this run indexed and reused.
	Adopted int
	// Stats sums the disks' statistics: BytesRead is what was read from
	// the source, ChunksNew the chunks stored in the target, ChunksReused
	// those it held already.
	Stats repo.DiskStats
	// Packs and BytesWritten are what the target's write session
	// uploaded.
	Packs        int
	BytesWritten int64
	Seconds      float64
}

// ErrWriteOnlySource is returned when the source's key cannot open
// chunk data.
var ErrWriteOnlySource = errors.New("the source repository's key is write-only: copying needs its full key, to open chunk data")

// Run copies the snapshots snaps of src (loaded from it) into dst, oldest
// first, skipping those dst holds a copy of already. Both repositories'
// indexes must be loaded. It returns what it did also when it fails: the
// snapshots whose manifests were written are in the target.
func Run(ctx context.Context, src, dst *repo.Repository, snaps []*repo.Snapshot, opts Options) (*Result, error) {
	start := time.Now()
	if opts.Progress == nil {
		opts.Progress = new(backup.Progress)
	}
	if opts.Readers <= 0 {
		opts.Readers = 8
	}
	if opts.Warn == nil {
		opts.Warn = func(string) {}
	}
	defer opts.Progress.Finished.Store(true)
	res := &Result{Mode: ModeOf(src, dst)}
	if src.Config().ID == dst.Config().ID {
		return res, fmt.Errorf("the source and the target are the same repository (%s)", src.Config().ID)
	}
	if !src.CanDecrypt() {
		return res, ErrWriteOnlySource
	}
	c := &copier{src: src, dst: dst, opts: opts, res: res, copies: map[repo.ID]repo.ID{}}
	todo, err := c.plan(ctx, snaps)
	if err != nil {
		return res, err
	}
	if len(todo) == 0 {
		// Nothing to write: not even a session announcement.
		res.Seconds = time.Since(start).Seconds()
		return res, nil
	}
	var total int64
	for _, sn := range todo {
		total += snapshotSize(sn)
	}
	opts.Progress.Total.Store(total)
	// As a backup does: the packs an interrupted run stored are indexed
	// and reused, not uploaded again.
	if res.Adopted, err = dst.AdoptOrphanPacks(ctx); err != nil {
		return res, fmt.Errorf("index the packs of an interrupted run: %w", err)
	}
	ws, err := dst.WithWriter(ctx, "copy", func(w *repo.Writer) error {
		for _, sn := range todo {
			nsn, err := c.snapshot(ctx, w, sn)
			if err != nil {
				return err
			}
			// One manifest per snapshot, as soon as it is complete: a
			// copy interrupted later skips it next time.
			id, err := w.SaveSnapshot(ctx, nsn)
			if err != nil {
				return fmt.Errorf("save the copy of snapshot %s: %w", sn.ID.Short(), err)
			}
			c.copies[sn.ID] = id
			c.targets = append(c.targets, nsn)
			res.Copied = append(res.Copied, pairOf(sn, id))
		}
		return nil
	})
	res.Packs, res.BytesWritten = ws.Packs, ws.Bytes
	res.Seconds = time.Since(start).Seconds()
	return res, err
}

// copier is one run's state.
type copier struct {
	src, dst *repo.Repository
	opts     Options
	res      *Result
	// copies maps source snapshots to their copies in the target.
	copies map[repo.ID]repo.ID
	// targets are the target's snapshots, with the copies made so far.
	targets []*repo.Snapshot

	mu       sync.Mutex
	inflight map[repo.ID]struct{}
	statsMu  sync.Mutex
}

// plan lists the target's snapshots, learns which source snapshots it
// holds copies of, and returns the others, oldest first.
func (c *copier) plan(ctx context.Context, snaps []*repo.Snapshot) ([]*repo.Snapshot, error) {
	targets, err := c.dst.Snapshots(ctx, func(id string, err error) { c.opts.Warn(err.Error()) })
	if err != nil {
		return nil, fmt.Errorf("list the target's snapshots: %w", err)
	}
	c.targets = targets
	srcID, dstID := c.src.Config().ID, c.dst.Config().ID
	have := map[repo.ID]bool{}
	for _, t := range targets {
		have[t.ID] = true
		// A manifest counts as a copy only if the target's owner or
		// this key signed it: another writer stating that it copied a
		// snapshot must not make this copy skip it.
		if cf := t.CopiedFrom; cf != nil && cf.Repository == srcID && c.trusted(t) {
			if _, ok := c.copies[cf.Snapshot]; !ok {
				c.copies[cf.Snapshot] = t.ID
			}
		}
	}
	snaps = slices.Clone(snaps)
	slices.SortStableFunc(snaps, func(a, b *repo.Snapshot) int {
		if d := a.Time.Compare(b.Time); d != 0 {
			return d
		}
		return slices.Compare(a.ID[:], b.ID[:])
	})
	var todo []*repo.Snapshot
	seen := map[repo.ID]bool{}
	for _, sn := range snaps {
		if seen[sn.ID] {
			continue
		}
		seen[sn.ID] = true
		if t, ok := c.copies[sn.ID]; ok {
			c.res.Skipped = append(c.res.Skipped, pairOf(sn, t))
			continue
		}
		// A copy of one of the target's own snapshots goes back as
		// the snapshot it is.
		if cf := sn.CopiedFrom; cf != nil && cf.Repository == dstID && have[cf.Snapshot] {
			c.res.Skipped = append(c.res.Skipped, pairOf(sn, cf.Snapshot))
			continue
		}
		todo = append(todo, sn)
	}
	return todo, nil
}

// trusted reports whether t was signed by the target's owner or by the
// key this copy writes with.
func (c *copier) trusted(t *repo.Snapshot) bool {
	k := c.dst.Keys()
	self := k.SignerPublic()
	return slices.Equal(t.SignerKey[:], k.OwnerPublic) || t.SignerKey == self
}

func pairOf(sn *repo.Snapshot, target repo.ID) Pair {
	return Pair{Source: sn.ID, Target: target, Host: sn.Host, Time: sn.Time, Size: snapshotSize(sn)}
}

func snapshotSize(sn *repo.Snapshot) int64 {
	var n int64
	for _, d := range sn.Disks {
		n += d.Size
	}
	return n
}

// snapshot copies the disks of sn and returns the manifest of its copy.
func (c *copier) snapshot(ctx context.Context, w *repo.Writer, sn *repo.Snapshot) (*repo.Snapshot, error) {
	if k := c.dst.Keys(); k.Cert != nil && !k.Cert.Allows(sn.Host) {
		c.opts.Warn(fmt.Sprintf("snapshot %s is of host %s, which the target key's certificate does not cover: its copy will be marked in the target", sn.ID.Short(), sn.Host))
	}
	nsn := &repo.Snapshot{
		Time: sn.Time, Host: sn.Host, Tags: sn.Tags, Parent: c.parent(sn), Program: c.opts.Program,
		Quiesce:    sn.Quiesce,
		CopiedFrom: &repo.CopiedFrom{Repository: c.src.Config().ID, Snapshot: sn.ID},
	}
	for i := range sn.Disks {
		d, err := c.disk(ctx, w, &sn.Disks[i])
		if err != nil {
			return nil, fmt.Errorf("copy disk %s of snapshot %s: %w", sn.Disks[i].Name, sn.ID.Short(), err)
		}
		nsn.Disks = append(nsn.Disks, *d)
		c.res.Stats.Add(d.Stats)
		c.res.Stats.Seconds += d.Stats.Seconds // copied one after another
	}
	return nsn, nil
}

// parent is the target's snapshot that the copy of sn follows: the copy
// of sn's parent when the target has one, otherwise what the format says
// of a backup's parent, in the target: the latest snapshot of the same
// host and first disk's source, not newer than sn.
func (c *copier) parent(sn *repo.Snapshot) *repo.ID {
	if sn.Parent != nil {
		if t, ok := c.copies[*sn.Parent]; ok {
			return &t
		}
	}
	var best *repo.Snapshot
	for _, t := range c.targets {
		if len(t.Marks) > 0 || t.Host != sn.Host || len(t.Disks) == 0 || t.Disks[0].Source != sn.Disks[0].Source || t.Time.After(sn.Time) {
			continue
		}
		if best == nil || !t.Time.Before(best.Time) {
			best = t
		}
	}
	if best == nil {
		return nil
	}
	id := best.ID
	return &id
}

// disk copies one disk and returns its entry in the copy's manifest:
// what the backup recorded of it, with the target's chunk lists and what
// the copy did as its statistics.
func (c *copier) disk(ctx context.Context, w *repo.Writer, d *repo.Disk) (*repo.Disk, error) {
	nd := *d
	// A change tracker records the writes since the source's backup
	// chain read the disk: a backup into the target must not take this
	// copy as the base of an incremental read (the tracker may have been
	// restarted since), so the copy names neither.
	nd.ChangeTracker, nd.Base = "", nil
	if c.res.Mode == SameIDs {
		lists, st, err := c.sameIDs(ctx, w, d)
		if err != nil {
			return nil, err
		}
		nd.ChunkLists, nd.Stats = lists, st
		return &nd, nil
	}
	dr, err := c.src.NewDiskReader(ctx, d, repo.ReaderOptions{Warn: func(f string, a ...any) { c.opts.Warn(fmt.Sprintf(f, a...)) }})
	if err != nil {
		return nil, err
	}
	defer dr.Close()
	bd, err := backup.Disk(ctx, c.dst, w, backup.Source{
		Name: d.Name, Path: d.Source, Kind: d.Kind, Size: d.Size, At: dr, Map: dr,
	}, backup.Options{Progress: c.opts.Progress, Warn: c.opts.Warn})
	if err != nil {
		return nil, err
	}
	nd.ChunkSize, nd.ChunkLists, nd.ListEntries, nd.Stats = bd.ChunkSize, bd.ChunkLists, bd.ListEntries, bd.Stats
	return &nd, nil
}

// chunkJob is one stored chunk of a disk to copy.
type chunkJob struct {
	i  int64
	id repo.ID
	n  int64
}

// sameIDs copies a disk whose chunks have the same IDs in both
// repositories: its chunk list is written again as it is (its list
// blobs too have the same IDs, so the target stores only those it
// lacks), and each chunk the target cannot reuse is read from the source,
// verified, and stored.
func (c *copier) sameIDs(ctx context.Context, w *repo.Writer, d *repo.Disk) ([]repo.ID, repo.DiskStats, error) {
	start := time.Now()
	var st repo.DiskStats
	if d.ChunkSize != c.src.Config().ChunkSize {
		return nil, st, fmt.Errorf("disk %s has chunk size %d, its repository %d", d.Name, d.ChunkSize, c.src.Config().ChunkSize)
	}
	prog := c.opts.Progress
	cl := c.src.ChunkList(d)
	cs := int64(d.ChunkSize)
	jobs := make(chan chunkJob, c.opts.Readers)
	g, gctx := errgroup.WithContext(ctx)
	var lists []repo.ID
	g.Go(func() error {
		defer close(jobs)
		lw := w.NewChunkListWriter()
		for i := int64(0); i < cl.Len(); i++ {
			id, err := cl.At(gctx, i)
			if err != nil {
				return err
			}
			if err := lw.Append(gctx, id); err != nil {
				return err
			}
			n := min(cs, d.Size-i*cs)
			if id.IsZero() {
				c.count(&st, func(st *repo.DiskStats) { st.ChunksZero++ })
				prog.Zero.Add(n)
				prog.Done.Add(n)
				continue
			}
			select {
			case jobs <- chunkJob{i: i, id: id, n: n}:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		var err error
		lists, err = lw.Close(gctx)
		return err
	})
	for range c.opts.Readers {
		g.Go(func() error {
			buf := make([]byte, 0, cs)
			for j := range jobs {
				if err := c.copyChunk(gctx, w, d, j, &buf, &st); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, st, err
	}
	st.Seconds = time.Since(start).Seconds()
	return lists, st, nil
}

// copyChunk stores chunk j of d in the target unless the target can
// reuse it, or another reader is copying it now.
func (c *copier) copyChunk(ctx context.Context, w *repo.Writer, d *repo.Disk, j chunkJob, buf *[]byte, st *repo.DiskStats) error {
	prog := c.opts.Progress
	reused := func() {
		c.count(st, func(st *repo.DiskStats) { st.ChunksReused++ })
		prog.Reused.Add(j.n)
		prog.Done.Add(j.n)
	}
	if !c.claim(j.id) {
		reused()
		return nil
	}
	defer c.release(j.id)
	if w.Reusable(j.id) {
		reused()
		return nil
	}
	off := j.i * int64(d.ChunkSize)
	plain, err := c.src.ReadBlobFor(ctx, repo.DataBlob, j.id, (*buf)[:0], d.Writer())
	if err != nil {
		return fmt.Errorf("read chunk %d (offset %d) from the source: %w", j.i, off, err)
	}
	*buf = plain[:0]
	if int64(len(plain)) != j.n {
		return fmt.Errorf("chunk %d (offset %d) of the source holds %d bytes, the disk needs %d there", j.i, off, len(plain), j.n)
	}
	prog.Read.Add(j.n)
	sr, err := w.SaveBlob(ctx, repo.DataBlob, j.id, plain)
	if err != nil {
		return fmt.Errorf("store chunk at offset %d: %w", off, err)
	}
	if !sr.New {
		c.count(st, func(st *repo.DiskStats) { st.BytesRead += j.n })
		reused()
		return nil
	}
	c.count(st, func(st *repo.DiskStats) {
		st.BytesRead += j.n
		st.ChunksNew++
		st.BytesNew += j.n
		st.BytesNewCoded += int64(sr.Coded)
		st.BytesStored += int64(sr.Sealed)
	})
	prog.New.Add(j.n)
	prog.Stored.Add(int64(sr.Sealed))
	prog.Done.Add(j.n)
	return nil
}

// claim marks id as being copied by the caller; false when another
// reader is at it (its chunk list entry needs nothing more: the session
// fails if that copy does).
func (c *copier) claim(id repo.ID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight == nil {
		c.inflight = map[repo.ID]struct{}{}
	}
	if _, ok := c.inflight[id]; ok {
		return false
	}
	c.inflight[id] = struct{}{}
	return true
}

func (c *copier) release(id repo.ID) {
	c.mu.Lock()
	delete(c.inflight, id)
	c.mu.Unlock()
}

// count updates a disk's statistics, which the readers share.
func (c *copier) count(st *repo.DiskStats, fn func(*repo.DiskStats)) {
	c.statsMu.Lock()
	fn(st)
	c.statsMu.Unlock()
}
