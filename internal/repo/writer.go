package repo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Every write to a repository goes through a write session (WithWriter):
// it announces itself in sessions/ before it writes anything, renews the
// announcement while it runs, announces its end, and never writes a
// snapshot once a prune may have stopped waiting for it. docs/FORMAT.md,
// "Write sessions", has the rules.

// clock is the writer's clock: Now must carry a monotonic reading, so
// that the time elapsed since an announcement does not follow changes of
// the wall clock. Tests replace it to drive a session without sleeping.
type clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// sessionTiming says how a write session keeps itself announced.
type sessionTiming struct {
	lifetime time.Duration // stated in each announcement
	renew    time.Duration // between announcements
	clock    clock
}

func defaultSessionTiming() sessionTiming {
	return sessionTiming{lifetime: SessionLifetime, renew: SessionLifetime / 3, clock: systemClock{}}
}

// margin is how long before its newest announcement's lifetime runs out a
// session stops starting snapshot manifests: time for the manifest's
// upload, for the storage to show it, and for the storage's and the
// writer's clocks to run at slightly different rates.
func (t sessionTiming) margin() time.Duration { return t.lifetime / 12 }

// endTimeout bounds the final announcement, which is made even when the
// session's context was cancelled.
const endTimeout = time.Minute

// ErrSessionExpired is returned when a write session can no longer be
// sure that a prune still waits for it.
var ErrSessionExpired = errors.New("write session expired")

// announcer makes a session's announcements, one at a time.
type announcer struct {
	r    *Repository
	t    sessionTiming
	base Announcement

	mu  sync.Mutex
	seq uint64
	// sentAt is the writer's clock just before the Save of the newest
	// announcement that succeeded began, storedAt its storage time: the
	// session is live, for a prune, until storedAt + lifetime, and that
	// cannot come before sentAt + lifetime on the writer's clock.
	sentAt, storedAt time.Time
	// broken is set once the storage times of two announcements were
	// a lifetime apart: a prune may have taken the session for dead in
	// between (the writer was suspended, or its clock stalled).
	broken error
}

func (r *Repository) newAnnouncer(purpose string) (*announcer, error) {
	if purpose == "" {
		return nil, errors.New("a write session needs a purpose")
	}
	if err := checkText(purpose); err != nil {
		return nil, fmt.Errorf("write session purpose %q: %w", clip(purpose), err)
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, fmt.Errorf("session ID: %w", err)
	}
	host, _ := os.Hostname()
	if checkText(host) != nil {
		host = ""
	}
	program := r.opts.Program
	if checkText(program) != nil {
		program = ""
	}
	t := r.timing
	return &announcer{r: r, t: t, base: Announcement{
		Session: hex.EncodeToString(id[:]), Purpose: purpose, Host: host, Program: program,
		Started: t.clock.Now().UTC(), LifetimeSeconds: int64(t.lifetime / time.Second),
	}}, nil
}

func (a *announcer) short() string { return a.base.Session[:8] }

// announce creates the next announcement and reads back the time the
// storage recorded for it.
func (a *announcer) announce(ctx context.Context, ended bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.broken != nil && !ended {
		return a.broken
	}
	ann := a.base
	ann.Seq, ann.Ended = a.seq, ended
	a.seq++
	data, err := encodeAnnouncement(a.r.meta, a.r.keys, &ann)
	if err != nil {
		return err
	}
	h := backend.Handle{Type: backend.SessionFile, Name: Hash(data).String()}
	start := a.t.clock.Now()
	if err := a.r.be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		return fmt.Errorf("create %s: %w", h, err)
	}
	fi, err := a.r.be.Stat(ctx, h)
	if err != nil {
		return fmt.Errorf("read the storage time of %s: %w", h, err)
	}
	if fi.ModTime.IsZero() {
		return fmt.Errorf("the storage gives %s no modification time", h)
	}
	if gap := fi.ModTime.Sub(a.storedAt); !a.storedAt.IsZero() && !ended && gap >= a.t.lifetime-a.t.margin() {
		a.broken = fmt.Errorf("%w: the storage recorded announcement %d of write session %s %s after the one before, and a session lives %s: a prune may have taken it for abandoned in between (was this machine suspended?)",
			ErrSessionExpired, ann.Seq, a.short(), gap.Round(time.Second), a.t.lifetime)
		return a.broken
	}
	a.sentAt, a.storedAt = start, fi.ModTime
	return nil
}

