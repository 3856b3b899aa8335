package overlay

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
)

// memBase is a base disk in memory whose data is where holes says not.
type memBase struct {
	b     []byte
	holes []extent.Range
	reads int
	mu    sync.Mutex
}

func (m *memBase) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	m.reads++
	m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *memBase) Data(off, n int64) ([]extent.Range, error) {
	// All data but one hole in the middle, enough to see a union.
	var out []extent.Range
	pos := off
	for _, h := range m.holes {
		if h.End <= pos || h.Start >= off+n {
			continue
		}
		if h.Start > pos {
			out = append(out, extent.Range{Start: pos, End: h.Start})
		}
		pos = min(h.End, off+n)
	}
	if pos < off+n {
		out = append(out, extent.Range{Start: pos, End: off + n})
	}
	return out, nil
}

func newBase(size int) *memBase {
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return &memBase{b: b}
}

const testSize = 3*BlockSize + 12345 // a short last block

func TestOverlayRandomWrites(t *testing.T) {
	base := newBase(testSize)
	model := bytes.Clone(base.b)
	path := filepath.Join(t.TempDir(), "o")
	o, err := Open(path, "snap/vda", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 4))
	for i := range 400 {
		off := r.Int64N(testSize)
		n := r.Int64N(min(testSize-off, 2*BlockSize) + 1)
		switch i % 5 {
		case 0:
			if err := o.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		default:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(r.Uint32())
			}
			if _, err := o.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		}
		if i%50 == 0 {
			if err := o.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]byte, testSize)
		if _, err := o.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("after operation %d the overlay reads other bytes than written", i)
		}
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(base.b[:100], newBase(testSize).b[:100]) {
		t.Fatal("the base was written")
	}
	// Reopened, it holds the same disk.
	o, err = Open(path, "snap/vda", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	got := make([]byte, testSize)
	if _, err := o.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("reopened overlay lost writes")
	}
}

func TestOverlayCopyOnWrite(t *testing.T) {
	base := newBase(testSize)
	o, err := Open(filepath.Join(t.TempDir(), "o"), "x", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	// A whole-block write does not read the base; a partial one does.
	if _, err := o.WriteAt(make([]byte, BlockSize), BlockSize); err != nil {
		t.Fatal(err)
	}
	if base.reads != 0 {
		t.Fatalf("a whole-block write read the base %d times", base.reads)
	}
	if _, err := o.WriteAt([]byte("hello"), 10); err != nil {
		t.Fatal(err)
	}
	if base.reads != 1 {
		t.Fatalf("a partial write read the base %d times, want 1", base.reads)
	}
	if w := o.Written(); w != 2*BlockSize {
		t.Fatalf("Written = %d, want %d", w, 2*BlockSize)
	}
	// Writes past the end are refused, reads there end.
	if _, err := o.WriteAt([]byte("x"), testSize); err == nil {
		t.Fatal("a write past the end was taken")
	}
	if n, err := o.ReadAt(make([]byte, 10), testSize-4); n != 4 || err == nil {
		t.Fatalf("read across the end: %d, %v", n, err)
	}
}

func TestOverlayData(t *testing.T) {
	base := newBase(testSize)
	base.holes = []extent.Range{{Start: 0, End: 3 * BlockSize}}
	o, err := Open(filepath.Join(t.TempDir(), "o"), "x", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	o.WriteAt([]byte("a"), BlockSize+5)
	got, err := o.Data(0, testSize)
	if err != nil {
		t.Fatal(err)
	}
	want := []extent.Range{{Start: BlockSize, End: 2 * BlockSize}, {Start: 3 * BlockSize, End: testSize}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("Data = %v, want %v", got, want)
	}
}

// A flushed write survives the process dying before Close; the file is
// opened again as it was left.
func TestOverlayFlushWithoutClose(t *testing.T) {
	base := newBase(testSize)
	path := filepath.Join(t.TempDir(), "o")
	o, err := Open(path, "x", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	o.WriteAt([]byte("flushed"), 2*BlockSize+7)
	if err := o.Flush(); err != nil {
		t.Fatal(err)
	}
	o.f.Close() // as if killed: no Close, no last Flush
	o, err = Open(path, "x", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	got := make([]byte, 7)
	o.ReadAt(got, 2*BlockSize+7)
	if string(got) != "flushed" {
		t.Fatalf("read %q after a reopen", got)
	}
}

func TestOverlayRefusals(t *testing.T) {
	base := newBase(testSize)
	dir := t.TempDir()
	path := filepath.Join(dir, "o")
	o, err := Open(path, "snap1/vda", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, "snap1/vda", testSize, base); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a second open of a held overlay: %v", err)
	}
	o.Close()
	damage := func(name string, f func(b []byte) []byte) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, f(bytes.Clone(b)), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		name, ident string
		size        int64
		path        string
		want        string
	}{
		{"other disk", "snap2/vda", testSize, path, "belongs to snap1/vda"},
		{"other size", "snap1/vda", testSize + 1, path, "not"},
		{"not an overlay", "snap1/vda", testSize, damage("junk", func(b []byte) []byte { copy(b, "GARBAGE!"); return b }), "not a sauve overlay"},
		{"header damaged", "snap1/vda", testSize, damage("flip", func(b []byte) []byte { b[20] ^= 1; return b }), "damaged"},
		{"truncated", "snap1/vda", testSize, damage("short", func(b []byte) []byte { return b[:len(b)-1] }), "truncated"},
		{"bits past the end", "snap1/vda", testSize, damage("bits", func(b []byte) []byte { b[headerSize] = 0xff; return b }), "past the end"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o, err := Open(c.path, c.ident, c.size, base)
			if err == nil {
				o.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

func TestOverlayConcurrentWrites(t *testing.T) {
	base := newBase(testSize)
	o, err := Open(filepath.Join(t.TempDir(), "o"), "x", testSize, base)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	// Eight writers each own every eighth 512-byte sector of the same
	// blocks: the copy-on-write of one must not undo another's.
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for s := int64(w); s*512 < 2*BlockSize; s += 8 {
				o.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, 512), s*512)
			}
		})
	}
	wg.Wait()
	got := make([]byte, 2*BlockSize)
	o.ReadAt(got, 0)
	for s := range int64(2 * BlockSize / 512) {
		if got[s*512] != byte(s%8+1) || got[s*512+511] != byte(s%8+1) {
			t.Fatalf("sector %d holds %d, want %d", s, got[s*512], s%8+1)
		}
	}
}
