package repo

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The journal of this machine's uploads keeps what a backup may still
// adopt and drops what it never will, lines of older versions included.
func TestCompactOwnPacks(t *testing.T) {
	c, err := OpenCache(t.TempDir(), "0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	id := func(b byte) ID { var x ID; x[0] = b; return x }
	indexed, orphan, inFlight, oldLost := id(1), id(2), id(3), id(4)
	for _, p := range []ID{indexed, orphan, inFlight} {
		if err := c.RecordOwnPack(p); err != nil {
			t.Fatal(err)
		}
	}
	// A line as sauve wrote them before they carried a time.
	f, _ := os.OpenFile(filepath.Join(c.dir, ownPacksFile), os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(oldLost.String() + "\n")
	f.Close()
	if n := len(c.OwnPacks()); n != 4 {
		t.Fatalf("journal holds %d packs, want 4", n)
	}
	isIndexed := func(p ID) bool { return p == indexed }
	isStored := func(p ID) bool { return p == orphan || p == indexed }
	if err := c.CompactOwnPacks(isIndexed, isStored, time.Now()); err != nil {
		t.Fatal(err)
	}
	got := c.OwnPacks()
	if len(got) != 2 || !got[orphan] || !got[inFlight] {
		t.Fatalf("after compaction: %v, want the orphan and the upload in flight", got)
	}
	// A week on, the upload that never arrived is dropped too.
	if err := c.CompactOwnPacks(isIndexed, isStored, time.Now().Add(ownPackGrace+time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := c.OwnPacks(); len(got) != 1 || !got[orphan] {
		t.Fatalf("a week later: %v, want the orphan alone", got)
	}
	if err := c.RecordOwnPack(inFlight); err != nil {
		t.Fatal(err)
	}
	if got := c.OwnPacks(); len(got) != 2 {
		t.Fatalf("appending after compaction: %v", got)
	}
}

// A listing record is a local file: whatever it holds, decoding it must
// fail cleanly or give back what was encoded.
func FuzzListingRecord(f *testing.F) {
	var key [32]byte
	f.Add(encodeListing(key, listingRecord{at: time.Unix(1, 0), listed: 3, missing: []ID{{1}, {2}}}))
	f.Add([]byte(listingMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeListing(key, b)
		if err != nil {
			return
		}
		if got := encodeListing(key, rec); string(got) != string(b) {
			t.Fatalf("record decodes to one that encodes otherwise")
		}
	})
}
