package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Parity objects (docs/FORMAT.md, "Parity") give back the promise of
// independent image files: deduplicated snapshots share packs, so one lost
// pack can spoil many snapshots, but with a parity object over each group
// of K packs any one lost or damaged pack of a group is rebuilt from the
// others, for 1/K more space. A parity object is the XOR of its packs'
// stored bytes (ciphertext: it reveals nothing the packs do not), named by
// its hash like every object; it needs no signature, since a rebuilt pack
// is accepted only when it hashes to its own name.
//
//	"SVPAR001" | u32 n | n × (pack id 32 | u64 size) | XOR of the n packs, each
//	padded with zeros to the longest
const (
	parityMagic = "SVPAR001"
	// MaxParityGroup bounds the packs of one parity object.
	MaxParityGroup = 64
	parityEntry    = 32 + 8
)

// ParityGroup is one parity object's header: the packs it covers.
type ParityGroup struct {
	Name  string
	Packs []ID
	Sizes []int64
	// Length is the parity's length: the longest pack's size.
	Length int64
}

func (g *ParityGroup) headerLen() int64 { return g.headerLenFor(len(g.Packs)) }

// encodeParityHeader writes a parity object's header.
func encodeParityHeader(packs []ID, sizes []int64) []byte {
	b := make([]byte, 0, 12+len(packs)*parityEntry)
	b = append(b, parityMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packs)))
	for i, id := range packs {
		b = append(b, id[:]...)
		b = binary.LittleEndian.AppendUint64(b, uint64(sizes[i]))
	}
	return b
}

// decodeParityHeader parses the header at the start of a parity object of
// size bytes; maxPack bounds the pack sizes it may claim.
func decodeParityHeader(name string, b []byte, size, maxPack int64) (*ParityGroup, error) {
	if len(b) < 12 || string(b[:8]) != parityMagic {
		return nil, errors.New("not a parity object (bad header)")
	}
	n := binary.LittleEndian.Uint32(b[8:12])
	if n == 0 || n > MaxParityGroup {
		return nil, fmt.Errorf("covers %d packs (1 to %d allowed)", n, MaxParityGroup)
	}
	g := &ParityGroup{Name: name}
	if int64(len(b)) < g.headerLenFor(int(n)) {
		return nil, errors.New("header truncated")
	}
	for i := range int(n) {
		e := b[12+i*parityEntry:]
		id := ID(e[:32])
		sz := int64(binary.LittleEndian.Uint64(e[32:40]))
		if sz <= 0 || sz > maxPack {
			return nil, fmt.Errorf("pack %s: size %d out of range", id.Short(), sz)
		}
		if slices.Contains(g.Packs, id) {
			return nil, fmt.Errorf("pack %s named twice", id.Short())
		}
		g.Packs = append(g.Packs, id)
		g.Sizes = append(g.Sizes, sz)
		g.Length = max(g.Length, sz)
	}
	if size != g.headerLen()+g.Length {
		return nil, fmt.Errorf("%d bytes, its header says %d", size, g.headerLen()+g.Length)
	}
	return g, nil
}

func (g *ParityGroup) headerLenFor(n int) int64 { return int64(12 + n*parityEntry) }

// maxParityPack bounds the size of a pack a parity object may cover: packs
// close when they pass pack_size, by at most one blob and the trailer.
func (r *Repository) maxParityPack() int64 {
	return 2*int64(r.cfg.PackSize) + 2*int64(r.cfg.ChunkSize) + 16<<20
}

// parityBuilder accumulates the XOR of the packs a write session uploads
// and stores a parity object every k packs (and for the rest at a flush).
// Its buffers hold the header's room before the XOR, so a parity object
// is stored from one buffer without a copy, and are reused: a session
// holds at most two (one filling, one being stored).
type parityBuilder struct {
	r     *Repository
	k     int
	mu    sync.Mutex
	cur   *parityGroupData
	spare []*parityGroupData
	// saved counts parity objects stored; bytes their size.
	saved int
	bytes int64
	// mapped are the buffers mapped by alloc.
	mapped [][]byte
}

