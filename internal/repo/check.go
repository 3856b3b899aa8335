package repo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

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

// CheckReport is the outcome of Check.
type CheckReport struct {
	Snapshots int      `json:"snapshots"`
	Indexes   int      `json:"indexes"`
	Packs     int      `json:"packs"`
	Blobs     int      `json:"blobs"`
	PacksRead int      `json:"packs_read"`
	BytesRead int64    `json:"bytes_read"`
	Errors    []string `json:"errors"`
	Warnings  []string `json:"warnings"`
	Damaged   []Damage `json:"damaged"`
	// DataSkipped is set when ReadData could not open chunk data because
	// the key is write-only: packs were checked against their names only.
	DataSkipped bool `json:"data_skipped,omitempty"`
}

// OK reports whether the repository is sound.
func (c *CheckReport) OK() bool { return len(c.Errors) == 0 && len(c.Damaged) == 0 }

type checker struct {
	r      *Repository
	mu     sync.Mutex
	report CheckReport
	bad    map[ID]string // blob → why it cannot be read
}

func (c *checker) errorf(format string, args ...any) {
	c.mu.Lock()
	c.report.Errors = append(c.report.Errors, fmt.Sprintf(format, args...))
	c.mu.Unlock()
}

func (c *checker) markBad(id ID, why string) {
	c.mu.Lock()
	if _, ok := c.bad[id]; !ok {
		c.bad[id] = why
	}
	c.mu.Unlock()
}

// Check verifies the repository: every index object readable, every
// indexed pack present and big enough, every snapshot's signature, every
// chunk every snapshot refers to indexed in a pack that exists; with
// ReadData, every pack's content against its name and every blob against
// its ID. Damage is reported with the snapshots and byte ranges it affects.
// It uses a fresh in-memory index and never writes to the repository.
func (r *Repository) Check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	c := &checker{r: r, bad: map[ID]string{}}
	// Check judges the repository, not the local copies of it.
	cache := r.cache
	r.cache = nil
	defer func() { r.cache = cache }()
	c.report.Errors, c.report.Warnings, c.report.Damaged = []string{}, []string{}, []Damage{}
	r.idx = NewIndex()
	var nidx int
	err := r.loadIndex(ctx, func(name string, err error) {
		c.errorf("index %s: %v", name, err)
	})
	if err != nil {
		return nil, err
	}
	if err := r.be.List(ctx, backend.IndexFile, func(backend.Info) error { nidx++; return nil }); err != nil {
		return nil, err
	}
	c.report.Indexes = nidx

	stored := map[ID]int64{}
	if err := r.be.List(ctx, backend.PackFile, func(fi backend.Info) error {
		id, err := ParseID(fi.Name)
		if err != nil {
			c.report.Warnings = append(c.report.Warnings, fmt.Sprintf("data/%s: not a pack name, ignored", fi.Name))
			return nil
		}
		stored[id] = fi.Size
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list packs: %w", err)
	}

	// Packs the index names must exist and hold their blobs.
	extent := map[ID]int64{}
	r.idx.Each(func(id ID, loc Location) {
		if e := int64(loc.Offset) + int64(loc.Length); e > extent[loc.Pack] {
			extent[loc.Pack] = e
		}
	})
	indexed := r.idx.Packs()
	missing := map[ID]bool{}
	for _, p := range indexed {
		size, ok := stored[p]
		switch {
		case !ok:
			c.errorf("pack %s is in the index but missing from the repository", p)
			missing[p] = true
		case size < extent[p]+packFooterSize:
			c.errorf("pack %s is %d bytes, too short for the blobs the index places in it (truncated)", p, size)
			missing[p] = true
		}
	}
	unindexed := 0
	for p := range stored {
		if !r.idx.HasPack(p) {
			unindexed++
		}
	}
	if unindexed > 0 {
		c.report.Warnings = append(c.report.Warnings, fmt.Sprintf("%d packs are in no index (left by an interrupted or running backup; the next backup adopts them)", unindexed))
	}
	r.idx.Each(func(id ID, loc Location) {
		if missing[loc.Pack] {
			c.markBad(id, fmt.Sprintf("pack %s is missing or truncated", loc.Pack.Short()))
		}
	})
	blobs, packs := r.idx.Len()
	c.report.Blobs, c.report.Packs = blobs, packs

	if opts.ReadData {
		if err := c.readData(ctx, stored, missing, opts.Progress); err != nil {
			return nil, err
		}
	}

	snaps, err := r.Snapshots(ctx, func(name string, err error) {
		c.errorf("snapshot %s: %v", name, err)
	})
	if err != nil {
		return nil, err
	}
	c.report.Snapshots = len(snaps)
	for _, sn := range snaps {
		for di := range sn.Disks {
			if err := c.walkDisk(ctx, sn, &sn.Disks[di]); err != nil {
				return nil, err
			}
		}
	}
	return &c.report, nil
}

