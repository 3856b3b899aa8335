package repo

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/crypto"
)

func testMeta() *crypto.MetaSealer {
	var k [32]byte
	copy(k[:], "0123456789abcdef0123456789abcdef")
	return crypto.NewMetaSealer(k)
}

func randID() (id ID) {
	rand.Read(id[:])
	return id
}

func TestPackRoundTrip(t *testing.T) {
	meta := testMeta()
	var eph [32]byte
	rand.Read(eph[:])
	pb := newPackBuilder(nil, eph)
	var want [][]byte
	for i := 0; i < 50; i++ {
		b := make([]byte, 100+i*37)
		rand.Read(b)
		want = append(want, b)
		typ := DataBlob
		if i%7 == 0 {
			typ = MetaBlob
		}
		pb.add(typ, randID(), b)
	}
	data := pb.finish(meta)
	info, err := parsePack(meta, data)
	if err != nil {
		t.Fatal(err)
	}
	if info.Ephemeral != eph || len(info.Blobs) != len(want) {
		t.Fatalf("got %d blobs, ephemeral %x", len(info.Blobs), info.Ephemeral[:4])
	}
	for i, b := range info.Blobs {
		if b != pb.blobs[i] {
			t.Errorf("blob %d: %+v, want %+v", i, b, pb.blobs[i])
		}
		if !bytes.Equal(data[b.Offset:b.Offset+b.Length], want[i]) {
			t.Errorf("blob %d: content differs", i)
		}
	}
	// Every truncation is refused, never misparsed.
	for _, n := range []int{0, 10, packHeaderSize, len(data) / 2, len(data) - 1} {
		if _, err := parsePack(meta, data[:n]); err == nil {
			t.Errorf("truncated to %d bytes: no error", n)
		}
	}
	// A flipped bit in the trailer fails authentication.
	bad := bytes.Clone(data)
	bad[len(bad)-packFooterSize-5] ^= 1
	if _, err := parsePack(meta, bad); err == nil {
		t.Error("flipped trailer bit: no error")
	}
}

func TestIndexRoundTrip(t *testing.T) {
	meta := testMeta()
	var packs []PackInfo
	for i := 0; i < 5; i++ {
		p := PackInfo{ID: randID(), Ephemeral: [32]byte(randID())}
		for j := 0; j < i*3; j++ {
			p.Blobs = append(p.Blobs, PackBlob{Type: DataBlob, ID: randID(), Offset: uint32(packHeaderSize + j*10), Length: 10})
		}
		packs = append(packs, p)
	}
	got, err := decodeIndex(meta, encodeIndex(meta, packs))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(packs) {
		t.Fatalf("%d packs, want %d", len(got), len(packs))
	}
	for i := range packs {
		if got[i].ID != packs[i].ID || got[i].Ephemeral != packs[i].Ephemeral || len(got[i].Blobs) != len(packs[i].Blobs) {
			t.Fatalf("pack %d differs", i)
		}
		for j := range packs[i].Blobs {
			if got[i].Blobs[j] != packs[i].Blobs[j] {
				t.Errorf("pack %d blob %d differs", i, j)
			}
		}
	}
	x := NewIndex()
	for _, p := range got {
		x.Add(p)
	}
	b := packs[4].Blobs[2]
	loc, ok := x.Lookup(b.ID)
	if !ok || loc.Pack != packs[4].ID || loc.Offset != b.Offset || loc.Ephemeral != packs[4].Ephemeral {
		t.Errorf("lookup: %+v %v", loc, ok)
	}
	if !x.Has(DataBlob, b.ID) || x.Has(MetaBlob, b.ID) {
		t.Error("Has ignores the blob type")
	}
}

func TestChunkListRoundTrip(t *testing.T) {
	ids := []ID{randID(), ZeroID, randID()}
	got, err := decodeChunkList(encodeChunkList(ids))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0] != ids[0] || !got[1].IsZero() || got[2] != ids[2] {
		t.Fatal("chunk list differs")
	}
}

func TestBlobCoding(t *testing.T) {
	c := newCompressor(1 << 16)
	random := make([]byte, 1<<16)
	rand.Read(random)
	text := []byte(strings.Repeat("sauve backs up disks. ", 3000))[:1<<16]
	for name, in := range map[string][]byte{"random": random, "text": text, "empty": {}} {
		coded := c.encode(nil, in)
		if name == "random" && coded[0] != codingRaw {
			t.Errorf("random data stored compressed")
		}
		if name == "text" && (coded[0] != codingZstd || len(coded) > len(in)/4) {
			t.Errorf("text: coding %d, %d bytes", coded[0], len(coded))
		}
		out, err := c.decode(nil, coded, 1<<16)
		if err != nil || !bytes.Equal(out, in) {
			t.Errorf("%s: round trip failed: %v", name, err)
		}
	}
	// A zstd frame that expands past the limit is refused.
	big := c.encode(nil, make([]byte, 1<<16))
	if _, err := c.decode(nil, big, 1<<10); err == nil {
		t.Error("decompression bomb accepted")
	}
}

