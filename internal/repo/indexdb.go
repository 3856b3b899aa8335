package repo

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"unsafe"

	"github.com/zeebo/blake3"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
)

// The local index file, $cache/<repository>/index.db, is not part of the
// repository (docs/FORMAT.md, "Local cache"): it holds what the index
// objects it covers state, sorted, so that a lookup reads the one bucket
// of entries it needs (pread) where today every index object would be
// loaded into memory. Memory then grows with the repository's packs (its
// pack and key tables, under a byte per chunk), not with its chunks. The
// file holds nothing of the ledger: which packs are damaged, condemned or
// deleted, and which writers are revoked, is read and applied per run, as
// without the file.
//
// Layout (little-endian; entries, keys and buckets in this machine's
// layout, which the footer's fingerprint checks):
//
//	objects   nobj × (index object id 32 | size u64), sorted by id: what it covers
//	writers   u32 n | n × (key 32 | owner u8 | u32 len | certificate JSON)
//	packs     npacks × pack id 32, sorted
//	keys      nkeys × (pack number u32 | ephemeral key 32), sorted
//	entries   nent × indexEntry (48 bytes), sorted by blob ID
//	buckets   (1<<bits + 1) × u32: where each bucket (the top bits of an ID) starts
//	footer    "SVIXDB01" | u32 layout fingerprint | u32 byte-order probe |
//	          u64 × 12: nobj, objects, writers, writers length, npacks, packs,
//	          nkeys, keys, nent, entries, buckets, bits
//	MAC       keyed BLAKE3 (key derived from the metadata key) of all the above
//
// Integrity: a file that is short, fails its MAC, or whose footer or
// tables do not hold together is rebuilt, never used. The MAC is checked
// at open by one sequential read (0.9 s for 50 M entries); entries and
// buckets are not checked one by one then: a bucket whose bounds do not
// hold together reads as empty, and an entry that names no key or writer
// of the file is ignored. Only a holder of the metadata key who can write
// this machine's cache can forge a file that passes the MAC; such a party
// can read this machine's key, so it gains nothing it could not do with
// the key itself. The file is written to a temporary name and renamed, so
// a reader sees an old file or a new one; an open file is read through
// its descriptor, so a rename by another process does not change it.
const (
	indexDBName  = "index.db"
	indexDBMagic = "SVIXDB01"
	dbFooterSize = 8 + 4 + 4 + 12*8
	dbMACSize    = 32
	dbObjectSize = 32 + 8
	dbKeySize    = 4 + 32
	// dbMaxWriters bounds the writers a file may name (WriterNum).
	dbMaxWriters = int(NoWriter)
)

// diskKey is a (pack, ephemeral key) pair as the file stores it.
type diskKey struct {
	pack uint32
	eph  [32]byte
}

// dbLayout fingerprints the in-memory layout of what the file maps, so a
// file written by a build with another layout (or byte order) is rebuilt
// rather than misread.
var dbLayout = func() uint32 {
	var e indexEntry
	var k diskKey
	s := fmt.Sprint(unsafe.Sizeof(e), unsafe.Offsetof(e.id), unsafe.Offsetof(e.pack), unsafe.Offsetof(e.offset),
		unsafe.Offsetof(e.length), unsafe.Offsetof(e.typ), unsafe.Offsetof(e.trust), unsafe.Offsetof(e.writer),
		unsafe.Sizeof(k), unsafe.Offsetof(k.pack), unsafe.Offsetof(k.eph), unsafe.Sizeof(ID{}))
	return crc32.ChecksumIEEE([]byte(s))
}()

// dbProbe is written in native byte order: a file from a machine of the
// other order fails the check.
const dbProbe = 0x01020304

// dbObject is an index object a file covers.
type dbObject struct {
	id   ID
	size int64
}

type dbWriter struct {
	key   [32]byte
	owner bool
	cert  *crypto.Cert
}

// indexDB is an open local index file. Its packs and keys are read into
// memory (about 70 bytes per pack, a pack holding a hundred chunks or
// more); its entries and buckets are read with pread where a lookup needs
// them, so the process holds only the few hundred bytes a lookup reads
// (mapping the file was measured: the kernel maps whole large folios of a
// cached file on each fault, so a backup's few thousand lookups mapped
// most of it; docs/BENCHMARKS.md).
type indexDB struct {
	r       io.ReaderAt
	f       *os.File // closed with db; nil for a file parsed from memory
	objects []dbObject
	writers []dbWriter
	// packs is handed to the index (setBase) and dropped here.
	packs     []ID
	npacks    uint32
	keys      []diskKey
	nent      uint32
	entOff    int64
	bucketOff int64
	bits      uint // buckets are the top bits of a blob ID
	// wmap numbers the file's writers as this process does (setBase).
	wmap []WriterNum
	size int64
	bufs sync.Pool // *[]indexEntry
}

