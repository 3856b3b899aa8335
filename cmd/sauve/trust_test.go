package main

// The repository never trusts what it reads (issue 9): lost, truncated and
// damaged objects, and a holder of a write-only key playing against the
// owner and the other writers. Each test runs on a local folder and, where
// the issue asks, on the real S3 and Azure servers; each ends in real
// restores compared byte for byte.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/location"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

// storage is a repository as the test reaches it directly: its objects,
// and the keys of the env that made it.
type storage struct {
	t  *testing.T
	e  *env
	be backend.Backend
}

// where runs a test on a local folder, and on S3 and Azure when remote is
// set, in repositories made with 'sauve init' and initArgs.
func where(t *testing.T, remote bool, initArgs []string, fn func(t *testing.T, e *env)) {
	t.Run("local", func(t *testing.T) { fn(t, newEnv(t, initArgs...)) })
	if !remote {
		return
	}
	for _, rk := range remotes {
		if rk.name == "sftp" {
			continue
		}
		t.Run(rk.name, func(t *testing.T) {
			r := rk.start(t)
			e := remoteEnv(t, r)
			e.ok(append([]string{"init"}, initArgs...)...)
			fn(t, e)
		})
	}
}

// store opens e's repository directly, as a test that plays damaged
// storage or a hostile writer does.
func (e *env) store() *storage {
	e.t.Helper()
	getenv := func(k string) string {
		for _, kv := range e.vars {
			if v, ok := strings.CutPrefix(kv, k+"="); ok {
				return v
			}
		}
		return ""
	}
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED"} {
		if v := getenv(k); v != "" {
			e.t.Setenv(k, v)
		}
	}
	be, _, err := location.Open(context.Background(), getenv("SAUVE_REPO"), location.Options{Getenv: getenv})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { be.Close() })
	return &storage{t: e.t, e: e, be: be}
}

