package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// Snapshot is a manifest: one point in time of one or more disks.
type Snapshot struct {
	Time    time.Time `json:"time"`
	Host    string    `json:"host"`
	Tags    []string  `json:"tags,omitempty"`
	Parent  *ID       `json:"parent,omitempty"`
	Program string    `json:"program"`
	Disks   []Disk    `json:"disks"`

	// Filled in when loaded, not stored in the manifest.
	ID     ID     `json:"-"`
	Signer string `json:"-"`
}

// Disk is one disk of a snapshot.
type Disk struct {
	Name      string `json:"name"`
	Source    string `json:"source"`
	Kind      string `json:"kind"` // file, device, stdin
	Size      int64  `json:"size"`
	ChunkSize int    `json:"chunk_size"`
	// ChunkLists are the IDs of the meta blobs that hold the disk's chunk
	// IDs in order, ListEntries per blob (the last may hold fewer).
	ChunkLists  []ID      `json:"chunk_lists"`
	ListEntries int       `json:"list_entries"`
	Stats       DiskStats `json:"stats"`
	// PartitionTable is "mbr", "gpt" or empty (none); DiskID is the MBR
	// signature or GPT disk GUID; SectorSize the sector size its LBAs
	// count in. Partitions are in table order, logical ones last.
	PartitionTable string      `json:"partition_table,omitempty"`
	DiskID         string      `json:"disk_id,omitempty"`
	SectorSize     int         `json:"sector_size,omitempty"`
	Partitions     []Partition `json:"partitions,omitempty"`
	// BytesOutside counts bytes read outside every partition (boot
	// code, gaps, partition tables, the disk's tail).
	BytesOutside int64 `json:"bytes_outside_partitions,omitempty"`
}

// Chunks returns the number of chunks of the disk.
func (d *Disk) Chunks() int64 {
	return (d.Size + int64(d.ChunkSize) - 1) / int64(d.ChunkSize)
}

// DiskStats records what the backup of a disk did.
type DiskStats struct {
	BytesRead     int64   `json:"bytes_read"`
	BytesNew      int64   `json:"bytes_new"`
	BytesNewCoded int64   `json:"bytes_new_compressed"`
	BytesStored   int64   `json:"bytes_stored"`
	ChunksNew     int64   `json:"chunks_new"`
	ChunksReused  int64   `json:"chunks_reused"`
	ChunksZero    int64   `json:"chunks_zero"`
	Seconds       float64 `json:"seconds"`
}

// envelope is what is sealed into a snapshot object: the manifest's exact
// bytes and the signature over them.
type envelope struct {
	Manifest  json.RawMessage  `json:"manifest"`
	Signature crypto.Signature `json:"signature"`
}

var snapshotAD = []byte("sauve snapshot v1")

// SaveSnapshot signs, seals and stores a manifest and returns its ID. It is
// the last write of a backup: blobs it names must be flushed first.
func (r *Repository) SaveSnapshot(ctx context.Context, sn *Snapshot) (ID, error) {
	for _, d := range sn.Disks {
		for _, id := range d.ChunkLists {
			if !r.idx.Has(MetaBlob, id) {
				return ID{}, fmt.Errorf("snapshot would refer to chunk list %s that is not stored", id.Short())
			}
		}
	}
	m, err := json.Marshal(sn)
	if err != nil {
		return ID{}, err
	}
	env, err := json.Marshal(envelope{Manifest: m, Signature: r.keys.Sign(m)})
	if err != nil {
		return ID{}, err
	}
	data := r.meta.Seal(nil, env, snapshotAD)
	id := Hash(data)
	h := backend.Handle{Type: backend.SnapshotFile, Name: id.String()}
	if err := r.be.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		return ID{}, fmt.Errorf("save snapshot: %w", err)
	}
	r.cache.Put(cacheSnapshots, id.String(), data)
	sn.ID = id
	sn.Signer = r.keys.Sign(nil).SignerName()
	return id, nil
}

// ErrTampered marks a manifest that fails decryption or signature checks.
var ErrTampered = errors.New("snapshot manifest failed verification")

// decodeSnapshot opens, verifies and parses a stored manifest.
func (r *Repository) decodeSnapshot(id ID, data []byte) (*Snapshot, error) {
	if Hash(data) != id {
		return nil, fmt.Errorf("snapshot %s: %w: content does not match its name", id.Short(), ErrTampered)
	}
	plain, err := r.meta.Open(nil, data, snapshotAD)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w: %v", id.Short(), ErrTampered, err)
	}
	var env envelope
	if err := json.Unmarshal(plain, &env); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w: %v", id.Short(), ErrTampered, err)
	}
	if err := r.keys.Verify(env.Manifest, env.Signature); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w: %v", id.Short(), ErrTampered, err)
	}
	sn, err := parseManifest(env.Manifest)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", id.Short(), err)
	}
	sn.ID = id
	sn.Signer = env.Signature.SignerName()
	return sn, nil
}