// indexDBKey derives the file's MAC key from the metadata key.
func indexDBKey(meta [crypto.KeySize]byte) [32]byte {
	return crypto.NewHasher(meta).Sum([]byte("sauve local index file v1"))
}

// openIndexDB opens and verifies the file at path.
func openIndexDB(path string, key [32]byte) (*indexDB, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	db, err := verifyIndexDB(f, key)
	if err != nil {
		f.Close()
		return nil, err
	}
	db.f = f
	runtime.AddCleanup(db, func(f *os.File) { f.Close() }, f)
	return db, nil
}

func verifyIndexDB(f *os.File, key [32]byte) (*indexDB, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := fi.Size()
	if size < dbFooterSize+dbMACSize || size > 1<<42 {
		return nil, fmt.Errorf("%d bytes is no index file", size)
	}
	h, err := blake3.NewKeyed(key[:])
	if err != nil {
		return nil, err
	}
	body := size - dbMACSize
	// Read through the page cache, not mapped: the pages stay out of
	// this process's memory.
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, body)); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	var mac [dbMACSize]byte
	if _, err := f.ReadAt(mac[:], body); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if !hmac.Equal(h.Sum(nil), mac[:]) {
		return nil, errors.New("fails authentication (damaged, or written with another key)")
	}
	db, err := parseIndexDB(f, body)
	if err != nil {
		return nil, err
	}
	db.size = size
	return db, nil
}

// parseIndexDB reads the tables of a file of size bytes (its MAC left
// out), which must stay unchanged while the result is used.
func parseIndexDB(r io.ReaderAt, size int64) (*indexDB, error) {
	if size < dbFooterSize {
		return nil, errors.New("too short")
	}
	ft := make([]byte, dbFooterSize)
	if _, err := r.ReadAt(ft, size-dbFooterSize); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if string(ft[:8]) != indexDBMagic {
		return nil, errors.New("not an index file of this version")
	}
	if binary.LittleEndian.Uint32(ft[8:]) != dbLayout || binary.NativeEndian.Uint32(ft[12:]) != dbProbe {
		return nil, errors.New("written by a build with another memory layout")
	}
	var v [12]uint64
	for i := range v {
		v[i] = binary.LittleEndian.Uint64(ft[16+8*i:])
	}
	nobj, objOff, wrOff, wrLen, npacks, packOff, nkeys, keyOff, nent, entOff, bucketOff, bits := v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]
	end := uint64(size - dbFooterSize)
	entSize := uint64(unsafe.Sizeof(indexEntry{}))
	// Each section must follow the previous one and fit; counts are
	// bounded first so the products below cannot overflow.
	if nobj > end || npacks > end || nkeys > end || nent > end || npacks >= 1<<32 || nkeys >= 1<<32 || nent >= 1<<32 || bits < 8 || bits > 28 {
		return nil, errors.New("bad counts")
	}
	type section struct{ off, n uint64 }
	secs := []section{{objOff, nobj * dbObjectSize}, {wrOff, wrLen}, {packOff, npacks * 32}, {keyOff, nkeys * dbKeySize}, {entOff, nent * entSize}, {bucketOff, (1<<bits + 1) * 4}}
	pos := uint64(0)
	for i, s := range secs {
		if s.off < pos || s.off > end || s.n > end-s.off {
			return nil, fmt.Errorf("section %d out of place", i)
		}
		pos = s.off + s.n
	}
	read := func(off, n uint64) ([]byte, error) {
		b := make([]byte, n)
		if _, err := r.ReadAt(b, int64(off)); err != nil {
			return nil, fmt.Errorf("read: %w", err)
		}
		return b, nil
	}
	db := &indexDB{r: r, npacks: uint32(npacks), nent: uint32(nent), entOff: int64(entOff), bucketOff: int64(bucketOff), bits: uint(bits)}
	ob, err := read(objOff, nobj*dbObjectSize)
	if err != nil {
		return nil, err
	}
	db.objects = make([]dbObject, nobj)
	for i := range db.objects {
		o := ob[i*dbObjectSize:]
		db.objects[i] = dbObject{id: ID(o[:32]), size: int64(binary.LittleEndian.Uint64(o[32:]))}
	}
	wb, err := read(wrOff, wrLen)
	if err != nil {
		return nil, err
	}
	if db.writers, err = parseDBWriters(wb); err != nil {
		return nil, err
	}
	db.packs = make([]ID, npacks)
	if _, err := r.ReadAt(bytesOf(db.packs), int64(packOff)); err != nil && npacks > 0 {
		return nil, fmt.Errorf("read: %w", err)
	}
	db.keys = make([]diskKey, nkeys)
	if _, err := r.ReadAt(bytesOf(db.keys), int64(keyOff)); err != nil && nkeys > 0 {
		return nil, fmt.Errorf("read: %w", err)
	}
	// The tables held in memory are checked whole, so that reading them
	// never indexes out of range; entries and buckets are checked where
	// they are read.
	for i := range db.keys {
		if uint64(db.keys[i].pack) >= npacks {
			return nil, fmt.Errorf("key %d names pack %d of %d", i, db.keys[i].pack, npacks)
		}
	}
	return db, nil
}

