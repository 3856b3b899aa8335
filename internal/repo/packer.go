package repo

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// indexBatch is how many packs one index object covers while a backup
// runs: often enough that a killed backup leaves little unindexed, rarely
// enough that a large backup does not write thousands of small objects.
const indexBatch = 64

// maxMetaBlob bounds a chunk list blob.
const maxMetaBlob = 4 << 20

// packer fills packs from concurrent SaveBlob calls and uploads them with a
// bounded number of uploaders. Pack buffers come from a fixed free list (one
// being filled plus one per uploader): a full pack waits for an uploader,
// which blocks SaveBlob, which is how a slow backend slows the reader down
// instead of filling memory.
type packer struct {
	r      *Repository
	ctx    context.Context
	sealer *crypto.DataSealer

	mu      sync.Mutex
	cur     *packBuilder
	pending map[ID]struct{}
	queue   chan *packBuilder
	wg      sync.WaitGroup

	free     chan []byte
	bufMu    sync.Mutex
	bufCount int
	bufMax   int

	resMu    sync.Mutex
	err      error
	unsaved  []indexRecord
	packs    int
	packSize int64
}

func (r *Repository) packer(ctx context.Context) (*packer, error) {
	r.pkMu.Lock()
	defer r.pkMu.Unlock()
	if r.pk != nil {
		return r.pk, nil
	}
	if r.ReadOnly() {
		return nil, r.errReadOnly()
	}
	sealer, err := r.keys.DataSealer()
	if err != nil {
		return nil, err
	}
	p := &packer{r: r, ctx: ctx, sealer: sealer, pending: map[ID]struct{}{}, queue: make(chan *packBuilder)}
	p.bufMax = r.opts.Connections + 1
	p.free = make(chan []byte, p.bufMax)
	for i := 0; i < r.opts.Connections; i++ {
		p.wg.Add(1)
		go p.upload()
	}
	r.pk = p
	return p, nil
}

// packCap is the capacity of a pack buffer: a pack is closed once its blobs
// and the trailer they need reach PackSize, so it overshoots by less than
// one sealed blob plus the footer.
func (p *packer) packCap() int {
	return p.r.cfg.PackSize + max(p.r.cfg.ChunkSize, maxMetaBlob) + 1024
}

// buffer returns a free pack buffer, allocating up to bufMax of them.
func (p *packer) buffer() ([]byte, error) {
	select {
	case b := <-p.free:
		return b, nil
	default:
	}
	p.bufMu.Lock()
	if p.bufCount < p.bufMax {
		p.bufCount++
		p.bufMu.Unlock()
		return make([]byte, 0, p.packCap()), nil
	}
	p.bufMu.Unlock()
	select {
	case b := <-p.free:
		return b, nil
	case <-p.ctx.Done():
		return nil, p.ctx.Err()
	}
}

// claim reserves id for the caller, unless it is being stored or stored
// where this writer may reuse it (Index.Reusable).
func (p *packer) claim(t BlobType, id ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.pending[id]; ok {
		return false
	}
	if _, ok := p.r.idx.Reusable(t, id, p.r.self); ok {
		return false
	}
	p.pending[id] = struct{}{}
	return true
}

func (p *packer) failed() error {
	p.resMu.Lock()
	defer p.resMu.Unlock()
	return p.err
}

func (p *packer) fail(err error) {
	p.resMu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.resMu.Unlock()
}