// parseManifest decodes and sanity-checks manifest JSON.
func parseManifest(b []byte) (*Snapshot, error) {
	var sn Snapshot
	if err := json.Unmarshal(b, &sn); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	for i, d := range sn.Disks {
		if d.Size < 0 || d.ChunkSize < MinChunkSize || d.ChunkSize > MaxChunkSize || d.ListEntries <= 0 {
			return nil, fmt.Errorf("manifest: disk %d has bad geometry (size %d, chunk %d, list %d)", i, d.Size, d.ChunkSize, d.ListEntries)
		}
		want := (d.Chunks() + int64(d.ListEntries) - 1) / int64(d.ListEntries)
		if int64(len(d.ChunkLists)) != want {
			return nil, fmt.Errorf("manifest: disk %d has %d chunk lists, needs %d", i, len(d.ChunkLists), want)
		}
	}
	return &sn, nil
}

// LoadSnapshot loads and verifies one snapshot.
func (r *Repository) LoadSnapshot(ctx context.Context, id ID) (*Snapshot, error) {
	data, ok := r.cache.Get(cacheSnapshots, id.String())
	if !ok || Hash(data) != id {
		var err error
		data, err = backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.SnapshotFile, Name: id.String()})
		if err != nil {
			return nil, fmt.Errorf("load snapshot %s: %w", id.Short(), err)
		}
		if Hash(data) == id {
			r.cache.Put(cacheSnapshots, id.String(), data)
		}
	}
	return r.decodeSnapshot(id, data)
}

// Snapshots loads every snapshot, oldest first. A snapshot that fails
// verification is reported through bad (and left out) when bad is not
// nil, and fails the call otherwise.
func (r *Repository) Snapshots(ctx context.Context, bad func(id string, err error)) ([]*Snapshot, error) {
	var names []string
	if err := r.be.List(ctx, backend.SnapshotFile, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	var (
		mu  sync.Mutex
		out []*Snapshot
	)
	listed := map[string]bool{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, name := range names {
		listed[name] = true
		g.Go(func() error {
			id, err := ParseID(name)
			if err != nil {
				return nil
			}
			sn, err := r.LoadSnapshot(gctx, id)
			if err != nil {
				if bad != nil && !errors.Is(err, context.Canceled) {
					bad(name, err)
					return nil
				}
				return err
			}
			mu.Lock()
			out = append(out, sn)
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, name := range r.cache.List(cacheSnapshots) {
		if !listed[name] {
			r.cache.Remove(cacheSnapshots, name)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Time.Equal(out[j].Time) {
			return out[i].Time.Before(out[j].Time)
		}
		return out[i].ID.String() < out[j].ID.String()
	})
	return out, nil
}

// Filter selects snapshots.
type Filter struct {
	Host string
	Tags []string // all must be present
	Path string
}

// Match reports whether sn passes the filter.
func (f Filter) Match(sn *Snapshot) bool {
	if f.Host != "" && sn.Host != f.Host {
		return false
	}
	for _, t := range f.Tags {
		found := false
		for _, st := range sn.Tags {
			if st == t {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	if f.Path != "" {
		found := false
		for _, d := range sn.Disks {
			if d.Source == f.Path {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// FindSnapshot resolves "latest" or an ID prefix among snapshots that pass f.
func FindSnapshot(all []*Snapshot, spec string, f Filter) (*Snapshot, error) {
	var match []*Snapshot
	for _, sn := range all {
		if f.Match(sn) {
			match = append(match, sn)
		}
	}
	if spec == "latest" {
		if len(match) == 0 {
			return nil, errors.New("no snapshot matches (host/tag filters?)")
		}
		return match[len(match)-1], nil
	}
	spec = strings.ToLower(spec)
	if len(spec) < 4 {
		return nil, fmt.Errorf("snapshot ID %q is too short: give at least 4 hex digits or 'latest'", spec)
	}
	var found []*Snapshot
	for _, sn := range match {
		if strings.HasPrefix(sn.ID.String(), spec) {
			found = append(found, sn)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no snapshot %q", spec)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("snapshot ID %q is ambiguous (%d snapshots match): give more digits", spec, len(found))
}

func jsonIndent(v any) ([]byte, error) { return json.MarshalIndent(v, "", "  ") }
