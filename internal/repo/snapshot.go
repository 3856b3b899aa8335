package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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
	// Quiesce says how applications were held still around the instant
	// of the copies; nil when nothing was asked of them.
	Quiesce *Quiescing `json:"quiesce,omitempty"`
	// CopiedFrom says which snapshot of which repository 'sauve copy'
	// made this one from; nil for a snapshot a backup wrote.
	CopiedFrom *CopiedFrom `json:"copied_from,omitempty"`
	// Machine is what the backed-up machine was (CPUs, memory, firmware,
	// controllers, network cards); nil when unknown (image files).
	Machine *Machine `json:"machine,omitempty"`

	// Filled in when loaded, not stored in the manifest.
	ID ID `json:"-"`
	// Signer is how the signer is shown ("owner", or the writer's name);
	// SignerKey its signing key, Writer its number in the index's table.
	Signer    string    `json:"-"`
	SignerKey [32]byte  `json:"-"`
	Writer    WriterNum `json:"-"`
	// Marks say why the snapshot is not to be trusted as the latest of its
	// host: a host outside its writer's certificate, a time in the future,
	// a revoked writer, data lost for good. Empty for a sound snapshot.
	Marks []string `json:"-"`
}

// Quiescing is what holding the applications still achieved: with every
// writer frozen for the whole window the snapshot is application-
// consistent, otherwise crash-consistent (what a power cut leaves).
type Quiescing struct {
	Consistency string `json:"consistency"` // "application" or "crash"
	// Reason says why a snapshot is crash-consistent.
	Reason        string            `json:"reason,omitempty"`
	Writers       []QuiescingWriter `json:"writers,omitempty"`
	WindowSeconds float64           `json:"window_seconds,omitempty"`
}

// CopiedFrom names the snapshot a copy was made from: its repository's
// ID and its manifest's ID there. A copy of a copy names the snapshot it
// was read from, not the first one.
type CopiedFrom struct {
	Repository string `json:"repository"`
	Snapshot   ID     `json:"snapshot"`
}

// QuiescingWriter is what one writer (hooks, a database, an agent) did.
type QuiescingWriter struct {
	Name    string  `json:"name"`
	Frozen  bool    `json:"frozen"`
	Seconds float64 `json:"seconds"`
	Detail  string  `json:"detail,omitempty"`
	Error   string  `json:"error,omitempty"`
}

// MaxClockSkew is how far in the future a snapshot may be dated before it
// is marked: a writer's clock may run a little fast, but a manifest dated
// next year must not stay "latest" forever.
const MaxClockSkew = time.Hour

// maxDiskSize bounds a disk in a manifest (64 PiB): no count derived from
// a manifest may be larger than what such a disk implies.
const maxDiskSize = 1 << 56

// maxDisks bounds the disks of one snapshot.
const maxDisks = 1024

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
	// writer is the snapshot's signer, whose copies of blobs are read
	// first (not stored).
	writer WriterNum
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
	// PointInTime names the point-in-time copy the disk was read from
	// ("reflink"); empty when it was read as it was, while others may
	// have written to it.
	PointInTime string `json:"point_in_time,omitempty"`
	// ChangeTracker names what records the writes made to the source
	// after this disk was read (a QEMU dirty bitmap, "qemu-bitmap:NAME"),
	// so that the next backup reads only those and takes the rest from
	// this disk.
	ChangeTracker string `json:"change_tracker,omitempty"`
	// InUse says that the disk was read as it was while in use, with no
	// point-in-time copy, and why ("/dev/loop0 is mounted read-write at
	// /mnt"): its contents may be torn between old and new writes.
	InUse string `json:"in_use,omitempty"`
	// Base is the ID of the snapshot whose disk of the same source this
	// one took its unchanged chunks from, when a change tracker said
	// which chunks changed; nil for a full read.
	Base *ID `json:"base,omitempty"`
}

// Chunks returns the number of chunks of the disk.
func (d *Disk) Chunks() int64 {
	return (d.Size + int64(d.ChunkSize) - 1) / int64(d.ChunkSize)
}

