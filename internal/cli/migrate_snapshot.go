package cli

// A migration's source may be a disk of a repository snapshot ('latest'
// or an ID prefix, with restore's filters): a migration seeded from last
// night's backup puts no load on the production machine, and is
// finished by live passes from the device (same state), the last one
// with --final.
//
// A pass from a snapshot reads every chunk (no free-space map: the
// repository stores a free chunk and a zero one alike, as the zero ID,
// and a used zero chunk taken for free would leave stale bytes on the
// target); zero chunks read as zeros without a fetch. After a pass from
// another snapshot, only the chunks whose IDs differ between the two
// are read.
//
// Why a failed or killed pass leaves the next one exact: the state
// records the snapshot of the last completed pass (Header.Snapshot) only
// with that pass's hashes, once its writes are durable, and every pass
// from a snapshot records its snapshot in Header.Begun before it writes
// anything. A chunk the state knows holds, on the target, the chunk of
// one of these snapshots; the next pass reads every chunk whose ID
// differs between its snapshot and any of them, and every chunk the
// state does not know. A pass from a device or file clears both before
// it writes: the next snapshot pass reads in full.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/source"
)

// migrateSnapshotFlags select a snapshot as the SOURCE of a migration.
type migrateSnapshotFlags struct {
	ff   filterFlags
	disk string
	is   bool // SOURCE is a snapshot (set by check)
}

func (f *migrateSnapshotFlags) add(cmd *cobra.Command) {
	f.ff.add(cmd)
	f.ff.addDates(cmd)
	cmd.Flags().StringVar(&f.disk, "disk", "", "with a snapshot SOURCE: the disk of the snapshot to migrate (needed when it holds several)")
}

// snapshotFlags are the flags that select a snapshot.
var snapshotFlags = []string{"host", "tag", "source", "before", "after", "disk"}

// liveOnlyFlags are the flags of the final pass and of VM drives, which
// a snapshot SOURCE has no use for.
var liveOnlyFlags = []string{"stop-source", "drive", "pre-freeze", "post-thaw", "writer", "quiesce", "hooks-file",
	"hook-failure", "freeze-timeout", "grow-last-partition", "grow-fs", "guest-freeze", "guest-agent", "fleece-dir", "nbd-server", "no-bitmaps"}