type parityGroupData struct {
	packs []ID
	sizes []int64
	// buf is header room (for MaxParityGroup packs) then the XOR; n the
	// XOR's length so far.
	buf []byte
	n   int
}

const parityRoom = 12 + MaxParityGroup*parityEntry

// alloc maps a parity buffer outside Go's heap: the collector would let
// the heap grow by twice the buffers' size on top of them (measured: 270
// against 130 MiB peak RSS for a backup), and only the pages the XOR
// touches become resident. Mappings are never unmapped (an HTTP transport
// may still read an abandoned upload's body after the upload returned);
// a finished session gives their pages back and leaves them to the next
// session of the repository. Falls back to the heap.
func (b *parityBuilder) alloc() []byte {
	if m := b.r.parityPool.get(); m != nil {
		b.mapped = append(b.mapped, m)
		return m[:parityRoom]
	}
	size := parityRoom + int(b.r.maxParityPack())
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return make([]byte, parityRoom)
	}
	b.mapped = append(b.mapped, m)
	return m[:parityRoom]
}

// release gives the buffers' pages back once the session's uploads are
// over, and the mappings to the repository's pool.
func (b *parityBuilder) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.mapped {
		_ = unix.Madvise(m, unix.MADV_DONTNEED) // reads as zeros after
		b.r.parityPool.put(m)
	}
	b.mapped, b.spare, b.cur = nil, nil, nil
}

// mapPool keeps parity mappings between sessions.
type mapPool struct {
	mu   sync.Mutex
	free [][]byte
}

func (p *mapPool) get() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.free); n > 0 {
		m := p.free[n-1]
		p.free = p.free[:n-1]
		return m
	}
	return nil
}

func (p *mapPool) put(m []byte) {
	p.mu.Lock()
	p.free = append(p.free, m)
	p.mu.Unlock()
}

// add folds an uploaded pack in, and returns a full group to store, if
// this pack completed one.
func (b *parityBuilder) add(id ID, data []byte) *parityGroupData {
	b.mu.Lock()
	defer b.mu.Unlock()
	g := b.cur
	if g == nil {
		if n := len(b.spare); n > 0 {
			g, b.spare = b.spare[n-1], b.spare[:n-1]
		} else {
			g = &parityGroupData{buf: b.alloc()}
		}
		b.cur = g
	}
	if need := parityRoom + len(data); need > len(g.buf) {
		// Within a mapped buffer's capacity, or (larger than any pack
		// the repository makes, or not mapped) on the heap.
		g.buf = slices.Grow(g.buf, need-len(g.buf))[:need]
	}
	if len(data) > g.n {
		clear(g.buf[parityRoom+g.n : parityRoom+len(data)])
		g.n = len(data)
	}
	xorInto(g.buf[parityRoom:], data)
	g.packs = append(g.packs, id)
	g.sizes = append(g.sizes, int64(len(data)))
	if len(g.packs) < b.k {
		return nil
	}
	b.cur = nil
	return g
}

// flush takes the group accumulated so far (nil when empty), for the end
// of a batch of uploads.
func (b *parityBuilder) flush() *parityGroupData {
	b.mu.Lock()
	defer b.mu.Unlock()
	g := b.cur
	b.cur = nil
	return g
}

// save stores a group's parity object and keeps its buffer for reuse.
func (b *parityBuilder) save(ctx context.Context, g *parityGroupData) error {
	if g == nil {
		return nil
	}
	hdr := encodeParityHeader(g.packs, g.sizes)
	start := parityRoom - len(hdr)
	copy(g.buf[start:], hdr)
	data := g.buf[start : parityRoom+g.n]
	id := Hash(data)
	h := backend.Handle{Type: backend.ParityFile, Name: id.String()}
	err := b.r.be.Save(ctx, h, backend.NewByteReader(data), int64(len(data)))
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save parity of %d packs: %w", len(g.packs), err)
	}
	b.saved++
	b.bytes += int64(len(data))
	g.packs, g.sizes, g.n = g.packs[:0], g.sizes[:0], 0
	if len(b.spare) < 1 {
		b.spare = append(b.spare, g)
	}
	return nil
}

