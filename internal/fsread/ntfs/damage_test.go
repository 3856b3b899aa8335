package ntfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf16"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/fsread"
)

func utf16le(s string) []byte {
	var b []byte
	for _, u := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, u)
	}
	return b
}

// reparse encodes a symlink (with flags) or, for flags < 0, a junction,
// as Windows writes them and ntfs-3g's system.ntfs_reparse_data takes.
func reparse(sub, print string, flags int) []byte {
	s, p := utf16le(sub), utf16le(print)
	var body []byte
	le := binary.LittleEndian
	tag := uint32(tagSymlink)
	if flags < 0 {
		tag = tagMountPoint
		s, p = append(s, 0, 0), append(p, 0, 0)
	}
	body = le.AppendUint16(body, 0)
	body = le.AppendUint16(body, uint16(len(s)-2*btoi(flags < 0)))
	body = le.AppendUint16(body, uint16(len(s)))
	body = le.AppendUint16(body, uint16(len(p)-2*btoi(flags < 0)))
	if flags >= 0 {
		body = le.AppendUint32(body, uint32(flags))
	}
	body = append(append(body, s...), p...)
	out := le.AppendUint32(nil, tag)
	out = le.AppendUint16(out, uint16(len(body)))
	return append(le.AppendUint16(out, 0), body...)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestReparsePoints: Windows symlinks and junctions read as symlinks
// whose absolute targets start from this filesystem's root (ntfs-3g
// prefixes its mount point), and are followed inside paths.
func TestReparsePoints(t *testing.T) {
	needNTFS(t)
	img := mkImage(t, 16<<20)
	mountImage(t, img, false, func(dir string) {
		must(t, os.MkdirAll(filepath.Join(dir, "dir/sub"), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "dir/sub/f"), []byte("via a junction"), 0o644))
		must(t, os.Mkdir(filepath.Join(dir, "junction"), 0o755))
		for _, n := range []string{"rel", "abs"} {
			must(t, os.WriteFile(filepath.Join(dir, n), nil, 0o644))
		}
		for n, v := range map[string][]byte{
			"rel":      reparse(`dir\sub`, `dir\sub`, symlinkRelative),
			"abs":      reparse(`\??\C:\dir\sub`, `C:\dir\sub`, 0),
			"junction": reparse(`\??\C:\dir`, `C:\dir`, -1),
		} {
			must(t, unix.Setxattr(filepath.Join(dir, n), "system.ntfs_reparse_data", v, 0))
		}
	})
	f := openImage(t, img)
	for p, want := range map[string]string{"/rel": "dir/sub", "/abs": "/dir/sub", "/junction": "/dir"} {
		got, err := f.Readlink(p)
		if err != nil || got != want {
			t.Errorf("Readlink(%s) = %q, %v; want %q", p, got, err, want)
		}
		if st, err := f.Lstat(p); err != nil || st.Type() != fsread.TypeSymlink || st.Size != int64(len(want)) {
			t.Errorf("Lstat(%s) = %+v, %v", p, st, err)
		}
	}
	fl, err := f.Open("/junction/sub/f")
	must(t, err)
	b := make([]byte, 14)
	if _, err := fl.ReadAt(b, 0); err != nil || string(b) != "via a junction" {
		t.Errorf("through the junction: %q, %v", b, err)
	}
}

// damageBase makes the image the damage tests break: a file, a small
// file and a folder of 2000 long names (an index tree three levels deep).
func damageBase(t *testing.T) []byte {
	img := mkImage(t, 32<<20)
	mountImage(t, img, false, func(dir string) {
		must(t, os.WriteFile(filepath.Join(dir, "file"), randBytes(rand.New(rand.NewPCG(3, 4)), 20000), 0o644))
		must(t, os.WriteFile(filepath.Join(dir, "small"), []byte("small"), 0o644))
		must(t, os.Mkdir(filepath.Join(dir, "bigdir"), 0o755))
		for i := range 2000 {
			must(t, os.WriteFile(filepath.Join(dir, "bigdir", fmt.Sprintf("%s%04d", strings.Repeat("y", 30), i)), nil, 0o644))
		}
	})
	b, err := os.ReadFile(img)
	must(t, err)
	return b
}

// where tells the damage tests where things are in an image.
type where struct {
	t   *testing.T
	f   *FS
	img []byte
}

// phys is the partition offset of byte off of stream s.
func (w where) phys(s *stream, off int64) int64 {
	for _, r := range s.runs {
		if off/w.f.cs < r.vcn+r.n && r.lcn >= 0 {
			return (r.lcn+off/w.f.cs-r.vcn)*w.f.cs + off%w.f.cs
		}
	}
	w.t.Fatalf("offset %d not mapped", off)
	return 0
}

