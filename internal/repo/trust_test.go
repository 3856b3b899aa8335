package repo_test

// The threat model, tested: what storage damage and a holder of a
// write-only key can do to other people's backups. Every case ends in real
// restores of the owner's and another writer's snapshots, byte for byte.
// The hostile writer uses its own valid key and the repository's object
// layout (repo.BuildPack, repo.BuildIndex), as anyone holding such a key
// could without sauve's help.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/mem"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/restore"
)

const chunk = repo.MinChunkSize

// world is a repository in memory with its owner and two writers: web1
// (honest) and evil (hostile, validly certified for host "evil").
type world struct {
	t     *testing.T
	be    *mem.Backend
	owner *crypto.Keys
	web1  *crypto.Keys
	evil  *crypto.Keys
	warns []string
	mu    sync.Mutex
}

func newWorld(t *testing.T) *world {
	t.Helper()
	cfg, err := repo.NewConfig(chunk, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	owner, err := crypto.Generate(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, be: mem.New(), owner: owner}
	if err := repo.Init(context.Background(), w.be, owner, cfg); err != nil {
		t.Fatal(err)
	}
	w.web1 = w.derive("web1")
	w.evil = w.derive("evil")
	return w
}

func (w *world) derive(name string, hosts ...string) *crypto.Keys {
	k, err := w.owner.DeriveWriteOnly(name, hosts...)
	if err != nil {
		w.t.Fatal(err)
	}
	return k
}

// open opens the repository as keys would, index loaded.
func (w *world) open(keys *crypto.Keys) *repo.Repository {
	w.t.Helper()
	r, err := repo.Open(context.Background(), w.be, keys, repo.Options{Warn: func(f string, a ...any) {
		w.mu.Lock()
		w.warns = append(w.warns, fmt.Sprintf(f, a...))
		w.mu.Unlock()
	}})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := r.LoadIndex(context.Background()); err != nil {
		w.t.Fatal(err)
	}
	return r
}

// backup backs up data as keys for host and returns the snapshot.
func (w *world) backup(keys *crypto.Keys, host string, data []byte) (*repo.Snapshot, repo.DiskStats) {
	w.t.Helper()
	r := w.open(keys)
	if _, err := r.AdoptOrphanPacks(context.Background()); err != nil {
		w.t.Fatal(err)
	}
	res, err := backup.Run(context.Background(), r, backup.Source{Name: "vda", Path: "/dev/vda", Kind: "device", Size: int64(len(data)), At: bytes.NewReader(data)},
		backup.Options{Host: host, Workers: 2})
	if err != nil {
		w.t.Fatalf("backup as %s: %v", keys.Kind, err)
	}
	return res.Snapshot, res.Stats
}

// snapshot loads a snapshot as the owner sees it.
func (w *world) snapshot(id repo.ID) *repo.Snapshot {
	w.t.Helper()
	all, err := w.open(w.owner).Snapshots(context.Background(), nil)
	if err != nil {
		w.t.Fatal(err)
	}
	for _, sn := range all {
		if sn.ID == id {
			return sn
		}
	}
	w.t.Fatalf("snapshot %s not found", id.Short())
	return nil
}

// restore restores a snapshot with the owner's key.
func (w *world) restore(id repo.ID) ([]byte, error) {
	r := w.open(w.owner)
	all, err := r.Snapshots(context.Background(), nil)
	if err != nil {
		return nil, err
	}
	sn, err := repo.FindSnapshot(all, id.String(), repo.Filter{})
	if err != nil {
		return nil, err
	}
	d := &sn.Disks[0]
	t := &memTarget{}
	if _, err := restore.ToTarget(context.Background(), r, d, t, restore.Options{Fresh: true, Workers: 2}); err != nil {
		return nil, err
	}
	return t.bytes(d.Size), nil
}

// mustRestore restores and compares with want.
func (w *world) mustRestore(id repo.ID, want []byte, what string) {
	w.t.Helper()
	got, err := w.restore(id)
	if err != nil {
		w.t.Fatalf("%s: restore: %v", what, err)
	}
	if !bytes.Equal(got, want) {
		w.t.Fatalf("%s: restored bytes differ", what)
	}
}

func (w *world) check(readData bool) *repo.CheckReport {
	w.t.Helper()
	rep, err := w.open(w.owner).Check(context.Background(), repo.CheckOptions{ReadData: readData, Record: readData})
	if err != nil {
		w.t.Fatal(err)
	}
	return rep
}

type memTarget struct {
	mu  sync.Mutex
	buf []byte
}

func (m *memTarget) grow(n int64) {
	if int64(len(m.buf)) < n {
		m.buf = append(m.buf, make([]byte, n-int64(len(m.buf)))...)
	}
}

func (m *memTarget) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(off + int64(len(p)))
	return copy(m.buf[off:], p), nil
}

