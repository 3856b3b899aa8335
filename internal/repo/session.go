package repo

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// A write session announces itself with objects in sessions/ (docs/FORMAT.md,
// "Write sessions"): signed, sealed, immutable and named by their hash
// like every other object, so that a writer with create rights only can
// make them. What counts is the time the storage recorded each of them
// (Info.ModTime), never a writer's clock: a prune compares storage times
// with storage times, so a backdated writer cannot stall it.

// SessionLifetime is how long one announcement keeps its session live,
// counted from the time the storage recorded it. A writer renews every
// third of it, so it can miss a renewal to a network outage of two hours
// and still not expire, while a writer that was killed (and so never
// wrote its "ended" announcement) holds a prune off for six hours at
// most, which a nightly or weekly prune hardly notices.
const SessionLifetime = 6 * time.Hour

const (
	// maxSessionLifetime bounds the lifetime a reader accepts in an
	// announcement: a hostile writer cannot hold a prune off longer per
	// announcement. Unreadable announcements count as live this long.
	maxSessionLifetime = 24 * time.Hour
	minSessionLifetime = time.Minute
	sessionMagic       = "SVSES001"
	maxSessionObject   = 64 << 10
	// maxSessionText bounds purpose, host and program.
	maxSessionText = 255
)

var sessionAD = []byte(crypto.DomainSession)

// Announcement is what one session object states. Started is the writer's
// clock and only informative; Lifetime is counted from the object's
// storage time.
type Announcement struct {
	Session         string    `json:"session"` // 32 random hex digits
	Seq             uint64    `json:"seq"`
	Purpose         string    `json:"purpose"`
	Host            string    `json:"host"`
	Program         string    `json:"program"`
	Started         time.Time `json:"started"`
	LifetimeSeconds int64     `json:"lifetime_seconds"`
	Ended           bool      `json:"ended"`
}

// Lifetime is how long the announcement keeps its session live.
func (a *Announcement) Lifetime() time.Duration {
	return time.Duration(a.LifetimeSeconds) * time.Second
}

// encodeAnnouncement signs and seals an announcement.
func encodeAnnouncement(meta *crypto.MetaSealer, keys *crypto.Keys, a *Announcement) ([]byte, error) {
	js, err := json.Marshal(a)
	if err != nil {
		return nil, fmt.Errorf("encode session announcement: %w", err)
	}
	plain := append([]byte(sessionMagic), keys.SignObject(js, crypto.DomainSession)...)
	return meta.Seal(nil, plain, sessionAD), nil
}

// decodeAnnouncement opens, verifies and parses one stored session object.
func decodeAnnouncement(meta *crypto.MetaSealer, keys *crypto.Keys, id ID, data []byte) (*Announcement, crypto.SignerBlock, error) {
	if Hash(data) != id {
		return nil, crypto.SignerBlock{}, errors.New("content does not match its name (damaged)")
	}
	plain, err := meta.Open(nil, data, sessionAD)
	if err != nil {
		return nil, crypto.SignerBlock{}, err
	}
	return openAnnouncement(keys, plain)
}

// openAnnouncement checks the signature of an opened session object and
// parses what it signs.
func openAnnouncement(keys *crypto.Keys, plain []byte) (*Announcement, crypto.SignerBlock, error) {
	if len(plain) < len(sessionMagic) || string(plain[:len(sessionMagic)]) != sessionMagic {
		return nil, crypto.SignerBlock{}, errors.New("bad header")
	}
	js, who, err := keys.OpenSigned(plain[len(sessionMagic):], crypto.DomainSession)
	if err != nil {
		return nil, who, err
	}
	a, err := parseAnnouncement(js)
	return a, who, err
}

// parseAnnouncement decodes and bounds an announcement's JSON: whatever a
// writer signed is still untrusted input (it is shown, and it holds a
// prune off).
func parseAnnouncement(js []byte) (*Announcement, error) {
	var a Announcement
	if err := json.Unmarshal(js, &a); err != nil {
		return nil, fmt.Errorf("announcement: %w", err)
	}
	if b, err := hex.DecodeString(a.Session); err != nil || len(b) != 16 || hex.EncodeToString(b) != a.Session {
		return nil, fmt.Errorf("announcement: session ID %q is not 32 lowercase hex digits", clip(a.Session))
	}
	if a.LifetimeSeconds < int64(minSessionLifetime/time.Second) || a.LifetimeSeconds > int64(maxSessionLifetime/time.Second) {
		return nil, fmt.Errorf("announcement: lifetime of %d seconds is outside %s to %s", a.LifetimeSeconds, minSessionLifetime, maxSessionLifetime)
	}
	for _, f := range []struct{ name, v string }{{"purpose", a.Purpose}, {"host", a.Host}, {"program", a.Program}} {
		if err := checkText(f.v); err != nil {
			return nil, fmt.Errorf("announcement: %s %q: %w", f.name, clip(f.v), err)
		}
	}
	return &a, nil
}

