package repo

import (
	"runtime"
	"testing"
)

// TestIndexMemoryPerBlob measures what one indexed blob costs in memory,
// the figure behind the memory-per-TiB table in docs/BENCHMARKS.md.
func TestIndexMemoryPerBlob(t *testing.T) {
	const n = 1 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// As LoadIndex fills it: reserved from the index objects' sizes, bulk
	// added, sorted once.
	x := NewIndex()
	x.reserve(n)
	p := PackInfo{ID: randID()}
	for i := 0; i < n; i++ {
		p.Blobs = append(p.Blobs, PackBlob{Type: DataBlob, ID: randID(), Offset: uint32(i), Length: 1})
		if len(p.Blobs) == 128 {
			x.addBulk(p, 1, TrustSigned)
			p = PackInfo{ID: randID()}
		}
	}
	x.finishBulk()
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("index: %.1f bytes per blob", per)
	if per > 56 {
		t.Errorf("index costs %.1f bytes per blob; the compact layout should stay near 48", per)
	}
	// Every blob is found, and nothing else.
	for _, b := range x.sorted[:1000] {
		if !x.Has(DataBlob, b.id) {
			t.Fatal("indexed blob not found")
		}
	}
	if x.Has(DataBlob, randID()) {
		t.Fatal("found a blob never added")
	}
	runtime.KeepAlive(x)
}