// bytesOf views a slice of plain values as its bytes.
func bytesOf[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	var z T
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(z)))
}

// dbBucketBits picks the bucket table for n entries: about 32 entries
// (1.5 KiB, one read) a bucket.
func dbBucketBits(n int) uint {
	return uint(min(max(bits.Len(uint(n/32)), 16), 24))
}

func (db *indexDB) bucket(id ID) uint32 {
	return binary.BigEndian.Uint32(id[:4]) >> (32 - db.bits)
}

func parseDBWriters(b []byte) ([]dbWriter, error) {
	if len(b) < 4 {
		return nil, errors.New("bad writers table")
	}
	n := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if n == 0 || n > uint32(dbMaxWriters) || uint64(n)*(32+1+4) > uint64(len(b)) {
		return nil, errors.New("bad writer count")
	}
	ws := make([]dbWriter, n)
	for i := range ws {
		if len(b) < 37 {
			return nil, errors.New("writers table truncated")
		}
		w := &ws[i]
		w.key = [32]byte(b[:32])
		w.owner = b[32] == 1
		l := binary.LittleEndian.Uint32(b[33:])
		b = b[37:]
		if uint64(l) > uint64(len(b)) {
			return nil, errors.New("writers table truncated")
		}
		if l > 0 {
			w.cert = new(crypto.Cert)
			if err := json.Unmarshal(b[:l], w.cert); err != nil {
				return nil, fmt.Errorf("writer %d: %w", i, err)
			}
		}
		b = b[l:]
	}
	if len(b) != 0 {
		return nil, errors.New("trailing bytes after the writers table")
	}
	return ws, nil
}

// covers reports whether the file covers only index objects that are
// listed (a file that covers an object since removed, by prune or repair,
// is rebuilt), and returns those listed that it does not cover.
func (db *indexDB) covers(listed map[ID]int64) (uncovered map[ID]int64, ok bool) {
	uncovered = make(map[ID]int64, len(listed))
	for id, size := range listed {
		uncovered[id] = size
	}
	for _, o := range db.objects {
		if size, in := listed[o.id]; !in || size != o.size {
			return nil, false
		}
		delete(uncovered, o.id)
	}
	return uncovered, true
}

// dbReadRun is how many entries a lookup reads at once (a variable for
// tests of buckets larger than one read).
var dbReadRun uint32 = 4096

// readEntries reads entries [lo, lo+len(dst)) into dst. A read of a
// local file that the MAC check read whole moments before fails only on
// a failing disk: the lookup then finds nothing, which costs storing a
// chunk again (a backup) or fails clearly (a restore names the chunk).
func (db *indexDB) readEntries(dst []indexEntry, lo uint32) bool {
	_, err := db.r.ReadAt(bytesOf(dst), db.entOff+int64(lo)*int64(unsafe.Sizeof(indexEntry{})))
	return err == nil
}