// DiskStats records what the backup of a disk did.
type DiskStats struct {
	BytesRead     int64 `json:"bytes_read"`
	BytesNew      int64 `json:"bytes_new"`
	BytesNewCoded int64 `json:"bytes_new_compressed"`
	BytesStored   int64 `json:"bytes_stored"`
	ChunksNew     int64 `json:"chunks_new"`
	ChunksReused  int64 `json:"chunks_reused"`
	ChunksZero    int64 `json:"chunks_zero"`
	// ChunksUnchanged counts the chunks taken from the base snapshot's
	// disk without reading them (a change tracker said they had not
	// changed); BytesUnchanged their bytes.
	ChunksUnchanged int64   `json:"chunks_unchanged,omitempty"`
	BytesUnchanged  int64   `json:"bytes_unchanged,omitempty"`
	Seconds         float64 `json:"seconds"`
}

// Add sums the counts of b into s (not Seconds: disks read at once do
// not add up their times).
func (s *DiskStats) Add(b DiskStats) {
	s.BytesRead += b.BytesRead
	s.BytesNew += b.BytesNew
	s.BytesNewCoded += b.BytesNewCoded
	s.BytesStored += b.BytesStored
	s.ChunksNew += b.ChunksNew
	s.ChunksReused += b.ChunksReused
	s.ChunksZero += b.ChunksZero
	s.ChunksUnchanged += b.ChunksUnchanged
	s.BytesUnchanged += b.BytesUnchanged
}

// envelope is what is sealed into a snapshot object: the manifest's exact
// bytes and the signature over them.
type envelope struct {
	Manifest  json.RawMessage  `json:"manifest"`
	Signature crypto.Signature `json:"signature"`
}

var snapshotAD = []byte("sauve snapshot v1")