// isSnapshotSpec says whether SOURCE names a snapshot: 'latest' or a hex
// ID prefix that is not an existing path.
func isSnapshotSpec(arg string) bool {
	if _, err := os.Lstat(arg); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	if arg == "latest" {
		return true
	}
	if len(arg) < 4 || len(arg) > 64 {
		return false
	}
	for _, c := range strings.ToLower(arg) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// check says whether SOURCE is a snapshot, and refuses the flags that
// mean nothing with the source it is, before anything is opened.
func (f *migrateSnapshotFlags) check(cmd *cobra.Command, srcPath string) error {
	fl := cmd.Flags()
	if f.is = isSnapshotSpec(srcPath); !f.is {
		for _, name := range snapshotFlags {
			if fl.Changed(name) {
				return usageError{fmt.Errorf("--%s selects a repository snapshot as SOURCE ('latest' or a snapshot ID); %s is not one", name, srcPath)}
			}
		}
		return nil
	}
	if fl.Changed("final") {
		return usageError{fmt.Errorf("--final with a snapshot SOURCE: a snapshot is one instant already, there is nothing to freeze; run the final pass from the live SOURCE onto the same TARGET, with the same state: sauve migrate DEVICE TARGET --final")}
	}
	for _, name := range liveOnlyFlags {
		if fl.Changed(name) {
			return usageError{fmt.Errorf("--%s applies to a live SOURCE (the final pass, or a running VM's drive), not to the snapshot %s", name, srcPath)}
		}
	}
	return nil
}

// snapshotSource is a disk of a repository snapshot, a migration's
// source.
type snapshotSource struct {
	g  *globals
	r  *repo.Repository
	sn *repo.Snapshot
	d  *repo.Disk
	dr *repo.DiskReader // the pass's
	// warn says what the reader met, once.
	warn func(format string, args ...any)
	// listed are the repository's snapshots, loaded once the previous
	// pass's snapshot is looked for.
	listed []*repo.Snapshot

	// The pass under way: why it reads every chunk ("" when it reads
	// what changed, or for a first pass), and the snapshot it compared
	// with.
	fullRead string
	prev     string
}

// maxBegun bounds the failed passes whose snapshots the state keeps; a
// pass after more reads in full.
const maxBegun = 8

// openSnapshotSource finds the snapshot and its disk, as restore does,
// and returns the disk's identity.
func (g *globals) openSnapshotSource(ctx context.Context, m *migration, spec string) (migrate.Identity, error) {
	f := &m.o.snap
	r, sn, disks, err := g.openDisks(ctx, "migrate", spec, &f.ff, f.disk)
	if err != nil {
		return migrate.Identity{}, err
	}
	if len(disks) != 1 {
		return migrate.Identity{}, usageError{fmt.Errorf("snapshot %s holds %d disks (%s): choose the one to migrate with --disk", sn.ID.Short(), len(disks), diskNames(disks))}
	}
	d := disks[0]
	if d.Size <= 0 {
		return migrate.Identity{}, fmt.Errorf("disk %s of snapshot %s holds no byte: nothing to migrate", d.Name, sn.ID.Short())
	}
	// A damaged copy is said once, however often reads and read-ahead
	// meet it.
	var mu sync.Mutex
	warned := map[string]bool{}
	warn := func(format string, args ...any) {
		w := fmt.Sprintf(format, args...)
		mu.Lock()
		defer mu.Unlock()
		if !warned[w] {
			warned[w] = true
			g.warn(w)
		}
	}
	ss := &snapshotSource{g: g, r: r, sn: sn, d: d, warn: warn}
	if err := ss.newReader(ctx, nil); err != nil { // checks the disk's geometry
		return migrate.Identity{}, err
	}
	m.snap = ss
	name := "snapshot " + sn.ID.Short()
	if len(sn.Disks) > 1 {
		name += " disk " + d.Name
	}
	m.src = &source.Source{Path: name, Kind: source.Kind("snapshot"), Size: d.Size}
	m.disk = &source.Disk{Size: d.Size}
	return ss.identity(), nil
}

// identity is the disk's: its size and layout, no device or inode.
func (ss *snapshotSource) identity() migrate.Identity {
	id := migrate.Identity{Path: ss.sn.Host + ":" + ss.d.Source, Size: ss.d.Size, DiskID: ss.d.DiskID, Snapshot: true}
	for _, p := range ss.d.Partitions {
		if p.FSUUID != "" {
			id.FSUUIDs = append(id.FSUUIDs, p.FSUUID)
		}
	}
	return id
}

// key names the source in the default state path: the path the disk
// was backed up from, so that a live pass from that path onto the same
// TARGET, on this machine, continues the passes without --state; or the
// host and disk name.
func (ss *snapshotSource) key() string {
	if filepath.IsAbs(ss.d.Source) {
		return ss.d.Source
	}
	return snapshotKeyPrefix + ss.sn.Host + "/" + ss.d.Name
}

const snapshotKeyPrefix = "snapshot:"

// chunkSize is the chunk size of a new state of the disk: the
// repository's, so that a chunk whose ID changed is all a delta pass
// reads for it, doubled until there are at most 2^20 chunks (up to 1
// MiB, a live source's).
func (ss *snapshotSource) chunkSize() int {
	cs := max(ss.d.ChunkSize, 4<<10)
	for cs < migrate.DefaultChunkSize && ss.d.Size/int64(cs) > 1<<20 {
		cs <<= 1
	}
	return min(cs, migrate.DefaultChunkSize)
}

func (ss *snapshotSource) ref() migrate.SnapshotRef {
	return migrate.SnapshotRef{Repository: ss.r.Config().ID, Snapshot: ss.sn.ID.String(), Disk: ss.d.Name, Time: ss.sn.Time}
}

// label names the snapshot on the progress meter.
func (ss *snapshotSource) label() string {
	return fmt.Sprintf("snapshot %s of %s", ss.sn.ID.Short(), ss.sn.Time.Local().Format("2006-01-02 15:04"))
}

// snapshotJSONRef is a snapshot as migrate's --json lines name it.
type snapshotJSONRef struct {
	ID    string    `json:"id"`
	Short string    `json:"short_id"`
	Time  time.Time `json:"time"`
	Host  string    `json:"host"`
	Disk  string    `json:"disk"`
}

func (ss *snapshotSource) json() *snapshotJSONRef {
	return &snapshotJSONRef{ID: ss.sn.ID.String(), Short: ss.sn.ID.Short(), Time: ss.sn.Time, Host: ss.sn.Host, Disk: ss.d.Name}
}

// unreadWhy says why the chunks not read were not.
func (ss *snapshotSource) unreadWhy() string {
	return fmt.Sprintf("their chunk IDs in snapshot %s are those of snapshot %s, which the previous pass read", ss.sn.ID.Short(), ss.prev)
}

// begin works out what the pass must read, and records in the state,
// durably, that a pass from this snapshot may write (the dirty bitmap of
// a VM drive no longer describes the target then). It returns the
// chunks to read (nil: all).
func (ss *snapshotSource) begin(ctx context.Context, m *migration) (extent.Map, error) {
	h := &m.state.Header
	changes, why, err := ss.changes(ctx, h)
	if err != nil {
		return nil, err
	}
	ss.fullRead = why
	// Even a pass that reads every chunk keeps the earlier passes'
	// snapshots: killed, it leaves the chunks it did not reach as they
	// wrote them. Once the list is full, every pass reads in full until
	// one completes (and empties it), so it need not grow.
	if ref := ss.ref(); !containsRef(h.Begun, ref) && len(h.Begun) < maxBegun {
		h.Begun = append(h.Begun, ref)
	}
	h.Tracker = ""
	if err := m.state.Compact(); err != nil {
		return nil, err
	}
	if why != "" && !m.warned["full read: "+why] {
		m.warned["full read: "+why] = true
		ss.g.printf("%s is read in full: %s\n", m.src.Path, why)
	}
	if changes == nil {
		return nil, ss.newReader(ctx, nil)
	}
	return changes, ss.newReader(ctx, changes)
}

// newReader makes the pass's reader of the disk; its read-ahead fetches
// only the chunks in changes, when set: the pass reads no other (but the
// few the state does not know, fetched when read).
func (ss *snapshotSource) newReader(ctx context.Context, changes *migrate.ChunkChanges) error {
	if ss.dr != nil {
		ss.dr.Close()
		ss.dr = nil
	}
	o := repo.ReaderOptions{Warn: ss.warn}
	if changes != nil {
		o.Want = changes.Marked
	}
	dr, err := ss.r.NewDiskReader(ctx, ss.d, o)
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", ss.sn.ID.Short(), err)
	}
	ss.dr = dr
	return nil
}