// lookup calls fn for every entry of id, with its number in the file.
func (db *indexDB) lookup(id ID, fn func(i uint32, e indexEntry)) {
	var bb [8]byte
	if _, err := db.r.ReadAt(bb[:], db.bucketOff+4*int64(db.bucket(id))); err != nil {
		return
	}
	lo, hi := binary.NativeEndian.Uint32(bb[:]), binary.NativeEndian.Uint32(bb[4:])
	if lo > hi || hi > db.nent {
		return // not a table this program wrote: nothing found
	}
	end := hi
	var one [1]indexEntry
	less := func(i uint32) bool {
		if !db.readEntries(one[:], i) {
			return false
		}
		return bytes.Compare(one[0].id[:], id[:]) < 0
	}
	// A bucket holds a few dozen entries: one read. Should one hold
	// more, halve it one entry at a time first, keeping the first entry
	// not below id inside [lo, hi].
	for hi-lo > dbReadRun {
		if m := lo + (hi-lo)/2; less(m) {
			lo = m + 1
		} else {
			hi = m + 1
		}
	}
	bp, _ := db.bufs.Get().(*[]indexEntry)
	if bp == nil {
		b := make([]indexEntry, dbReadRun)
		bp = &b
	}
	defer db.bufs.Put(bp)
	for lo < hi {
		buf := (*bp)[:min(hi-lo, dbReadRun)]
		if !db.readEntries(buf, lo) {
			return
		}
		i, _ := slices.BinarySearchFunc(buf, id, func(a indexEntry, id ID) int { return bytes.Compare(a.id[:], id[:]) })
		matched := false
		for ; i < len(buf) && buf[i].id == id; i++ {
			fn(lo+uint32(i), buf[i])
			matched = true
		}
		// Only copies of id that run to the end of the read may go on
		// past it, within the bucket.
		if i < len(buf) || !matched {
			return
		}
		lo += uint32(len(buf))
		hi = end
	}
}

// scan calls fn for every entry in order.
func (db *indexDB) scan(fn func(i uint32, e indexEntry)) error {
	buf := make([]indexEntry, 1<<14)
	for lo := uint32(0); lo < db.nent; {
		n := min(db.nent-lo, uint32(len(buf)))
		if !db.readEntries(buf[:n], lo) {
			return errors.New("read the local index file failed")
		}
		for i, e := range buf[:n] {
			fn(lo+uint32(i), e)
		}
		lo += n
	}
	return nil
}

// findPack returns the index's number of a pack of the file.
func (x *Index) findPack(id ID) (uint32, bool) {
	i, ok := slices.BinarySearchFunc(x.packs[:x.base.npacks], id, func(a packRecord, id ID) int { return bytes.Compare(a.id[:], id[:]) })
	return uint32(i), ok
}

// findKey returns the file's number of a (pack, ephemeral key) pair.
func (db *indexDB) findKey(k packKey) (uint32, bool) {
	i, ok := slices.BinarySearchFunc(db.keys, k, func(a diskKey, k packKey) int {
		return cmp.Or(cmp.Compare(a.pack, k.pack), bytes.Compare(a.eph[:], k.eph[:]))
	})
	return uint32(i), ok
}

// writer returns how this process numbers the file's writer n.
func (db *indexDB) writer(n WriterNum) (WriterNum, bool) {
	if n == NoWriter {
		return NoWriter, true
	}
	if int(n) < len(db.wmap) {
		return db.wmap[n], true
	}
	return 0, false
}

// setBase makes db the index's file; x must be empty.
func (x *Index) setBase(db *indexDB) {
	x.mu.Lock()
	defer x.mu.Unlock()
	db.wmap = make([]WriterNum, len(db.writers))
	for i, w := range db.writers {
		if w.owner || i == int(OwnerWriter) {
			db.wmap[i] = OwnerWriter
			continue
		}
		db.wmap[i] = x.Writers.Number(w.key, w.cert)
	}
	x.base = db
	x.packs = make([]packRecord, len(db.packs), len(db.packs)+64)
	for i := range db.packs {
		x.packs[i] = packRecord{id: db.packs[i], size: -1, indexed: true}
	}
	db.packs = nil // x.packs holds the IDs now
}

