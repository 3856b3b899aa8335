package repo

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/sauve-backup/sauve/internal/crypto"
)

// WriterNum numbers the signers an index knows, so that an entry names its
// writer in two bytes.
type WriterNum uint16

const (
	// OwnerWriter is the repository owner.
	OwnerWriter WriterNum = 0
	// NoWriter is no writer: an entry nobody signed, or no preference.
	NoWriter WriterNum = 0xffff
)

// KnownWriter is a signer the repository has seen: the owner, or a writer
// key the owner certified.
type KnownWriter struct {
	Key   [32]byte
	Owner bool
	Cert  *crypto.Cert // nil for the owner, and for a writer known only from its revocation
	// RevokedAt is when the owner revoked the writer (zero if it did not).
	RevokedAt time.Time
}

// Name is how the writer is shown.
func (w KnownWriter) Name() string {
	switch {
	case w.Owner:
		return crypto.OwnerName
	case w.Cert == nil:
		return fmt.Sprintf("writer %x", w.Key[:4])
	}
	return crypto.DisplayName(w.Cert)
}

// Writers is the table of signers, shared by an index and the snapshots
// read with it. Only signers whose certificate verified are added.
type Writers struct {
	mu   sync.RWMutex
	list []KnownWriter
	num  map[[32]byte]WriterNum
}

// NewWriters returns a table that knows no owner yet (SetOwner).
func NewWriters() *Writers {
	return &Writers{list: []KnownWriter{{}}, num: map[[32]byte]WriterNum{}}
}

// SetOwner records the owner's signing key as writer 0.
func (w *Writers) SetOwner(key [32]byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.list[0] = KnownWriter{Key: key, Owner: true}
	w.num[key] = OwnerWriter
}

// Number returns the writer number of a verified signer, adding it.
func (w *Writers) Number(key [32]byte, cert *crypto.Cert) WriterNum {
	w.mu.RLock()
	n, ok := w.num[key]
	known := ok && (n == OwnerWriter || w.list[n].Cert != nil || cert == nil)
	w.mu.RUnlock()
	if known {
		return n
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if n, ok := w.num[key]; ok {
		if n != OwnerWriter && w.list[n].Cert == nil {
			w.list[n].Cert = cert
		}
		return n
	}
	if len(w.list) >= int(NoWriter) {
		return NoWriter
	}
	n = WriterNum(len(w.list))
	w.list = append(w.list, KnownWriter{Key: key, Cert: cert})
	w.num[key] = n
	return n
}

// Get returns writer n.
func (w *Writers) Get(n WriterNum) (KnownWriter, bool) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if int(n) >= len(w.list) {
		return KnownWriter{}, false
	}
	return w.list[n], true
}

// Name is how writer n is shown.
func (w *Writers) Name(n WriterNum) string {
	if wr, ok := w.Get(n); ok {
		return wr.Name()
	}
	return "nobody (unsigned)"
}

// Revoke marks the writer with this key as revoked at t. The owner cannot
// be revoked.
func (w *Writers) Revoke(key [32]byte, t time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n, ok := w.num[key]
	if !ok {
		n = WriterNum(len(w.list))
		if n == NoWriter {
			return
		}
		w.list = append(w.list, KnownWriter{Key: key})
		w.num[key] = n
	}
	if n == OwnerWriter {
		return
	}
	if wr := &w.list[n]; wr.RevokedAt.IsZero() || t.Before(wr.RevokedAt) {
		wr.RevokedAt = t
	}
}

// Revoked reports whether writer n was revoked.
func (w *Writers) Revoked(n WriterNum) bool {
	wr, ok := w.Get(n)
	return ok && !wr.RevokedAt.IsZero()
}

// snapshot returns the writers in number order.
func (w *Writers) snapshot() []KnownWriter {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return slices.Clone(w.list)
}
