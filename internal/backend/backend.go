// Package backend defines where a repository's objects live: the Backend
// interface that the repository format is written against, the names and
// layout of its objects, and error values every implementation shares.
//
// Every object is written once and never changed in place (content-addressed
// objects are immutable), so the interface has no append or rename: a backend
// only has to store a whole object atomically, read a range of it, list and
// remove.
package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// FileType is the kind of object, which decides its place in the layout.
type FileType string

// The object kinds of a repository.
const (
	ConfigFile   FileType = "config"
	PackFile     FileType = "data"
	IndexFile    FileType = "index"
	SnapshotFile FileType = "snapshots"
	LedgerFile   FileType = "ledger"
	LockFile     FileType = "locks"
	// SessionFile objects announce running writers (docs/FORMAT.md,
	// "Write sessions"), so that prune can wait for them.
	SessionFile FileType = "sessions"
	// ParityFile objects let a lost or damaged pack be rebuilt from the
	// others of its group (docs/FORMAT.md, "Parity").
	ParityFile FileType = "parity"
)

// AllTypes lists the kinds that hold many objects (everything but config).
var AllTypes = []FileType{PackFile, IndexFile, SnapshotFile, LedgerFile, LockFile, SessionFile, ParityFile}

// ContentAddressed reports whether objects of kind t are named by the hash
// of their bytes: saving one that exists stores the same bytes again, so a
// backend may treat it as done.
func ContentAddressed(t FileType) bool {
	return t == PackFile || t == IndexFile || t == SnapshotFile || t == LedgerFile || t == SessionFile || t == ParityFile
}

// ListPurpose says what listing objects of kind t is needed for, in the
// words of an error that names a missing list permission.
func ListPurpose(t FileType) string {
	switch t {
	case IndexFile:
		return "to read the index"
	case SnapshotFile:
		return "to list snapshots"
	case LedgerFile:
		return "to read the owner's records (damage found, revoked writers)"
	case PackFile:
		return "to find the packs of an interrupted backup"
	case SessionFile:
		return "to find the backups running (write sessions)"
	case ParityFile:
		return "to find the parity of lost packs"
	}
	return "to list " + string(t)
}

// Handle names one object.
type Handle struct {
	Type FileType
	Name string // empty for ConfigFile
}

func (h Handle) String() string {
	if h.Type == ConfigFile {
		return "config"
	}
	return string(h.Type) + "/" + h.Name
}

// Path returns the object's path relative to the repository root. Packs are
// fanned out into 256 directories by the first two hex digits of their name
// so that no directory grows past what file systems and SFTP servers list
// comfortably.
func (h Handle) Path() string {
	switch {
	case h.Type == ConfigFile:
		return "config"
	case h.Type == PackFile && len(h.Name) >= 2:
		return "data/" + h.Name[:2] + "/" + h.Name
	default:
		return string(h.Type) + "/" + h.Name
	}
}

// Info describes a stored object.
type Info struct {
	Name string
	Size int64
	// ModTime is when the storage recorded the object (its file's
	// modification time, or the object store's Last-Modified), by the
	// storage's clock: write sessions compare it with other storage
	// times, never with a writer's clock.
	ModTime time.Time
}

// Backend stores a repository's objects.
//
// Implementations must be safe for concurrent use. Save must be atomic: a
// reader sees either no object or the whole object, never a prefix, even if
// the process is killed during the write.
type Backend interface {
	// Location describes the backend for messages (no secrets).
	Location() string
	// Save stores an object of the given size read from rd. rd may be read
	// more than once (after Seek to 0) when the save is retried.
	Save(ctx context.Context, h Handle, rd io.ReadSeeker, size int64) error
	// Load returns a reader for length bytes at offset off; length 0 means
	// to the end.
	Load(ctx context.Context, h Handle, off, length int64) (io.ReadCloser, error)
	// Stat returns the object's size and storage time; ErrNotExist when
	// there is none.
	Stat(ctx context.Context, h Handle) (Info, error)
	// List calls fn for each object of type t, in no particular order,
	// with the same Info as Stat.
	List(ctx context.Context, t FileType, fn func(Info) error) error
	// Remove deletes an object.
	Remove(ctx context.Context, h Handle) error
	// Close releases connections.
	Close() error
}

// ErrNotExist is returned (wrapped) when an object does not exist.
var ErrNotExist = errors.New("object does not exist")

