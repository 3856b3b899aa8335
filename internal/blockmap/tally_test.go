package blockmap

import (
	"os"
	"slices"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
)

// twoPartDisk makes a 64 MiB disk image: an MBR with an ext4 partition
// (1 MiB, 40 MiB) and a FAT one (41 MiB, 20 MiB), the tail unpartitioned.
func twoPartDisk(t *testing.T) (*os.File, int64) {
	t.Helper()
	need(t, "mkfs.ext4", "mkfs.fat")
	const size = 64 << 20
	p := image(t, "disk.img", size)
	run(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", p, "40960k")
	fat := image(t, "fat.img", 20<<20)
	run(t, "mkfs.fat", "-F", "16", fat)
	b, err := os.ReadFile(fat)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.WriteAt(b, 41<<20); err != nil {
		t.Fatal(err)
	}
	mbr := make([]byte, 512)
	mbrTestEntry(mbr, 0x83, 2048, 40<<11)
	e := mbr[446+16:]
	e[4] = 0x06
	putLE32(e[8:], 41<<11)
	putLE32(e[12:], 20<<11)
	if _, err := f.WriteAt(mbr, 0); err != nil {
		t.Fatal(err)
	}
	return f, size
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// TestWindowIsPure: the layout answers a window the same whatever was
// asked before, and its shares add up to the window.
func TestWindowIsPure(t *testing.T) {
	f, size := twoPartDisk(t)
	l, err := NewLayout(f, size, LayoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Parts) != 2 || l.Parts[0].FS == nil || l.Parts[0].FS.Type != "ext4" || l.Parts[1].FS == nil || l.Parts[1].FS.Type != "fat16" {
		t.Fatalf("layout: %+v, warnings %v", l.Parts, l.Warnings)
	}
	const win = 1 << 20
	type answer struct {
		data   []extent.Range
		shares []Share
	}
	ask := func(off int64) answer {
		d, s, err := l.Window(off, win)
		if err != nil {
			t.Fatal(err)
		}
		return answer{d, s}
	}
	var forward []answer
	for off := int64(0); off < size; off += win {
		forward = append(forward, ask(off))
	}
	for _, order := range []string{"again", "backwards", "odd then even"} {
		var idx []int
		n := len(forward)
		switch order {
		case "again":
			for i := range n {
				idx = append(idx, i)
			}
		case "backwards":
			for i := n - 1; i >= 0; i-- {
				idx = append(idx, i)
			}
		default:
			for i := 1; i < n; i += 2 {
				idx = append(idx, i)
			}
			for i := 0; i < n; i += 2 {
				idx = append(idx, i)
			}
		}
		for _, i := range idx {
			got := ask(int64(i) * win)
			if !slices.Equal(got.data, forward[i].data) || !slices.Equal(got.shares, forward[i].shares) {
				t.Fatalf("%s: window %d is %+v, was %+v", order, i, got, forward[i])
			}
		}
	}
	for i, a := range forward {
		var read, inData, span int64
		for _, r := range a.data {
			inData += r.Len()
		}
		for _, s := range a.shares {
			read += s.Read
			span += s.Read + s.Skipped
		}
		if read != inData || span != win {
			t.Fatalf("window %d: shares %+v read %d and span %d, data holds %d of %d", i, a.shares, read, span, inData, win)
		}
	}
	if l.Late != nil || l.Parts[0].Notes != nil {
		t.Fatalf("a sound disk has late warnings: %v", l.Late)
	}
}

// TestTally: the tally counts what a walk of the disk read, per
// partition and outside, each byte once even when a window is asked again.
func TestTally(t *testing.T) {
	f, size := twoPartDisk(t)
	for _, tc := range []struct {
		name   string
		noSkip bool
		win    int64
		repeat bool // ask every window twice
	}{
		{"skip free", false, 256 << 10, false},
		{"windows asked twice", false, 1 << 20, true},
		{"odd windows", false, 3<<20 + 512, false},
		{"no skip", true, 1 << 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := NewLayout(f, size, LayoutOptions{NoSkip: tc.noSkip})
			if err != nil {
				t.Fatal(err)
			}
			tl := NewTally(l)
			var mapped int64
			for off := int64(0); off < size; off += tc.win {
				n := min(tc.win, size-off)
				rs, err := tl.Data(off, n)
				if err != nil {
					t.Fatal(err)
				}
				if tc.repeat {
					again, err := tl.Data(off, n)
					if err != nil || !slices.Equal(again, rs) {
						t.Fatalf("window %d asked again: %v, was %v (%v)", off, again, rs, err)
					}
				}
				for _, r := range rs {
					mapped += r.Len()
				}
			}
			counted := tl.Outside()
			if want := int64(1<<20 + 3<<20); counted != want {
				t.Errorf("outside partitions: read %d, want %d", counted, want)
			}
			var skipped int64
			for i, p := range l.Parts {
				s := tl.Part(i)
				counted += s.Read
				skipped += s.Skipped
				if s.Read+s.Skipped != p.Size {
					t.Errorf("%s: read %d + skipped %d != size %d", l.Label(p), s.Read, s.Skipped, p.Size)
				}
				if !p.UsedKnown || s.Used <= 0 || s.Used > p.Size {
					t.Errorf("%s: used %d (known %v)", l.Label(p), s.Used, p.UsedKnown)
				}
				if tc.noSkip && (s.Skipped != 0 || s.Read != p.Size) {
					t.Errorf("%s: --no-fs-skip skipped %d", l.Label(p), s.Skipped)
				}
				if !tc.noSkip && s.Skipped < p.Size/2 {
					t.Errorf("%s: skipped only %d of an empty filesystem of %d", l.Label(p), s.Skipped, p.Size)
				}
			}
			if counted != mapped || skipped != tl.Skipped() || mapped+skipped != size {
				t.Fatalf("mapped %d, counted %d, skipped %d (total %d) of %d", mapped, counted, skipped, tl.Skipped(), size)
			}
		})
	}
}
