package repo

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"github.com/zeebo/blake3"
)

// dbTestIndex fills an index with several copies, writers and trusts per
// blob, some stated twice with more trust the second time.
func dbTestIndex(t testing.TB, rng *rand.Rand, x *Index, ids []ID, packs int) {
	t.Helper()
	for len(x.Writers.snapshot()) < 3 {
		x.Writers.Number(rngID(rng), nil)
	}
	for p := 0; p < packs; p++ {
		info := PackInfo{ID: rngID(rng)}
		info.Ephemeral = rngID(rng)
		for j := 0; j < 1+rng.IntN(20); j++ {
			info.Blobs = append(info.Blobs, PackBlob{Type: BlobType(rng.IntN(2)), ID: ids[rng.IntN(len(ids))], Offset: uint32(32 + j*64), Length: 40})
		}
		w := WriterNum(rng.IntN(3))
		x.Add(info, w, Trust(1<<rng.IntN(3)))
		if rng.IntN(4) == 0 {
			x.Add(info, w, TrustOwner) // an endorsement of the same place
		}
	}
}

func rngID(rng *rand.Rand) (id ID) {
	for i := range id {
		id[i] = byte(rng.Uint32())
	}
	return id
}

func allCopies(x *Index, ids []ID) [][]Copy {
	var out [][]Copy
	for _, id := range ids {
		out = append(out, x.Copies(id, 1))
	}
	return out
}

// TestIndexFileSameAnswers writes an index to a file, maps it, adds more
// (statements of the same places with more trust, new packs) to both, and
// checks that every query answers as the in-memory index does.
func TestIndexFileSameAnswers(t *testing.T) {
	t.Run("one read a bucket", testIndexFileSameAnswers)
	t.Run("buckets of many reads", func(t *testing.T) {
		defer func(n uint32) { dbReadRun = n }(dbReadRun)
		dbReadRun = 2
		testIndexFileSameAnswers(t)
	})
}

func testIndexFileSameAnswers(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	ids := make([]ID, 3000)
	for i := range ids {
		ids[i] = randID()
	}
	mem := NewIndex()
	dbTestIndex(t, rng, mem, ids, 400)
	mem.mu.Lock()
	mem.compact()
	mem.mu.Unlock()

	path := filepath.Join(t.TempDir(), indexDBName)
	key := [32]byte{7}
	if err := writeIndexDB(path, key, mem, []dbObject{{id: randID(), size: 12}}); err != nil {
		t.Fatal(err)
	}
	db, err := openIndexDB(path, key)
	if err != nil {
		t.Fatal(err)
	}
	mapped := NewIndex()
	mapped.Writers = mem.Writers
	mapped.setBase(db)
	if got, want := allCopies(mapped, ids), allCopies(mem, ids); !reflect.DeepEqual(got, want) {
		t.Fatal("the mapped index answers differently")
	}

	// The same further statements to both.
	rng2 := rand.New(rand.NewPCG(3, 4))
	var later []PackInfo
	mem.Each(func(id ID, c Copy) {
		if rng2.IntN(10) == 0 {
			later = append(later, PackInfo{ID: c.Pack, Ephemeral: c.Ephemeral, Blobs: []PackBlob{{Type: c.Type, ID: id, Offset: c.Offset, Length: c.Length}}})
		}
	})
	for _, x := range []*Index{mem, mapped} {
		for _, p := range later {
			x.Add(p, OwnerWriter, TrustOwner|TrustSigned)
		}
		dbTestIndex(t, rand.New(rand.NewPCG(5, 6)), x, ids, 50)
		x.SetListing(map[ID]int64{later[0].ID: 1 << 20})
		x.MarkDamaged(later[1].ID, "test")
		x.MarkCondemned(later[2].ID)
	}
	if got, want := allCopies(mapped, ids), allCopies(mem, ids); !reflect.DeepEqual(got, want) {
		for i := range got {
			if !reflect.DeepEqual(got[i], want[i]) {
				t.Logf("mapped %+v\nmemory %+v", got[i], want[i])
				break
			}
		}
		t.Fatal("after more statements, the mapped index answers differently")
	}
	for _, id := range ids {
		for self := WriterNum(0); self < 3; self++ {
			c1, ok1 := mem.Reusable(DataBlob, id, self)
			c2, ok2 := mapped.Reusable(DataBlob, id, self)
			if ok1 != ok2 || c1 != c2 {
				t.Fatalf("Reusable(%v, %d) differs", id.Short(), self)
			}
		}
	}
	if !reflect.DeepEqual(mapped.PackStates(), mem.PackStates()) || !slices.Equal(mapped.Packs(), mem.Packs()) {
		t.Fatal("pack states differ")
	}
	nm, pm := mem.Len()
	nx, px := mapped.Len()
	if nm != nx || pm != px {
		t.Fatalf("Len: %d/%d mapped, %d/%d in memory", nx, px, nm, pm)
	}
	// A pack marked gone disappears from the mapped index.
	mapped.markGone(later[3].ID)
	if mapped.HasPack(later[3].ID) {
		t.Fatal("a gone pack is still indexed")
	}
	for _, c := range mapped.Copies(later[3].Blobs[0].ID, NoWriter) {
		if c.Pack == later[3].ID {
			t.Fatal("an entry of a gone pack is still found")
		}
	}

	// Rewriting the mapped index (file and memory) gives a file that
	// answers the same.
	path2 := filepath.Join(t.TempDir(), indexDBName)
	for i := range mapped.packs {
		mapped.packs[i].gone = false
	}
	mapped.ngone = 0
	if err := writeIndexDB(path2, key, mapped, nil); err != nil {
		t.Fatal(err)
	}
	db2, err := openIndexDB(path2, key)
	if err != nil {
		t.Fatal(err)
	}
	again := NewIndex()
	again.Writers = mem.Writers
	again.setBase(db2)
	var a, b []ID
	again.Each(func(id ID, c Copy) { a = append(a, id) })
	mem.Each(func(id ID, c Copy) { b = append(b, id) })
	slices.SortFunc(b, func(x, y ID) int { return compareID(x, y) })
	if !slices.Equal(a, b) {
		t.Fatal("rewritten file holds other entries")
	}
}