func TestConfigVersion(t *testing.T) {
	cfg, err := NewConfig(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(cfg)
	if _, err := ParseConfig(b); err != nil {
		t.Fatal(err)
	}
	cfg.Version = 99
	b, _ = json.Marshal(cfg)
	_, err = ParseConfig(b)
	if err == nil || !strings.Contains(err.Error(), "version 99 is not supported") {
		t.Fatalf("unknown version: %v", err)
	}
	for _, bad := range []int{1000, 3 << 10, 1 << 30} {
		if _, err := NewConfig(bad, 0); err == nil {
			t.Errorf("chunk size %d accepted", bad)
		}
	}
}

func TestFindSnapshot(t *testing.T) {
	mk := func(host string, tags ...string) *Snapshot {
		return &Snapshot{ID: randID(), Host: host, Tags: tags}
	}
	a, b, c := mk("web", "daily"), mk("db"), mk("web")
	all := []*Snapshot{a, b, c}
	for _, tc := range []struct {
		spec string
		f    Filter
		want *Snapshot
	}{
		{"latest", Filter{}, c},
		{"latest", Filter{Host: "db"}, b},
		{"latest", Filter{Tags: []string{"daily"}}, a},
		{a.ID.String()[:10], Filter{}, a},
		{strings.ToUpper(b.ID.String()[:8]), Filter{}, b},
	} {
		got, err := FindSnapshot(all, tc.spec, tc.f)
		if err != nil || got != tc.want {
			t.Errorf("%q %+v: got %v, %v", tc.spec, tc.f, got, err)
		}
	}
	for _, spec := range []string{"ab", "ffffffffff", "latest"} {
		f := Filter{}
		if spec == "latest" {
			f.Host = "nobody"
		}
		if _, err := FindSnapshot(all, spec, f); err == nil {
			t.Errorf("%q: no error", spec)
		}
	}
}

func FuzzDecodeIndex(f *testing.F) {
	var p PackInfo
	p.ID = randID()
	p.Blobs = []PackBlob{{Type: DataBlob, ID: randID(), Offset: 40, Length: 99}}
	plain, _ := testMeta().Open(nil, encodeIndex(testMeta(), []PackInfo{p}), indexAD)
	f.Add(plain)
	f.Add([]byte(indexMagic + "\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		packs, err := decodeIndexPlain(b)
		if err != nil {
			return
		}
		// What decodes must encode back to the same bytes.
		re, _ := testMeta().Open(nil, encodeIndex(testMeta(), packs), indexAD)
		if !bytes.Equal(re, b) {
			t.Fatal("index does not round-trip")
		}
	})
}

func FuzzDecodeTrailer(f *testing.F) {
	pb := newPackBuilder(nil, [32]byte{})
	pb.add(DataBlob, randID(), make([]byte, 77))
	pb.add(MetaBlob, randID(), make([]byte, 5))
	plain := []byte(trailerMagic)
	plain = binary.LittleEndian.AppendUint32(plain, 2)
	for _, b := range pb.blobs {
		plain = append(plain, byte(b.Type))
		plain = append(plain, b.ID[:]...)
		plain = binary.LittleEndian.AppendUint32(plain, b.Length)
	}
	f.Add(plain, int64(packHeaderSize+82))
	f.Fuzz(func(t *testing.T, b []byte, end int64) {
		blobs, err := decodeTrailer(b, end)
		if err != nil {
			return
		}
		off := int64(packHeaderSize)
		for _, bl := range blobs {
			if int64(bl.Offset) != off {
				t.Fatal("blobs not contiguous")
			}
			off += int64(bl.Length)
		}
		if off != end {
			t.Fatal("blobs do not fill the pack")
		}
	})
}

func FuzzDecodeChunkList(f *testing.F) {
	f.Add(encodeChunkList([]ID{randID(), ZeroID}))
	f.Add([]byte(chunkListMagic + "\x01\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ids, err := decodeChunkList(b)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeChunkList(ids), b) {
			t.Fatal("chunk list does not round-trip")
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	sn := Snapshot{Host: "h", Disks: []Disk{{Name: "d", Size: 100000, ChunkSize: 65536, ListEntries: ListEntries, ChunkLists: []ID{randID()}}}}
	b, _ := json.Marshal(sn)
	f.Add(b)
	f.Add([]byte(`{"disks":[{"size":-1}]}`))
	f.Add([]byte(`{"disks":[{"size":9223372036854775807,"chunk_size":4096,"list_entries":1}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		sn, err := parseManifest(b)
		if err != nil {
			return
		}
		for _, d := range sn.Disks {
			if d.Size < 0 || int64(len(d.ChunkLists))*int64(d.ListEntries) < d.Chunks() {
				t.Fatalf("accepted inconsistent disk %+v", d)
			}
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	cfg, _ := NewConfig(0, 0)
	b, _ := json.Marshal(cfg)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		if c.ChunkSize < MinChunkSize || c.ChunkSize > MaxChunkSize || c.PackSize < c.ChunkSize {
			t.Fatalf("accepted bad config %+v", c)
		}
	})
}

func FuzzDecodeBlob(f *testing.F) {
	c := newCompressor(1 << 16)
	f.Add(c.encode(nil, bytes.Repeat([]byte("abc"), 1000)))
	f.Add(c.encode(nil, []byte{1, 2, 3}))
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := c.decode(nil, b, 1<<16)
		if err == nil && len(out) > 1<<16 {
			t.Fatalf("decoded %d bytes past the limit", len(out))
		}
	})
}

func TestIndexBulkAndFresh(t *testing.T) {
	x := NewIndex()
	mk := func(n int) PackInfo {
		p := PackInfo{ID: randID()}
		for i := 0; i < n; i++ {
			p.Blobs = append(p.Blobs, PackBlob{Type: DataBlob, ID: randID(), Offset: uint32(packHeaderSize + i), Length: 1})
		}
		return p
	}
	a, b := mk(1000), mk(1000)
	x.addBulk(a)
	x.addBulk(b)
	x.addBulk(a) // the same pack in two index objects
	x.finishBulk()
	if n, packs := x.Len(); n != 2000 || packs != 2 {
		t.Fatalf("after bulk load: %d blobs, %d packs", n, packs)
	}
	// Fresh blobs, enough to force compactions, and a duplicate of a
	// sorted one, which must keep its first location.
	var fresh []PackInfo
	for i := 0; i < 80; i++ {
		p := mk(1000)
		fresh = append(fresh, p)
		x.Add(p)
	}
	dup := PackInfo{ID: randID(), Blobs: []PackBlob{{Type: DataBlob, ID: a.Blobs[5].ID, Offset: 999, Length: 9}}}
	x.Add(dup)
	for _, p := range append(fresh, a, b) {
		for _, bl := range p.Blobs {
			loc, ok := x.Lookup(bl.ID)
			if !ok || loc.Pack != p.ID || loc.Offset != bl.Offset {
				t.Fatalf("blob %s: %+v %v", bl.ID.Short(), loc, ok)
			}
		}
	}
	if n, _ := x.Len(); n != 82000 {
		t.Fatalf("%d blobs, want 82000", n)
	}
	seen := 0
	x.Each(func(ID, Location) { seen++ })
	if seen != 82000 {
		t.Fatalf("Each saw %d blobs", seen)
	}
}

// BenchmarkEncodeChunk measures the work SaveBlob does per new chunk before
// it reaches a pack: compression (or the attempt, for random data).
func BenchmarkEncodeChunk(b *testing.B) {
	const size = DefaultChunkSize
	c := newCompressor(size)
	random := make([]byte, size)
	rand.Read(random)
	text := []byte(strings.Repeat("sauve backs up disks, block by block. ", size/30))[:size]
	for name, in := range map[string][]byte{"random": random, "text": text} {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(size)
			dst := make([]byte, 0, 2*size)
			for b.Loop() {
				dst = c.encode(dst[:0], in)
			}
		})
	}
}

// BenchmarkObjectHash compares the hash that names packs, indexes and
// snapshots (BLAKE3, unkeyed) with SHA-256, which it replaced, on a pack.
func BenchmarkObjectHash(b *testing.B) {
	pack := make([]byte, DefaultPackSize)
	rand.Read(pack)
	b.Run("blake3", func(b *testing.B) {
		b.SetBytes(int64(len(pack)))
		for b.Loop() {
			Hash(pack)
		}
	})
	b.Run("sha256", func(b *testing.B) {
		b.SetBytes(int64(len(pack)))
		for b.Loop() {
			sha256.Sum256(pack)
		}
	})
}