// fetched is what the pass's reader fetched from the repository.
func (ss *snapshotSource) fetched() *int64 {
	n := ss.dr.Stats().BytesFetched
	return &n
}

func containsRef(refs []migrate.SnapshotRef, r migrate.SnapshotRef) bool {
	for _, x := range refs {
		if x.Same(r) {
			return true
		}
	}
	return false
}

// changes returns the chunks whose IDs differ between the disk and those
// of the snapshots the state's chunks may hold, or nil and why every
// chunk is read ("" for a first pass).
func (ss *snapshotSource) changes(ctx context.Context, h *migrate.Header) (*migrate.ChunkChanges, string, error) {
	switch {
	case h.Snapshot == nil && h.Passes == 0:
		return nil, "", nil
	case h.Snapshot == nil:
		return nil, "the previous pass did not read a snapshot (a device or file: what it wrote is no snapshot's)", nil
	case len(h.Begun) >= maxBegun:
		return nil, fmt.Sprintf("%d passes from snapshots failed since the last complete one", len(h.Begun)), nil
	}
	ss.prev = shortRef(*h.Snapshot)
	c := migrate.NewChunkChanges(ss.d.Size, ss.d.ChunkSize)
	for _, ref := range append([]migrate.SnapshotRef{*h.Snapshot}, h.Begun...) {
		if ref.Same(ss.ref()) {
			continue // the same chunk list
		}
		why, err := ss.diffWith(ctx, c, ref)
		if err != nil || why != "" {
			return nil, why, err
		}
	}
	return c, "", nil
}

func shortRef(r migrate.SnapshotRef) string {
	if len(r.Snapshot) > 8 {
		return r.Snapshot[:8]
	}
	return r.Snapshot
}

