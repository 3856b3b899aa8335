package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// CheckOptions select what Check verifies.
type CheckOptions struct {
	// ReadData downloads every pack and verifies every blob in it.
	ReadData bool
	// Progress is called with packs done and total while reading data,
	// one call at a time and in order; it must be quick.
	Progress func(done, total int)
	// Record, with ReadData and the owner's key, writes what was found
	// to the ledger (damaged packs, packs that verify again) and endorses
	// the writers' packs that verified, so that every writer may reuse
	// their chunks. It only adds objects.
	Record bool
}

// Damage is a stretch of a disk in a snapshot that cannot be restored.
type Damage struct {
	Snapshot ID     `json:"snapshot"`
	Disk     string `json:"disk"`
	Ranges   []Span `json:"ranges"` // byte ranges of the disk
	Chunks   int64  `json:"chunks"`
}

// Span is a byte range [Offset, Offset+Length).
type Span struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// PackProblem is a pack that cannot be used, or not wholly.
type PackProblem struct {
	Pack ID     `json:"pack"`
	Why  string `json:"why"`
}

// CheckReport is the outcome of Check. Its lists are sorted, so the same
// repository gives the same report on every run.
type CheckReport struct {
	Snapshots int   `json:"snapshots"`
	Indexes   int   `json:"indexes"`
	Packs     int   `json:"packs"`
	Blobs     int   `json:"blobs"`
	PacksRead int   `json:"packs_read"`
	BytesRead int64 `json:"bytes_read"`
	// Errors and Warnings are messages; the other lists say exactly what
	// is damaged: packs, index objects, and the snapshots and byte ranges
	// that cannot be restored.
	Errors       []string      `json:"errors"`
	Warnings     []string      `json:"warnings"`
	Damaged      []Damage      `json:"damaged"`
	DamagedPacks []PackProblem `json:"damaged_packs"`
	DamagedIndex []string      `json:"damaged_index_objects"`
	// Unindexed counts packs no usable index object names.
	Unindexed int `json:"unindexed_packs"`
	// TempFiles counts files left by interrupted writes.
	TempFiles int   `json:"temp_files"`
	TempBytes int64 `json:"temp_bytes"`
	// LiveSessions counts the write sessions running (announced, not
	// ended, not expired by this machine's clock), Sessions lists them:
	// information, not a problem (docs/FORMAT.md, "Write sessions").
	LiveSessions int           `json:"live_sessions"`
	Sessions     []SessionInfo `json:"sessions"`
	// DataSkipped is set when ReadData could not open chunk data because
	// the key is write-only: packs were checked against their names only.
	DataSkipped bool `json:"data_skipped,omitempty"`
	// Recorded is set when findings were written to the ledger.
	Recorded bool `json:"recorded,omitempty"`
}

// OK reports whether the repository is sound.
func (c *CheckReport) OK() bool { return len(c.Errors) == 0 && len(c.Damaged) == 0 }

// copyKey names one copy of a blob, as an index entry states it.
type copyKey struct {
	pack   ID
	offset uint32
	id     ID
	eph    [32]byte
}

func keyOf(id ID, c Copy) copyKey { return copyKey{c.Pack, c.Offset, id, c.Ephemeral} }

type checker struct {
	r     *Repository
	idx   *Index
	st    *loadState
	mu    sync.Mutex
	rep   CheckReport
	bad   map[copyKey]string // copies that failed verification
	packs map[ID]string      // packs found damaged → why
	ok    map[ID]packTrailer // packs that verified entirely (ReadData)
	// lists memoizes the damage found in each chunk list blob, so that
	// snapshots sharing lists (and a list repeated many times in one
	// manifest) cost one walk each.
	lists      map[listKey]listResult
	chunkNotes int
	// readData is set once every pack was read: copies are then judged
	// by what reading them found.
	readData bool
	// collect asks for the lost chunks one by one (LostChunks).
	collect    bool
	lostChunks []LostChunk
	lostLists  []LostList
	// missing are the packs the index names that are not stored.
	missing []ID
	// whole are the snapshots none of whose disks lost anything, in the
	// order walked: with every pack read and decrypted, they are
	// verified (recorded as such by record).
	whole []ID
}

// listKey names a chunk list blob walked where it must hold n entries.
type listKey struct {
	id ID
	n  int64
}