func xorInto(dst, src []byte) {
	// 8 bytes at a time: the compiler does not vectorise the byte loop,
	// and parity runs over every byte a backup uploads.
	n := len(src) &^ 7
	for i := 0; i < n; i += 8 {
		v := binary.LittleEndian.Uint64(dst[i:]) ^ binary.LittleEndian.Uint64(src[i:])
		binary.LittleEndian.PutUint64(dst[i:], v)
	}
	for i := n; i < len(src); i++ {
		dst[i] ^= src[i]
	}
}

// SetParity makes the write sessions opened after it store a parity
// object over every k packs they upload (0: none).
func (r *Repository) SetParity(k int) error {
	if k < 0 || k == 1 || k > MaxParityGroup {
		return fmt.Errorf("parity groups of %d packs: give 2 to %d (or 0 for none)", k, MaxParityGroup)
	}
	r.parityK = k
	return nil
}

// ParityGroups reads the headers of every parity object (two small reads
// each). Objects that are not well-formed are reported in bad.
func (r *Repository) ParityGroups(ctx context.Context) (groups []*ParityGroup, bad map[string]error, err error) {
	var infos []backend.Info
	if err := r.be.List(ctx, backend.ParityFile, func(fi backend.Info) error {
		infos = append(infos, fi)
		return nil
	}); err != nil {
		return nil, nil, fmt.Errorf("list parity: %w", err)
	}
	bad = map[string]error{}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.opts.Connections * 2)
	for _, fi := range infos {
		g.Go(func() error {
			pg, err := r.readParityHeader(gctx, fi)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				bad[fi.Name] = err
				return nil
			}
			groups = append(groups, pg)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	slices.SortFunc(groups, func(a, b *ParityGroup) int { return bytes.Compare([]byte(a.Name), []byte(b.Name)) })
	return groups, bad, nil
}

func (r *Repository) readParityHeader(ctx context.Context, fi backend.Info) (*ParityGroup, error) {
	if _, err := ParseID(fi.Name); err != nil {
		return nil, errors.New("not a parity object name")
	}
	h := backend.Handle{Type: backend.ParityFile, Name: fi.Name}
	head := min(fi.Size, 12+MaxParityGroup*parityEntry)
	b, err := backend.ReadRange(ctx, r.be, h, 0, head)
	if err != nil {
		return nil, err
	}
	return decodeParityHeader(fi.Name, b, fi.Size, r.maxParityPack())
}

// RebuildPack rebuilds a lost or damaged pack from its parity group: the
// parity XOR every other pack of the group. The result is returned only
// when it hashes to the pack's name; the other packs must be whole.
func (r *Repository) RebuildPack(ctx context.Context, g *ParityGroup, lost ID) ([]byte, error) {
	at := slices.Index(g.Packs, lost)
	if at < 0 {
		return nil, fmt.Errorf("parity %s does not cover pack %s", shortName(g.Name), lost.Short())
	}
	buf, err := backend.ReadRange(ctx, r.be, backend.Handle{Type: backend.ParityFile, Name: g.Name}, g.headerLen(), g.Length)
	if err != nil {
		return nil, fmt.Errorf("read parity %s: %w", shortName(g.Name), err)
	}
	for i, id := range g.Packs {
		if i == at {
			continue
		}
		data, err := backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: id.String()})
		if err != nil {
			return nil, fmt.Errorf("read pack %s of the same parity group: %w (a group rebuilds one lost pack, not two)", id.Short(), err)
		}
		if int64(len(data)) != g.Sizes[i] || Hash(data) != id {
			return nil, fmt.Errorf("pack %s of the same parity group is damaged too (a group rebuilds one lost pack, not two)", id.Short())
		}
		xorInto(buf, data)
	}
	out := buf[:g.Sizes[at]]
	if Hash(out) != lost {
		return nil, fmt.Errorf("the pack rebuilt from parity %s does not match its name (the parity object is damaged)", shortName(g.Name))
	}
	return out, nil
}