func compareID(a, b ID) int {
	for i := range a {
		if a[i] != b[i] {
			return int(a[i]) - int(b[i])
		}
	}
	return 0
}

// TestIndexFileDamage: a file with any byte changed, or cut short, or
// opened with another key, is refused.
func TestIndexFileDamage(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	ids := make([]ID, 100)
	for i := range ids {
		ids[i] = randID()
	}
	x := NewIndex()
	dbTestIndex(t, rng, x, ids, 20)
	dir := t.TempDir()
	path := filepath.Join(dir, indexDBName)
	key := [32]byte{1}
	if err := writeIndexDB(path, key, x, nil); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	if _, err := openIndexDB(path, [32]byte{2}); err == nil {
		t.Fatal("opened with another key")
	}
	for _, n := range []int{0, 1, len(good) - 33, len(good) - 1} {
		os.WriteFile(path, good[:n], 0o600)
		if _, err := openIndexDB(path, key); err == nil {
			t.Fatalf("opened when cut to %d bytes", n)
		}
	}
	for i := 0; i < 200; i++ {
		b := slices.Clone(good)
		b[rng.IntN(len(b))] ^= 1 << rng.IntN(8)
		os.WriteFile(path, b, 0o600)
		if _, err := openIndexDB(path, key); err == nil {
			t.Fatal("opened with a flipped bit")
		}
	}
}

// FuzzIndexFile feeds the parser files that pass the MAC (what a holder
// of the key could write): it must refuse or answer, never panic.
func FuzzIndexFile(f *testing.F) {
	x := NewIndex()
	ids := []ID{randID(), randID(), randID()}
	dbTestIndex(f, rand.New(rand.NewPCG(1, 1)), x, ids, 3)
	path := filepath.Join(f.TempDir(), indexDBName)
	if err := writeIndexDB(path, [32]byte{}, x, []dbObject{{id: ids[0], size: 3}}); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	f.Add(good[:len(good)-dbMACSize])
	f.Add([]byte(indexDBMagic))
	f.Fuzz(func(t *testing.T, body []byte) {
		db, err := parseIndexDB(bytes.NewReader(body), int64(len(body)))
		if err != nil {
			return
		}
		y := NewIndex()
		y.setBase(db)
		var seen []indexEntry
		db.scan(func(i uint32, e indexEntry) {
			if len(seen) < 1000 {
				seen = append(seen, e)
			}
		})
		for _, e := range seen {
			y.Copies(e.id, NoWriter)
			y.Reusable(e.typ, e.id, 1)
		}
		for _, id := range ids {
			y.Copies(id, 0)
		}
		y.PackStates()
		y.Add(PackInfo{ID: ids[0], Blobs: []PackBlob{{ID: ids[1], Offset: 40, Length: 30}}}, 1, TrustSigned)
		y.Len()
		// And the same bytes, MAC'd, through the file path.
		h, _ := blake3.NewKeyed(make([]byte, 32))
		h.Write(body)
		p := filepath.Join(t.TempDir(), "f")
		os.WriteFile(p, append(slices.Clone(body), h.Sum(nil)...), 0o600)
		if _, err := openIndexDB(p, [32]byte{}); err != nil {
			t.Fatalf("parsed in memory, refused from a file: %v", err)
		}
	})
}
