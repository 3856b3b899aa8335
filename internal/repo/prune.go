package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Prune deletes what no snapshot needs, in two phases (docs/FORMAT.md,
// "Prune"): it first *condemns* packs in a ledger record, and deletes a
// condemned pack only once every write session that may not have read
// that record has ended. Writers read the ledger after their session's
// first announcement and never reuse a condemned pack, so a backup
// running on another host, with a key that can neither delete nor read
// the data, never names a chunk that prune deletes.

// PruneOptions tune Prune.
type PruneOptions struct {
	// MaxUnused is the share of a pack's bytes that may be unused before
	// the pack is repacked (its used blobs copied to new packs and the
	// pack condemned). Zero repacks every pack with any unused blob.
	MaxUnused float64
	// MaxRepackBytes bounds the bytes of packs repacked in one run
	// (0: no bound). Packs condemned whole cost nothing to repack.
	MaxRepackBytes int64
	// DryRun computes and reports what a prune would do, writing
	// nothing (judging sessions by this machine's clock).
	DryRun bool
	// Progress reports the steps: the stage, and done of total.
	Progress func(stage string, done, total int64)
	// Parity, when not 0, stores a parity object over every Parity packs
	// that repacking writes.
	Parity int
	// Pause, when set, is called at the named points of a run (tests
	// force races with it): "planned", "repacked", "condemned",
	// "deleting".
	Pause func(point string)
}

// PackCount counts packs and their bytes.
type PackCount struct {
	Packs int   `json:"packs"`
	Bytes int64 `json:"bytes"`
}

func (c *PackCount) add(size int64) { c.Packs++; c.Bytes += size }

// PruneReport says what a prune did (or, with DryRun, would do).
type PruneReport struct {
	DryRun    bool `json:"dry_run"`
	Snapshots int  `json:"snapshots"`
	// Stored is every stored pack before the run.
	Stored PackCount `json:"stored"`
	// UsedBytes is the stored size of the blob copies snapshots need;
	// UnusedBytes that of all the other blobs.
	UsedBytes   int64 `json:"used_bytes"`
	UnusedBytes int64 `json:"unused_bytes"`
	// Young are unused packs stored after a running write session began
	// (or after this prune did): they may belong to a backup that has
	// not written its snapshot yet, and are left for a later prune.
	Young PackCount `json:"young"`
	// Condemned are the packs condemned by this run (Repacked among
	// them).
	Condemned PackCount `json:"condemned"`
	// Repacked are the packs whose used blobs were copied to new packs.
	Repacked      PackCount `json:"repacked"`
	RepackedBlobs int       `json:"repacked_blobs"`
	// BytesRead and BytesWritten are the pack bytes read and written.
	BytesRead    int64 `json:"bytes_read"`
	BytesWritten int64 `json:"bytes_written"`
	// Deleted are the packs deleted by this run.
	Deleted PackCount `json:"deleted"`
	// Waiting are condemned packs left for a later prune, because write
	// sessions that may not know of the condemnation still run
	// (WaitingFor).
	Waiting    PackCount     `json:"waiting"`
	WaitingFor []SessionInfo `json:"waiting_for,omitempty"`
	// WaitReason says why Waiting packs wait when no session is named
	// (an unreadable session object, a backup that finished meanwhile).
	WaitReason string `json:"wait_reason,omitempty"`
	// IndexRemoved and IndexWritten count index objects removed and
	// written to drop the entries of deleted packs.
	IndexRemoved int `json:"index_removed"`
	IndexWritten int `json:"index_written"`
	// SessionsRemoved counts announcements of finished sessions removed.
	SessionsRemoved int `json:"sessions_removed"`
	// SnapshotsRemoved counts manifests of forgotten snapshots removed.
	SnapshotsRemoved int `json:"snapshots_removed"`
	// ParityRemoved counts parity objects removed because they covered a
	// deleted pack; Unprotected the kept packs they covered.
	ParityRemoved int `json:"parity_removed"`
	Unprotected   int `json:"packs_unprotected"`
	// After is what stays stored once the deletions are done.
	After PackCount `json:"after"`
}

// ErrPruneOwner is returned when prune is run with a write-only key.
var ErrPruneOwner = errors.New("prune needs the owner's key: a write-only key can neither delete nor verify what it would keep (docs/PERMISSIONS.md)")

// Prune deletes the packs that no snapshot needs and repacks those
// mostly unused, safely against backups running at the same time.
func (r *Repository) Prune(ctx context.Context, opts PruneOptions) (*PruneReport, error) {
	if !r.keys.IsOwner() {
		return nil, ErrPruneOwner
	}
	if r.ReadOnly() {
		return nil, r.errReadOnly()
	}
	if opts.Pause == nil {
		opts.Pause = func(string) {}
	}
	if opts.Progress == nil {
		opts.Progress = func(string, int64, int64) {}
	}
	p := &pruner{r: r, opts: opts, rep: &PruneReport{DryRun: opts.DryRun}}
	if opts.DryRun {
		now, err := r.storageNowGuess(ctx)
		if err != nil {
			return nil, err
		}
		return p.rep, p.plan(ctx, now, "")
	}
	if err := r.SetParity(opts.Parity); err != nil {
		return nil, err
	}
	// The record goes in before the first announcement: a prune killed
	// right after announcing itself must not keep the next one off.
	var session string
	_, err := r.withWriter(ctx, "prune", func(id string) {
		session = id
		r.cache.RecordPrune(id)
	}, func(w *Writer) error {
		p.w = w
		return p.run(ctx)
	})
	if session != "" {
		r.cache.ForgetPrune(session)
	}
	if err != nil {
		return p.rep, err
	}
	return p.rep, nil
}

// storageNowGuess reads the storage's clock without writing: the latest
// storage time of the objects written last (sessions, ledger,
// snapshots). It is earlier than the true time, which only makes
// sessions look live longer and more packs young: a dry run errs on the
// side of doing less.
func (r *Repository) storageNowGuess(ctx context.Context) (time.Time, error) {
	var now time.Time
	for _, t := range []backend.FileType{backend.SessionFile, backend.LedgerFile, backend.SnapshotFile} {
		if err := r.be.List(ctx, t, func(fi backend.Info) error {
			if fi.ModTime.After(now) {
				now = fi.ModTime
			}
			return nil
		}); err != nil {
			return time.Time{}, fmt.Errorf("list %s: %w", t, err)
		}
	}
	return now, nil
}

// pruner is one run of Prune.
type pruner struct {
	r    *Repository
	w    *Writer
	opts PruneOptions
	rep  *PruneReport

	led      *Ledger
	sessions *SessionReport
	snaps    map[string]bool // manifests listed
	st       *loadState
	// refs are the blobs the snapshots refer to.
	refs map[ID]struct{}
	// packs describe every stored or indexed pack.
	packs map[ID]*packUse
	// young is the storage time from which packs are too new to touch.
	young time.Time

	// buf and plain are reused by every read of a repack.
	buf, plain []byte

	condemn  []ID // to condemn (repack first when used)
	repack   []ID // to copy used blobs out of before deleting or condemning
	ripe     []ID // condemned and ripe: delete now
	leftover []ID // recorded deleted but still stored
}

// packUse is what prune knows of one pack.
type packUse struct {
	id     ID
	size   int64 // -1: not stored
	stored time.Time
	// blobs are the pack's entries; need marks those snapshots need
	// from this very pack.
	blobs []Copy
	ids   []ID
	need  []bool
	// refBytes counts the bytes of the pack's copies of referenced
	// blobs (whether needed here or not); usedBytes those needed here.
	refBytes, usedBytes, blobBytes int64
}

func (u *packUse) unusedShare() float64 {
	if u.size <= 0 {
		return 1
	}
	return float64(u.blobBytes-u.usedBytes) / float64(u.size)
}

// run is a prune within its write session.
func (p *pruner) run(ctx context.Context) error {
	if err := p.plan(ctx, p.w.StorageTime(), p.w.Session()); err != nil {
		return err
	}
	p.opts.Pause("planned")
	if err := p.repackAll(ctx); err != nil {
		return err
	}
	p.opts.Pause("repacked")
	tc, err := p.recordCondemned(ctx)
	if err != nil {
		return err
	}
	p.opts.Pause("condemned")
	if len(p.condemn) > 0 {
		if err := p.ripenNow(ctx, tc); err != nil {
			return err
		}
	}
	p.opts.Pause("deleting")
	err = p.deleteRipe(ctx)
	p.settle()
	if err != nil {
		return err
	}
	return p.cleanUp(ctx)
}

// plan reads the sessions, the snapshots and the index, in that order
// (a session seen ended has its manifest in the listing that follows,
// and a manifest's index objects precede it), and decides what to
// condemn, repack and delete. self is prune's own session.
func (p *pruner) plan(ctx context.Context, now time.Time, self string) error {
	r := p.r
	led, err := r.readLedgerWith(ctx, true)
	if err != nil {
		return err
	}
	p.led = led
	if p.sessions, err = r.sessions(ctx, now, led, r.writers); err != nil {
		return err
	}
	if err := p.otherPrune(self); err != nil {
		return err
	}
	names, err := r.listSnapshots(ctx)
	if err != nil {
		return err
	}
	p.snaps = map[string]bool{}
	for _, n := range names {
		p.snaps[n] = true
	}
	if p.st, err = r.loadInto(ctx, r.idx, r.cache, -1, func(context.Context) (*Ledger, error) { return led, nil }, false); err != nil {
		return err
	}
	r.load = p.st
	if err := p.loadRefs(ctx, names); err != nil {
		return err
	}
	p.young = p.youngFrom(now, self)
	p.usage()
	p.decide(self)
	return nil
}

// otherPrune refuses to run beside another live prune that started
// first. A prune killed on this machine (its process is gone) is not
// waited for.
func (p *pruner) otherPrune(self string) error {
	var mine *SessionInfo
	for i := range p.sessions.Sessions {
		if p.sessions.Sessions[i].ID == self {
			mine = &p.sessions.Sessions[i]
		}
	}
	dead := p.r.cache.DeadPrunes()
	for _, si := range p.sessions.Sessions {
		if si.ID == self || !p.ownerPrune(si) || si.State != SessionLive {
			continue
		}
		if dead[si.ID] {
			p.r.opts.Warn("the session of a prune killed on this machine (%s, %s) is ignored", si.ID[:8], si.First.Format(time.RFC3339))
			continue
		}
		if mine == nil || si.First.Before(mine.First) || (si.First.Equal(mine.First) && si.ID < self) {
			return fmt.Errorf("another prune is running (session %s on %s, announced %s): wait for it to end, or for its session to expire (%s at most)",
				si.ID[:8], si.Host, si.First.Format(time.RFC3339), si.Lifetime)
		}
	}
	return nil
}

// ownerPrune reports whether a session is a prune signed by the owner.
// Such a session neither blocks the deletions of this prune nor makes
// packs young: one that announced itself before this one is either dead
// or made this one refuse, and one that announced itself later refuses
// to run.
func (p *pruner) ownerPrune(si SessionInfo) bool {
	return si.Purpose == "prune" && bytes.Equal(si.signer[:], p.r.keys.OwnerPublic)
}

// loadRefs reads every snapshot not recorded forgotten and every chunk
// list it names. Any that cannot be read stops the prune: what it
// refers to is unknown, so nothing may be deleted.
func (p *pruner) loadRefs(ctx context.Context, names []string) error {
	r := p.r
	var bad []string
	v := snapView{cache: r.cache, writers: r.writers, led: p.led}
	var keep []string
	for _, n := range names {
		if id, err := ParseID(n); err == nil && p.led.Forgotten[id] {
			continue
		}
		keep = append(keep, n)
	}
	snaps, err := r.snapshots(ctx, v, keep, func(id string, err error) {
		bad = append(bad, err.Error())
	})
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("%s; nothing was deleted: a prune must know every snapshot's chunks (remove a manifest that cannot be read with 'sauve forget FULL-ID', or run 'sauve check')", strings.Join(bad, "; "))
	}
	p.rep.Snapshots = len(snaps)
	p.refs = map[ID]struct{}{}
	walked := map[ID]bool{}
	var total int64
	for _, sn := range snaps {
		for _, d := range sn.Disks {
			total += int64(len(d.ChunkLists))
		}
	}
	var done int64
	for _, sn := range snaps {
		for i := range sn.Disks {
			d := &sn.Disks[i]
			if err := p.walkDisk(ctx, d, walked, &done, total); err != nil {
				return fmt.Errorf("snapshot %s, disk %s: %w; nothing was deleted", sn.ID.Short(), d.Name, err)
			}
		}
	}
	return nil
}

