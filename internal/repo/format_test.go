package repo

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/zstdenc"
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
	keys := testKeys(t)
	tr := trailerReader{meta: meta, keys: keys}
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
	data, id := pb.finish(meta, keys)
	if id != Hash(data) {
		t.Fatal("pack ID is not the hash of its bytes")
	}
	info, whole, err := tr.parseStoredPack(id, data)
	if err != nil || !whole {
		t.Fatal(err, whole)
	}
	if info.Ephemeral != eph || len(info.Blobs) != len(want) || info.Version != 2 {
		t.Fatalf("got %d blobs, ephemeral %x, version %d", len(info.Blobs), info.Ephemeral[:4], info.Version)
	}
	if info.Signer.Key != keys.SignerPublic() || info.Signer.Cert != nil {
		t.Fatal("trailer signer is not the owner")
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
		if _, err := parse(tr, id, data[:n]); err == nil {
			t.Errorf("truncated to %d bytes: no error", n)
		}
	}
	// A flipped bit in the trailer fails authentication.
	bad := bytes.Clone(data)
	bad[len(bad)-packFooterSize-5] ^= 1
	if _, err := parse(tr, id, bad); err == nil {
		t.Error("flipped trailer bit: no error")
	}
	// A flipped bit in a blob is not what the signer signed.
	bad = bytes.Clone(data)
	bad[packHeaderSize+3] ^= 1
	if _, err := parse(tr, id, bad); err == nil || !strings.Contains(err.Error(), "signer signed") {
		t.Errorf("flipped blob bit: %v", err)
	}
	// The trailer of another key's pack does not verify for this repository.
	other := testKeys(t)
	if _, err := parse(trailerReader{meta: meta, keys: other}, id, data); err == nil {
		t.Error("trailer signed by another repository's owner accepted")
	}
}

func parse(tr trailerReader, id ID, data []byte) (packTrailer, error) {
	t, _, err := tr.parseStoredPack(id, data)
	return t, err
}