// diffWith marks in c the chunks whose IDs differ between the disk and
// the one ref names, or says why they cannot be compared.
func (ss *snapshotSource) diffWith(ctx context.Context, c *migrate.ChunkChanges, ref migrate.SnapshotRef) (string, error) {
	name := "snapshot " + shortRef(ref)
	if ref.Repository != ss.r.Config().ID {
		return fmt.Sprintf("the previous pass read %s of another repository (%s)", name, ref.Repository), nil
	}
	prev, err := ss.find(ctx, ref.Snapshot)
	if err != nil {
		return "", err
	}
	if prev == nil {
		return fmt.Sprintf("%s, which the previous pass read, is no longer in the repository (forgotten, or pruned)", name), nil
	}
	var pd *repo.Disk
	for i := range prev.Disks {
		if prev.Disks[i].Name == ref.Disk {
			pd = &prev.Disks[i]
		}
	}
	switch {
	case pd == nil:
		return fmt.Sprintf("%s, which the previous pass read, has no disk %q", name, ref.Disk), nil
	case pd.Size != ss.d.Size || pd.ChunkSize != ss.d.ChunkSize:
		return fmt.Sprintf("disk %s of %s, which the previous pass read, holds %d bytes in chunks of %d, this one %d in chunks of %d", pd.Name, name, pd.Size, pd.ChunkSize, ss.d.Size, ss.d.ChunkSize), nil
	}
	// A chunk list of the previous snapshot that does not load is a
	// reason to read in full; one of this snapshot fails the pass.
	var prevErr error
	pl, cl := ss.r.ChunkList(pd), ss.r.ChunkList(ss.d)
	prevAt := func(ctx context.Context, i int64) (repo.ID, error) {
		id, err := pl.At(ctx, i)
		if err != nil {
			prevErr = err
		}
		return id, err
	}
	curAt := func(ctx context.Context, i int64) (repo.ID, error) {
		id, err := cl.At(ctx, i)
		if err != nil {
			err = fmt.Errorf("snapshot %s: %w", ss.sn.ID.Short(), err)
		}
		return id, err
	}
	err = migrate.DiffChunks(ctx, c, ss.d.Chunks(), prevAt, curAt)
	if prevErr != nil && ctx.Err() == nil {
		return fmt.Sprintf("the chunk list of %s, which the previous pass read, does not load (%v)", name, prevErr), nil
	}
	return "", err
}

// find returns the snapshot of ID hex among those the repository lists
// (nil when it lists none: forgotten, or pruned).
func (ss *snapshotSource) find(ctx context.Context, hex string) (*repo.Snapshot, error) {
	if ss.listed == nil {
		// Its damaged snapshots were reported when SOURCE was found.
		all, err := ss.r.Snapshots(ctx, func(string, error) {})
		if err != nil {
			return nil, err
		}
		ss.listed = all
	}
	for _, sn := range ss.listed {
		if sn.ID.String() == hex {
			return sn, nil
		}
	}
	return nil, nil
}

// done records the snapshot as the last completed pass's, with the
// pass's hashes: every chunk the state knows now holds its chunk.
func (ss *snapshotSource) done(h *migrate.Header) {
	ref := ss.ref()
	h.Snapshot, h.Begun = &ref, nil
}

// forgetSnapshots clears, durably and before a pass from a device or
// file writes anything, the snapshots the state's chunks held: they are
// that source's from then on, and the next pass from a snapshot reads in
// full.
func forgetSnapshots(st *migrate.State) error {
	h := &st.Header
	if h.Snapshot == nil && len(h.Begun) == 0 {
		return nil
	}
	h.Snapshot, h.Begun = nil, nil
	return st.Compact()
}

func (ss *snapshotSource) close() {
	if ss.dr != nil {
		ss.dr.Close()
	}
}

// printSummary says what TARGET holds after passes from the snapshot,
// and how to finish.
func (ss *snapshotSource) printSummary(m *migration) {
	ss.g.printf("%s now holds disk %s of snapshot %s (host %s, %s); finish from the live disk with the same state: sauve migrate DEVICE %s --state %s --final\n",
		m.target.Path(), ss.d.Name, ss.sn.ID.Short(), ss.sn.Host, ss.sn.Time.Local().Format("2006-01-02 15:04"), m.target.Path(), m.state.Path())
}
