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

// packer fills packs from concurrent SaveBlob calls of one write session
// and uploads them with a bounded number of uploaders. Pack buffers come
// from a fixed free list (one being filled plus one per uploader): a full
// pack waits for an uploader, which blocks SaveBlob, which is how a slow
// backend slows the reader down instead of filling memory.
type packer struct {
	r      *Repository
	ctx    context.Context
	cancel context.CancelFunc // stops uploads at once (abort)
	sealer *crypto.DataSealer

	mu  sync.Mutex
	cur *packBuilder
	// pending are the blobs claimed and not yet uploaded, under a lock
	// of their own: an uploader must never wait for mu, which a writer
	// holds while it waits for a pack buffer that only uploaders free.
	pendMu  sync.Mutex
	pending map[ID]struct{}
	queue   chan *packBuilder
	// stop is closed when the session ends: uploaders return and sends
	// fail, so a goroutine that outlives its session writes nothing.
	stop chan struct{}
	wg   sync.WaitGroup

	free     chan []byte
	bufMu    sync.Mutex
	bufCount int
	bufMax   int

	resMu sync.Mutex
	// idle is signalled (on resMu) each time an upload finishes, for
	// flush to wait until finished catches up with sent.
	idle     *sync.Cond
	sent     int
	finished int
	err      error
	unsaved  []indexRecord
	packs    int
	packSize int64

	// parity, when the repository asks for it, XORs the packs uploaded.
	parity *parityBuilder
}

// newPacker starts the uploaders of a write session; they run under ctx.
func (r *Repository) newPacker(ctx context.Context) (*packer, error) {
	sealer, err := r.keys.DataSealer()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	p := &packer{r: r, ctx: ctx, cancel: cancel, sealer: sealer, pending: map[ID]struct{}{},
		queue: make(chan *packBuilder), stop: make(chan struct{})}
	p.idle = sync.NewCond(&p.resMu)
	if r.parityK > 0 {
		p.parity = &parityBuilder{r: r, k: r.parityK}
	}
	p.bufMax = r.opts.Connections + 1
	p.free = make(chan []byte, p.bufMax)
	for i := 0; i < r.opts.Connections; i++ {
		p.wg.Add(1)
		go p.upload()
	}
	return p, nil
}

// packCap is the capacity of a pack buffer: a pack is closed once its blobs
// and the trailer they need reach PackSize, so it overshoots by less than
// one sealed blob plus the footer.
func (p *packer) packCap() int {
	return p.r.cfg.PackSize + max(p.r.cfg.ChunkSize, maxMetaBlob) + 1024
}

// limitBuffers lowers the number of pack buffers the session may hold
// to n (at least 1); before its first blob. With one buffer, filling the
// next pack waits for the previous upload to finish.
func (p *packer) limitBuffers(n int) {
	p.bufMu.Lock()
	p.bufMax = min(p.bufMax, max(n, 1))
	p.bufMu.Unlock()
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
	case <-p.stop:
		return nil, errSessionEnded
	}
}

