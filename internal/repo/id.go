package repo

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// ID names a chunk (keyed hash of its plaintext) or a stored object (SHA-256
// of its stored bytes).
type ID [32]byte

// ZeroID marks an all-zero chunk in a chunk list. A keyed hash that comes out
// all zero is not a possibility worth planning for (2^-256).
var ZeroID ID

// String returns the ID in hex.
func (id ID) String() string { return hex.EncodeToString(id[:]) }

// Short returns the first 8 hex digits, as shown to users.
func (id ID) Short() string { return hex.EncodeToString(id[:4]) }

// IsZero reports whether id is ZeroID.
func (id ID) IsZero() bool { return id == ZeroID }

// ParseID parses a full 64-digit hex ID.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 64 {
		return id, fmt.Errorf("invalid ID %q: want 64 hex digits", s)
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("invalid ID %q: %w", s, err)
	}
	return id, nil
}

// Hash returns the SHA-256 of data, which names stored objects.
func Hash(data []byte) ID { return sha256.Sum256(data) }

// MarshalText implements encoding.TextMarshaler.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *ID) UnmarshalText(b []byte) error {
	v, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}