// ErrExists is returned by Save when a create-only object (config) exists.
var ErrExists = errors.New("object already exists")

// ErrPermission marks an error that retrying cannot fix: credentials that
// lack a right, an expired token, a read-only location.
var ErrPermission = errors.New("permission denied")

// Permanent wraps err so that retry wrappers give up at once.
type Permanent struct{ Err error }

func (p *Permanent) Error() string { return p.Err.Error() }
func (p *Permanent) Unwrap() error { return p.Err }

// IsPermanent reports whether err must not be retried.
func IsPermanent(err error) bool {
	var p *Permanent
	return errors.As(err, &p) || errors.Is(err, ErrNotExist) || errors.Is(err, ErrPermission) ||
		errors.Is(err, ErrExists) || errors.Is(err, context.Canceled)
}

// ReadAll loads a whole object.
func ReadAll(ctx context.Context, be Backend, h Handle) ([]byte, error) {
	rd, err := be.Load(ctx, h, 0, 0)
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	buf, err := io.ReadAll(rd)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", h, err)
	}
	return buf, nil
}

// ReadRange loads length bytes at off and fails unless all arrive.
func ReadRange(ctx context.Context, be Backend, h Handle, off, length int64) ([]byte, error) {
	buf := make([]byte, length)
	if err := ReadRangeInto(ctx, be, h, off, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// ReadRangeInto fills dst with the bytes at off and fails unless all
// arrive.
func ReadRangeInto(ctx context.Context, be Backend, h Handle, off int64, dst []byte) error {
	rd, err := be.Load(ctx, h, off, int64(len(dst)))
	if err != nil {
		return err
	}
	defer rd.Close()
	if _, err := io.ReadFull(rd, dst); err != nil {
		return fmt.Errorf("read %d bytes at %d of %s: %w", len(dst), off, h, err)
	}
	return nil
}

// ByteReader is a bytes.Reader that also hands out its slice, so that a
// backend can write it without a copy (the local backend writes it with
// O_DIRECT).
type ByteReader struct {
	*bytes.Reader
	buf []byte
}

// NewByteReader returns a reader of b.
func NewByteReader(b []byte) *ByteReader { return &ByteReader{bytes.NewReader(b), b} }

// Bytes returns the whole slice.
func (r *ByteReader) Bytes() []byte { return r.buf }

// Stray is a file among a repository's objects that is not one: the
// temporary file of a write that was interrupted (kill -9, a crash).
type Stray struct {
	Path    string // relative to the repository root, with slashes
	Size    int64
	ModTime time.Time
}

// StrayLister is implemented by backends whose writes go through
// temporary files beside the objects (a folder, SFTP). Object stores make
// uploads visible whole or not at all, and hold none.
type StrayLister interface {
	// ListStray calls fn for every temporary file.
	ListStray(ctx context.Context, fn func(Stray) error) error
	// RemoveStray deletes one, by the Path ListStray gave.
	RemoveStray(ctx context.Context, path string) error
}

// StrayListerOf returns the StrayLister of be or of a backend it wraps.
func StrayListerOf(be Backend) (StrayLister, bool) {
	for be != nil {
		if s, ok := be.(StrayLister); ok {
			return s, true
		}
		u, ok := be.(interface{ Unwrap() Backend })
		if !ok {
			return nil, false
		}
		be = u.Unwrap()
	}
	return nil, false
}

// StrayDirs are the folders, relative to the root, that may hold stray
// files: the root (config) and every object kind's folder (for packs,
// also its fan-out folders, which ListStray implementations walk).
var StrayDirs = []string{".", string(PackFile), string(IndexFile), string(SnapshotFile), string(LedgerFile), string(LockFile), string(SessionFile), string(ParityFile)}

// Limits are what a backend's credentials are known, before any request,
// not to allow: a SAS token says its permissions and expiry.
type Limits struct {
	// NoList: objects cannot be listed (an Azure SAS without l).
	NoList bool
	// Expires is when the credentials stop working (zero: unknown).
	Expires time.Time
	// Credential names the credentials for messages (no secret).
	Credential string
}

// LimitsOf returns the Limits of be or of a backend it wraps.
func LimitsOf(be Backend) Limits {
	for be != nil {
		if l, ok := be.(interface{ Limits() Limits }); ok {
			return l.Limits()
		}
		u, ok := be.(interface{ Unwrap() Backend })
		if !ok {
			break
		}
		be = u.Unwrap()
	}
	return Limits{}
}