// listResult is what walking one chunk list blob found: the damaged
// entries as runs of list positions, or the error that made the whole
// list unreadable.
type listResult struct {
	runs []run
	lost []lostAt // the damaged entries, for LostChunks
	err  error
}

type lostAt struct {
	pos int64
	id  ID
}

// LostChunk is one place of a snapshot's disk whose chunk has no usable
// copy.
type LostChunk struct {
	ID       ID
	Snapshot ID
	Disk     string
	Source   string // the disk's source path, as backed up
	Offset   int64
	Length   int
}

// LostList is a stretch of a snapshot's disk whose chunk list is lost:
// which chunks it held is not known any more.
type LostList struct {
	Snapshot ID
	Disk     string
	Span     Span
}

// maxLost bounds the lost chunks LostChunks reports one by one.
const maxLost = 1 << 22

type run struct{ start, n int64 }

// maxChunkNotes bounds how many damaged chunks are named one by one.
const maxChunkNotes = 100

func (c *checker) errorf(format string, args ...any) {
	c.mu.Lock()
	c.rep.Errors = append(c.rep.Errors, fmt.Sprintf(format, args...))
	c.mu.Unlock()
}

func (c *checker) warnf(format string, args ...any) {
	c.mu.Lock()
	c.rep.Warnings = append(c.rep.Warnings, fmt.Sprintf(format, args...))
	c.mu.Unlock()
}

// Check verifies the repository: every index object readable, every pack
// the index names stored and long enough, every snapshot's signature, and
// for every chunk of every snapshot at least one usable copy; with
// ReadData, every pack's content against its name and signer and every
// blob against its ID. It names exactly what is damaged (packs, index
// objects) and which snapshots and byte ranges that costs. It works on a
// view of its own (index, ledger, table of writers), never on the local
// cache nor on the repository's own view, which it leaves as it was; it
// writes only with Record.
func (r *Repository) Check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	rep, _, _, err := r.check(ctx, opts, false)
	return rep, err
}

// LostChunks checks the repository as Check does and also returns every
// place of every snapshot whose chunk has no usable copy (up to a bound),
// and the stretches whose chunk lists are lost.
func (r *Repository) LostChunks(ctx context.Context, opts CheckOptions) (*CheckReport, []LostChunk, []LostList, error) {
	return r.check(ctx, opts, true)
}

func (r *Repository) check(ctx context.Context, opts CheckOptions, collect bool) (*CheckReport, []LostChunk, []LostList, error) {
	c, err := r.newChecker(ctx, collect)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := c.run(ctx, opts); err != nil {
		return nil, nil, nil, err
	}
	return &c.rep, c.lostChunks, c.lostLists, nil
}