// add seals coded straight into the current pack (sealing under the lock
// saves a copy of every blob; AES-GCM is fast enough not to contend).
func (p *packer) add(t BlobType, id ID, coded []byte) (int, error) {
	p.mu.Lock()
	if p.cur == nil {
		buf, err := p.buffer()
		if err != nil {
			p.mu.Unlock()
			return 0, err
		}
		p.cur = newPackBuilder(buf, p.sealer.Ephemeral())
	}
	pb := p.cur
	start := len(pb.buf)
	switch t {
	case DataBlob:
		pb.buf = p.sealer.Seal(pb.buf, coded, id[:])
	case MetaBlob:
		pb.buf = p.r.meta.Seal(pb.buf, coded, id[:])
	}
	n := len(pb.buf) - start
	pb.blobs = append(pb.blobs, PackBlob{Type: t, ID: id, Offset: uint32(start), Length: uint32(n)})
	var full *packBuilder
	if len(pb.buf)+len(pb.blobs)*trailerEntry >= p.r.cfg.PackSize {
		full, p.cur = pb, nil
	}
	p.mu.Unlock()
	// pb is another writer's once p.mu is released: only n, taken under
	// the lock, is ours.
	if full != nil {
		return n, p.send(full)
	}
	return n, nil
}

func (p *packer) send(pb *packBuilder) error {
	select {
	case p.queue <- pb:
		return nil
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
}

func (p *packer) upload() {
	defer p.wg.Done()
	for pb := range p.queue {
		if p.failed() != nil || p.ctx.Err() != nil {
			p.free <- pb.buf[:0]
			continue // drain
		}
		data, id := pb.finish(p.r.meta, p.r.keys)
		h := backend.Handle{Type: backend.PackFile, Name: id.String()}
		if err := p.r.cache.RecordOwnPack(id); err != nil {
			p.r.opts.Warn("cannot note pack %s in the cache (it will not be reused if this backup is interrupted): %v", id.Short(), err)
		}
		if err := p.r.be.Save(p.ctx, h, backend.NewByteReader(data), int64(len(data))); err != nil {
			p.free <- pb.buf[:0]
			p.fail(fmt.Errorf("save pack %s: %w", id.Short(), err))
			continue
		}
		info := PackInfo{ID: id, Ephemeral: pb.eph, Blobs: pb.blobs}
		for _, b := range pb.blobs {
			if b.Type == MetaBlob {
				p.r.cache.Put(cacheBlobs, b.ID.String(), data[b.Offset:b.Offset+b.Length])
			}
		}
		p.r.idx.SetPackSize(id, int64(len(data)))
		p.r.idx.Add(info, p.r.self, p.r.selfTrust())
		// Return the buffer before taking p.mu: add may hold p.mu while
		// it waits for a buffer.
		p.free <- data[:0]
		p.mu.Lock()
		for _, b := range pb.blobs {
			delete(p.pending, b.ID)
		}
		p.mu.Unlock()

		p.resMu.Lock()
		p.packs++
		p.packSize += int64(len(data))
		p.unsaved = append(p.unsaved, indexRecord{PackInfo: info, Writer: p.r.keys.SignerPublic()})
		var batch []indexRecord
		if len(p.unsaved) >= indexBatch {
			batch, p.unsaved = p.unsaved, nil
		}
		p.resMu.Unlock()
		if err := p.r.saveIndex(p.ctx, batch, nil); err != nil {
			p.fail(err)
		}
	}
}

// BeginWrite starts a writing session whose uploads run under ctx. Calling
// it is optional (SaveBlob starts one with its own context), but a caller
// whose SaveBlob contexts end before Flush must call it.
func (r *Repository) BeginWrite(ctx context.Context) error {
	_, err := r.packer(ctx)
	return err
}

// SaveResult says what SaveBlob did.
type SaveResult struct {
	New    bool // false: the blob was stored already
	Coded  int  // plaintext bytes after compression
	Sealed int  // bytes added to the pack
}

// SaveBlob stores a blob unless a blob with its ID is stored (or being
// stored). id must be the blob's ID (ChunkID for data).
func (r *Repository) SaveBlob(ctx context.Context, t BlobType, id ID, plain []byte) (SaveResult, error) {
	p, err := r.packer(ctx)
	if err != nil {
		return SaveResult{}, err
	}
	if err := p.failed(); err != nil {
		return SaveResult{}, err
	}
	if t != DataBlob && t != MetaBlob {
		return SaveResult{}, fmt.Errorf("unknown blob type %d", t)
	}
	if t == MetaBlob && len(plain) > maxMetaBlob {
		return SaveResult{}, fmt.Errorf("meta blob of %d bytes exceeds %d", len(plain), maxMetaBlob)
	}
	if t == MetaBlob && r.storedMetaOK(ctx, id) {
		return SaveResult{}, nil
	}
	if !p.claim(t, id) {
		return SaveResult{}, nil
	}
	bp := r.codedBufs.Get().(*[]byte)
	coded := r.comp.encode((*bp)[:0], plain)
	n, err := p.add(t, id, coded)
	*bp = coded
	r.codedBufs.Put(bp)
	if err != nil {
		return SaveResult{}, err
	}
	return SaveResult{New: true, Coded: len(coded) - 1, Sealed: n}, nil
}

// SaveMeta stores a chunk list blob and returns its ID.
func (r *Repository) SaveMeta(ctx context.Context, plain []byte) (ID, SaveResult, error) {
	id := r.metaIDs.Sum(plain)
	res, err := r.SaveBlob(ctx, MetaBlob, id, plain)
	return id, res, err
}

// FlushStats reports what the writing session stored.
type FlushStats struct {
	Packs int
	Bytes int64
}

// Flush uploads the pack being filled, waits for all uploads and writes the
// index objects that cover them. Only after Flush returns nil may a
// snapshot refer to the blobs saved before it.
func (r *Repository) Flush(ctx context.Context) (FlushStats, error) {
	r.pkMu.Lock()
	p := r.pk
	r.pk = nil
	r.pkMu.Unlock()
	if p == nil {
		return FlushStats{}, nil
	}
	p.mu.Lock()
	last := p.cur
	p.cur = nil
	p.mu.Unlock()
	var err error
	if last != nil && len(last.blobs) > 0 {
		err = p.send(last)
	}
	close(p.queue)
	p.wg.Wait()
	stats := FlushStats{Packs: p.packs, Bytes: p.packSize}
	if perr := p.failed(); perr != nil {
		return stats, perr
	}
	if err != nil {
		return stats, err
	}
	if err := ctx.Err(); err != nil {
		return stats, err
	}
	if err := r.saveIndex(ctx, p.unsaved, nil); err != nil {
		return stats, err
	}
	return stats, nil
}

// Abort stops a writing session without writing anything more.
func (r *Repository) Abort() {
	r.pkMu.Lock()
	p := r.pk
	r.pk = nil
	r.pkMu.Unlock()
	if p == nil {
		return
	}
	p.fail(errors.New("aborted"))
	close(p.queue)
	p.wg.Wait()
	p.mu.Lock()
	p.cur = nil
	p.mu.Unlock()
}

// storedMetaOK reports whether a chunk list blob is stored where this
// writer may reuse it, reading the stored copy back to make sure: a chunk
// list costs one ranged read per 8 GiB of disk, and a damaged one would
// spoil every later snapshot that reused it. A copy that fails is marked
// damaged (for this process) and the next one is tried.
func (r *Repository) storedMetaOK(ctx context.Context, id ID) bool {
	if _, ok := r.metaOK.Load(id); ok {
		return true
	}
	for {
		c, ok := r.idx.Reusable(MetaBlob, id, r.self)
		if !ok {
			return false
		}
		if _, err := r.ReadCopy(ctx, id, c.Location, nil); err != nil {
			if ctx.Err() != nil {
				return false
			}
			r.opts.Warn("chunk list %s in pack %s cannot be read back (%v): storing it again", id.Short(), c.Pack.Short(), err)
			r.idx.MarkDamaged(c.Pack, "a chunk list in it failed to read back: "+err.Error())
			continue
		}
		r.metaOK.Store(id, true)
		return true
	}
}