// attr is the partition offset of the first attribute of type typ in
// the record of path p.
func (w where) attr(p string, typ uint32) int64 {
	ref, err := w.f.resolve(p)
	num := refNum(ref)
	must(w.t, err)
	rec := w.phys(w.f.mft, int64(num)*w.f.recSize)
	off := int64(le16(w.img, int(rec)+0x14))
	for le32(w.img, int(rec+off)) != typ {
		off += int64(le32(w.img, int(rec+off)+4))
		if off >= w.f.recSize {
			w.t.Fatalf("%s has no attribute %#x", p, typ)
		}
	}
	return rec + off
}

// firstEntry is the offset of the first entry of the index node whose
// header is at h.
func (w where) firstEntry(h int64) int64 { return h + int64(le32(w.img, int(h))) }

// TestDamaged: a damaged image gives an error naming what is damaged
// (and the path asked for), never a panic, a hang or a huge allocation.
func TestDamaged(t *testing.T) {
	needNTFS(t)
	base := damageBase(t)
	f, err := Open(bytes.NewReader(base), int64(len(base)), Options{})
	must(t, err)
	w := where{t, f, base}
	le := binary.LittleEndian
	put64 := func(v uint64) []byte { return le.AppendUint64(nil, v) }
	for _, tc := range []struct {
		name string
		// patch gives the bytes to write at offsets of the image.
		patch func() map[int64][]byte
		// do reads what the damage is in; its error must hold want.
		do   func(f *FS) error
		want string
	}{
		{"bytes per sector", func() map[int64][]byte { return map[int64][]byte{11: {0xE8, 0x03}} }, nil, "1000 bytes per sector"},
		{"sectors per cluster", func() map[int64][]byte { return map[int64][]byte{13: {3}} }, nil, "3 sectors per cluster"},
		{"sectors per cluster code", func() map[int64][]byte { return map[int64][]byte{13: {0x80 + 0x70}} }, nil, "sectors per cluster code"},
		{"MFT cluster", func() map[int64][]byte { return map[int64][]byte{0x30: put64(1 << 40)} }, nil, "$MFT at cluster"},
		{"MFT record size", func() map[int64][]byte { return map[int64][]byte{0x40: {0}} }, nil, "MFT record size"},
		{"runlist outside the volume", func() map[int64][]byte {
			a := w.attr("/file", atData)
			rl := a + int64(le16(base, int(a)+0x20))
			h := base[rl]
			return map[int64][]byte{rl + 1 + int64(h&0xF) + int64(h>>4) - 1: {0x3F}}
		}, func(f *FS) error { _, err := f.Lstat("/file"); return err }, "/file: MFT record"},
		{"attribute past the record", func() map[int64][]byte {
			return map[int64][]byte{w.attr("/file", atData) + 4: {0xF8, 0xFF, 0, 0}}
		}, func(f *FS) error { _, err := f.ReadDir("/"); return err }, "damaged length"},
		{"absurd size", func() map[int64][]byte {
			a := w.attr("/file", atData)
			return map[int64][]byte{a + 0x28: put64(1 << 59), a + 0x30: put64(1 << 59), a + 0x38: put64(1 << 59)}
		}, func(f *FS) error { _, err := f.Open("/file"); return err }, "/file: MFT record"},
		{"torn record", func() map[int64][]byte {
			a := w.attr("/small", atStdInfo)
			rec := a - a%w.f.recSize
			return map[int64][]byte{rec + 510: {0x12, 0x34}}
		}, func(f *FS) error { _, err := f.Lstat("/small"); return err }, "update sequence mismatch"},
		{"record number", func() map[int64][]byte {
			a := w.attr("/small", atStdInfo)
			return map[int64][]byte{a - a%w.f.recSize + 0x2C: {0x77, 0x77}}
		}, func(f *FS) error { _, err := f.Lstat("/small"); return err }, "says it is record"},
		{"stale entry", func() map[int64][]byte {
			// The sequence number of /small's record moves on, as if
			// it were deleted and reused.
			a := w.attr("/small", atStdInfo)
			return map[int64][]byte{a - a%w.f.recSize + 0x10: {0x55, 0x55}}
		}, func(f *FS) error { _, err := f.Lstat("/small"); return err }, "stale directory entry"},
		{"index block outside", func() map[int64][]byte {
			a := w.attr("/bigdir", atIndexRoot)
			e := w.firstEntry(a + int64(le16(base, int(a)+0x14)) + 0x10)
			return map[int64][]byte{e + int64(le16(base, int(e)+8)) - 8: put64(1 << 30)}
		}, func(f *FS) error { _, err := f.ReadDir("/bigdir"); return err }, "outside $INDEX_ALLOCATION"},
		{"index loop", func() map[int64][]byte {
			// The root's child, a node, made to point to itself.
			a := w.attr("/bigdir", atIndexRoot)
			e := w.firstEntry(a + int64(le16(base, int(a)+0x14)) + 0x10)
			vcn := le64(base, int(e)+int(le16(base, int(e)+8))-8)
			ref, _ := w.f.resolve("/bigdir")
			num := refNum(ref)
			rec, _ := w.f.record(num)
			s, err := w.f.newStream(num, rec.all(atIndexAlloc, "$I30"))
			must(t, err)
			blk := w.phys(s, int64(vcn)*w.f.cs)
			if le32(base, int(blk)+0x18+0x0C)&1 == 0 {
				t.Fatal("the root's child is a leaf: no loop to make")
			}
			c := w.firstEntry(blk + 0x18)
			return map[int64][]byte{c + int64(le16(base, int(c)+8)) - 8: put64(vcn)}
		}, func(f *FS) error {
			// The blocks below the node are lost, the rest listed.
			ents, err := f.ReadDir("/bigdir")
			if err != nil {
				return err
			}
			names := map[string]bool{}
			for _, e := range ents {
				names[e.Name] = true
			}
			if len(ents) == 0 || len(ents) >= 2000 || len(names) != len(ents) {
				return fmt.Errorf("%d entries, %d names", len(ents), len(names))
			}
			return errors.New("listed " + strconv.Itoa(len(ents)) + " names, each once")
		}, "each once"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := bytes.Clone(base)
			for off, b := range tc.patch() {
				if o := off % 512; o+int64(len(b)) > 510 && tc.name != "torn record" {
					t.Fatalf("patch at %d overwrites an update sequence slot", off)
				}
				copy(img[off:], b)
			}
			done := make(chan error, 1)
			go func() {
				f, err := Open(bytes.NewReader(img), int64(len(img)), Options{})
				if err == nil && tc.do != nil {
					err = tc.do(f)
				} else if err == nil {
					err = errors.New("opened")
				}
				done <- err
			}()
			select {
			case err := <-done:
				t.Log(err)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("got %v, want an error with %q", err, tc.want)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("hangs")
			}
		})
	}
}