// PackRepairReport says what RepairPacks did (or, with dryRun, would do).
type PackRepairReport struct {
	DryRun bool `json:"dry_run"`
	// Protected counts the stored packs some parity object covers.
	Protected int `json:"protected_packs"`
	Packs     int `json:"packs"`
	// Rebuilt are the lost or damaged packs rebuilt from parity.
	Rebuilt []ID `json:"rebuilt"`
	// Unrecoverable maps the lost or damaged packs that could not be
	// rebuilt to why.
	Unrecoverable map[string]string `json:"unrecoverable"`
	// BadParity maps parity objects that are not well-formed to why.
	BadParity map[string]string `json:"bad_parity"`
	BytesRead int64             `json:"bytes_read"`
}

// RepairPacks rebuilds, from their parity groups, the packs the index
// names that are missing from the storage or recorded as damaged (by
// 'check --read-data'), stores them again, and records them sound in the
// ledger (owner key). The index must be loaded.
func (r *Repository) RepairPacks(ctx context.Context, dryRun bool) (*PackRepairReport, error) {
	if r.load == nil {
		return nil, errors.New("internal error: RepairPacks before LoadIndex")
	}
	led := r.load.ledger
	groups, bad, err := r.ParityGroups(ctx)
	if err != nil {
		return nil, err
	}
	rep := &PackRepairReport{DryRun: dryRun, Unrecoverable: map[string]string{}, BadParity: map[string]string{}}
	for name, err := range bad {
		rep.BadParity[name] = err.Error()
	}
	groupOf := map[ID]*ParityGroup{}
	for _, g := range groups {
		for _, id := range g.Packs {
			if _, ok := groupOf[id]; !ok {
				groupOf[id] = g
			}
		}
	}
	var broken []ID
	for _, ps := range r.idx.PackStates() {
		if led.Deleted[ps.ID] {
			continue // pruned
		}
		rep.Packs++
		if _, ok := groupOf[ps.ID]; ok && ps.Size >= 0 {
			rep.Protected++
		}
		if ps.Size < 0 || led.Damaged(ps.ID) != "" {
			broken = append(broken, ps.ID)
		}
	}
	var fixed []LedgerEvent
	for _, id := range broken {
		g := groupOf[id]
		if g == nil {
			rep.Unrecoverable[id.String()] = "no parity object covers it"
			continue
		}
		data, err := r.RebuildPack(ctx, g, id)
		if err != nil {
			if ctx.Err() != nil {
				return rep, ctx.Err()
			}
			rep.Unrecoverable[id.String()] = err.Error()
			continue
		}
		rep.BytesRead += g.Length - int64(len(data))
		for _, size := range g.Sizes {
			rep.BytesRead += size
		}
		if !dryRun {
			if err := r.storeRebuilt(ctx, id, data); err != nil {
				return rep, err
			}
			fixed = append(fixed, LedgerEvent{Kind: EventPackOK, Pack: &id})
		}
		rep.Rebuilt = append(rep.Rebuilt, id)
	}
	if len(fixed) > 0 && r.keys.IsOwner() {
		if err := r.SaveLedger(ctx, fixed); err != nil {
			return rep, fmt.Errorf("record the rebuilt packs: %w", err)
		}
	}
	return rep, nil
}