// writeIndexDB writes what x holds (its file, if any, and the entries in
// memory; none fresh) as the index file at path, covering objs.
func writeIndexDB(path string, key [32]byte, x *Index, objs []dbObject) (err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if len(x.fresh) > 0 {
		x.compact()
	}
	ws := x.Writers.snapshot()
	if len(ws) > dbMaxWriters {
		return errors.New("too many writers")
	}
	// Packs in ID order, keys in (pack, key) order: the file's numbers.
	order := make([]uint32, len(x.packs))
	for i := range order {
		order[i] = uint32(i)
	}
	slices.SortFunc(order, func(a, b uint32) int { return bytes.Compare(x.packs[a].id[:], x.packs[b].id[:]) })
	newPack := make([]uint32, len(x.packs))
	for i, o := range order {
		newPack[o] = uint32(i)
	}
	nk := x.keyCount()
	korder := make([]uint32, nk)
	for i := range korder {
		korder[i] = uint32(i)
	}
	slices.SortFunc(korder, func(a, b uint32) int {
		ka, kb := x.keyAt(a), x.keyAt(b)
		return cmp.Or(cmp.Compare(newPack[ka.pack], newPack[kb.pack]), bytes.Compare(ka.eph[:], kb.eph[:]))
	})
	newKey := make([]uint32, nk)
	for i, o := range korder {
		newKey[o] = uint32(i)
	}
	slices.SortFunc(objs, func(a, b dbObject) int { return bytes.Compare(a.id[:], b.id[:]) })

	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(filepath.Dir(path), ".tmp-index-"+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	mac, err := blake3.NewKeyed(key[:])
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(io.MultiWriter(f, mac), 1<<20)
	var pos uint64
	put := func(b []byte) {
		bw.Write(b) // errors surface at Flush
		pos += uint64(len(b))
	}
	align := func(n uint64) {
		var zero [64]byte
		put(zero[:(n-pos%n)%n])
	}
	var v [12]uint64
	v[0], v[1] = uint64(len(objs)), pos
	for _, o := range objs {
		put(o.id[:])
		put(binary.LittleEndian.AppendUint64(nil, uint64(o.size)))
	}
	align(8)
	v[2] = pos
	put(binary.LittleEndian.AppendUint32(nil, uint32(len(ws))))
	for _, w := range ws {
		b := append([]byte(nil), w.Key[:]...)
		b = append(b, 0)
		if w.Owner {
			b[32] = 1
		}
		var cj []byte
		if w.Cert != nil && !w.Owner {
			if cj, err = json.Marshal(w.Cert); err != nil {
				return err
			}
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(cj)))
		put(append(b, cj...))
	}
	v[3] = pos - v[2]
	align(64)
	v[4], v[5] = uint64(len(x.packs)), pos
	for _, o := range order {
		put(x.packs[o].id[:])
	}
	align(64)
	v[6], v[7] = uint64(nk), pos
	for _, o := range korder {
		k := x.keyAt(o)
		dk := diskKey{pack: newPack[k.pack], eph: k.eph}
		put(unsafe.Slice((*byte)(unsafe.Pointer(&dk)), unsafe.Sizeof(dk)))
	}
	align(64)
	v[9] = pos
	nmax := len(x.sorted) + x.spilledLen()
	if x.base != nil {
		nmax += int(x.base.nent)
	}
	bbits := dbBucketBits(nmax)
	v[11] = uint64(bbits)
	buckets := make([]uint32, 1<<bbits+1)
	var n uint32
	batch := make([]indexEntry, 0, 4096)
	flush := func() {
		if len(batch) > 0 {
			put(unsafe.Slice((*byte)(unsafe.Pointer(&batch[0])), len(batch)*int(unsafe.Sizeof(indexEntry{}))))
			batch = batch[:0]
		}
	}
	// Every entry, gone or not: the file holds what index objects state.
	err = x.merged(func(e indexEntry) {
		e.pack = newKey[e.pack]
		buckets[binary.BigEndian.Uint32(e.id[:4])>>(32-bbits)+1]++
		batch = append(batch, e)
		n++
		if len(batch) == cap(batch) {
			flush()
		}
	})
	if err != nil {
		return err
	}
	flush()
	v[8] = uint64(n)
	for p := 1; p < len(buckets); p++ {
		buckets[p] += buckets[p-1]
	}
	v[10] = pos
	put(bytesOf(buckets))
	ft := []byte(indexDBMagic)
	ft = binary.LittleEndian.AppendUint32(ft, dbLayout)
	ft = binary.NativeEndian.AppendUint32(ft, dbProbe)
	for _, x := range v {
		ft = binary.LittleEndian.AppendUint64(ft, x)
	}
	put(ft)
	if err = bw.Flush(); err != nil {
		return err
	}
	if _, err = f.Write(mac.Sum(nil)); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// dbRebuildEntries is how many entries of index objects the file does not
// cover a run loads into memory before it rewrites the file with them
// (about 48 MiB): the backups of one client add far fewer between the
// rebuilds, and a rebuild costs writing the whole file.
const dbRebuildEntries = 1 << 20

// empty reports whether nothing was added to the index.
func (x *Index) empty() bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.base == nil && len(x.packs) == 0 && len(x.sorted) == 0 && len(x.fresh) == 0
}