// newChecker loads a view of the repository of check's own: the ledger
// read again, a table of writers and an index of its own, no cache. The
// repository's view (its index, ledger, writers, cache) is left alone.
func (r *Repository) newChecker(ctx context.Context, collect bool) (*checker, error) {
	writers := NewWriters()
	writers.SetOwner([32]byte(r.keys.OwnerPublic))
	idx := NewIndex()
	idx.Writers = writers
	c := &checker{r: r, idx: idx, bad: map[copyKey]string{}, packs: map[ID]string{}, ok: map[ID]packTrailer{}, lists: map[listKey]listResult{}, collect: collect}
	c.rep.Errors, c.rep.Warnings, c.rep.Damaged = []string{}, []string{}, []Damage{}
	c.rep.DamagedPacks, c.rep.DamagedIndex, c.rep.Sessions = []PackProblem{}, []string{}, []SessionInfo{}
	var err error
	c.st, err = r.loadInto(ctx, c.idx, nil, -1, r.readLedger)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (c *checker) run(ctx context.Context, opts CheckOptions) error {
	c.rep.Indexes = c.st.indexObjects
	c.reportLoad()
	if err := c.reportTemp(ctx); err != nil {
		return err
	}
	c.rep.Blobs, c.rep.Packs = c.idx.Len()
	if opts.ReadData {
		if err := c.readAll(ctx, opts.Progress); err != nil {
			return err
		}
		c.readData = true
	}
	if err := c.walkSnapshots(ctx); err != nil {
		return err
	}
	if err := c.reportSessions(ctx); err != nil {
		return err
	}
	c.finish()
	if opts.Record && opts.ReadData {
		if err := c.record(ctx); err != nil {
			c.rep.Warnings = append(c.rep.Warnings, fmt.Sprintf("could not record the findings in the ledger: %v", err))
		}
	}
	return nil
}

// walkSnapshots finds what each snapshot's disks cannot restore.
func (c *checker) walkSnapshots(ctx context.Context) error {
	names, err := c.r.listSnapshots(ctx)
	if err != nil {
		return err
	}
	v := snapView{writers: c.idx.Writers, led: c.st.ledger}
	snaps, err := c.r.snapshots(ctx, v, names, func(name string, err error) {
		c.errorf("snapshot %s: %v", shortName(name), err)
	})
	if err != nil {
		return err
	}
	c.rep.Snapshots = len(snaps)
	for _, sn := range snaps {
		damaged := len(c.rep.Damaged)
		for di := range sn.Disks {
			if err := c.walkDisk(ctx, sn, &sn.Disks[di]); err != nil {
				return err
			}
		}
		if len(c.rep.Damaged) == damaged {
			c.whole = append(c.whole, sn.ID)
		}
	}
	return nil
}

// reportLoad reports what loading the index found.
func (c *checker) reportLoad() {
	for name, err := range c.st.damagedIndex {
		c.rep.DamagedIndex = append(c.rep.DamagedIndex, name)
		c.errorf("index object %s: %v (its packs were read from their trailers)", name, err)
	}
	for _, ps := range c.idx.PackStates() {
		switch {
		case ps.Size < 0:
			c.packProblem(ps.ID, fmt.Sprintf("missing from the repository (the index places %d blobs in it)", ps.Entries))
			c.missing = append(c.missing, ps.ID)
		case ps.Beyond > 0:
			c.packProblem(ps.ID, fmt.Sprintf("%d bytes, too short for %d of the blobs the index places in it (truncated)", ps.Size, ps.Beyond))
		case ps.Damaged != "":
			c.packProblem(ps.ID, ps.Damaged)
		}
	}
	for p, err := range c.st.orphanErrs {
		c.packProblem(p, fmt.Sprintf("in no index, and its trailer cannot be read: %v", err))
	}
	if n := len(c.st.orphans); n > 0 {
		c.rep.Unindexed = n
		c.warnf("%d packs are in no index (left by an interrupted or running backup, or named by a damaged index object): their chunks were found from their trailers; 'sauve repair index' indexes them", n)
	}
}

func (c *checker) packProblem(p ID, why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.packs[p]; !ok {
		c.packs[p] = why
		c.rep.Errors = append(c.rep.Errors, fmt.Sprintf("pack %s: %s", p, why))
	}
}

// reportTemp reports files left by interrupted writes.
func (c *checker) reportTemp(ctx context.Context) error {
	sl, ok := backend.StrayListerOf(c.r.be)
	if !ok {
		return nil
	}
	var oldest time.Time
	err := sl.ListStray(ctx, func(s backend.Stray) error {
		c.rep.TempFiles++
		c.rep.TempBytes += s.Size
		if oldest.IsZero() || s.ModTime.Before(oldest) {
			oldest = s.ModTime
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list temporary files: %w", err)
	}
	if c.rep.TempFiles > 0 {
		c.warnf("%d temporary files (%d bytes) were left by interrupted writes, the oldest from %s: 'sauve repair index' removes those older than %s",
			c.rep.TempFiles, c.rep.TempBytes, oldest.Local().Format("2006-01-02 15:04"), StrayAge)
	}
	return nil
}

// reportSessions counts the write sessions running. check writes nothing,
// so it cannot learn the storage's time: it judges by this machine's
// clock, which is good enough to inform (a prune must not).
func (c *checker) reportSessions(ctx context.Context) error {
	rep, err := c.r.sessions(ctx, time.Now(), c.st.ledger, c.idx.Writers)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.warnf("write sessions could not be listed: %v", err)
		return nil
	}
	for _, s := range rep.Sessions {
		if s.State == SessionLive {
			c.rep.Sessions = append(c.rep.Sessions, s)
		}
	}
	c.rep.LiveSessions = rep.Live()
	for _, u := range rep.Unreadable {
		c.warnf("write session object %s cannot be read (%s); it counts as a running session until a day after it was stored", shortName(u.Name), u.Error)
	}
	return nil
}

// usable says why no copy of a data chunk can be read, or "" if one can.
func (c *checker) usable(id ID, prefer WriterNum) string {
	copies := c.idx.Copies(id, prefer)
	why := "not in any index"
	for _, cp := range copies {
		switch {
		case cp.Type != DataBlob:
			why = "indexed as " + cp.Type.String() + ", not data"
		case cp.Missing, cp.Damaged != "" && !c.readData:
			// Without reading the pack, a pack recorded as damaged is
			// taken as damaged whole.
			why = cp.Damaged
		default:
			c.mu.Lock()
			bad := c.bad[keyOf(id, cp)]
			c.mu.Unlock()
			if bad == "" {
				return ""
			}
			why = bad
		}
	}
	if len(copies) > 1 {
		return fmt.Sprintf("none of its %d copies is usable (last: %s)", len(copies), why)
	}
	return why
}

// walkDisk records the byte ranges of a disk that cannot be restored.
func (c *checker) walkDisk(ctx context.Context, sn *Snapshot, d *Disk) error {
	dmg := Damage{Snapshot: sn.ID, Disk: d.Name}
	cs := int64(d.ChunkSize)
	list := c.r.chunkList(c.idx, nil, d)
	per := int64(d.ListEntries)
	for li := range d.ChunkLists {
		if err := ctx.Err(); err != nil {
			return err
		}
		first := int64(li) * per
		n := min(per, list.Len()-first)
		res := c.walkList(ctx, sn, d, list, li, n)
		if res.err != nil {
			res.runs = []run{{0, n}}
			if c.collect {
				off := first * cs
				c.lostLists = append(c.lostLists, LostList{Snapshot: sn.ID, Disk: d.Name, Span: Span{off, min((first+n)*cs, d.Size) - off}})
			}
		}
		if c.collect {
			for _, l := range res.lost {
				if len(c.lostChunks) >= maxLost {
					break
				}
				off := (first + l.pos) * cs
				c.lostChunks = append(c.lostChunks, LostChunk{ID: l.id, Snapshot: sn.ID, Disk: d.Name, Source: d.Source, Offset: off, Length: int(min(cs, d.Size-off))})
			}
		}
		for _, rn := range res.runs {
			off := (first + rn.start) * cs
			end := min((first+rn.start+rn.n)*cs, d.Size)
			dmg.Chunks += rn.n
			if k := len(dmg.Ranges); k > 0 && dmg.Ranges[k-1].Offset+dmg.Ranges[k-1].Length == off {
				dmg.Ranges[k-1].Length = end - dmg.Ranges[k-1].Offset
				continue
			}
			dmg.Ranges = append(dmg.Ranges, Span{off, end - off})
		}
	}
	if dmg.Chunks > 0 {
		c.rep.Damaged = append(c.rep.Damaged, dmg)
	}
	return nil
}

// walkList finds the damaged entries of list blob li (memoized by the
// list's ID and the reader's preferred writer, which decide the answer).
func (c *checker) walkList(ctx context.Context, sn *Snapshot, d *Disk, list *ChunkList, li int, n int64) listResult {
	key := listKey{d.ChunkLists[li], n}
	if res, ok := c.lists[key]; ok {
		return res
	}
	ids, err := list.readList(ctx, li)
	if err != nil {
		c.errorf("snapshot %s disk %s: %v", sn.ID.Short(), d.Name, err)
		res := listResult{err: err}
		c.lists[key] = res
		return res
	}
	var res listResult
	for i, id := range ids[:n] {
		if id.IsZero() {
			continue
		}
		why := c.usable(id, d.writer)
		if why == "" {
			continue
		}
		if c.chunkNotes < maxChunkNotes {
			c.errorf("chunk %s (snapshot %s, disk %s, offset %d): %s", id.Short(), sn.ID.Short(), d.Name, (int64(li)*int64(d.ListEntries)+int64(i))*int64(d.ChunkSize), why)
		}
		c.chunkNotes++
		res.lost = append(res.lost, lostAt{int64(i), id})
		if k := len(res.runs); k > 0 && res.runs[k-1].start+res.runs[k-1].n == int64(i) {
			res.runs[k-1].n++
			continue
		}
		res.runs = append(res.runs, run{int64(i), 1})
	}
	c.lists[key] = res
	return res
}

// readAll downloads and verifies every stored pack.
func (c *checker) readAll(ctx context.Context, progress func(int, int)) error {
	byPack := map[ID][]Copy{}
	ids := map[ID][]ID{}
	c.idx.Each(func(id ID, cp Copy) {
		byPack[cp.Pack] = append(byPack[cp.Pack], cp)
		ids[cp.Pack] = append(ids[cp.Pack], id)
	})
	var packs []ID
	for p := range c.st.stored {
		packs = append(packs, p)
	}
	slices.SortFunc(packs, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	canData := c.r.CanDecrypt()
	if !canData {
		c.rep.DataSkipped = true
	}
	var done int
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.r.opts.Connections)
	for _, p := range packs {
		g.Go(func() error {
			err := c.readPack(gctx, p, byPack[p], ids[p], canData)
			c.mu.Lock()
			done++
			c.rep.PacksRead++
			c.rep.BytesRead += c.st.stored[p]
			if progress != nil {
				progress(done, len(packs)) // under c.mu: calls arrive in order
			}
			c.mu.Unlock()
			return err
		})
	}
	return g.Wait()
}

// readPack verifies one pack: its bytes against its name, its trailer
// against its signer and content, every blob the trailer states against
// its ID (once each), and every copy the index places in the pack against
// the trailer. A false index entry (another place, length or session key
// than the trailer's) is an error of that entry, not of the pack.
func (c *checker) readPack(ctx context.Context, p ID, copies []Copy, ids []ID, canData bool) error {
	h := backend.Handle{Type: backend.PackFile, Name: p.String()}
	data, err := backend.ReadAll(ctx, c.r.be, h)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.packProblem(p, fmt.Sprintf("cannot be read: %v", err))
		c.markCopies(copies, ids, "pack unreadable")
		return nil
	}
	tr := trailerReader{meta: c.r.meta, keys: c.r.keys}
	t, whole, terr := tr.parseStoredPack(p, data)
	if !whole {
		c.packProblem(p, "content does not match its name (damaged)")
	}
	if terr != nil {
		c.packProblem(p, terr.Error())
	}
	// What the trailer states, verified once per blob.
	stated := make(map[copyKey]string, len(t.Blobs))
	allOK := whole && terr == nil
	for _, b := range t.Blobs {
		loc := Location{Pack: p, Ephemeral: t.Ephemeral, Type: b.Type, Offset: b.Offset, Length: b.Length}
		why := c.verifyCopy(data, b.ID, Copy{Location: loc}, canData)
		stated[keyOf(b.ID, Copy{Location: loc})] = why
		if why != "" && allOK {
			allOK = false
			c.packProblem(p, fmt.Sprintf("blob %s at offset %d, in its trailer, does not verify", b.ID.Short(), b.Offset))
		}
	}
	for i, cp := range copies {
		id := ids[i]
		why, ok := stated[keyOf(id, cp)]
		switch {
		case terr != nil:
			why = c.verifyCopy(data, id, cp, canData)
		case !ok:
			why = "the pack's trailer does not hold it where (or as) the index says: a false index entry"
		}
		if why == "" {
			continue
		}
		c.mu.Lock()
		c.bad[keyOf(id, cp)] = why
		c.mu.Unlock()
		if whole {
			c.errorf("pack %s: blob %s at offset %d: %s", p.Short(), id.Short(), cp.Offset, why)
		}
	}
	if allOK && canData {
		c.mu.Lock()
		c.ok[p] = t
		c.mu.Unlock()
	}
	return nil
}

// verifyCopy checks one copy in a pack held in memory.
func (c *checker) verifyCopy(data []byte, id ID, cp Copy, canData bool) string {
	end := int64(cp.Offset) + int64(cp.Length)
	if end > int64(len(data)) {
		return "beyond the end of its pack"
	}
	if cp.Type == DataBlob && !canData {
		return ""
	}
	if _, err := c.r.OpenBlob(nil, id, cp.Location, data[cp.Offset:end]); err != nil {
		if errors.Is(err, crypto.ErrWriteOnly) {
			return ""
		}
		var be *BlobError
		if errors.As(err, &be) {
			return be.Err.Error()
		}
		return err.Error()
	}
	return ""
}

func (c *checker) markCopies(copies []Copy, ids []ID, why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, cp := range copies {
		c.bad[keyOf(ids[i], cp)] = why
	}
}

// finish sorts the report so that it reads the same on every run.
func (c *checker) finish() {
	if len(c.rep.Damaged) == 0 && len(c.missing) > 0 {
		// Every snapshot restores: what the lost packs held is stored
		// elsewhere (a later backup or a repair stored it again). The
		// loss is still worth knowing, not an error.
		gone := map[string]bool{}
		for _, p := range c.missing {
			gone[fmt.Sprintf("pack %s: %s", p, c.packs[p])] = true
			c.rep.Warnings = append(c.rep.Warnings, fmt.Sprintf("pack %s is missing from the repository, but no snapshot needs it: its chunks are stored elsewhere", p))
		}
		c.rep.Errors = slices.DeleteFunc(c.rep.Errors, func(e string) bool { return gone[e] })
	}
	sort.Strings(c.rep.Errors)
	sort.Strings(c.rep.Warnings)
	sort.Strings(c.rep.DamagedIndex)
	for p, why := range c.packs {
		c.rep.DamagedPacks = append(c.rep.DamagedPacks, PackProblem{Pack: p, Why: why})
	}
	slices.SortFunc(c.rep.DamagedPacks, func(a, b PackProblem) int { return bytes.Compare(a.Pack[:], b.Pack[:]) })
	if c.chunkNotes > maxChunkNotes {
		c.rep.Errors = append(c.rep.Errors, fmt.Sprintf("… and %d more damaged chunks (see the damaged ranges)", c.chunkNotes-maxChunkNotes))
	}
}

// record writes the findings of a full read to the ledger and endorses
// the packs that verified entirely but are not yet vouched for by the
// owner, so that every writer may deduplicate against them.
func (c *checker) record(ctx context.Context) error {
	r := c.r
	if !r.keys.IsOwner() || r.ReadOnly() {
		return nil
	}
	var events []LedgerEvent
	for _, pp := range c.rep.DamagedPacks {
		p := pp.Pack
		kind := EventPackDamaged
		if _, stored := c.st.stored[p]; !stored {
			kind = EventPackMissing
		}
		if kind == EventPackDamaged && c.st.ledger.Damaged(p) != "" {
			continue // recorded already
		}
		events = append(events, LedgerEvent{Kind: kind, Pack: &p, Reason: pp.Why})
	}
	// A snapshot is verified only when every pack was read and every
	// chunk decrypted and checked against its ID: walking the snapshots
	// after such a read judged each chunk by what reading found.
	if c.readData && !c.rep.DataSkipped {
		for _, id := range c.whole {
			events = append(events, LedgerEvent{Kind: EventSnapshotVerified, Snapshot: &id})
		}
	}
	var endorse []indexRecord
	certs := map[[32]byte]*crypto.Cert{}
	owner := [32]byte(r.keys.OwnerPublic)
	for _, p := range sortedIDs(c.ok) {
		t := c.ok[p]
		if c.st.ledger.Damaged(p) != "" {
			events = append(events, LedgerEvent{Kind: EventPackOK, Pack: &p})
		}
		if t.Version != 2 || c.idx.ownerVouches(t.PackInfo) {
			continue
		}
		rec := indexRecord{PackInfo: t.PackInfo, Writer: t.Signer.Key}
		if t.Signer.Key != owner {
			rec.Flags = recEndorsed
			certs[t.Signer.Key] = t.Signer.Cert
		}
		endorse = append(endorse, rec)
	}
	for start := 0; start < len(endorse); start += indexBatch {
		batch := endorse[start:min(start+indexBatch, len(endorse))]
		if err := r.saveIndexTo(ctx, nil, batch, certsFor(batch, certs)); err != nil {
			return err
		}
	}
	if err := r.writeLedger(ctx, events); err != nil {
		return err
	}
	c.rep.Recorded = len(events) > 0 || len(endorse) > 0
	return nil
}

func sortedIDs[V any](m map[ID]V) []ID {
	out := make([]ID, 0, len(m))
	for id := range m {
		out = append(out, id)
	}
	slices.SortFunc(out, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	return out
}

// certsFor returns the certificates of the writers records are attributed
// to.
func certsFor(records []indexRecord, certs map[[32]byte]*crypto.Cert) []*crypto.Cert {
	var out []*crypto.Cert
	seen := map[[32]byte]bool{}
	for _, rec := range records {
		if c := certs[rec.Writer]; c != nil && !seen[rec.Writer] {
			seen[rec.Writer] = true
			out = append(out, c)
		}
	}
	return out
}