// storeRebuilt stores a rebuilt pack under its name, replacing a damaged
// copy (a content-addressed save may take an existing object for done).
func (r *Repository) storeRebuilt(ctx context.Context, id ID, data []byte) error {
	h := backend.Handle{Type: backend.PackFile, Name: id.String()}
	if err := r.be.Remove(ctx, h); err != nil && !errors.Is(err, backend.ErrNotExist) {
		return fmt.Errorf("remove the damaged pack %s before storing it rebuilt: %w", id.Short(), err)
	}
	if err := r.be.Save(ctx, h, backend.NewByteReader(data), int64(len(data))); err != nil {
		return fmt.Errorf("store rebuilt pack %s: %w", id.Short(), err)
	}
	return nil
}

// ParityReport says what ProtectPacks did (or, with dryRun, would do).
type ParityReport struct {
	DryRun bool `json:"dry_run"`
	// Covered are the stored packs some parity object covered already.
	Covered int `json:"covered_packs"`
	// Protected are the packs given parity now, in Groups objects.
	Protected   int   `json:"protected_packs"`
	Groups      int   `json:"parity_objects"`
	ParityBytes int64 `json:"parity_bytes"`
	BytesRead   int64 `json:"bytes_read"`
	// Damaged are packs that did not match their name: left without
	// parity (check --read-data records them; repair packs may rebuild
	// them from an older parity object).
	Damaged []ID `json:"damaged"`
}

// ProtectPacks stores parity objects over the stored packs that no parity
// object covers (written without --parity, or whose group lost a member
// to prune), k packs a group in pack ID order. Each pack is read whole
// and checked against its name first: parity over a damaged pack would
// rebuild the damage. The index must be loaded.
func (r *Repository) ProtectPacks(ctx context.Context, k int, dryRun bool, progress func(done, total int)) (*ParityReport, error) {
	if k < 2 || k > MaxParityGroup {
		return nil, fmt.Errorf("parity groups of %d packs: give 2 to %d", k, MaxParityGroup)
	}
	if r.load == nil {
		return nil, errors.New("internal error: ProtectPacks before LoadIndex")
	}
	groups, _, err := r.ParityGroups(ctx)
	if err != nil {
		return nil, err
	}
	covered := map[ID]bool{}
	for _, g := range groups {
		for _, id := range g.Packs {
			covered[id] = true
		}
	}
	rep := &ParityReport{DryRun: dryRun}
	var todo []ID
	for id := range r.load.stored {
		if r.load.ledger.Deleted[id] {
			continue
		}
		if covered[id] {
			rep.Covered++
		} else {
			todo = append(todo, id)
		}
	}
	slices.SortFunc(todo, func(a, b ID) int { return bytes.Compare(a[:], b[:]) })
	b := &parityBuilder{r: r, k: k}
	defer b.release()
	for i, id := range todo {
		if progress != nil {
			progress(i, len(todo))
		}
		data, err := backend.ReadAll(ctx, r.be, backend.Handle{Type: backend.PackFile, Name: id.String()})
		if err != nil {
			return rep, fmt.Errorf("read pack %s to give it parity: %w", id.Short(), err)
		}
		rep.BytesRead += int64(len(data))
		if Hash(data) != id {
			rep.Damaged = append(rep.Damaged, id)
			continue
		}
		rep.Protected++
		if g := b.add(id, data); g != nil {
			if err := r.saveParityGroup(ctx, b, g, dryRun, rep); err != nil {
				return rep, err
			}
		}
	}
	if err := r.saveParityGroup(ctx, b, b.flush(), dryRun, rep); err != nil {
		return rep, err
	}
	if progress != nil {
		progress(len(todo), len(todo))
	}
	return rep, nil
}

func (r *Repository) saveParityGroup(ctx context.Context, b *parityBuilder, g *parityGroupData, dryRun bool, rep *ParityReport) error {
	if g == nil {
		return nil
	}
	rep.Groups++
	rep.ParityBytes += int64(12 + len(g.packs)*parityEntry + g.n)
	if dryRun {
		g.packs, g.sizes, g.n = g.packs[:0], g.sizes[:0], 0
		b.spare = append(b.spare, g)
		return nil
	}
	return b.save(ctx, g)
}
