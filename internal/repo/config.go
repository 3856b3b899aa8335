package repo

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
)

// FormatVersion is the repository format this code writes. It reads
// every version from 1 on: version 1 (unsigned index objects and pack
// trailers) only for reading.
const FormatVersion = 2

// Defaults for new repositories (see docs/BENCHMARKS.md for how they were
// chosen).
const (
	DefaultChunkSize = 256 << 10
	DefaultPackSize  = 32 << 20
	MinChunkSize     = 4 << 10
	MaxChunkSize     = 8 << 20
)

// Config is the repository's one mutable-never, plaintext object. It holds
// nothing secret, so a command can read the repository ID before it has
// found the key; its MAC (metadata key) is checked once the key is loaded.
type Config struct {
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	ChunkSize   int       `json:"chunk_size"`
	PackSize    int       `json:"pack_size"`
	ChunkHash   string    `json:"chunk_hash"`
	Compression string    `json:"compression"`
	Created     time.Time `json:"created"`
	MAC         []byte    `json:"mac,omitempty"`
}

// NewConfig returns the config of a new repository with a random ID.
func NewConfig(chunkSize, packSize int) (Config, error) {
	if chunkSize == 0 {
		chunkSize = DefaultChunkSize
	}
	if packSize == 0 {
		packSize = DefaultPackSize
	}
	if chunkSize < MinChunkSize || chunkSize > MaxChunkSize || chunkSize&(chunkSize-1) != 0 {
		return Config{}, fmt.Errorf("chunk size %d: must be a power of two between %d KiB and %d MiB", chunkSize, MinChunkSize>>10, MaxChunkSize>>20)
	}
	if packSize < chunkSize || packSize > 1<<30 {
		return Config{}, fmt.Errorf("pack size %d: must be between the chunk size and 1 GiB", packSize)
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return Config{}, err
	}
	return Config{
		Version: FormatVersion, ID: hex.EncodeToString(id[:]), ChunkSize: chunkSize, PackSize: packSize,
		ChunkHash: "blake3-keyed", Compression: "zstd", Created: time.Now().UTC().Truncate(time.Second),
	}, nil
}

func (c Config) mac(metaKey []byte) []byte {
	c.MAC = nil
	b, _ := json.Marshal(c)
	m := hmac.New(sha256.New, metaKey)
	m.Write([]byte("sauve config v1\x00"))
	m.Write(b)
	return m.Sum(nil)
}

// ErrNoRepository is returned when the location holds no repository.
var ErrNoRepository = errors.New("no sauve repository here (run 'sauve init' first)")

// ParseConfig decodes a config object and checks its version and fields.
func ParseConfig(data []byte) (Config, error) {
	var probe struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return Config{}, fmt.Errorf("repository config is not valid JSON: %w", err)
	}
	if probe.Version < 1 || probe.Version > FormatVersion {
		return Config{}, fmt.Errorf("repository format version %d is not supported by this sauve (it reads versions 1 to %d)", probe.Version, FormatVersion)
	}
	var c Config
	if err := json.Unmarshal(data, &c); err != nil {
		return Config{}, fmt.Errorf("repository config: %w", err)
	}
	if err := ValidRepoID(c.ID); err != nil {
		return Config{}, fmt.Errorf("repository config: %w", err)
	}
	if c.ChunkSize < MinChunkSize || c.ChunkSize > MaxChunkSize || c.ChunkSize&(c.ChunkSize-1) != 0 {
		return Config{}, fmt.Errorf("repository config: bad chunk size %d", c.ChunkSize)
	}
	if c.PackSize < c.ChunkSize || c.PackSize > 1<<30 {
		return Config{}, fmt.Errorf("repository config: bad pack size %d", c.PackSize)
	}
	if c.ChunkHash != "blake3-keyed" || c.Compression != "zstd" {
		return Config{}, fmt.Errorf("repository config: unsupported chunk hash %q or compression %q", c.ChunkHash, c.Compression)
	}
	return c, nil
}

// ReadConfig loads and parses the config object; it does not authenticate it.
func ReadConfig(ctx context.Context, be backend.Backend) (Config, error) {
	data, err := backend.ReadAll(ctx, be, backend.Handle{Type: backend.ConfigFile})
	if err != nil {
		if errors.Is(err, backend.ErrNotExist) {
			return Config{}, fmt.Errorf("%s: %w", be.Location(), ErrNoRepository)
		}
		return Config{}, fmt.Errorf("read repository config: %w", err)
	}
	return ParseConfig(data)
}

// ValidRepoID checks a repository ID: 32 lowercase hex digits. The ID
// names the key file and the cache folder, so it is checked before either
// is touched: a config planted with "../../tmp/x" as its ID must not make
// sauve load another key or write elsewhere.
func ValidRepoID(id string) error {
	if len(id) != 32 {
		return fmt.Errorf("repository ID %q is not 32 hex digits", id)
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("repository ID %q is not 32 hex digits", id)
		}
	}
	return nil
}

// NamespaceConfig returns the config of an isolated namespace of the
// repository whose config is parent: the same geometry, its own ID.
func NamespaceConfig(parent Config, id string) Config {
	c := parent
	c.ID, c.MAC = id, nil
	c.Version = FormatVersion
	c.Created = time.Now().UTC().Truncate(time.Second)
	return c
}