// checkText refuses what would garble a terminal or a report.
func checkText(s string) error {
	if len(s) > maxSessionText {
		return fmt.Errorf("longer than %d bytes", maxSessionText)
	}
	if !utf8.ValidString(s) {
		return errors.New("not UTF-8")
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return errors.New("holds a control character")
		}
	}
	return nil
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

// SessionState is what a session's announcements say at a storage time.
type SessionState string

// The states of a session.
const (
	// SessionLive: no "ended" announcement, and the newest announcement
	// is younger than its lifetime. A prune must wait for it.
	SessionLive SessionState = "live"
	// SessionEnded: the writer announced that it finished.
	SessionEnded SessionState = "ended"
	// SessionExpired: the writer stopped renewing (killed, stalled, cut
	// off); it will never write a snapshot, so a prune need not wait.
	SessionExpired SessionState = "expired"
)

// SessionInfo is one write session, as its announcements tell it.
type SessionInfo struct {
	ID      string `json:"id"`
	Writer  string `json:"writer"` // the signer, as shown
	Revoked bool   `json:"revoked,omitempty"`
	Purpose string `json:"purpose"`
	Host    string `json:"host"`
	Program string `json:"program"`
	// Started is the writer's clock at the start: informative only.
	Started time.Time `json:"started"`
	// First and Last are the storage times of the oldest and newest
	// announcements read (those older than a day are not read).
	First time.Time `json:"first_announced"`
	Last  time.Time `json:"last_announced"`
	// FirstSeq is the seq of the oldest announcement read: not 0 when
	// the session's first ones were not read (older than a day), so its
	// start is unknown.
	FirstSeq uint64        `json:"-"`
	Seq      uint64        `json:"seq"`
	Lifetime time.Duration `json:"-"`
	State    SessionState  `json:"state"`
	// Objects are the names of its announcements (for prune to remove).
	Objects []string `json:"-"`

	signer [32]byte
}

// UnreadableSession is a session object that failed to read or verify.
// Whose it is cannot be told, so it is taken as live for the longest
// lifetime a reader accepts (a damaged announcement may be a real
// writer's).
type UnreadableSession struct {
	Name    string    `json:"name"`
	ModTime time.Time `json:"storage_time"`
	Error   string    `json:"error"`
	Live    bool      `json:"live"`
}

// SessionReport lists the write sessions of the repository.
type SessionReport struct {
	// Now is the storage time the states were judged at.
	Now        time.Time           `json:"now"`
	Sessions   []SessionInfo       `json:"sessions"`
	Unreadable []UnreadableSession `json:"unreadable"`
	// Old are the objects stored a day or more before Now: they cannot
	// keep any session live, and were not read.
	Old []string `json:"old_objects"`
}

// Live counts the sessions a prune must wait for, unreadable objects
// included.
func (s *SessionReport) Live() int {
	n := 0
	for _, si := range s.Sessions {
		if si.State == SessionLive {
			n++
		}
	}
	for _, u := range s.Unreadable {
		if u.Live {
			n++
		}
	}
	return n
}

// Sessions lists the write sessions, judged at storage time now. A prune
// must take now from the storage (the ModTime of an object it created
// just before, such as its own session's announcement: Writer.StorageTime),
// never from its own clock; check, which writes nothing, passes its clock
// and reports what it finds as information only.
func (r *Repository) Sessions(ctx context.Context, now time.Time) (*SessionReport, error) {
	led, err := r.Ledger(ctx)
	if err != nil {
		return nil, err
	}
	return r.sessions(ctx, now, led, r.writers)
}

// sessionObject is one announcement read.
type sessionObject struct {
	name string
	mod  time.Time
	a    *Announcement
	who  crypto.SignerBlock
}