func (s *storage) names(t backend.FileType) []string {
	s.t.Helper()
	var out []string
	if err := s.be.List(context.Background(), t, func(fi backend.Info) error {
		out = append(out, fi.Name)
		return nil
	}); err != nil {
		s.t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

func (s *storage) get(h backend.Handle) []byte {
	s.t.Helper()
	b, err := backend.ReadAll(context.Background(), s.be, h)
	if err != nil {
		s.t.Fatal(err)
	}
	return b
}

// put stores bytes under a name, replacing what was there.
func (s *storage) put(h backend.Handle, data []byte) {
	s.t.Helper()
	s.be.Remove(context.Background(), h)
	if err := s.be.Save(context.Background(), h, bytes.NewReader(data), int64(len(data))); err != nil {
		s.t.Fatal(err)
	}
}

func (s *storage) remove(h backend.Handle) {
	s.t.Helper()
	if err := s.be.Remove(context.Background(), h); err != nil {
		s.t.Fatal(err)
	}
}

func pack(name string) backend.Handle { return backend.Handle{Type: backend.PackFile, Name: name} }

// keys loads a key file of the env (its own by default).
func (s *storage) keys(file string) *crypto.Keys {
	s.t.Helper()
	if file == "" {
		files, _ := filepath.Glob(filepath.Join(s.e.dir, "config", "sauve", "keys", "*.key"))
		if len(files) != 1 {
			s.t.Fatalf("key files: %v", files)
		}
		file = files[0]
	}
	k, err := crypto.DecodeKeyFile(mustRead(s.t, file), nil)
	if err != nil {
		s.t.Fatal(err)
	}
	return k
}

// repo opens the repository with keys, index loaded.
func (s *storage) repo(keys *crypto.Keys) *repo.Repository {
	s.t.Helper()
	r, err := repo.Open(context.Background(), s.be, keys, repo.Options{})
	if err != nil {
		s.t.Fatal(err)
	}
	if err := r.LoadIndex(context.Background()); err != nil {
		s.t.Fatal(err)
	}
	return r
}

// packsOf returns where the first chunk list of a snapshot is, and the
// pack holding its first data chunk stored in another pack.
func (s *storage) packsOf(snapshot string) (list repo.Location, data string) {
	s.t.Helper()
	r := s.repo(s.keys(""))
	id, _ := repo.ParseID(snapshot)
	sn, err := r.LoadSnapshot(context.Background(), id)
	if err != nil {
		s.t.Fatal(err)
	}
	d := &sn.Disks[0]
	loc, ok := r.Index().Lookup(d.ChunkLists[0])
	if !ok {
		s.t.Fatal("chunk list not indexed")
	}
	cl := r.ChunkList(d)
	for i := int64(0); i < cl.Len(); i++ {
		cid, err := cl.At(context.Background(), i)
		if err != nil {
			s.t.Fatal(err)
		}
		if !cid.IsZero() {
			if dl, ok := r.Index().Lookup(cid); ok && dl.Pack != loc.Pack {
				return loc, dl.Pack.String()
			}
		}
	}
	s.t.Fatal("no data chunk outside the chunk list's pack")
	return loc, ""
}

// restored restores SNAPSHOT and compares with want.
func (e *env) restored(snapshot, want string, extra ...string) {
	e.t.Helper()
	out := e.path("restored-" + time.Now().Format("150405.000000000"))
	e.ok(append([]string{"restore", snapshot, out}, extra...)...)
	sameFile(e.t, want, out)
	os.Remove(out)
}

// Item 1: a backup never reuses chunks whose pack is lost, truncated, or
// recorded as damaged, nor a chunk list it cannot read back.
func TestBackupNeverReusesLostChunks(t *testing.T) {
	where(t, true, []string{"--pack-size", "1M"}, func(t *testing.T, e *env) {
		src := e.path("disk.img")
		writeFile(t, src, append(randomBytes(3<<20), textBytes(5, 2<<20)...))
		first := e.backup(src)
		s := e.store()
		_, dataPack := s.packsOf(first.Snapshot)

		// A lost pack: check names it and the snapshot it damages; the
		// next backup stores its chunks again, which repairs that
		// snapshot too.
		s.remove(pack(dataPack))
		e.fail([]string{dataPack, "missing", first.ShortID}, "check")
		b := e.backup(src)
		if b.ChunksNew == 0 {
			t.Fatal("the backup after a pack was lost stored nothing")
		}
		e.restored(b.Snapshot, src)
		e.restored(first.Snapshot, src)

		// A truncated pack.
		_, dataPack = s.packsOf(b.Snapshot)
		p := s.get(pack(dataPack))
		s.put(pack(dataPack), p[:len(p)/2])
		b = e.backup(src)
		if b.ChunksNew == 0 {
			t.Fatal("the backup after a pack was truncated stored nothing")
		}
		e.restored(b.Snapshot, src)

		// A damaged chunk list is read back and stored again.
		list, _ := s.packsOf(b.Snapshot)
		p = s.get(pack(list.Pack.String()))
		p[list.Offset+list.Length/2] ^= 0x40
		s.put(pack(list.Pack.String()), p)
		b = e.backup(src)
		e.restored(b.Snapshot, src)

		// A pack damaged in place is found by check --read-data, which
		// records it; the next backup stores its chunks again.
		_, dataPack = s.packsOf(b.Snapshot)
		p = s.get(pack(dataPack))
		p[len(p)/3] ^= 1
		s.put(pack(dataPack), p)
		e.fail([]string{dataPack}, "check", "--read-data")
		b = e.backup(src)
		if b.ChunksNew == 0 {
			t.Fatal("the backup after check found a damaged pack stored nothing")
		}
		e.restored(b.Snapshot, src)
		e.restored("latest", src)
	})
}

// Item 2: one damaged index object costs nothing: restores and backups of
// every snapshot work, check names the object and no damaged snapshot,
// and repair index rewrites it.
func TestDamagedIndexObjectCostsNothing(t *testing.T) {
	where(t, true, nil, func(t *testing.T, e *env) {
		a, b := e.path("a.img"), e.path("b.img")
		writeFile(t, a, randomBytes(2<<20))
		writeFile(t, b, textBytes(7, 3<<20))
		e.backup(a, "--host", "ha")
		e.backup(b, "--host", "hb")
		s := e.store()
		idx := s.names(backend.IndexFile)
		if len(idx) != 2 {
			t.Fatalf("%d index objects", len(idx))
		}
		for _, name := range idx {
			h := backend.Handle{Type: backend.IndexFile, Name: name}
			d := s.get(h)
			d[len(d)/2] ^= 1
			s.put(h, d)
		}
		e.restored("latest", a, "--host", "ha", "--no-cache")
		e.restored("latest", b, "--host", "hb", "--no-cache")
		var rep struct {
			Damaged      []any    `json:"damaged"`
			DamagedIndex []string `json:"damaged_index_objects"`
		}
		r := e.run("check", "--json")
		if r.code == 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil || len(rep.Damaged) != 0 || len(rep.DamagedIndex) != 2 {
			t.Fatalf("check: exit %d\n%s", r.code, r.stdout)
		}
		e.backup(a, "--host", "ha", "--no-cache")
		e.ok("repair", "index", "--read-data")
		e.ok("check")
		e.restored("latest", b, "--host", "hb", "--no-cache")
	})
}

// Item 3: a chunk stored twice (two backups at once) survives the loss of
// one copy, and check says the same on every run.
func TestSecondCopyIsUsed(t *testing.T) {
	where(t, true, nil, func(t *testing.T, e *env) {
		src := e.path("disk.img")
		writeFile(t, src, randomBytes(4<<20))
		var wg sync.WaitGroup
		outs := make([]string, 2)
		for i := range outs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := e.run("backup", src, "--json", "--no-cache")
				if r.code != 0 {
					t.Errorf("backup %d: %s", i, r.stderr)
				}
				outs[i] = r.stdout
			}()
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		s := e.store()
		packs := s.names(backend.PackFile)
		if len(packs) < 2 {
			t.Fatalf("the two backups did not both store the disk (%d packs)", len(packs))
		}
		s.remove(pack(packs[0]))
		var first string
		for run := 0; run < 3; run++ {
			r := e.run("check", "--json")
			var rep struct {
				Damaged []any `json:"damaged"`
				Errors  []string
			}
			json.Unmarshal([]byte(r.stdout), &rep)
			if len(rep.Damaged) != 0 {
				t.Fatalf("check reports damaged snapshots although every chunk has a copy: %s", r.stdout)
			}
			if run == 0 {
				first = r.stdout
			} else if r.stdout != first {
				t.Fatalf("check differs between runs:\n%s\n%s", first, r.stdout)
			}
		}
		for _, o := range outs {
			var b backupOut
			json.Unmarshal([]byte(o), &b)
			e.restored(b.Snapshot, src, "--no-cache")
		}
	})
}

// Item 4: a holder of a write-only key states that chunks are where they
// are not (shadowing the owner's, claiming those of a disk another writer
// will back up, under a predictable chunk list ID, and by a copy of
// another writer's signed trailer over garbage). Nobody's backup trusts
// it, and every other snapshot restores.
func TestHostileWriterSpoilsOnlyItsOwn(t *testing.T) {
	where(t, true, []string{"--pack-size", "1M"}, func(t *testing.T, e *env) {
		owned, future := e.path("owned.img"), e.path("future.img")
		writeFile(t, owned, randomBytes(3<<20))
		writeFile(t, future, append(randomBytes(2<<20), textBytes(9, 1<<20)...))
		ob := e.backup(owned, "--host", "files")
		evilKey, webKey := e.path("evil.key"), e.path("web1.key")
		e.ok("key", "export", "--write-only", "--name", "evil", evilKey)
		e.ok("key", "export", "--write-only", "--name", "web1", webKey)
		s := e.store()
		evil := s.keys(evilKey)
		er := s.repo(evil)
		ids := func(path string) []repo.ID {
			data := mustRead(t, path)
			var out []repo.ID
			for off := 0; off < len(data); off += chunk {
				out = append(out, er.ChunkID(data[off:min(off+chunk, len(data))]))
			}
			return out
		}
		claimed := append(ids(owned), ids(future)...)
		list := er.MetaID(repo.EncodeChunkList(ids(future)))
		var blobs []repo.RawBlob
		for i, id := range claimed {
			blobs = append(blobs, repo.RawBlob{Type: repo.DataBlob, ID: id, Sealed: bytes.Repeat([]byte{byte(i)}, 64)})
		}
		blobs = append(blobs, repo.RawBlob{Type: repo.MetaBlob, ID: list, Sealed: bytes.Repeat([]byte{7}, 64)})
		sealer, _ := evil.DataSealer()
		data, info := repo.BuildPack(evil, sealer.Ephemeral(), blobs)
		s.put(pack(info.ID.String()), data)
		obj := repo.BuildIndex(evil, []repo.PackInfo{info})
		s.put(backend.Handle{Type: backend.IndexFile, Name: repo.Hash(obj).String()}, obj)

		// web1 backs up the claimed disk: it stores every chunk.
		w := e.as(webKey)
		wb := w.backup(future, "--host", "web1")
		if wb.ChunksNew != 12 {
			t.Fatalf("web1 stored %d of 12 chunks: it trusted the hostile writer's index", wb.ChunksNew)
		}
		// A fake orphan: another writer's signed trailer over garbage.
		for _, name := range s.names(backend.PackFile) {
			p := s.get(pack(name))
			if name == info.ID.String() {
				continue
			}
			fake := bytes.Clone(p)
			for i := 40; i < len(fake)/2; i++ {
				fake[i] ^= 0x33
			}
			s.put(pack(repo.Hash(fake).String()), fake)
			break
		}
		// The owner's next backup reuses its own chunks only.
		nb := e.backup(owned, "--host", "files")
		if nb.ChunksNew != 0 {
			t.Fatalf("the owner's second backup stored %d chunks it had", nb.ChunksNew)
		}
		wb2 := w.backup(future, "--host", "web1")
		e.restored(ob.Snapshot, owned)
		e.restored(nb.Snapshot, owned)
		e.restored(wb.Snapshot, future)
		e.restored(wb2.Snapshot, future)
		// Structure is sound and no snapshot damaged; reading the data
		// names the hostile pack.
		e.ok("check")
		e.fail([]string{info.ID.Short()}, "check", "--read-data")
	})
}

// Item 5: a write-only key cannot plant the snapshot that the owner's
// 'restore latest --host vm' picks, neither for another host nor dated in
// the future; snapshots and restore show who signed.
func TestPlantedSnapshotIsNotLatest(t *testing.T) {
	where(t, true, nil, func(t *testing.T, e *env) {
		real, evil := e.path("vm.img"), e.path("evil.img")
		writeFile(t, real, randomBytes(1<<20))
		writeFile(t, evil, textBytes(3, 1<<20))
		vmKey, evilKey := e.path("vm.key"), e.path("evil.key")
		e.ok("key", "export", "--write-only", "--name", "vm", vmKey)
		e.ok("key", "export", "--write-only", "--name", "evil", evilKey)
		vb := e.as(vmKey).backup(real, "--host", "vm")
		eb := e.as(evilKey).backup(evil, "--host", "vm")
		// The same key, within its scope but a year ahead.
		s := e.store()
		ek := s.keys(evilKey)
		er := s.repo(ek)
		id, _ := repo.ParseID(eb.Snapshot)
		sn, err := er.LoadSnapshot(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		fut := &repo.Snapshot{Time: time.Now().AddDate(1, 0, 0).UTC(), Host: "evil", Program: "forged", Disks: sn.Disks}
		if _, err := er.WithWriter(context.Background(), "forge", func(w *repo.Writer) error {
			_, err := w.SaveSnapshot(context.Background(), fut)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		older := e.as(evilKey).backup(real, "--host", "evil")

		out := e.ok("restore", "latest", e.path("r.img"), "--host", "vm")
		sameFile(t, real, e.path("r.img"))
		if !strings.Contains(out, "signed by vm") {
			t.Errorf("restore does not say who signed:\n%s", out)
		}
		e.restored("latest", real, "--host", "evil")
		list := e.ok("snapshots")
		for _, want := range []string{"evil", "vm", eb.ShortID + " !", "outside what writer evil may back up", "in the future"} {
			if !strings.Contains(list, want) {
				t.Errorf("snapshots lacks %q:\n%s", want, list)
			}
		}
		var js []struct {
			ID, Signer string
			Marks      []string
		}
		e.okJSON(&js, "snapshots")
		for _, x := range js {
			if x.ID == vb.Snapshot && len(x.Marks) != 0 || x.ID == older.Snapshot && len(x.Marks) != 0 {
				t.Errorf("sound snapshot marked: %+v", x)
			}
		}
		// Named by ID, the planted one restores, with a warning.
		r := e.run("restore", eb.Snapshot, e.path("p.img"))
		if r.code != 0 || !strings.Contains(r.stderr, "outside") {
			t.Errorf("restore of the planted snapshot by ID: exit %d, %s", r.code, r.stderr)
		}
		// 'owner' is the owner's name alone.
		e.fail([]string{"reserved"}, "key", "export", "--write-only", "--name", "owner", e.path("o.key"))
	})
}

// Item 6: the repository ID is checked before it is used as a path.
func TestRepositoryIDIsChecked(t *testing.T) {
	e := newEnv(t)
	cfgPath := filepath.Join(e.repo, "config")
	var cfg map[string]any
	json.Unmarshal(mustRead(t, cfgPath), &cfg)
	evil := filepath.Join(t.TempDir(), "x")
	os.MkdirAll(evil, 0o700)
	rel, _ := filepath.Rel(filepath.Join(e.dir, "config", "sauve", "keys"), filepath.Join(evil, "abcd"))
	cfg["id"] = (rel + strings.Repeat("0", 32))[:32]
	b, _ := json.Marshal(cfg)
	os.Chmod(cfgPath, 0o600)
	writeFile(t, cfgPath, b)
	e.fail([]string{"repository ID", "hex"}, "snapshots")
	e.fail([]string{"repository ID", "hex"}, "backup", cfgPath)
	if ents, _ := os.ReadDir(evil); len(ents) != 0 {
		t.Fatalf("sauve wrote under the path the ID named: %v", ents)
	}
}

// Item 7: 'latest' is this machine's disk: with snapshots of two hosts,
// restore refuses and says which --host to add.
func TestLatestIsOneMachinesDisk(t *testing.T) {
	e := newEnv(t)
	web, db := e.path("web.img"), e.path("db.img")
	writeFile(t, web, randomBytes(1<<20))
	writeFile(t, db, randomBytes(1<<20))
	e.backup(web, "--host", "web1")
	e.backup(db, "--host", "db1")
	stderr := e.fail([]string{"ambiguous", "--host web1", "--host db1"}, "restore", "latest", e.path("x.img"))
	if _, err := os.Stat(e.path("x.img")); err == nil {
		t.Fatal("refused restore created its target")
	}
	_ = stderr
	e.restored("latest", web, "--host", "web1")
	e.restored("latest", db, "--host", "db1")
	// Two sources of one host: --source chooses.
	e.backup(db, "--host", "web1")
	e.fail([]string{"ambiguous", "--source"}, "restore", "latest", e.path("y.img"), "--host", "web1")
	e.restored("latest", db, "--host", "web1", "--source", db)
	e.fail([]string{"ambiguous"}, "export", "latest", e.path("z.qcow2"))
}

// Item 9: a manifest whose counts the sizes do not bound is refused, and
// check of a manifest that names one chunk list thousands of times takes
// no longer than one.
func TestManifestCountsAreBounded(t *testing.T) {
	e := newEnv(t)
	src := e.path("d.img")
	writeFile(t, src, randomBytes(1<<20))
	b := e.backup(src)
	s := e.store()
	r := s.repo(s.keys(""))
	id, _ := repo.ParseID(b.Snapshot)
	sn, err := r.LoadSnapshot(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	d := sn.Disks[0]
	// 4 PiB of disk made of one list repeated 2^16 times.
	lists := make([]repo.ID, 1<<16)
	for i := range lists {
		lists[i] = d.ChunkLists[0]
	}
	d.Size = int64(len(lists)) * int64(d.ListEntries) * int64(d.ChunkSize)
	d.ChunkLists = lists
	huge := &repo.Snapshot{Time: time.Now().UTC(), Host: "h", Disks: []repo.Disk{d}}
	// The list holds 4 entries, not 32768: check names every copy of the
	// mismatch quickly, and never walks 2^31 chunks.
	if _, err := r.WithWriter(context.Background(), "forge", func(w *repo.Writer) error {
		_, err := w.SaveSnapshot(context.Background(), huge)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan result, 1)
	go func() { done <- e.run("check") }()
	select {
	case res := <-done:
		if res.code == 0 || !strings.Contains(res.stderr, "holds 4 entries") {
			t.Fatalf("check of a manifest repeating a list: exit %d\n%s", res.code, res.stderr)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("check of a manifest repeating one chunk list 65536 times did not finish in 2 minutes")
	}
}

// Item 9: a snapshot deleted from storage is reported, not silently
// dropped; temporary files left by kill -9 are reported by check and
// removed by repair.
func TestVanishedSnapshotAndLeftovers(t *testing.T) {
	e := newEnv(t)
	src := e.path("d.img")
	writeFile(t, src, randomBytes(1<<20))
	a := e.backup(src, "--host", "h1")
	e.backup(src, "--host", "h2")
	e.ok("snapshots")
	os.Remove(filepath.Join(e.repo, "snapshots", a.Snapshot))
	r := e.run("snapshots")
	if r.code != 0 || !strings.Contains(r.stderr, a.ShortID) || !strings.Contains(r.stderr, "no longer in the repository") {
		t.Fatalf("a vanished snapshot is not reported: exit %d\n%s", r.code, r.stderr)
	}
	tmp := filepath.Join(e.repo, "data", ".tmp-0123456789abcdef")
	writeFile(t, tmp, randomBytes(1000))
	old := time.Now().Add(-48 * time.Hour)
	os.Chtimes(tmp, old, old)
	r = e.run("check")
	if !strings.Contains(r.stderr, "1 temporary files") {
		t.Fatalf("check does not report a leftover temporary file:\n%s", r.stderr)
	}
	out := e.ok("repair", "index", "--dry-run")
	if _, err := os.Stat(tmp); err != nil || !strings.Contains(out, "1 temporary files") {
		t.Fatalf("repair --dry-run: %v\n%s", err, out)
	}
	e.ok("repair", "index")
	if _, err := os.Stat(tmp); err == nil {
		t.Fatal("repair did not remove an old temporary file")
	}
}

// A repository of format version 1 (made by the last sauve that wrote it)
// restores and checks as before; this sauve refuses to write to it.
func TestVersion1Repository(t *testing.T) {
	e := newBareEnv(t)
	fix := filepath.Join("testdata", "v1repo")
	if err := os.CopyFS(e.repo, os.DirFS(filepath.Join(fix, "repo"))); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(filepath.Join(fix, "owner.key"))
	e.setenv("SAUVE_KEY", abs)
	want := map[string]string{
		"24fa2d85": "73c56d6a9f171cda185728319a8251dfdaadb3bc422b3fa895068b4a786f07d9",
		"49546b12": "882ab00fe168e53d1167c16b549c8bbcf423db85c10d267dcd950d707df15ddb",
		"b593b6f0": "226672bf8f8433a2a00fa17f54451769d8f17972141aa36149e54038420c10a1",
	}
	var sn []struct{ ID, Signer, Host string }
	e.okJSON(&sn, "snapshots")
	if len(sn) != 3 || sn[2].Signer != "web1" || sn[0].Signer != "owner" {
		t.Fatalf("snapshots of the version-1 repository: %+v", sn)
	}
	for id, sum := range want {
		out := e.path(id + ".img")
		e.ok("restore", id, out)
		if got := fileHash(t, out, -1); got != sum {
			t.Errorf("snapshot %s restores to %s, want %s", id, got, sum)
		}
	}
	e.ok("restore", "latest", e.path("l.img"), "--host", "fixture", "--source", "/tmp/fix/a2.img")
	if got := fileHash(t, e.path("l.img"), -1); got != want["49546b12"] {
		t.Error("latest of host fixture and source a2.img is not its snapshot")
	}
	e.ok("check", "--read-data")
	e.ok("export", "b593b6f0", e.path("w.qcow2"))
	src := e.path("new.img")
	writeFile(t, src, randomBytes(1000))
	e.fail([]string{"format version 1", "new repository"}, "backup", src)
	if _, err := os.Stat(filepath.Join(e.repo, "sessions")); err == nil {
		t.Error("a refused backup of a version-1 repository announced a write session")
	}
	// With a damaged index object, the packs are read from their
	// (version-1) trailers.
	idx, _ := filepath.Glob(filepath.Join(e.repo, "index", "*"))
	for _, p := range idx {
		d := mustRead(t, p)
		d[len(d)/2] ^= 1
		os.Chmod(p, 0o600)
		writeFile(t, p, d)
	}
	e.ok("restore", "24fa2d85", e.path("again.img"), "--no-cache")
	if got := fileHash(t, e.path("again.img"), -1); got != want["24fa2d85"] {
		t.Error("restore through trailers differs")
	}
}

// A backup announces its write session in sessions/ on every backend,
// with the owner's key as with a write-only key (whose storage rights are
// those of a backup host): three announcements (start, before the
// manifest, end), stamped by the storage's clock. check reads them: none
// running once the backups are done, one while a session is open.
func TestBackupAnnouncesItsSession(t *testing.T) {
	where(t, true, nil, func(t *testing.T, e *env) {
		ctx := context.Background()
		src := e.path("d.img")
		writeFile(t, src, randomBytes(1<<20))
		start := time.Now()
		e.backup(src)
		key := e.path("web1.key")
		e.ok("key", "export", "--write-only", "--name", "web1", key)
		e.as(key).backup(src, "--host", "web1")
		s := e.store()
		if names := s.names(backend.SessionFile); len(names) != 6 {
			t.Fatalf("%d announcements after two backups, want 6", len(names))
		}
		r := s.repo(s.keys(""))
		rep, err := r.Sessions(ctx, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Sessions) != 2 || len(rep.Unreadable) != 0 || rep.Live() != 0 {
			t.Fatalf("sessions after two backups: %+v", rep)
		}
		slices.SortFunc(rep.Sessions, func(a, b repo.SessionInfo) int { return strings.Compare(a.Writer, b.Writer) })
		for i, want := range []string{"owner", "web1"} {
			ss := rep.Sessions[i]
			if ss.Writer != want || ss.State != repo.SessionEnded || ss.Purpose != "backup" || ss.Seq != 2 ||
				ss.First.Before(start.Add(-5*time.Second)) || ss.Last.After(time.Now().Add(5*time.Second)) {
				t.Errorf("session %d: %+v, want %s's ended backup, stamped by the storage just now", i, ss, want)
			}
		}
		var ck struct {
			LiveSessions int `json:"live_sessions"`
			Warnings     []string
		}
		e.okJSON(&ck, "check")
		if ck.LiveSessions != 0 || len(ck.Warnings) != 0 {
			t.Fatalf("check after the backups: %+v", ck)
		}
		// A session open in this process is running for check.
		if _, err := r.WithWriter(ctx, "repair snapshots", func(w *repo.Writer) error {
			out := e.ok("check")
			e.okJSON(&ck, "check")
			if !strings.Contains(out, "1 write session running") || !strings.Contains(out, "repair snapshots on") || ck.LiveSessions != 1 {
				return fmt.Errorf("check during a session: %d live\n%s", ck.LiveSessions, out)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		e.as(key).ok("check")
	})
}

// repair snapshots stores lost chunks again from the disk, an image or
// another repository (taking only bytes that hash to the lost IDs), and
// marks the snapshots it cannot make whole.
func TestRepairSnapshots(t *testing.T) {
	e := newEnv(t, "--pack-size", "1M")
	src := e.path("disk.img")
	writeFile(t, src, append(randomBytes(3<<20), textBytes(3, 1<<20)...))
	b := e.backup(src, "--host", "h")
	s := e.store()
	_, dataPack := s.packsOf(b.Snapshot)
	s.remove(pack(dataPack))

	e.fail([]string{"still damaged", b.ShortID}, "repair", "snapshots", "--dry-run")
	if list := e.ok("snapshots"); strings.Contains(list, " !") {
		t.Fatalf("--dry-run marked a snapshot:\n%s", list)
	}
	// Another repository with its own key holds the same disk.
	o := newEnv(t)
	o.backup(src, "--host", "h")
	oKey, _ := filepath.Glob(filepath.Join(o.dir, "config", "sauve", "keys", "*.key"))
	var rep struct {
		Lost      int            `json:"lost_chunks"`
		Recovered int            `json:"recovered_chunks"`
		From      map[string]int `json:"recovered_from"`
	}
	e.okJSON(&rep, "repair", "snapshots", "--from-repo", o.repo, "--from-key", oKey[0])
	if rep.Lost == 0 || rep.Recovered != rep.Lost {
		t.Fatalf("repair from another repository: %+v", rep)
	}
	e.ok("check")
	e.restored(b.Snapshot, src)

	// Lost again; the disk changed meanwhile where some lost chunks were:
	// those cannot come back, and the snapshot is marked.
	_, dataPack = s.packsOf(b.Snapshot)
	s.remove(pack(dataPack))
	changed := e.path("changed.img")
	writeFile(t, changed, mustRead(t, src))
	writeAt(t, changed, 0, randomBytes(8<<20/8))
	r := e.run("repair", "snapshots", "--from", changed, "--json")
	if r.code == 0 || !strings.Contains(r.stdout, `"still_damaged"`) {
		t.Fatalf("repair from a changed disk: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	list := e.ok("snapshots")
	if !strings.Contains(list, b.ShortID+" !") || !strings.Contains(list, "lost for good") {
		t.Fatalf("a snapshot still damaged is not marked:\n%s", list)
	}
	e.fail([]string{"marked"}, "restore", "latest", e.path("x.img"))
	// The unchanged disk gives the rest back; the mark goes.
	e.ok("repair", "snapshots", "--from", src)
	if list := e.ok("snapshots"); strings.Contains(list, " !") {
		t.Fatalf("a repaired snapshot is still marked:\n%s", list)
	}
	e.restored("latest", src)
}

// An isolated writer has a namespace of its own: it and the other writers
// cannot read each other's manifests, chunk lists or index, nor confirm
// each other's chunks; the owner reads, restores and checks everything.
func TestIsolatedWriter(t *testing.T) {
	where(t, true, nil, func(t *testing.T, e *env) {
		owned, shared := e.path("owned.img"), e.path("shared.img")
		writeFile(t, owned, randomBytes(1<<20))
		writeFile(t, shared, append(randomBytes(1<<20), textBytes(4, 1<<20)...))
		e.backup(owned, "--host", "files")
		isoKey, webKey := e.path("iso.key"), e.path("web1.key")
		e.ok("key", "export", "--write-only", "--isolated", "--name", "payroll", isoKey)
		e.ok("key", "export", "--write-only", "--name", "web1", webKey)
		iso, web := e.as(isoKey), e.as(webKey)
		ib := iso.backup(shared, "--host", "payroll")
		wb := web.backup(shared, "--host", "web1")
		if ib.ChunksNew != 8 || wb.ChunksNew != 8 {
			t.Fatalf("isolated and shared writers deduplicated with each other: %d and %d new chunks of 8", ib.ChunksNew, wb.ChunksNew)
		}
		if again := iso.backup(shared, "--host", "payroll"); again.ChunksNew != 0 {
			t.Fatalf("the isolated writer does not deduplicate against itself: %d new", again.ChunksNew)
		}
		var sn []struct{ ID, Host, Signer string }
		web.okJSON(&sn, "snapshots")
		for _, s := range sn {
			if s.Host == "payroll" {
				t.Fatal("a shared writer lists the isolated writer's snapshots")
			}
		}
		iso.okJSON(&sn, "snapshots")
		if len(sn) != 2 || sn[0].Host != "payroll" {
			t.Fatalf("the isolated writer sees: %+v", sn)
		}
		iso.ok("check")
		web.ok("check")
		// The shared metadata key opens nothing of the namespace.
		s := e.store()
		wk := s.keys(webKey)
		ik := s.keys(isoKey)
		sub, err := location.Sub(getenv(e, "SAUVE_REPO"), "isolated/"+ik.Namespace)
		if err != nil {
			t.Fatal(err)
		}
		sube := &env{t: t, dir: e.dir, repo: sub, vars: append([]string(nil), e.vars...)}
		sube.setenv("SAUVE_REPO", sub)
		ss := sube.store()
		names := ss.names(backend.SnapshotFile)
		if len(names) != 2 {
			t.Fatalf("%d snapshots in the namespace", len(names))
		}
		obj := ss.get(backend.Handle{Type: backend.SnapshotFile, Name: names[0]})
		if _, err := crypto.NewMetaSealer(wk.MetaKey).Open(nil, obj, []byte("sauve snapshot v1")); err == nil {
			t.Fatal("the shared metadata key opens an isolated manifest")
		}
		if _, err := crypto.NewMetaSealer(ik.MetaKey).Open(nil, obj, []byte("sauve snapshot v1")); err != nil {
			t.Fatalf("the isolated writer's own key does not open its manifest: %v", err)
		}
		// The owner sees and restores all, and checks every namespace.
		var all []struct{ ID, Host string }
		e.okJSON(&all, "snapshots")
		if len(all) != 4 {
			t.Fatalf("the owner sees %d snapshots, want 4", len(all))
		}
		e.restored(ib.Snapshot, shared)
		e.restored("latest", shared, "--host", "payroll")
		e.restored(wb.Snapshot, shared)
		e.ok("check", "--read-data")
		list := e.ok("key", "list")
		if !strings.Contains(list, "payroll") || !strings.Contains(list, "web1") {
			t.Fatalf("key list:\n%s", list)
		}
		e.ok("key", "revoke", "payroll")
		iso.ok("snapshots")
		var marked []struct {
			ID    string
			Marks []string
		}
		e.okJSON(&marked, "snapshots", "--host", "payroll")
		if len(marked) != 2 || len(marked[0].Marks) == 0 {
			t.Fatalf("the revoked isolated writer's snapshots are not marked: %+v", marked)
		}
	})
}

func getenv(e *env, k string) string {
	for _, kv := range e.vars {
		if v, ok := strings.CutPrefix(kv, k+"="); ok {
			return v
		}
	}
	return ""
}

// as returns an environment on e's repository that uses another key file
// and a cache of its own: another host.
func (e *env) as(key string) *env {
	w := newBareEnv(e.t)
	w.vars = append([]string(nil), e.vars...)
	w.dir = e.t.TempDir()
	w.setenv("XDG_CACHE_HOME", filepath.Join(w.dir, "cache"))
	w.setenv("SAUVE_KEY", key)
	return w
}

// TestVersion2FixtureRepository reads a repository that the sauve of
// before write sessions made (testdata/v2repo/README): its snapshots
// restore byte for byte, check --read-data passes, export reads it, and
// a backup into it works and announces its session.
func TestVersion2FixtureRepository(t *testing.T) {
	e := newBareEnv(t)
	fix := filepath.Join("testdata", "v2repo")
	if err := os.CopyFS(e.repo, os.DirFS(filepath.Join(fix, "repo"))); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(filepath.Join(fix, "owner.key"))
	e.setenv("SAUVE_KEY", abs)
	want := map[string]string{
		"efa64071": "b4282f7c83d1931bea8d5935fcc3f7975377fc9800010df133dac8e005ebe53e",
		"5dab07a3": "395daa1079f9fe8ffc2d8ac8c8fc945bebcf7cf32bbf00991c8205f4af7b1f27",
		"d2fc5546": "569ad2c5b53a613f877ad562ce84f3a48e3fecebd9b87cdd54765094d99744a4",
	}
	var sn []struct{ ID, Signer, Host string }
	e.okJSON(&sn, "snapshots")
	if len(sn) != 3 || sn[2].Signer != "web1" || sn[0].Signer != "owner" {
		t.Fatalf("snapshots of the fixture: %+v", sn)
	}
	for id, sum := range want {
		out := e.path(id + ".img")
		e.ok("restore", id, out)
		if got := fileHash(t, out, -1); got != sum {
			t.Errorf("snapshot %s restores to %s, want %s", id, got, sum)
		}
	}
	// A delta restore of the second day onto the first.
	e.ok("restore", "--delta", "5dab07a3", e.path("efa64071.img"))
	if got := fileHash(t, e.path("efa64071.img"), -1); got != want["5dab07a3"] {
		t.Error("delta restore onto the first snapshot does not give the second")
	}
	e.ok("check", "--read-data")
	e.ok("export", "--skip-free", "5dab07a3", e.path("x.qcow2"))
	e.ok("export", "d2fc5546", e.path("raw.img"))
	if got := fileHash(t, e.path("raw.img"), -1); got != want["d2fc5546"] {
		t.Error("raw export of the web1 snapshot differs from its restore")
	}
	src := e.path("new.img")
	writeFile(t, src, randomBytes(300000))
	e.ok("backup", src, "--host", "new")
	if ss, _ := filepath.Glob(filepath.Join(e.repo, "sessions", "*")); len(ss) == 0 {
		t.Error("a backup into the fixture announced no write session")
	}
	e.ok("restore", "latest", e.path("new-restored.img"), "--host", "new")
	if fileHash(t, e.path("new-restored.img"), -1) != fileHash(t, src, -1) {
		t.Error("the new snapshot does not restore")
	}
	e.ok("check", "--read-data")
}