// alive returns how long a snapshot manifest may still take to upload,
// or an error once the newest announcement may have expired for a prune:
// its lifetime is measured from just before its Save began, by the
// writer's monotonic clock, which a storage time can only come after.
func (a *announcer) alive() (time.Duration, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.broken != nil {
		return 0, a.broken
	}
	elapsed := a.t.clock.Now().Sub(a.sentAt)
	if elapsed >= a.t.lifetime-a.t.margin() {
		return 0, fmt.Errorf("%w: write session %s last renewed its announcement %s ago, and a session lives %s (less a margin of %s): a prune may no longer wait for it, so it writes no snapshot",
			ErrSessionExpired, a.short(), elapsed.Round(time.Second), a.t.lifetime, a.t.margin())
	}
	return a.t.lifetime - a.t.margin()/2 - elapsed, nil
}

// untilRenewal is how long until the next renewal is due.
func (a *announcer) untilRenewal() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.t.renew - a.t.clock.Now().Sub(a.sentAt)
}

// keep renews the announcement until ctx ends. A renewal that fails is
// retried sooner; once the session may have expired, fail stops it (its
// saves fail from then on, rather than run for hours for nothing).
func (a *announcer) keep(ctx context.Context, fail func(error)) {
	wait := a.untilRenewal()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.t.clock.After(wait):
		}
		err := a.announce(ctx, false)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			wait = a.untilRenewal()
			continue
		}
		if _, aerr := a.alive(); aerr != nil {
			fail(aerr)
			return
		}
		wait = a.t.renew / 8
		a.r.opts.Warn("cannot renew the announcement of write session %s (retrying in %s): %v", a.short(), wait.Round(time.Second), err)
	}
}

// end announces that the session wrote its last object. It is best
// effort: without it, a prune waits until the session expires.
func (a *announcer) end(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), endTimeout)
	defer cancel()
	if err := a.announce(ctx, true); err != nil {
		a.r.opts.Warn("could not announce the end of write session %s (a prune will wait until it expires, %s at most): %v", a.short(), a.t.lifetime, err)
	}
}

// Writer is an open write session: what the function WithWriter runs
// stores blobs and snapshots with. It is safe for concurrent use by that
// function's goroutines, which must all have returned when it does.
type Writer struct {
	r *Repository
	p *packer
	a *announcer
}

// WithWriter opens a write session, runs fn, then flushes what fn stored
// (packs, index objects) when fn returns nil, or aborts (nothing more
// written) when it fails. purpose says what the session is for
// ("backup", "repair snapshots"), for whoever lists sessions.
//
// The session announces itself before anything is written, and fails at
// once if it cannot (an announcement needs the right to create objects in
// sessions/ and to read them back); it renews the announcement while fn
// runs, and announces its end when it is over.
func (r *Repository) WithWriter(ctx context.Context, purpose string, fn func(w *Writer) error) (WriteStats, error) {
	return r.withWriter(ctx, purpose, nil, fn)
}

// withWriter is WithWriter; before, when set, learns the session's ID
// before its first announcement is stored.
func (r *Repository) withWriter(ctx context.Context, purpose string, before func(session string), fn func(w *Writer) error) (WriteStats, error) {
	if r.ReadOnly() {
		return WriteStats{}, r.errReadOnly()
	}
	a, err := r.newAnnouncer(purpose)
	if err != nil {
		return WriteStats{}, err
	}
	if before != nil {
		before(a.base.Session)
	}
	if err := a.announce(ctx, false); err != nil {
		return WriteStats{}, announceError(err)
	}
	if err := r.refreshCondemned(ctx); err != nil {
		a.end(ctx)
		return WriteStats{}, err
	}
	p, err := r.newPacker(ctx)
	if err != nil {
		a.end(ctx)
		return WriteStats{}, err
	}
	kctx, stopKeep := context.WithCancel(ctx)
	kept := make(chan struct{})
	go func() {
		defer close(kept)
		a.keep(kctx, p.fail)
	}()
	stats, err := runSession(ctx, &Writer{r: r, p: p, a: a}, fn)
	stopKeep()
	<-kept
	a.end(ctx)
	return stats, err
}