// TestInitializedSize: past a stream's initialized size (Windows
// extends files without writing them), the file reads as zeros and
// holds no data.
func TestInitializedSize(t *testing.T) {
	needNTFS(t)
	base := damageBase(t)
	f, err := Open(bytes.NewReader(base), int64(len(base)), Options{})
	must(t, err)
	w := where{t, f, base}
	a := w.attr("/file", atData)
	img := bytes.Clone(base)
	binary.LittleEndian.PutUint64(img[a+0x38:], 100)
	g, err := Open(bytes.NewReader(img), int64(len(img)), Options{})
	must(t, err)
	want := make([]byte, 20000)
	copy(want, randBytes(rand.New(rand.NewPCG(3, 4)), 100))
	fl, err := g.Open("/file")
	must(t, err)
	got := make([]byte, 20000)
	if n, err := fl.ReadAt(got, 0); n != 20000 || (err != nil && err != io.EOF) || !bytes.Equal(got, want) {
		t.Errorf("read %d bytes, %v; equal to the initialized part then zeros: %v", n, err, bytes.Equal(got, want))
	}
	if rs, err := fl.Data(); err != nil || len(rs) != 1 || rs[0].Start != 0 || rs[0].End != 100 {
		t.Errorf("data ranges %v, %v; want [0,100)", rs, err)
	}
}

// TestDirtyVolume: an image of a volume marked dirty (a snapshot of a
// mounted Windows volume) is read with a warning that its $LogFile is
// not replayed; a clean one without.
func TestDirtyVolume(t *testing.T) {
	needNTFS(t)
	base, err := os.ReadFile(mkImage(t, 16<<20))
	must(t, err)
	open := func(img []byte) []string {
		var warned []string
		_, err := Open(bytes.NewReader(img), int64(len(img)), Options{Warn: func(s string) { warned = append(warned, s) }})
		must(t, err)
		return warned
	}
	if w := open(base); len(w) != 0 {
		t.Errorf("warnings on a clean volume: %q", w)
	}
	f, err := Open(bytes.NewReader(base), int64(len(base)), Options{})
	must(t, err)
	a := where{t, f, base}.attr("/$Volume", atVolumeInfo)
	img := bytes.Clone(base)
	img[a+int64(le16(img, int(a)+0x14))+10] |= volDirty
	if w := open(img); len(w) != 1 || !strings.Contains(w[0], "$LogFile is not replayed") {
		t.Errorf("warnings %q", w)
	}
}