// walkDisk adds a disk's chunk lists and chunks to the references; each
// distinct list blob is read once.
func (p *pruner) walkDisk(ctx context.Context, d *Disk, walked map[ID]bool, done *int64, total int64) error {
	list := p.r.chunkList(p.r.idx, p.r.cache, d)
	for li, lid := range d.ChunkLists {
		*done++
		p.opts.Progress("reading chunk lists", *done, total)
		p.refs[lid] = struct{}{}
		if walked[lid] {
			continue
		}
		ids, err := list.readList(ctx, li)
		if err != nil {
			return err
		}
		walked[lid] = true
		for _, id := range ids {
			if id != ZeroID {
				p.refs[id] = struct{}{}
			}
		}
	}
	return nil
}

// youngFrom is the storage time from which packs may belong to a running
// session: the start of the oldest live session other than prune's (an
// unreadable live object counts from its own storage time), or now.
func (p *pruner) youngFrom(now time.Time, self string) time.Time {
	t := now
	for _, si := range p.sessions.Sessions {
		if si.ID != self && si.State == SessionLive && !p.ownerPrune(si) && si.First.Before(t) {
			t = si.First
		}
	}
	for _, u := range p.sessions.Unreadable {
		if u.Live && u.ModTime.Before(t) {
			t = u.ModTime
		}
	}
	return t
}