// saveSnapshot signs, seals and stores a manifest and returns its ID. It is
// the last write of a backup, made by Writer.SaveSnapshot once the blobs it
// names are flushed and the session is known to be live.
func (r *Repository) saveSnapshot(ctx context.Context, sn *Snapshot) (ID, error) {
	if r.ReadOnly() {
		return ID{}, r.errReadOnly()
	}
	for _, d := range sn.Disks {
		for _, id := range d.ChunkLists {
			if _, ok := r.idx.Reusable(MetaBlob, id, r.self); !ok {
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
	sn.Signer, sn.SignerKey, sn.Writer = r.keys.Sign(nil).SignerName(), r.keys.SignerPublic(), r.self
	for i := range sn.Disks {
		sn.Disks[i].writer = r.self
	}
	return id, nil
}

// ErrTampered marks a manifest that fails decryption or signature checks.
var ErrTampered = errors.New("snapshot manifest failed verification")

// decodeSnapshot opens, verifies and parses a stored manifest, numbering
// its signer in writers.
func (r *Repository) decodeSnapshot(writers *Writers, id ID, data []byte) (*Snapshot, error) {
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
	sn.SignerKey = [32]byte(env.Signature.Signer)
	sn.Writer = writers.Number(sn.SignerKey, env.Signature.Cert)
	for i := range sn.Disks {
		sn.Disks[i].writer = sn.Writer
	}
	if c := env.Signature.Cert; c != nil && !c.Allows(sn.Host) {
		sn.Marks = append(sn.Marks, fmt.Sprintf("names host %q, outside what writer %s may back up (%s)", sn.Host, sn.Signer, strings.Join(c.Scope(), ", ")))
	}
	return sn, nil
}

// mark adds the marks that depend on the time and the ledger.
func mark(sn *Snapshot, v snapView, now time.Time) {
	led := v.led
	if sn.Time.After(now.Add(MaxClockSkew)) {
		sn.Marks = append(sn.Marks, fmt.Sprintf("dated %s, in the future", sn.Time.Format(time.RFC3339)))
	}
	if v.writers.Revoked(sn.Writer) {
		sn.Marks = append(sn.Marks, fmt.Sprintf("signed by writer %s, which the owner revoked", sn.Signer))
	}
	for _, dmg := range led.SnapshotDamage[sn.ID] {
		var n int64
		for _, r := range dmg.Ranges {
			n += r.Length
		}
		sn.Marks = append(sn.Marks, fmt.Sprintf("damaged: %d bytes in %d ranges of disk %s are lost for good (recorded by 'sauve repair snapshots')", n, len(dmg.Ranges), dmg.Disk))
	}
}

// parseManifest decodes and sanity-checks manifest JSON.
func parseManifest(b []byte) (*Snapshot, error) {
	var sn Snapshot
	if err := json.Unmarshal(b, &sn); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if len(sn.Disks) == 0 || len(sn.Disks) > maxDisks {
		return nil, fmt.Errorf("manifest: %d disks", len(sn.Disks))
	}
	for i, d := range sn.Disks {
		if d.Size < 0 || d.Size > maxDiskSize || d.ChunkSize < MinChunkSize || d.ChunkSize > MaxChunkSize ||
			d.ChunkSize&(d.ChunkSize-1) != 0 || d.ListEntries <= 0 || d.ListEntries > ListEntries {
			return nil, fmt.Errorf("manifest: disk %d has bad geometry (size %d, chunk %d, list %d)", i, d.Size, d.ChunkSize, d.ListEntries)
		}
		want := (d.Chunks() + int64(d.ListEntries) - 1) / int64(d.ListEntries)
		if int64(len(d.ChunkLists)) != want {
			return nil, fmt.Errorf("manifest: disk %d has %d chunk lists, needs %d", i, len(d.ChunkLists), want)
		}
	}
	if q := sn.Quiesce; q != nil {
		if q.Consistency != "application" && q.Consistency != "crash" || len(q.Writers) > maxQuiescingWriters {
			return nil, fmt.Errorf("manifest: quiescing %q with %d writers", q.Consistency, len(q.Writers))
		}
	}
	return &sn, nil
}

// maxQuiescingWriters bounds the writers a manifest may list.
const maxQuiescingWriters = 64

// snapView is what snapshots are read against: the cache of their
// objects (nil: none), the table their signers are numbered in, and the
// ledger that marks them. The repository has its own; check makes one
// of its own, so that it leaves the repository's alone.
type snapView struct {
	cache   *Cache
	writers *Writers
	led     *Ledger
}

// LoadSnapshot loads and verifies one snapshot.
func (r *Repository) LoadSnapshot(ctx context.Context, id ID) (*Snapshot, error) {
	return r.loadSnapshot(ctx, snapView{cache: r.cache, writers: r.writers}, id)
}

func (r *Repository) loadSnapshot(ctx context.Context, v snapView, id ID) (*Snapshot, error) {
	cache := v.cache
	data, ok := cache.Get(cacheSnapshots, id.String())
	if !ok || Hash(data) != id {
		var err error
		data, err = backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.SnapshotFile, Name: id.String()})
		if err != nil {
			return nil, fmt.Errorf("load snapshot %s: %w", id.Short(), err)
		}
		if Hash(data) == id {
			cache.Put(cacheSnapshots, id.String(), data)
		}
	}
	return r.decodeSnapshot(v.writers, id, data)
}

// Snapshots loads every snapshot, oldest first, and marks those not to be
// trusted as the latest of their host (see Snapshot.Marks). Snapshots the
// ledger records forgotten are left out, stored or not. A snapshot
// that fails verification is reported through bad (and left out) when bad
// is not nil, and fails the call otherwise. A snapshot this machine saw
// before (it is in the cache) that is no longer stored is reported through
// the Warn option, unless the owner's ledger records that it was removed.
func (r *Repository) Snapshots(ctx context.Context, bad func(id string, err error)) ([]*Snapshot, error) {
	names, err := r.listSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	led, err := r.Ledger(ctx)
	if err != nil {
		return nil, err
	}
	return r.snapshots(ctx, snapView{cache: r.cache, writers: r.writers, led: led}, names, bad)
}

// listSnapshots returns the names of the stored manifests.
func (r *Repository) listSnapshots(ctx context.Context) ([]string, error) {
	var names []string
	if err := r.be.List(ctx, backend.SnapshotFile, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	return names, nil
}

// snapshots is Snapshots of the listed names in view v.
func (r *Repository) snapshots(ctx context.Context, v snapView, names []string, bad func(id string, err error)) ([]*Snapshot, error) {
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
			if v.led != nil && v.led.Forgotten[id] {
				// The owner forgot it: a forget interrupted before its
				// removal (or one that could not remove it) left the
				// manifest, which RemoveForgotten deletes.
				return nil
			}
			sn, err := r.loadSnapshot(gctx, v, id)
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
	r.reportVanished(v, listed)
	now := time.Now()
	for _, sn := range out {
		mark(sn, v, now)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Time.Equal(out[j].Time) {
			return out[i].Time.Before(out[j].Time)
		}
		return out[i].ID.String() < out[j].ID.String()
	})
	return out, nil
}

// reportVanished warns about cached snapshots that are no longer listed
// and drops them from the cache.
func (r *Repository) reportVanished(v snapView, listed map[string]bool) {
	cache, led := v.cache, v.led
	for _, name := range cache.List(cacheSnapshots) {
		if listed[name] {
			continue
		}
		id, err := ParseID(name)
		if err == nil && !led.Forgotten[id] {
			what := "snapshot " + id.Short()
			if data, ok := cache.Get(cacheSnapshots, name); ok {
				if sn, err := r.decodeSnapshot(v.writers, id, data); err == nil {
					what = fmt.Sprintf("snapshot %s (host %s, %s)", id.Short(), sn.Host, sn.Time.Local().Format("2006-01-02 15:04:05"))
				}
			}
			r.opts.Warn("%s is no longer in the repository: it was deleted or lost since this machine last saw it", what)
		}
		cache.Remove(cacheSnapshots, name)
	}
}

// Filter selects snapshots.
type Filter struct {
	Host string
	Tags []string // all must be present
	// Path is a disk's source path or name.
	Path string
	// Before, when set, selects snapshots dated strictly before it;
	// After, when set, those dated at or after it.
	Before, After time.Time
}

// Match reports whether sn passes the filter.
func (f Filter) Match(sn *Snapshot) bool {
	if f.Host != "" && sn.Host != f.Host {
		return false
	}
	for _, t := range f.Tags {
		if !slices.Contains(sn.Tags, t) {
			return false
		}
	}
	if !f.Before.IsZero() && !sn.Time.Before(f.Before) {
		return false
	}
	if !f.After.IsZero() && sn.Time.Before(f.After) {
		return false
	}
	if f.Path != "" {
		found := false
		for _, d := range sn.Disks {
			if d.Source == f.Path || d.Name == f.Path {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Sources is what a snapshot is of: its host and its disks' sources.
func (sn *Snapshot) Sources() string {
	var src []string
	for _, d := range sn.Disks {
		src = append(src, d.Source)
	}
	return sn.Host + " " + strings.Join(src, ",")
}

// FindSnapshot resolves "latest" or an ID prefix among snapshots that pass
// f. "latest" is the newest snapshot without marks, and only when the
// snapshots that match are all of one host and source: a restore that
// names no host must not write another machine's disk. An ID prefix may
// name a marked snapshot (the caller says so).
func FindSnapshot(all []*Snapshot, spec string, f Filter) (*Snapshot, error) {
	var match []*Snapshot
	for _, sn := range all {
		if f.Match(sn) {
			match = append(match, sn)
		}
	}
	if spec == "latest" {
		return findLatest(match)
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

func findLatest(match []*Snapshot) (*Snapshot, error) {
	var sound []*Snapshot
	marked := 0
	for _, sn := range match {
		if len(sn.Marks) == 0 {
			sound = append(sound, sn)
		} else {
			marked++
		}
	}
	if len(sound) == 0 {
		if marked > 0 {
			return nil, fmt.Errorf("no snapshot matches but %d marked ones ('sauve snapshots' says why): name one by its ID to use it anyway", marked)
		}
		return nil, errors.New("no snapshot matches (host/tag filters?)")
	}
	latest := map[string]*Snapshot{}
	var order []string
	for _, sn := range sound {
		k := sn.Sources()
		if _, ok := latest[k]; !ok {
			order = append(order, k)
		}
		latest[k] = sn
	}
	if len(order) == 1 {
		return sound[len(sound)-1], nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "'latest' is ambiguous: the snapshots that match are of %d different hosts or disks:", len(order))
	for _, k := range order {
		sn := latest[k]
		src := ""
		if len(sn.Disks) > 0 {
			src = sn.Disks[0].Source
		}
		fmt.Fprintf(&b, "\n  --host %s --source %s   (latest: %s of %s)", sn.Host, src, sn.ID.Short(), sn.Time.Local().Format("2006-01-02 15:04"))
	}
	b.WriteString("\nadd --host and --source to choose one")
	return nil, errors.New(b.String())
}

func jsonIndent(v any) ([]byte, error) { return json.MarshalIndent(v, "", "  ") }