// claim reserves id for the caller, unless it is being stored or stored
// where this writer may reuse it (Index.Reusable).
func (p *packer) claim(t BlobType, id ID) bool {
	p.pendMu.Lock()
	defer p.pendMu.Unlock()
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

// errSessionEnded is returned to a save that comes after its session.
var errSessionEnded = errors.New("the write session has ended")

// send hands a full pack to an uploader. It counts as sent until the
// upload finishes, so that flush waits for it.
func (p *packer) send(pb *packBuilder) error {
	p.resMu.Lock()
	p.sent++
	p.resMu.Unlock()
	var err error
	select {
	case p.queue <- pb:
		return nil
	case <-p.ctx.Done():
		err = p.ctx.Err()
	case <-p.stop:
		err = errSessionEnded
	}
	p.uploaded()
	return err
}

// uploaded counts one sent pack as finished, uploaded or not.
func (p *packer) uploaded() {
	p.resMu.Lock()
	p.finished++
	p.idle.Broadcast()
	p.resMu.Unlock()
}

func (p *packer) upload() {
	defer p.wg.Done()
	for {
		select {
		case pb := <-p.queue:
			p.uploadPack(pb)
			p.uploaded()
		case <-p.stop:
			return
		}
	}
}

// uploadPack stores one pack and indexes it, writing an index object
// every indexBatch packs.
func (p *packer) uploadPack(pb *packBuilder) {
	if p.failed() != nil || p.ctx.Err() != nil {
		p.free <- pb.buf[:0]
		return // drain
	}
	data, id := pb.finish(p.r.meta, p.r.keys)
	h := backend.Handle{Type: backend.PackFile, Name: id.String()}
	if err := p.r.cache.RecordOwnPack(id); err != nil {
		p.r.opts.Warn("cannot note pack %s in the cache (it will not be reused if this backup is interrupted): %v", id.Short(), err)
	}
	if err := p.r.be.Save(p.ctx, h, backend.NewByteReader(data), int64(len(data))); err != nil {
		p.free <- pb.buf[:0]
		p.fail(fmt.Errorf("save pack %s: %w", id.Short(), err))
		return
	}
	info := PackInfo{ID: id, Ephemeral: pb.eph, Blobs: pb.blobs}
	for _, b := range pb.blobs {
		if b.Type == MetaBlob {
			p.r.cache.Put(cacheBlobs, b.ID.String(), data[b.Offset:b.Offset+b.Length])
		}
	}
	if p.parity != nil {
		// Before the buffer goes back: the parity reads it.
		if err := p.parity.save(p.ctx, p.parity.add(id, data)); err != nil {
			p.free <- data[:0]
			p.fail(err)
			return
		}
	}
	p.r.idx.SetPackSize(id, int64(len(data)))
	p.r.idx.Add(info, p.r.self, p.r.selfTrust())
	// Never p.mu here: add holds it while it waits for a buffer, and
	// the buffer returned may be taken by another pack's blobs before
	// this uploader gets p.mu (two uploaders, two full packs waiting for
	// them, and a third writer waiting for a buffer under p.mu, was a
	// deadlock seen with small packs and many concurrent writers).
	p.free <- data[:0]
	p.pendMu.Lock()
	for _, b := range pb.blobs {
		delete(p.pending, b.ID)
	}
	p.pendMu.Unlock()

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

// SaveResult says what SaveBlob did.
type SaveResult struct {
	New    bool // false: the blob was stored already
	Coded  int  // plaintext bytes after compression
	Sealed int  // bytes added to the pack
}

// saveBlob stores a blob unless a blob with its ID is stored (or being
// stored) where this writer may reuse it.
func (p *packer) saveBlob(ctx context.Context, t BlobType, id ID, plain []byte) (SaveResult, error) {
	r := p.r
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

// saveCoded stores a blob already coded (a repack's copy of a stored
// blob, verified), unless it is stored where this writer may reuse it.
func (p *packer) saveCoded(t BlobType, id ID, coded []byte) (SaveResult, error) {
	if err := p.failed(); err != nil {
		return SaveResult{}, err
	}
	if !p.claim(t, id) {
		return SaveResult{}, nil
	}
	n, err := p.add(t, id, coded)
	if err != nil {
		return SaveResult{}, err
	}
	return SaveResult{New: true, Coded: len(coded) - 1, Sealed: n}, nil
}

// WriteStats reports what a write session stored.
type WriteStats struct {
	Packs int
	Bytes int64
	// ParityObjects and ParityBytes count the parity stored (SetParity).
	ParityObjects int
	ParityBytes   int64
}

// flush uploads the pack being filled, waits for every pack sent so far
// and writes the index objects that cover them. Only after flush returns
// nil may a snapshot refer to the blobs saved before it. The session goes
// on: blobs saved after it go into new packs.
func (p *packer) flush(ctx context.Context) (WriteStats, error) {
	p.mu.Lock()
	last := p.cur
	p.cur = nil
	p.mu.Unlock()
	var err error
	if last != nil && len(last.blobs) > 0 {
		err = p.send(last)
	}
	p.resMu.Lock()
	for p.finished < p.sent {
		p.idle.Wait()
	}
	stats := p.statsLocked()
	if p.err != nil {
		err = p.err
	}
	var batch []indexRecord
	if err == nil {
		batch, p.unsaved = p.unsaved, nil
	}
	p.resMu.Unlock()
	if err != nil {
		return stats, err
	}
	if err := ctx.Err(); err != nil {
		return stats, err
	}
	if p.parity != nil {
		if err := p.parity.save(ctx, p.parity.flush()); err != nil {
			p.fail(err)
			return stats, err
		}
	}
	if err := p.r.saveIndex(ctx, batch, nil); err != nil {
		p.fail(err)
		return stats, err
	}
	return p.stats(), nil
}

// stats reports what the session stored so far.
func (p *packer) stats() WriteStats {
	p.resMu.Lock()
	defer p.resMu.Unlock()
	return p.statsLocked()
}

func (p *packer) statsLocked() WriteStats {
	st := WriteStats{Packs: p.packs, Bytes: p.packSize}
	if p.parity != nil {
		p.parity.mu.Lock()
		st.ParityObjects, st.ParityBytes = p.parity.saved, p.parity.bytes
		p.parity.mu.Unlock()
	}
	return st
}

// close ends the session's uploads: after a flush, there are none left;
// after a failure (abort), those under way are cancelled and nothing more
// is written. It returns once no uploader runs.
func (p *packer) close(abort error) {
	if abort != nil {
		p.fail(abort)
		p.cancel()
	}
	// A save that comes later (a goroutine fn did not wait for) fails.
	p.fail(errSessionEnded)
	close(p.stop)
	p.wg.Wait()
	p.cancel()
	p.mu.Lock()
	p.cur = nil
	p.mu.Unlock()
	if p.parity != nil {
		p.parity.release()
	}
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