// storedBefore reports whether storage time a is surely before b. Object
// stores stamp whole seconds: a pack stamped in the same second as a
// session's start may be that session's, and a session announced in the
// same second as a condemnation may have read the ledger before it.
func storedBefore(a, b time.Time) bool {
	if a.Nanosecond() == 0 || b.Nanosecond() == 0 {
		return a.Truncate(time.Second).Before(b.Truncate(time.Second))
	}
	return a.Before(b)
}

// usage decides, for every referenced blob, which copies are needed:
// the best copy the owner vouches for (not condemned, in the pack that
// holds the most referenced bytes), or, when the owner vouches for none,
// every copy (none is known to be sound, so none is given up).
func (p *pruner) usage() {
	p.packs = map[ID]*packUse{}
	for id, size := range p.st.stored {
		p.packs[id] = &packUse{id: id, size: size, stored: p.st.storedAt[id]}
	}
	p.r.idx.Each(func(id ID, c Copy) {
		u := p.packs[c.Pack]
		if u == nil {
			u = &packUse{id: c.Pack, size: -1}
			p.packs[c.Pack] = u
		}
		u.blobs = append(u.blobs, c)
		u.ids = append(u.ids, id)
		u.need = append(u.need, false)
		u.blobBytes += int64(c.Length)
		if _, ok := p.refs[id]; ok {
			u.refBytes += int64(c.Length)
		}
	})
	type choice struct {
		u *packUse
		i int
	}
	best := map[ID]choice{}
	better := func(a, b choice) bool { // a better than b
		ac, bc := p.condemnedPack(a.u.id), p.condemnedPack(b.u.id)
		if ac != bc {
			return !ac
		}
		if a.u.refBytes != b.u.refBytes {
			return a.u.refBytes > b.u.refBytes
		}
		return bytes.Compare(a.u.id[:], b.u.id[:]) < 0
	}
	for _, u := range p.packs {
		for i, c := range u.blobs {
			if _, ok := p.refs[u.ids[i]]; !ok || c.Trust&TrustOwner == 0 || c.Damaged != "" || c.Missing {
				continue
			}
			ch := choice{u, i}
			if b, ok := best[u.ids[i]]; !ok || better(ch, b) {
				best[u.ids[i]] = ch
			}
		}
	}
	for _, u := range p.packs {
		for i, c := range u.blobs {
			id := u.ids[i]
			if _, ok := p.refs[id]; !ok || c.Missing {
				continue
			}
			if b, ok := best[id]; ok {
				u.need[i] = b.u == u && b.i == i
			} else {
				u.need[i] = true
			}
			if u.need[i] {
				u.usedBytes += int64(c.Length)
			}
		}
	}
	for _, u := range p.packs {
		if u.size >= 0 {
			p.rep.Stored.add(u.size)
			p.rep.UsedBytes += u.usedBytes
			p.rep.UnusedBytes += u.blobBytes - u.usedBytes
		}
	}
}