// walkDisk checks every chunk of a disk and records the ranges that are
// damaged.
func (c *checker) walkDisk(ctx context.Context, sn *Snapshot, d *Disk) error {
	dmg := Damage{Snapshot: sn.ID, Disk: d.Name}
	addRange := func(off, n int64) {
		dmg.Chunks++
		if k := len(dmg.Ranges); k > 0 && dmg.Ranges[k-1].Offset+dmg.Ranges[k-1].Length == off {
			dmg.Ranges[k-1].Length += n
			return
		}
		dmg.Ranges = append(dmg.Ranges, Span{off, n})
	}
	reported := map[ID]bool{}
	cs := int64(d.ChunkSize)
	list := c.r.ChunkList(d)
	for i := int64(0); i < list.Len(); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		off := i * cs
		n := min(cs, d.Size-off)
		id, err := list.At(ctx, i)
		if err != nil {
			// The rest of this list blob is unreadable.
			li := i / int64(d.ListEntries)
			end := min((li+1)*int64(d.ListEntries), list.Len())
			c.errorf("snapshot %s disk %s: %v", sn.ID.Short(), d.Name, err)
			for ; i < end; i++ {
				addRange(i*cs, min(cs, d.Size-i*cs))
			}
			i--
			continue
		}
		if id.IsZero() {
			continue
		}
		loc, ok := c.r.idx.Lookup(id)
		why := ""
		switch {
		case !ok:
			why = "not in any index"
		case loc.Type != DataBlob:
			why = "indexed as " + loc.Type.String() + ", not data"
		default:
			c.mu.Lock()
			why = c.bad[id]
			c.mu.Unlock()
		}
		if why == "" {
			continue
		}
		if !reported[id] {
			reported[id] = true
			if !ok {
				c.errorf("chunk %s (snapshot %s, disk %s, offset %d): %s", id.Short(), sn.ID.Short(), d.Name, off, why)
			}
		}
		addRange(off, n)
	}
	if dmg.Chunks > 0 {
		c.report.Damaged = append(c.report.Damaged, dmg)
	}
	return nil
}

// readData downloads and verifies every pack.
func (c *checker) readData(ctx context.Context, stored map[ID]int64, missing map[ID]bool, progress func(int, int)) error {
	byPack := map[ID][]ID{}
	c.r.idx.Each(func(id ID, loc Location) { byPack[loc.Pack] = append(byPack[loc.Pack], id) })
	var packs []ID
	for p := range stored {
		packs = append(packs, p)
	}
	sort.Slice(packs, func(i, j int) bool { return packs[i].String() < packs[j].String() })
	canData := c.r.CanDecrypt()
	if !canData {
		c.report.DataSkipped = true
	}
	var done int
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.r.opts.Connections)
	for _, p := range packs {
		if missing[p] {
			continue
		}
		g.Go(func() error {
			err := c.readPack(gctx, p, byPack[p], canData)
			c.mu.Lock()
			done++
			c.report.PacksRead++
			c.report.BytesRead += stored[p]
			if progress != nil {
				progress(done, len(packs)) // under c.mu: calls arrive in order
			}
			c.mu.Unlock()
			return err
		})
	}
	return g.Wait()
}

func (c *checker) readPack(ctx context.Context, p ID, ids []ID, canData bool) error {
	h := backend.Handle{Type: backend.PackFile, Name: p.String()}
	data, err := backend.ReadAll(ctx, c.r.be, h)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.errorf("pack %s: %v", p, err)
		for _, id := range ids {
			c.markBad(id, "pack unreadable")
		}
		return nil
	}
	if Hash(data) != p {
		c.errorf("pack %s: content does not match its name (damaged)", p)
	}
	info, err := parsePack(c.r.meta, data)
	if err != nil {
		c.errorf("pack %s: %v", p, err)
	} else if len(ids) > 0 {
		inPack := make(map[ID]PackBlob, len(info.Blobs))
		for _, b := range info.Blobs {
			inPack[b.ID] = b
		}
		for _, id := range ids {
			loc, _ := c.r.idx.Lookup(id)
			b, ok := inPack[id]
			if !ok || b.Offset != loc.Offset || b.Length != loc.Length || b.Type != loc.Type {
				c.errorf("pack %s: its trailer disagrees with the index about blob %s", p, id.Short())
			}
		}
	}
	for _, id := range ids {
		loc, _ := c.r.idx.Lookup(id)
		end := int64(loc.Offset) + int64(loc.Length)
		if end > int64(len(data)) {
			c.markBad(id, "beyond the end of its pack")
			continue
		}
		if loc.Type == DataBlob && !canData {
			continue
		}
		if _, err := c.r.OpenBlob(nil, id, loc, data[loc.Offset:end]); err != nil {
			if errors.Is(err, crypto.ErrWriteOnly) {
				continue
			}
			c.errorf("%v", err)
			c.markBad(id, err.Error())
		}
	}
	return nil
}