// sessions lists the sessions as seen with the ledger led, naming signers
// from writers.
func (r *Repository) sessions(ctx context.Context, now time.Time, led *Ledger, writers *Writers) (*SessionReport, error) {
	rep := &SessionReport{Now: now, Sessions: []SessionInfo{}, Unreadable: []UnreadableSession{}, Old: []string{}}
	var recent []backend.Info
	if err := r.be.List(ctx, backend.SessionFile, func(fi backend.Info) error {
		if now.Sub(fi.ModTime) >= maxSessionLifetime {
			rep.Old = append(rep.Old, fi.Name)
		} else {
			recent = append(recent, fi)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list write sessions: %w", err)
	}
	objs, bad, err := r.readSessionObjects(ctx, recent)
	if err != nil {
		return nil, err
	}
	for _, u := range bad {
		u.Live = now.Sub(u.ModTime) < maxSessionLifetime
		rep.Unreadable = append(rep.Unreadable, u)
	}
	slices.SortFunc(rep.Unreadable, func(a, b UnreadableSession) int { return strings.Compare(a.Name, b.Name) })
	rep.Sessions = groupSessions(objs, now, led, writers)
	return rep, nil
}

// readSessionObjects reads and verifies session objects concurrently.
func (r *Repository) readSessionObjects(ctx context.Context, infos []backend.Info) ([]sessionObject, []UnreadableSession, error) {
	var (
		mu   sync.Mutex
		objs []sessionObject
		bad  []UnreadableSession
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, fi := range infos {
		g.Go(func() error {
			o, err := r.readSessionObject(gctx, fi)
			if gctx.Err() != nil {
				return gctx.Err()
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				bad = append(bad, UnreadableSession{Name: fi.Name, ModTime: fi.ModTime, Error: err.Error()})
				return nil
			}
			objs = append(objs, o)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	return objs, bad, nil
}

func (r *Repository) readSessionObject(ctx context.Context, fi backend.Info) (sessionObject, error) {
	id, err := ParseID(fi.Name)
	if err != nil {
		return sessionObject{}, errors.New("not a session object name")
	}
	if fi.Size > maxSessionObject {
		return sessionObject{}, fmt.Errorf("%d bytes, larger than any announcement", fi.Size)
	}
	data, err := backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.SessionFile, Name: fi.Name})
	if err != nil {
		return sessionObject{}, err
	}
	a, who, err := decodeAnnouncement(r.meta, r.keys, id, data)
	if err != nil {
		return sessionObject{}, err
	}
	return sessionObject{name: fi.Name, mod: fi.ModTime, a: a, who: who}, nil
}

// groupSessions folds announcements into sessions. A session is one
// signer's session ID: another signer's announcement under the same ID is
// another session, so nobody can end someone else's.
func groupSessions(objs []sessionObject, now time.Time, led *Ledger, writers *Writers) []SessionInfo {
	type key struct {
		signer [32]byte
		id     string
	}
	byKey := map[key]*SessionInfo{}
	newest := map[key]uint64{}
	for _, o := range objs {
		k := key{o.who.Key, o.a.Session}
		si, ok := byKey[k]
		if !ok {
			si = &SessionInfo{ID: o.a.Session, First: o.mod, Last: o.mod, FirstSeq: o.a.Seq, signer: o.who.Key}
			si.Writer = writers.Name(writers.Number(o.who.Key, o.who.Cert))
			_, si.Revoked = led.Revoked[o.who.Key]
			byKey[k] = si
		}
		si.Objects = append(si.Objects, o.name)
		if o.mod.Before(si.First) || (o.mod.Equal(si.First) && o.a.Seq < si.FirstSeq) {
			si.First, si.FirstSeq = o.mod, o.a.Seq
		}
		si.Last = maxTime(si.Last, o.mod)
		if o.a.Ended {
			si.State = SessionEnded
		}
		if n, seen := newest[k]; !seen || o.a.Seq >= n {
			newest[k] = o.a.Seq
			si.Seq, si.Purpose, si.Host, si.Program, si.Started = o.a.Seq, o.a.Purpose, o.a.Host, o.a.Program, o.a.Started
			si.Lifetime = o.a.Lifetime()
		}
	}
	out := make([]SessionInfo, 0, len(byKey))
	for _, si := range byKey {
		switch {
		case si.State == SessionEnded:
		case now.Sub(si.Last) < si.Lifetime:
			si.State = SessionLive
		default:
			si.State = SessionExpired
		}
		slices.Sort(si.Objects)
		out = append(out, *si)
	}
	slices.SortFunc(out, func(a, b SessionInfo) int {
		if c := a.First.Compare(b.First); c != 0 {
			return c
		}
		if c := strings.Compare(a.ID, b.ID); c != 0 {
			return c
		}
		return bytes.Compare(a.signer[:], b.signer[:])
	})
	return out
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