func (m *memTarget) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(off + int64(len(p)))
	return copy(p, m.buf[off:]), nil
}

func (m *memTarget) Zero(off, n int64, _ []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grow(off + n)
	clear(m.buf[off : off+n])
	return nil
}

func (m *memTarget) bytes(size int64) []byte {
	m.grow(size)
	return m.buf[:size]
}

// disk returns n chunks of random (incompressible) data.
func disk(seed uint64, n int) []byte {
	rng := mrand.New(mrand.NewPCG(seed, seed))
	b := make([]byte, n*chunk)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// chunkIDs returns the IDs the repository gives data's chunks.
func chunkIDs(r *repo.Repository, data []byte) []repo.ID {
	var ids []repo.ID
	for off := 0; off < len(data); off += chunk {
		ids = append(ids, r.ChunkID(data[off:min(off+chunk, len(data))]))
	}
	return ids
}

// forge stores a pack of garbage blobs that claim the given IDs, signed by
// keys, and an index object stating it; it returns the pack.
func (w *world) forge(keys *crypto.Keys, t repo.BlobType, ids []repo.ID) repo.PackInfo {
	w.t.Helper()
	var blobs []repo.RawBlob
	for i, id := range ids {
		g := bytes.Repeat([]byte{byte(i + 1)}, 100)
		blobs = append(blobs, repo.RawBlob{Type: t, ID: id, Sealed: g})
	}
	s, err := keys.DataSealer()
	if err != nil {
		w.t.Fatal(err)
	}
	data, info := repo.BuildPack(keys, s.Ephemeral(), blobs)
	w.be.Put(backend.Handle{Type: backend.PackFile, Name: info.ID.String()}, data)
	w.putIndex(repo.BuildIndex(keys, []repo.PackInfo{info}))
	return info
}

func (w *world) putIndex(obj []byte) {
	w.be.Put(backend.Handle{Type: backend.IndexFile, Name: repo.Hash(obj).String()}, obj)
}

// The hostile writer states that the chunks of a disk another writer will
// back up, and the chunks of the owner's old snapshot, are in its garbage
// pack. Nobody deduplicates against its word; every restore reads the
// right copy.
func TestHostileIndexEntries(t *testing.T) {
	w := newWorld(t)
	old := disk(1, 40)
	osn, _ := w.backup(w.owner, "files", old)
	future := disk(2, 40)
	er := w.open(w.evil)
	// Shadow the owner's chunks and claim the future disk's chunks.
	forged := w.forge(w.evil, repo.DataBlob, append(chunkIDs(er, old), chunkIDs(er, future)...))

	// Restate the owner's own packs with a wrong session key: that must
	// not make the owner's copies unreadable.
	var restated []repo.PackInfo
	for _, ps := range er.Index().PackStates() {
		info := repo.PackInfo{ID: ps.ID, Ephemeral: [32]byte{1, 2, 3}}
		for _, id := range chunkIDs(er, old) {
			if c, n := er.Index().Best(repo.DataBlob, id, repo.NoWriter); n > 0 && c.Pack == ps.ID {
				info.Blobs = append(info.Blobs, repo.PackBlob{Type: repo.DataBlob, ID: id, Offset: c.Offset, Length: c.Length})
			}
		}
		slices.SortFunc(info.Blobs, func(a, b repo.PackBlob) int { return int(a.Offset) - int(b.Offset) })
		if len(info.Blobs) > 0 {
			restated = append(restated, info)
		}
	}
	if len(restated) == 0 {
		t.Fatal("nothing to restate")
	}
	w.putIndex(repo.BuildIndex(w.evil, restated))

	vsn, st := w.backup(w.web1, "web1", future)
	if st.ChunksNew != 40 {
		t.Fatalf("web1 stored %d of 40 chunks: it trusted the hostile writer's index", st.ChunksNew)
	}
	osn2, st := w.backup(w.owner, "files", old)
	if st.ChunksNew != 0 {
		t.Fatalf("the owner's second backup stored %d chunks it had", st.ChunksNew)
	}
	w.mustRestore(osn.ID, old, "owner's old snapshot")
	w.mustRestore(osn2.ID, old, "owner's new snapshot")
	w.mustRestore(vsn.ID, future, "web1's snapshot")
	// The forged copies are named, but no snapshot is damaged.
	rep := w.check(true)
	if len(rep.Damaged) != 0 {
		t.Fatalf("check reports damaged snapshots: %+v", rep.Damaged)
	}
	if !strings.Contains(strings.Join(rep.Errors, "\n"), forged.ID.Short()) {
		t.Errorf("check --read-data does not name the forged pack: %v", rep.Errors)
	}
}

// The hostile writer copies web1's signed trailer onto garbage of the same
// length: neither web1 (adopting after a crash) nor a repair trusts it.
func TestForgedOrphanPackIsNotAdopted(t *testing.T) {
	w := newWorld(t)
	data := disk(3, 20)
	vsn, _ := w.backup(w.web1, "web1", data)
	// Take web1's pack and lay its trailer over garbage.
	var real []byte
	for _, name := range w.be.Names(backend.PackFile) {
		real, _ = w.be.Get(backend.Handle{Type: backend.PackFile, Name: name})
		break
	}
	fake := bytes.Clone(real)
	for i := 40; i < len(fake)/2; i++ {
		fake[i] ^= 0x5a
	}
	fakeID := repo.Hash(fake)
	w.be.Put(backend.Handle{Type: backend.PackFile, Name: fakeID.String()}, fake)
	// Even if web1's index were lost, the fake is not its own.
	for _, name := range w.be.Names(backend.IndexFile) {
		w.be.Remove(context.Background(), backend.Handle{Type: backend.IndexFile, Name: name})
	}
	r := w.open(w.web1)
	if n, err := r.AdoptOrphanPacks(context.Background()); err != nil || n != 0 {
		t.Fatalf("web1 adopted %d packs (%v) without a journal of its own", n, err)
	}
	if _, err := w.open(w.owner).RepairIndex(context.Background(), repo.RepairOptions{}); err != nil {
		t.Fatal(err)
	}
	_, st := w.backup(w.web1, "web1", data)
	if st.ChunksNew != 20 {
		t.Fatalf("web1 stored %d of 20 chunks: it reused chunks it only read of in trailers", st.ChunksNew)
	}
	w.mustRestore(vsn.ID, data, "web1's first snapshot")
	// With --read-data, repair tells the fake from the real pack.
	// (This one finds nothing left to index: the plain repair indexed
	// both packs as claimed. A fresh repository state shows it.)
	for _, name := range w.be.Names(backend.IndexFile) {
		w.be.Remove(context.Background(), backend.Handle{Type: backend.IndexFile, Name: name})
	}
	rep, err := w.open(w.owner).RepairIndex(context.Background(), repo.RepairOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range rep.Unreadable {
		found = found || p.Pack == fakeID
	}
	if !found || rep.Endorsed == 0 {
		t.Fatalf("repair --read-data: %+v", rep)
	}
	led, err := w.open(w.owner).Ledger(context.Background())
	if err != nil || led.Damaged(fakeID) == "" {
		t.Fatalf("the fake pack is not recorded as damaged: %v", err)
	}
}

// The hostile writer stores garbage under the ID of a chunk list it can
// predict (the list of a disk it knows): the writer who backs up that disk
// stores its own list, and restores read it.
func TestForgedChunkList(t *testing.T) {
	w := newWorld(t)
	data := disk(4, 30)
	er := w.open(w.evil)
	list := repo.EncodeChunkList(chunkIDs(er, data))
	w.forge(w.evil, repo.MetaBlob, []repo.ID{er.MetaID(list)})
	vsn, _ := w.backup(w.web1, "web1", data)
	w.mustRestore(vsn.ID, data, "web1's snapshot")
}

// A flood of entries naming packs that do not exist costs the hostile
// writer the storage of its index objects and nobody a restore.
func TestFloodOfEntries(t *testing.T) {
	w := newWorld(t)
	data := disk(5, 20)
	osn, _ := w.backup(w.owner, "files", data)
	er := w.open(w.evil)
	var packs []repo.PackInfo
	ids := chunkIDs(er, data)
	for p := 0; p < 200; p++ {
		info := repo.PackInfo{ID: repo.Hash([]byte(fmt.Sprint("fake", p)))}
		for i := 0; i < 500; i++ {
			id := ids[(p*500+i)%len(ids)]
			if i%2 == 1 {
				id = repo.Hash([]byte(fmt.Sprint(p, i)))
			}
			info.Blobs = append(info.Blobs, repo.PackBlob{Type: repo.DataBlob, ID: id, Offset: uint32(40 + i*100), Length: 100})
		}
		packs = append(packs, info)
	}
	w.putIndex(repo.BuildIndex(w.evil, packs))
	w.mustRestore(osn.ID, data, "owner's snapshot under a flood")
	// web1 reuses the owner's chunks, never the flood's.
	vsn, st := w.backup(w.web1, "web1", data)
	if st.ChunksNew != 0 {
		t.Fatalf("web1 stored %d of 20 chunks the owner holds", st.ChunksNew)
	}
	w.mustRestore(vsn.ID, data, "web1's snapshot under a flood")
	rep := w.check(false)
	if len(rep.Damaged) != 0 {
		t.Fatalf("damaged: %+v", rep.Damaged)
	}
}

// A writer's manifest for a host outside its certificate, or dated in the
// future, is marked and never 'latest'; the owner sees who signed it.
func TestPlantedSnapshots(t *testing.T) {
	w := newWorld(t)
	real := disk(6, 10)
	vsn, _ := w.backup(w.web1, "web1", real)
	evil := disk(7, 10)
	esn, _ := w.backup(w.evil, "web1", evil) // evil may back up only "evil"
	fut := w.open(w.web1)
	res, err := backup.Run(context.Background(), fut, backup.Source{Name: "vda", Path: "/dev/vda", Kind: "device", Size: int64(len(evil)), At: bytes.NewReader(evil)},
		backup.Options{Host: "web1", Workers: 2, Time: time.Now().AddDate(1, 0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	all, err := w.open(w.owner).Snapshots(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := repo.FindSnapshot(all, "latest", repo.Filter{Host: "web1"})
	if err != nil || got.ID != vsn.ID {
		t.Fatalf("latest for web1: %v, %v; want web1's own %s", got, err, vsn.ID.Short())
	}
	for _, sn := range all {
		switch sn.ID {
		case esn.ID:
			if sn.Signer != "evil" || len(sn.Marks) == 0 || !strings.Contains(sn.Marks[0], "outside") {
				t.Errorf("planted snapshot: signer %q, marks %q", sn.Signer, sn.Marks)
			}
		case res.Snapshot.ID:
			if len(sn.Marks) == 0 || !strings.Contains(sn.Marks[0], "future") {
				t.Errorf("future snapshot: marks %q", sn.Marks)
			}
		}
	}
	w.mustRestore(vsn.ID, real, "web1's snapshot")
}

// After the owner revokes a writer, its snapshots are marked and nobody
// reuses chunks on its word, not even itself.
func TestRevokedWriter(t *testing.T) {
	w := newWorld(t)
	data := disk(8, 10)
	vsn, _ := w.backup(w.web1, "web1", data)
	or := w.open(w.owner)
	if err := or.SaveLedger(context.Background(), []repo.LedgerEvent{{Kind: repo.EventWriterRevoked, Signer: func() []byte { k := w.web1.SignerPublic(); return k[:] }(), Name: "web1"}}); err != nil {
		t.Fatal(err)
	}
	if sn := w.snapshot(vsn.ID); len(sn.Marks) == 0 || !strings.Contains(sn.Marks[0], "revoked") {
		t.Fatalf("marks after revocation: %q", sn.Marks)
	}
	_, st := w.backup(w.owner, "web1", data)
	if st.ChunksNew != 10 {
		t.Fatalf("the owner reused %d chunks of a revoked writer", 10-st.ChunksNew)
	}
	w.mustRestore(vsn.ID, data, "revoked writer's snapshot, by ID")
}

// A writer's ledger record is ignored: it cannot mark packs damaged or
// revoke anyone.
func TestLedgerNeedsTheOwner(t *testing.T) {
	w := newWorld(t)
	r := w.open(w.evil)
	if err := r.SaveLedger(context.Background(), []repo.LedgerEvent{{Kind: repo.EventWriterRevoked}}); err == nil {
		t.Fatal("a writer saved a ledger record")
	}
}

// Storage loses a pack: the next backup stores its chunks again instead of
// reusing them, and its snapshot restores; check names the loss and the
// old snapshot's damaged ranges, the same on every run.
func TestMissingPackIsStoredAgain(t *testing.T) {
	w := newWorld(t)
	data := disk(9, 40)
	osn, _ := w.backup(w.owner, "files", data)
	lost := largest(w.be, backend.PackFile)
	w.be.Remove(context.Background(), backend.Handle{Type: backend.PackFile, Name: lost})
	a, b := w.check(false), w.check(false)
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	if !bytes.Equal(ja, jb) {
		t.Fatalf("check differs between runs:\n%s\n%s", ja, jb)
	}
	if len(a.Damaged) != 1 || a.Damaged[0].Snapshot != osn.ID || !strings.Contains(strings.Join(a.Errors, "\n"), lost) {
		t.Fatalf("check: damaged %+v, errors %v", a.Damaged, a.Errors)
	}
	// web1's backup finds the lost chunks missing and stores them; so
	// does the owner's (it trusts only its own and endorsed copies).
	for _, k := range []*crypto.Keys{w.web1, w.owner} {
		sn, st := w.backup(k, "files", data)
		if st.ChunksNew < 16 {
			t.Fatalf("a backup stored %d chunks of the missing pack's 16", st.ChunksNew)
		}
		w.mustRestore(sn.ID, data, "backup after the loss")
	}
	// The old snapshot's chunks exist again: only the lost pack is named.
	w.mustRestore(osn.ID, data, "the old snapshot, whose chunks were stored again")
	if rep := w.check(false); len(rep.Damaged) != 0 || len(rep.Errors) != 0 || !strings.Contains(strings.Join(rep.Warnings, " "), lost) {
		t.Fatalf("check after the chunks were stored again: %+v %v", rep.Damaged, rep.Errors)
	}
}

// A damaged pack found by check --read-data is recorded; later backups
// store its chunks again.
func TestDamagedPackIsStoredAgain(t *testing.T) {
	w := newWorld(t)
	data := disk(10, 12)
	w.backup(w.owner, "files", data)
	name := largest(w.be, backend.PackFile)
	w.be.Damage(backend.Handle{Type: backend.PackFile, Name: name}, 100)
	rep := w.check(true)
	if len(rep.DamagedPacks) != 1 || rep.DamagedPacks[0].Pack.String() != name || !rep.Recorded {
		t.Fatalf("check: %+v", rep.DamagedPacks)
	}
	sn, st := w.backup(w.web1, "files", data)
	if st.ChunksNew != 12 {
		t.Fatalf("backup after damage stored %d of 12 chunks", st.ChunksNew)
	}
	w.mustRestore(sn.ID, data, "backup after the damage")
}

// A damaged index object costs nothing: its packs are read from their
// trailers, restores work, and repair index rewrites it.
func TestDamagedIndexObject(t *testing.T) {
	w := newWorld(t)
	a, b := disk(11, 20), disk(12, 20)
	asn, _ := w.backup(w.owner, "a", a)
	bsn, _ := w.backup(w.web1, "web1", b)
	for _, name := range w.be.Names(backend.IndexFile) {
		w.be.Damage(backend.Handle{Type: backend.IndexFile, Name: name}, 50)
	}
	w.mustRestore(asn.ID, a, "owner's snapshot without an index")
	w.mustRestore(bsn.ID, b, "web1's snapshot without an index")
	rep := w.check(false)
	if len(rep.Damaged) != 0 || len(rep.DamagedIndex) != 2 {
		t.Fatalf("check: damaged %+v, index %v", rep.Damaged, rep.DamagedIndex)
	}
	rr, err := w.open(w.owner).RepairIndex(context.Background(), repo.RepairOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rr.RemovedIndex) != 2 || rr.Indexed == 0 || rr.Endorsed != rr.Indexed {
		t.Fatalf("repair: %+v", rr)
	}
	if rep := w.check(false); !rep.OK() {
		t.Fatalf("check after repair: %v", rep.Errors)
	}
	// Verified again, the chunks are reused.
	_, st := w.backup(w.web1, "web1", b)
	if st.ChunksNew != 0 {
		t.Fatalf("after repair --read-data, web1 stored %d chunks again", st.ChunksNew)
	}
}

// A chunk stored twice (two concurrent backups) survives the loss of one
// copy: restore and check use the other, on every run.
func TestSecondCopy(t *testing.T) {
	w := newWorld(t)
	data := disk(13, 20)
	var wg sync.WaitGroup
	var sns [2]*repo.Snapshot
	// Two writers back up the same disk at once: each stores its own
	// copy (neither trusts the other's).
	for i, k := range []*crypto.Keys{w.owner, w.web1} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := w.open(k)
			res, err := backup.Run(context.Background(), r, backup.Source{Name: "vda", Path: "/dev/vda", Kind: "device", Size: int64(len(data)), At: bytes.NewReader(data)}, backup.Options{Host: "files"})
			if err != nil {
				t.Error(err)
				return
			}
			sns[i] = res.Snapshot
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, name := range w.be.Names(backend.PackFile)[:1] {
		w.be.Remove(context.Background(), backend.Handle{Type: backend.PackFile, Name: name})
	}
	for range 3 {
		rep := w.check(false)
		if rep.Snapshots != 2 {
			t.Fatal("snapshots lost")
		}
		for _, sn := range sns {
			got, err := w.restore(sn.ID)
			if err != nil || !bytes.Equal(got, data) {
				// One of the two snapshots may have lost its only
				// chunk list; then check must say so, every time.
				if len(rep.Damaged) == 0 {
					t.Fatalf("restore of %s failed (%v) while check reports nothing", sn.ID.Short(), err)
				}
			}
		}
	}
}

// largest returns the name of the largest object of kind t (a pack of
// data chunks, not the small one of chunk lists).
func largest(be *mem.Backend, t backend.FileType) string {
	best, size := "", -1
	for _, name := range be.Names(t) {
		b, _ := be.Get(backend.Handle{Type: t, Name: name})
		if len(b) > size {
			best, size = name, len(b)
		}
	}
	return best
}