func (p *pruner) condemnedPack(id ID) bool {
	_, ok := p.led.Condemnation(id)
	return ok
}

// decide sorts the stored packs into those to delete now (condemned and
// ripe; leftovers of a deletion), to condemn, to repack, and to keep.
func (p *pruner) decide(self string) {
	ids := make([]ID, 0, len(p.packs))
	for id, u := range p.packs {
		if u.size >= 0 {
			ids = append(ids, id)
		}
	}
	slices.SortFunc(ids, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	var candidates []*packUse
	for _, id := range ids {
		u := p.packs[id]
		switch tc, condemned := p.led.Condemnation(id); {
		case p.led.Deleted[id]:
			p.leftover = append(p.leftover, id)
		case condemned:
			if blocking := p.blocking(tc, self); len(blocking) == 0 && p.sessionsKnown() {
				p.ripe = append(p.ripe, id)
				if u.usedBytes > 0 {
					p.repack = append(p.repack, id)
				}
			} else {
				p.wait(u, blocking)
			}
		case !storedBefore(u.stored, p.young):
			if u.usedBytes == 0 {
				p.rep.Young.add(u.size)
			}
		case u.usedBytes == 0:
			p.condemn = append(p.condemn, id)
			p.rep.Condemned.add(u.size)
		case u.unusedShare() > p.opts.MaxUnused:
			candidates = append(candidates, u)
		}
	}
	// Most unused first: they free the most for the bytes copied.
	slices.SortStableFunc(candidates, func(a, b *packUse) int {
		if a.unusedShare() != b.unusedShare() {
			if a.unusedShare() > b.unusedShare() {
				return -1
			}
			return 1
		}
		return 0
	})
	var budget int64
	for _, u := range candidates {
		if p.opts.MaxRepackBytes > 0 && budget+u.size > p.opts.MaxRepackBytes {
			continue
		}
		budget += u.size
		p.repack = append(p.repack, u.id)
		p.condemn = append(p.condemn, u.id)
		p.rep.Condemned.add(u.size)
		p.rep.Repacked.add(u.size)
	}
	p.rep.After = p.rep.Stored
	for _, id := range p.ripe {
		p.rep.After.Packs--
		p.rep.After.Bytes -= p.packs[id].size
	}
	if p.opts.DryRun {
		p.estimate()
	}
}

// estimate fills a dry run's figures as if nothing blocked the packs
// condemned now: they go, and the needed blobs of repacked packs are
// written again (their stored size; pack headers and trailers aside).
func (p *pruner) estimate() {
	var moved int64
	for _, id := range p.repack {
		u := p.packs[id]
		for i := range u.blobs {
			if u.need[i] {
				p.rep.RepackedBlobs++
			}
		}
		moved += u.usedBytes
		p.rep.BytesRead += u.usedBytes
	}
	for _, id := range p.condemn {
		p.rep.After.Packs--
		p.rep.After.Bytes -= p.packs[id].size
	}
	p.rep.BytesWritten = moved
	p.rep.After.Bytes += moved
	if moved > 0 {
		p.rep.After.Packs += int((moved + int64(p.r.cfg.PackSize) - 1) / int64(p.r.cfg.PackSize))
	}
	p.rep.Deleted = PackCount{Packs: p.rep.Stored.Packs - p.rep.After.Packs, Bytes: p.rep.Stored.Bytes - p.rep.After.Bytes}
}

// settle states what stays stored after the run: what was, less what
// was deleted, plus the packs written.
func (p *pruner) settle() {
	st := p.w.p.stats()
	p.rep.BytesWritten = st.Bytes
	p.rep.After = PackCount{Packs: p.rep.Stored.Packs - p.rep.Deleted.Packs + st.Packs, Bytes: p.rep.Stored.Bytes - p.rep.Deleted.Bytes + st.Bytes}
}

// sessionsKnown reports whether every live session object could be read:
// an unreadable one may be an uninformed writer's, so nothing ripens
// while it is live.
func (p *pruner) sessionsKnown() bool {
	for _, u := range p.sessions.Unreadable {
		if u.Live {
			if p.rep.WaitReason == "" {
				p.rep.WaitReason = fmt.Sprintf("session object %s cannot be read (%s) and may be a running writer's: it stops counting a day after it was stored", shortName(u.Name), u.Error)
			}
			return false
		}
	}
	return true
}

// blocking returns the live sessions (other than prune's) that may not
// know of a condemnation stored at tc: those whose first announcement
// was not stored strictly after it (in whole seconds, the granularity of
// object stores), or whose first announcement was not read.
func (p *pruner) blocking(tc time.Time, self string) []SessionInfo {
	var out []SessionInfo
	for _, si := range p.sessions.Sessions {
		if si.ID == self || si.State != SessionLive || p.ownerPrune(si) {
			continue
		}
		if si.FirstSeq != 0 || !storedBefore(tc, si.First) {
			out = append(out, si)
		}
	}
	return out
}

func (p *pruner) wait(u *packUse, blocking []SessionInfo) {
	p.rep.Waiting.add(u.size)
	for _, si := range blocking {
		if !slices.ContainsFunc(p.rep.WaitingFor, func(s SessionInfo) bool { return s.ID == si.ID && s.signer == si.signer }) {
			p.rep.WaitingFor = append(p.rep.WaitingFor, si)
		}
	}
}

// repackAll copies the needed blobs of the packs to repack into new packs
// of prune's session, as stored (compressed: decrypted and sealed again,
// never compressed again), each verified against its ID first: a damaged
// blob stops the prune before anything is condemned or deleted. The packs are marked condemned first, so that
// the session does not take their own copies as already stored.
func (p *pruner) repackAll(ctx context.Context) error {
	if p.opts.DryRun {
		return nil
	}
	for _, id := range p.repack {
		p.r.idx.MarkCondemned(id)
	}
	for _, id := range p.condemn {
		p.r.idx.MarkCondemned(id)
	}
	var total, done int64
	for _, id := range p.repack {
		total += p.packs[id].size
	}
	// Repacking is a single stream and prune a background job: one pack
	// buffer (36 MiB) waits for its upload rather than a second one
	// overlapping it, which on the 4-day retention set cost 30 MiB of
	// peak RSS to save nothing measurable.
	p.w.p.limitBuffers(1)
	for _, id := range p.repack {
		if err := p.repackOne(ctx, p.packs[id]); err != nil {
			return err
		}
		done += p.packs[id].size
		p.opts.Progress("repacking", done, total)
	}
	if err := p.w.Flush(ctx); err != nil {
		return fmt.Errorf("store the repacked blobs: %w", err)
	}
	return nil
}

func (p *pruner) repackOne(ctx context.Context, u *packUse) error {
	for _, rg := range neededRanges(u) {
		if rg.end > u.size {
			return fmt.Errorf("pack %s is shorter than its index says (%d bytes, blobs up to %d); nothing was deleted", u.id.Short(), u.size, rg.end)
		}
		if err := p.repackRange(ctx, u, rg); err != nil {
			return err
		}
	}
	return nil
}

// repackRange streams one range of a pack and stores its needed blobs
// again: one request per range, and one blob in memory at a time, so
// that prune's memory is its pack buffer's and not the range's.
func (p *pruner) repackRange(ctx context.Context, u *packUse, rg packRange) error {
	h := backend.Handle{Type: backend.PackFile, Name: u.id.String()}
	rd, err := p.r.be.Load(ctx, h, rg.start, rg.end-rg.start)
	if err != nil {
		return fmt.Errorf("read pack %s to repack it: %w; nothing was deleted", u.id.Short(), err)
	}
	defer rd.Close()
	pos := rg.start
	for _, i := range rg.blobs {
		c := u.blobs[i]
		if _, err := io.CopyN(io.Discard, rd, int64(c.Offset)-pos); err != nil {
			return fmt.Errorf("read pack %s at %d to repack it: %w; nothing was deleted", u.id.Short(), pos, err)
		}
		p.buf = slices.Grow(p.buf[:0], int(c.Length))[:c.Length]
		if _, err := io.ReadFull(rd, p.buf); err != nil {
			return fmt.Errorf("read blob %s at %d of pack %s to repack it: %w; nothing was deleted", u.ids[i].Short(), c.Offset, u.id.Short(), err)
		}
		pos = int64(c.Offset) + int64(c.Length)
		coded, err := p.r.openCoded(u.ids[i], c.Location, p.buf, &p.plain)
		if err != nil {
			return fmt.Errorf("pack %s: blob %s is damaged (%v); nothing was deleted: run 'sauve check --read-data'", u.id.Short(), u.ids[i].Short(), err)
		}
		if _, err := p.w.p.saveCoded(c.Type, u.ids[i], coded); err != nil {
			return fmt.Errorf("store blob %s of pack %s: %w", u.ids[i].Short(), u.id.Short(), err)
		}
		p.rep.RepackedBlobs++
	}
	p.rep.BytesRead += rg.end - rg.start
	return nil
}

// packRange is a stretch of a pack read at once, and the needed blobs in
// it (indexes into the pack's blobs).
type packRange struct {
	start, end int64
	blobs      []int
}

// neededRanges groups the needed blobs of a pack into ranges read at
// once: blobs less than rangeGap apart share a read, so a mostly used
// pack costs a request or two and a mostly unused one reads little more
// than what it keeps. A range is streamed (repackRange), so its length
// costs no memory; rangeMax only bounds how long one request runs.
// Blobs that overlap (a forged index may say so) start a range of their
// own.
func neededRanges(u *packUse) []packRange {
	const rangeGap, rangeMax = 1 << 20, 64 << 20
	idx := make([]int, 0, len(u.blobs))
	for i := range u.blobs {
		if u.need[i] {
			idx = append(idx, i)
		}
	}
	slices.SortFunc(idx, func(a, b int) int { return int(u.blobs[a].Offset) - int(u.blobs[b].Offset) })
	var out []packRange
	for _, i := range idx {
		c := u.blobs[i]
		start, end := int64(c.Offset), int64(c.Offset)+int64(c.Length)
		if n := len(out); n > 0 && start >= out[n-1].end && start-out[n-1].end <= rangeGap && end-out[n-1].start <= rangeMax {
			out[n-1].end = end
			out[n-1].blobs = append(out[n-1].blobs, i)
			continue
		}
		out = append(out, packRange{start: start, end: end, blobs: []int{i}})
	}
	return out
}

// recordCondemned stores the record condemning the packs decided on and
// returns its storage time, from which no writer that announces itself
// reuses them.
func (p *pruner) recordCondemned(ctx context.Context) (time.Time, error) {
	if len(p.condemn) == 0 {
		return time.Time{}, nil
	}
	events := make([]LedgerEvent, len(p.condemn))
	for i := range p.condemn {
		events[i] = LedgerEvent{Kind: EventPackCondemned, Pack: &p.condemn[i]}
	}
	id, err := p.r.storeLedger(ctx, events)
	if err != nil {
		return time.Time{}, fmt.Errorf("record the condemned packs: %w", err)
	}
	// A writer that cannot read the record would reuse the packs: make
	// sure it reads back before counting on it.
	h := backend.Handle{Type: backend.LedgerFile, Name: id.String()}
	fi, err := p.r.be.Stat(ctx, h)
	if err != nil {
		return time.Time{}, fmt.Errorf("read back the record of condemned packs: %w", err)
	}
	data, err := backend.ReadAll(ctx, p.r.be, h)
	if err == nil {
		_, err = p.r.decodeLedger(id, data)
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("read back the record of condemned packs: %w", err)
	}
	return fi.ModTime, nil
}

// ripenNow deletes the packs condemned by this run at once when no
// session can have missed the record: it lists the sessions again (at a
// fresh storage time), then the snapshots. A snapshot that appeared since
// the plan may name blobs of the condemned packs (its writer may have
// reused them before the record), so they then wait for the next prune.
func (p *pruner) ripenNow(ctx context.Context, tc time.Time) error {
	r := p.r
	if err := p.w.a.announce(ctx, false); err != nil {
		return fmt.Errorf("renew prune's write session: %w", err)
	}
	sessions, err := r.sessions(ctx, p.w.StorageTime(), p.led, r.writers)
	if err != nil {
		return err
	}
	p.sessions = sessions
	names, err := r.listSnapshots(ctx)
	if err != nil {
		return err
	}
	fresh := false
	for _, n := range names {
		if !p.snaps[n] {
			fresh = true
		}
	}
	blocking := p.blocking(tc, p.w.Session())
	if len(blocking) > 0 || !p.sessionsKnown() || fresh {
		if fresh && len(blocking) == 0 && p.rep.WaitReason == "" {
			p.rep.WaitReason = "a backup finished while prune ran: the next prune deletes them"
		}
		for _, id := range p.condemn {
			p.wait(p.packs[id], blocking)
		}
		return nil
	}
	p.ripe = append(p.ripe, p.condemn...)
	return nil
}

// deleteRipe records the deletions, checks that every blob a snapshot
// refers to keeps a copy the owner vouches for outside the packs deleted,
// and deletes the packs (and leftovers of an interrupted deletion).
func (p *pruner) deleteRipe(ctx context.Context) error {
	gone := map[ID]bool{}
	for _, id := range p.ripe {
		gone[id] = true
	}
	if err := p.keepsEveryBlob(gone); err != nil {
		return err
	}
	if len(p.ripe) > 0 {
		events := make([]LedgerEvent, len(p.ripe))
		for i := range p.ripe {
			events[i] = LedgerEvent{Kind: EventPackDeleted, Pack: &p.ripe[i]}
		}
		if err := p.r.writeLedger(ctx, events); err != nil {
			return fmt.Errorf("record the deleted packs: %w", err)
		}
	}
	all := append(slices.Clone(p.ripe), p.leftover...)
	var mu sync.Mutex
	var done int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(p.r.opts.Connections * 2)
	for _, id := range all {
		g.Go(func() error {
			err := p.r.be.Remove(gctx, backend.Handle{Type: backend.PackFile, Name: id.String()})
			if err != nil && !errors.Is(err, backend.ErrNotExist) {
				return fmt.Errorf("delete pack %s: %w", id.Short(), err)
			}
			mu.Lock()
			defer mu.Unlock()
			done++
			p.opts.Progress("deleting packs", done, int64(len(all)))
			if gone[id] {
				p.rep.Deleted.add(p.packs[id].size)
			}
			return nil
		})
	}
	return g.Wait()
}

// keepsEveryBlob checks the rule deletions rely on: each referenced blob
// with a copy in a pack to delete has a copy the owner vouches for in a
// stored pack that stays (a repacked copy, or another). It holds by
// construction; checking it costs one pass over the index and turns a
// mistake into a refusal instead of a loss.
func (p *pruner) keepsEveryBlob(gone map[ID]bool) error {
	if len(gone) == 0 {
		return nil
	}
	kept := map[ID]bool{}
	var lost []string
	p.r.idx.Each(func(id ID, c Copy) {
		if _, ok := p.refs[id]; ok && !gone[c.Pack] && c.Trust&TrustOwner != 0 && c.Damaged == "" && !c.Missing {
			kept[id] = true
		}
	})
	p.r.idx.Each(func(id ID, c Copy) {
		if _, ok := p.refs[id]; ok && gone[c.Pack] && !kept[id] && len(lost) < 5 {
			lost = append(lost, fmt.Sprintf("blob %s of pack %s", id.Short(), c.Pack.Short()))
		}
	})
	if len(lost) > 0 {
		return fmt.Errorf("internal error: deleting the condemned packs would lose %s, which snapshots need; nothing was deleted", strings.Join(lost, ", "))
	}
	return nil
}

// cleanUp drops what refers to deleted packs or to finished sessions:
// index objects whose packs are all deleted (the owner's are rewritten
// without the deleted packs), announcements of sessions no longer live,
// and manifests of forgotten snapshots still stored.
func (p *pruner) cleanUp(ctx context.Context) error {
	if err := p.cleanIndex(ctx); err != nil {
		return err
	}
	if err := p.cleanParity(ctx); err != nil {
		return err
	}
	for _, si := range p.sessions.Sessions {
		if si.State == SessionLive || si.ID == p.w.Session() {
			continue
		}
		p.rep.SessionsRemoved += p.removeAll(ctx, backend.SessionFile, si.Objects)
	}
	p.rep.SessionsRemoved += p.removeAll(ctx, backend.SessionFile, p.sessions.Old)
	var forgotten []string
	for n := range p.snaps {
		if id, err := ParseID(n); err == nil && p.led.Forgotten[id] {
			forgotten = append(forgotten, n)
		}
	}
	p.rep.SnapshotsRemoved = p.removeAll(ctx, backend.SnapshotFile, forgotten)
	return ctx.Err()
}

// cleanParity removes the parity objects that cover a deleted pack: they
// can no longer rebuild anything (every other pack of the group, and the
// deleted one, would be needed). The kept packs of such a group lose
// their parity; prune's own new packs get parity when asked (Parity).
func (p *pruner) cleanParity(ctx context.Context) error {
	groups, _, err := p.r.ParityGroups(ctx)
	if err != nil {
		return err
	}
	var gone []string
	for _, g := range groups {
		for _, id := range g.Packs {
			if p.led.Deleted[id] || slices.Contains(p.ripe, id) {
				gone = append(gone, g.Name)
				for _, id := range g.Packs {
					if !p.led.Deleted[id] && !slices.Contains(p.ripe, id) {
						p.rep.Unprotected++
					}
				}
				break
			}
		}
	}
	p.rep.ParityRemoved = p.removeAll(ctx, backend.ParityFile, gone)
	return nil
}

// removeAll removes objects, best effort (a later prune retries), and
// counts those removed.
func (p *pruner) removeAll(ctx context.Context, t backend.FileType, names []string) int {
	n := 0
	for _, name := range names {
		err := p.r.be.Remove(ctx, backend.Handle{Type: t, Name: name})
		if err == nil || errors.Is(err, backend.ErrNotExist) {
			n++
		} else if ctx.Err() == nil {
			p.r.opts.Warn("could not remove %s/%s: %v (the next prune tries again)", t, name, err)
		}
	}
	return n
}

// cleanIndex removes the index objects that name only deleted packs, and
// rewrites the owner's that name some, without them. A writer's index
// object naming live packs too stays as it is: only its writer could
// sign a replacement, and readers skip the entries of deleted packs.
func (p *pruner) cleanIndex(ctx context.Context) error {
	deleted := map[ID]bool{}
	for id := range p.led.Deleted {
		deleted[id] = true
	}
	for _, id := range p.ripe {
		deleted[id] = true
	}
	if len(deleted) == 0 {
		return nil
	}
	var objs []backend.Info
	if err := p.r.be.List(ctx, backend.IndexFile, func(fi backend.Info) error {
		objs = append(objs, fi)
		return nil
	}); err != nil {
		return fmt.Errorf("list index: %w", err)
	}
	owner := [32]byte(p.r.keys.OwnerPublic)
	for _, fi := range objs {
		if _, bad := p.st.damagedIndex[fi.Name]; bad {
			continue // repair's business
		}
		o, err := p.r.loadIndexObject(ctx, p.r.cache, fi)
		if err != nil {
			continue
		}
		var rest []indexRecord
		for _, rec := range o.records {
			if !deleted[rec.ID] {
				rest = append(rest, rec)
			}
		}
		switch {
		case len(rest) == len(o.records):
			continue
		case len(rest) > 0 && o.signer.Key != owner:
			continue
		case len(rest) > 0:
			if err := p.r.saveIndex(ctx, rest, certsFor(rest, o.certs)); err != nil {
				return fmt.Errorf("rewrite index object %s without the deleted packs: %w", shortName(fi.Name), err)
			}
			p.rep.IndexWritten++
		}
		if err := p.r.be.Remove(ctx, backend.Handle{Type: backend.IndexFile, Name: fi.Name}); err != nil && !errors.Is(err, backend.ErrNotExist) {
			p.r.opts.Warn("could not remove index object %s: %v (the next prune tries again)", shortName(fi.Name), err)
			continue
		}
		p.r.cache.Remove(cacheIndex, fi.Name)
		p.rep.IndexRemoved++
	}
	return nil
}