// openIndexFile backs idx with the cache's index file, building or
// rebuilding it first when it is missing, damaged, covers an index object
// no longer listed, or leaves too many uncovered. It returns the listed
// index objects still to load into memory, and false when the file
// cannot be used (idx is untouched then, and every object is to load).
func (r *Repository) openIndexFile(ctx context.Context, idx *Index, cache *Cache, objs []backend.Info, st *loadState) ([]backend.Info, bool, error) {
	path := filepath.Join(cache.dir, indexDBName)
	key := indexDBKey(r.keys.MetaKey)
	listed := make(map[ID]int64, len(objs))
	var odd []backend.Info // names that are no index object's: reported by the load
	for _, fi := range objs {
		if id, err := ParseID(fi.Name); err == nil {
			listed[id] = fi.Size
		} else {
			odd = append(odd, fi)
		}
	}
	db, err := openIndexDB(path, key)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		r.opts.Warn("local index file %s: %v: rebuilding it", path, err)
	}
	var rest map[ID]int64
	if db != nil {
		var ok bool
		if rest, ok = db.covers(listed); !ok {
			db = nil
		}
	}
	if db == nil {
		rest = listed
	}
	if n := sizeOf(rest) / indexBlobEntry; db == nil || n > dbRebuildEntries {
		var err error
		if db, err = r.buildIndexFile(ctx, path, key, db, rest, cache, st); err != nil {
			if ctx.Err() != nil {
				return nil, false, ctx.Err()
			}
			r.opts.Warn("cannot write the local index file, the index is held in memory: %v", err)
			return objs, false, nil
		}
		rest, _ = db.covers(listed)
	}
	idx.setBase(db)
	todo := odd
	for _, fi := range objs {
		if id, err := ParseID(fi.Name); err == nil {
			if _, ok := rest[id]; ok && st.damagedIndex[fi.Name] == nil {
				todo = append(todo, fi)
			}
		}
	}
	return todo, true, nil
}

func sizeOf(objs map[ID]int64) int64 {
	var n int64
	for _, s := range objs {
		n += s
	}
	return n
}

// buildBatches cuts objs into batches whose entries (estimated from the
// objects' sizes) stay under max, an object too large alone in one.
func buildBatches(objs []backend.Info, max int) [][]backend.Info {
	var out [][]backend.Info
	var est int64
	for i, fi := range objs {
		n := fi.Size / indexBlobEntry
		if i == 0 || est+n > int64(max) {
			out = append(out, nil)
			est = 0
		}
		out[len(out)-1] = append(out[len(out)-1], fi)
		est += n
	}
	return out
}

// buildIndexFile writes the index file covering what old covers (nil:
// nothing) and the index objects rest, and opens it. The objects of rest
// are loaded into memory for that, once; those that cannot be used are
// recorded in st and left uncovered, so that every run reports them.
func (r *Repository) buildIndexFile(ctx context.Context, path string, key [32]byte, old *indexDB, rest map[ID]int64, cache *Cache, st *loadState) (*indexDB, error) {
	scratch := r.newIndex()
	var covered []dbObject
	if old != nil {
		scratch.setBase(old)
		covered = slices.Clone(old.objects)
	}
	todo := make([]backend.Info, 0, len(rest))
	ids := make([]ID, 0, len(rest))
	for id, size := range rest {
		todo = append(todo, backend.Info{Name: id.String(), Size: size})
		ids = append(ids, id)
	}
	defer scratch.dropSpilled()
	// Records of deleted packs are kept: the ledger is applied per run.
	for i, batch := range buildBatches(todo, r.dbBuildEntries) {
		if i > 0 {
			if err := scratch.spill(filepath.Dir(path)); err != nil {
				return nil, err
			}
		}
		var size int64
		for _, fi := range batch {
			size += fi.Size
		}
		scratch.reserve(int(size / indexBlobEntry))
		if err := r.loadObjects(ctx, scratch, cache, batch, st, false); err != nil {
			return nil, err
		}
	}
	for i, fi := range todo {
		if st.damagedIndex[fi.Name] == nil {
			covered = append(covered, dbObject{id: ids[i], size: fi.Size})
		}
	}
	err := writeIndexDB(path, key, scratch, covered)
	// What was loaded (scratch is dead from here) goes back to the system
	// before the command runs.
	debug.FreeOSMemory()
	if err != nil {
		return nil, err
	}
	return openIndexDB(path, key)
}