func TestIndexRoundTrip(t *testing.T) {
	meta := testMeta()
	owner := testKeys(t)
	w1, _ := owner.DeriveWriteOnly("web1")
	var recs []indexRecord
	for i := 0; i < 5; i++ {
		r := indexRecord{PackInfo: PackInfo{ID: randID(), Ephemeral: [32]byte(randID())}, Writer: w1.SignerPublic()}
		for j := 0; j < i*3; j++ {
			r.Blobs = append(r.Blobs, PackBlob{Type: DataBlob, ID: randID(), Offset: uint32(packHeaderSize + j*100), Length: 100})
		}
		recs = append(recs, r)
	}
	o, err := decodeIndex(meta, owner, 2, encodeIndex(meta, w1, recs, nil))
	if err != nil {
		t.Fatal(err)
	}
	if o.signer.Key != w1.SignerPublic() || o.signer.Cert == nil || o.signer.Cert.Name != "web1" {
		t.Fatal("signer lost")
	}
	if len(o.records) != len(recs) {
		t.Fatalf("%d packs, want %d", len(o.records), len(recs))
	}
	for i := range recs {
		if o.records[i].ID != recs[i].ID || o.records[i].Ephemeral != recs[i].Ephemeral || !slices.Equal(o.records[i].Blobs, recs[i].Blobs) {
			t.Fatalf("pack %d differs", i)
		}
	}
	x := NewIndex()
	for i := range o.records {
		w, tr := o.entriesOf(&o.records[i], x.Writers, [32]byte(owner.OwnerPublic))
		if tr != TrustSigned {
			t.Fatalf("a writer's entries have trust %v", tr)
		}
		x.Add(o.records[i].PackInfo, w, tr)
	}
	b := recs[4].Blobs[2]
	loc, ok := x.Lookup(b.ID)
	if !ok || loc.Pack != recs[4].ID || loc.Offset != b.Offset || loc.Ephemeral != recs[4].Ephemeral {
		t.Errorf("lookup: %+v %v", loc, ok)
	}
	if !x.Has(DataBlob, b.ID) || x.Has(MetaBlob, b.ID) {
		t.Error("Has ignores the blob type")
	}

	// What each signer may state.
	w2, _ := owner.DeriveWriteOnly("web2")
	foreign := []indexRecord{{PackInfo: recs[1].PackInfo, Writer: w1.SignerPublic()}}
	if _, err := decodeIndex(meta, owner, 2, encodeIndex(meta, w2, foreign, nil)); err == nil {
		t.Error("a writer attributed packs to another writer")
	}
	endorsed := []indexRecord{{PackInfo: recs[1].PackInfo, Writer: w2.SignerPublic(), Flags: recEndorsed}}
	if _, err := decodeIndex(meta, owner, 2, encodeIndex(meta, w2, endorsed, nil)); err == nil {
		t.Error("a writer endorsed its own pack")
	}
	if _, err := decodeIndex(meta, owner, 2, encodeIndex(meta, owner, endorsed, nil)); err == nil {
		t.Error("the owner attributed a pack to a writer without its certificate")
	}
	o, err = decodeIndex(meta, owner, 2, encodeIndex(meta, owner, endorsed, []*crypto.Cert{w2.Cert}))
	if err != nil {
		t.Fatalf("owner's endorsement: %v", err)
	}
	if _, tr := o.entriesOf(&o.records[0], x.Writers, [32]byte(owner.OwnerPublic)); tr&TrustOwner == 0 {
		t.Error("an endorsement is not vouched for by the owner")
	}
	// A key of another repository signs nothing here.
	stranger := testKeys(t)
	if _, err := decodeIndex(meta, owner, 2, encodeIndex(meta, stranger, recs, nil)); err == nil {
		t.Error("an index object signed by another repository's owner was accepted")
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
	c := newCompressor(1<<16, zstdenc.DefaultLevel)
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

// TestBlobDecodeFrameSize: a frame that states its size decodes into
// memory of that size (in place in a buffer with that room), and one that
// states less than it holds fails.
func TestBlobDecodeFrameSize(t *testing.T) {
	c := newCompressor(1<<20, zstdenc.DefaultLevel)
	in := []byte(strings.Repeat("chunk lists are mostly zeros. ", 400))[:10000]
	coded := c.encode(nil, in)
	out, err := c.decode(nil, coded, 1<<20)
	if err != nil || !bytes.Equal(out, in) || cap(out) > len(in)+DecodeSlack {
		t.Fatalf("decode: %v, %d bytes in %d of memory", err, len(out), cap(out))
	}
	dst := make([]byte, 0, len(in)+DecodeSlack)
	if out, err := c.decode(dst, coded, 1<<20); err != nil || &out[0] != &dst[:1][0] {
		t.Fatalf("a buffer of the stated size is not decoded into in place: %v", err)
	}
	// The frame content size of a single-segment frame of 10000 bytes is
	// 2 bytes, value-256, right after the frame header descriptor.
	frame := bytes.Clone(coded[1:])
	fhd := frame[4]
	if fhd&0x20 == 0 || fhd>>6 != 1 || fhd&3 != 0 {
		t.Fatalf("unexpected frame header descriptor %#x", fhd)
	}
	binary.LittleEndian.PutUint16(frame[5:], 5000-256)
	if out, err := c.decode(nil, append([]byte{codingZstd}, frame...), 1<<20); err == nil {
		t.Fatalf("a frame stating 5000 bytes decoded %d", len(out))
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
	t0 := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	mk := func(host, src string, tags ...string) *Snapshot {
		n++
		return &Snapshot{ID: randID(), Host: host, Tags: tags, Time: t0.Add(time.Duration(n) * time.Hour), Disks: []Disk{{Name: "vda", Source: src}}}
	}
	a, b, c := mk("web", "/dev/vda", "daily"), mk("db", "/dev/vda"), mk("web", "/dev/vda")
	d := mk("web", "/dev/vdb")
	planted := mk("web", "/dev/vda")
	planted.Marks = []string{"names host web, outside what writer evil may back up"}
	for _, tc := range []struct {
		name string
		all  []*Snapshot
		spec string
		f    Filter
		want *Snapshot
		err  string
	}{
		{"one host", []*Snapshot{a, c}, "latest", Filter{}, c, ""},
		{"two hosts", []*Snapshot{a, b, c}, "latest", Filter{}, nil, "ambiguous"},
		{"host chosen", []*Snapshot{a, b, c}, "latest", Filter{Host: "db"}, b, ""},
		{"two sources", []*Snapshot{a, c, d}, "latest", Filter{Host: "web"}, nil, "--source /dev/vdb"},
		{"source chosen", []*Snapshot{a, c, d}, "latest", Filter{Host: "web", Path: "/dev/vda"}, c, ""},
		{"source by disk name", []*Snapshot{a}, "latest", Filter{Path: "vda"}, a, ""},
		{"tag", []*Snapshot{a, b, c}, "latest", Filter{Tags: []string{"daily"}}, a, ""},
		{"marked skipped", []*Snapshot{a, c, planted}, "latest", Filter{}, c, ""},
		{"only marked", []*Snapshot{planted}, "latest", Filter{}, nil, "marked"},
		{"marked by ID", []*Snapshot{a, planted}, planted.ID.String()[:10], Filter{}, planted, ""},
		{"prefix", []*Snapshot{a, b, c}, a.ID.String()[:10], Filter{}, a, ""},
		{"prefix upper case", []*Snapshot{a, b, c}, strings.ToUpper(b.ID.String()[:8]), Filter{}, b, ""},
		{"too short", []*Snapshot{a}, "ab", Filter{}, nil, "too short"},
		{"unknown", []*Snapshot{a}, "ffffffffff", Filter{}, nil, "no snapshot"},
		{"no match", []*Snapshot{a}, "latest", Filter{Host: "nobody"}, nil, "no snapshot matches"},
	} {
		got, err := FindSnapshot(tc.all, tc.spec, tc.f)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: got %v, %v; want an error with %q", tc.name, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s: got %v, %v", tc.name, got, err)
		}
	}
}

func FuzzDecodeIndex(f *testing.F) {
	var r indexRecord
	r.ID = randID()
	r.Blobs = []PackBlob{{Type: DataBlob, ID: randID(), Offset: 40, Length: 99}, {Type: MetaBlob, ID: randID(), Offset: 139, Length: 45}}
	keys := testKeysF(f)
	plain, _ := testMeta().Open(nil, encodeIndex(testMeta(), keys, []indexRecord{r}, nil), indexAD)
	f.Add(plain[8:])
	f.Add([]byte("\x00\x00\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		// What a signed object holds is the body; what decodes must
		// encode back to the same bytes.
		body := b
		if len(b) >= 4 {
			if msg, _, err := keys.OpenSigned(b, crypto.DomainIndex); err == nil {
				body = msg
			}
		}
		o, err := decodeIndexBody(body)
		if err != nil {
			return
		}
		for _, rec := range o.records {
			next := uint32(packHeaderSize)
			for _, bl := range rec.Blobs {
				if bl.Offset < next || bl.Length < minSealedBlob {
					t.Fatalf("accepted overlapping or tiny blob %+v", bl)
				}
				next = bl.Offset + bl.Length
			}
		}
	})
}

func FuzzDecodeIndexV1(f *testing.F) {
	f.Add([]byte(indexMagicV1 + "\x01\x00\x00\x00" + strings.Repeat("\x00", 68)))
	f.Add([]byte(indexMagicV1 + "\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		packs, err := decodeIndexV1(b)
		if err != nil {
			return
		}
		for _, p := range packs {
			for _, bl := range p.Blobs {
				if bl.Offset < packHeaderSize {
					t.Fatal("accepted a blob inside the header")
				}
			}
		}
	})
}

func FuzzDecodeTrailer(f *testing.F) {
	pb := newPackBuilder(nil, [32]byte{})
	pb.add(DataBlob, randID(), make([]byte, 77))
	pb.add(MetaBlob, randID(), make([]byte, 5))
	plain := binary.LittleEndian.AppendUint32(nil, 2)
	for _, b := range pb.blobs {
		plain = append(plain, byte(b.Type))
		plain = append(plain, b.ID[:]...)
		plain = binary.LittleEndian.AppendUint32(plain, b.Length)
	}
	f.Add(plain, int64(packHeaderSize+82))
	f.Fuzz(func(t *testing.T, b []byte, end int64) {
		blobs, err := decodeTrailerEntries(b, end)
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
	c := newCompressor(1<<16, zstdenc.DefaultLevel)
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
	x.addBulk(a, 1, TrustSigned)
	x.addBulk(b, 1, TrustSigned)
	x.addBulk(a, 1, TrustSigned) // the same pack in two index objects
	x.finishBulk()
	if n, packs := x.Len(); n != 2000 || packs != 2 {
		t.Fatalf("after bulk load: %d blobs, %d packs", n, packs)
	}
	// Fresh blobs, enough to force compactions, and a second copy of a
	// sorted one, which must not hide the first.
	var fresh []PackInfo
	for i := 0; i < 80; i++ {
		p := mk(1000)
		fresh = append(fresh, p)
		x.Add(p, 1, TrustSigned)
	}
	dup := PackInfo{ID: randID(), Blobs: []PackBlob{{Type: DataBlob, ID: a.Blobs[5].ID, Offset: 999, Length: 9}}}
	x.Add(dup, 2, TrustSigned)
	for _, p := range append(fresh, b) {
		for _, bl := range p.Blobs {
			loc, ok := x.Lookup(bl.ID)
			if !ok || loc.Pack != p.ID || loc.Offset != bl.Offset {
				t.Fatalf("blob %s: %+v %v", bl.ID.Short(), loc, ok)
			}
		}
	}
	if cs := x.Copies(a.Blobs[5].ID, NoWriter); len(cs) != 2 {
		t.Fatalf("%d copies of a blob stored twice", len(cs))
	}
	if n, _ := x.Len(); n != 82001 {
		t.Fatalf("%d entries, want 82001", n)
	}
	seen := 0
	x.Each(func(ID, Copy) { seen++ })
	if seen != 82001 {
		t.Fatalf("Each saw %d entries", seen)
	}
}

// BenchmarkEncodeChunk measures the work SaveBlob does per new chunk before
// it reaches a pack: compression (or the attempt, for random data).
func BenchmarkEncodeChunk(b *testing.B) {
	const size = DefaultChunkSize
	c := newCompressor(size, zstdenc.DefaultLevel)
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

func FuzzLedgerRecord(f *testing.F) {
	p := randID()
	rec := LedgerRecord{Time: time.Now(), Events: []LedgerEvent{{Kind: EventPackDamaged, Pack: &p, Reason: "x"}, {Kind: EventWriterRevoked, Signer: make([]byte, 32)},
		{Kind: EventSnapshotDamaged, Snapshot: &p, Ranges: []Span{{0, 10}}}, {Kind: EventNamespace, Namespace: "0011223344556677"}}}
	b, _ := json.Marshal(rec)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var r LedgerRecord
		if json.Unmarshal(b, &r) != nil {
			return
		}
		l := buildLedger([]*LedgerRecord{&r, &r})
		for id := range l.Packs {
			_ = l.Damaged(id)
		}
		for _, ns := range l.Namespaces {
			if len(ns) != 16 {
				t.Fatalf("namespace %q accepted", ns)
			}
		}
	})
}

func testAnnouncement() Announcement {
	return Announcement{Session: strings.Repeat("0a", 16), Seq: 3, Purpose: "backup", Host: "web1", Program: "sauve 0.2.0",
		Started: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC), LifetimeSeconds: 21600}
}

func TestAnnouncementRoundTrip(t *testing.T) {
	keys := testKeys(t)
	a := testAnnouncement()
	data, err := encodeAnnouncement(testMeta(), keys, &a)
	if err != nil {
		t.Fatal(err)
	}
	got, who, err := decodeAnnouncement(testMeta(), keys, Hash(data), data)
	if err != nil || *got != a || who.Key != keys.SignerPublic() {
		t.Fatalf("round trip: %+v %v, want %+v", got, err, a)
	}
	if _, _, err := decodeAnnouncement(testMeta(), keys, randID(), data); err == nil {
		t.Fatal("an announcement under another name decodes")
	}
	// Another kind of signed object is not an announcement.
	plain := append([]byte(sessionMagic), keys.SignObject([]byte(`{}`), crypto.DomainLedger)...)
	if _, _, err := openAnnouncement(keys, plain); err == nil {
		t.Fatal("a ledger signature verifies as an announcement")
	}
	for _, bad := range []Announcement{
		{Session: "abc", LifetimeSeconds: 3600},
		{Session: strings.Repeat("0A", 16), LifetimeSeconds: 3600},
		{Session: a.Session, LifetimeSeconds: 59},
		{Session: a.Session, LifetimeSeconds: 86401},
		{Session: a.Session, LifetimeSeconds: 3600, Host: "web\x1b[2J"},
		{Session: a.Session, LifetimeSeconds: 3600, Purpose: strings.Repeat("x", 256)},
	} {
		js, _ := json.Marshal(bad)
		if _, err := parseAnnouncement(js); err == nil {
			t.Errorf("announcement %+v accepted", bad)
		}
	}
}

// FuzzOpenAnnouncement feeds the parser what a hostile writer could sign
// (the signature checked first), and the JSON behind it alone.
func FuzzOpenAnnouncement(f *testing.F) {
	keys := testKeysF(f)
	a := testAnnouncement()
	js, _ := json.Marshal(a)
	f.Add(append([]byte(sessionMagic), keys.SignObject(js, crypto.DomainSession)...))
	f.Add(js)
	f.Add([]byte(`{"session":"0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a","lifetime_seconds":9223372036854775807}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		checkParsed := func(a *Announcement) {
			if l := a.Lifetime(); l < minSessionLifetime || l > maxSessionLifetime {
				t.Fatalf("lifetime %s accepted", l)
			}
			for _, s := range []string{a.Session, a.Purpose, a.Host, a.Program} {
				if checkText(s) != nil {
					t.Fatalf("text %q accepted", s)
				}
			}
			led := &Ledger{Revoked: map[[32]byte]time.Time{}}
			ss := groupSessions([]sessionObject{{name: "x", a: a}}, time.Now(), led, NewWriters())
			if len(ss) != 1 || ss[0].State == "" {
				t.Fatalf("sessions %+v", ss)
			}
		}
		if a, err := parseAnnouncement(b); err == nil {
			checkParsed(a)
		}
		if a, _, err := openAnnouncement(keys, b); err == nil {
			checkParsed(a)
		}
	})
}