// runSession runs fn and flushes, or aborts; no upload runs when it
// returns.
func runSession(ctx context.Context, w *Writer, fn func(*Writer) error) (WriteStats, error) {
	err := fn(w)
	if err == nil {
		var stats WriteStats
		stats, err = w.p.flush(ctx)
		w.p.close(err)
		return stats, err
	}
	w.p.close(err)
	return w.p.stats(), err
}

func announceError(err error) error {
	err = fmt.Errorf("announce the write session: %w", err)
	if errors.Is(err, backend.ErrPermission) {
		return fmt.Errorf("%w (a writer needs the right to create objects in sessions/ and to read them back, as it does in data/ and index/: see docs/PERMISSIONS.md)", err)
	}
	return err
}

// SaveBlob stores a blob unless a blob with its ID is stored (or being
// stored) where this writer may reuse it. id must be the blob's ID
// (ChunkID for data). The blob is in the repository once the session
// flushes (SaveSnapshot, or the end of WithWriter).
func (w *Writer) SaveBlob(ctx context.Context, t BlobType, id ID, plain []byte) (SaveResult, error) {
	return w.p.saveBlob(ctx, t, id, plain)
}

// SaveMeta stores a chunk list blob and returns its ID.
func (w *Writer) SaveMeta(ctx context.Context, plain []byte) (ID, SaveResult, error) {
	id := w.r.metaIDs.Sum(plain)
	res, err := w.SaveBlob(ctx, MetaBlob, id, plain)
	return id, res, err
}

// NewChunkListWriter starts a chunk list stored by this session.
func (w *Writer) NewChunkListWriter() *ChunkListWriter {
	return &ChunkListWriter{w: w, cur: make([]ID, 0, ListEntries)}
}

// SaveSnapshot writes a snapshot manifest: it flushes the packs and index
// objects stored so far, renews the session's announcement, checks that
// the session is still live (a prune still waits for it), then signs,
// seals and stores the manifest, abandoning its upload before the
// session's lifetime runs out. Blobs the manifest refers to must have been
// saved (their SaveBlob returned) before.
func (w *Writer) SaveSnapshot(ctx context.Context, sn *Snapshot) (ID, error) {
	if _, err := w.p.flush(ctx); err != nil {
		return ID{}, fmt.Errorf("store what the snapshot refers to: %w", err)
	}
	if err := w.a.announce(ctx, false); err != nil {
		return ID{}, fmt.Errorf("renew write session %s before writing the snapshot: %w", w.a.short(), err)
	}
	left, err := w.a.alive()
	if err != nil {
		return ID{}, err
	}
	mctx, cancel := context.WithTimeout(ctx, left)
	defer cancel()
	return w.r.saveSnapshot(mctx, sn)
}

// Flush stores the packs and index objects of the blobs saved so far;
// the session goes on.
func (w *Writer) Flush(ctx context.Context) error {
	_, err := w.p.flush(ctx)
	return err
}

// Session is the session's ID, as its announcements state it.
func (w *Writer) Session() string { return w.a.base.Session }

// StorageTime is the time the storage recorded the session's newest
// announcement: a reading of the storage's clock (what a prune compares
// session times with).
func (w *Writer) StorageTime() time.Time {
	w.a.mu.Lock()
	defer w.a.mu.Unlock()
	return w.a.storedAt
}

// Reusable reports whether a data chunk with this ID is stored where this
// writer may reuse it without reading and storing it again (see
// Index.Reusable): what a backup that knows a chunk is unchanged (from a
// change tracker) asks before naming it in its chunk list.
func (w *Writer) Reusable(id ID) bool {
	_, ok := w.r.idx.Reusable(DataBlob, id, w.r.self)
	return ok
}

// MayBase reports whether this writer may take unchanged chunks from the
// chunk list of sn without reading them: only from a snapshot that it or
// the owner signed, since another writer's chunk list could name any
// stored chunk at any position.
func (w *Writer) MayBase(sn *Snapshot) bool {
	// By key, not by writer number: numbers belong to the repository
	// value that loaded the snapshot.
	owner, self := w.r.keys.OwnerPublic, w.r.keys.SignerPublic()
	if bytes.Equal(sn.SignerKey[:], owner) {
		return true
	}
	return bytes.Equal(sn.SignerKey[:], self[:]) && !w.r.idx.Writers.Revoked(w.r.self)
}
