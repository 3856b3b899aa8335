package source

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// walk asks m for a disk of size bytes in the 1 MiB windows a backup
// asks for, and returns the bytes it maps.
func walk(t *testing.T, m extent.Map, size int64) int64 {
	t.Helper()
	var mapped int64
	const win = 1 << 20
	for off := int64(0); off < size; off += win {
		rs, err := m.Data(off, min(win, size-off))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			mapped += r.Len()
		}
	}
	return mapped
}

// mapFile opens path, maps it and walks its map as a backup would; it
// returns the description and the warnings given.
func mapFile(t *testing.T, path string, mo MapOptions) (*repo.Disk, []string, int64) {
	t.Helper()
	var warns []string
	mo.Warn = func(s string) { warns = append(warns, s) }
	s := mustOpen(t, path)
	t.Cleanup(func() { s.Close() })
	d, err := OpenDisk(Live(s), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	l, err := d.Map(mo)
	if err != nil {
		t.Fatal(err)
	}
	mapped := walk(t, l.Map(), d.Size)
	l.WarnLate()
	rd := &repo.Disk{Size: d.Size}
	l.Describe(rd)
	if got := l.Skipped(); got != skipped(rd) {
		t.Fatalf("Skipped %d, the partitions say %d", got, skipped(rd))
	}
	return rd, warns, mapped
}

func skipped(d *repo.Disk) int64 {
	var n int64
	for _, p := range d.Partitions {
		n += p.BytesSkipped
	}
	return n
}

// TestMapFilesystems: each filesystem sauve maps is found on a whole
// disk, in an MBR and in a GPT partition; its free space is skipped, and
// the description has what the end-to-end tests check of a backup.
func TestMapFilesystems(t *testing.T) {
	for _, k := range fsKinds {
		for _, table := range []string{"", "dos", "gpt"} {
			name := k.name + " on the whole disk"
			if table != "" {
				name = k.name + " in a " + table + " partition"
			}
			t.Run(name, func(t *testing.T) {
				fs := makeFS(t, k)
				path, start, wantTable, number := fs, int64(0), "", 0
				if table != "" {
					path = partitioned(t, table, k.size+2<<20, k.size, fs)
					start, wantTable, number = 1<<20, map[string]string{"dos": "mbr", "gpt": "gpt"}[table], 1
				}
				fi, _ := os.Stat(path)
				d, warns, mapped := mapFile(t, path, MapOptions{})
				if len(warns) != 0 {
					t.Fatalf("warnings: %q", warns)
				}
				if d.PartitionTable != wantTable || (wantTable != "") != (d.DiskID != "") || len(d.Partitions) != 1 {
					t.Fatalf("disk: %+v", d)
				}
				p := d.Partitions[0]
				if p.Number != number || p.Start != start || p.Size != k.size || p.Filesystem != k.name || p.ImagedInFull != "" || p.UsedBytes == nil {
					t.Fatalf("partition: %+v", p)
				}
				// As the end-to-end tests check: bytes after the last
				// block of the filesystem are read too, at most 64 KiB.
				if p.BytesRead > *p.UsedBytes+64<<10 || p.BytesSkipped < k.size/4 || p.BytesRead+p.BytesSkipped > p.Size {
					t.Fatalf("read %d, skipped %d, used %d of %d", p.BytesRead, p.BytesSkipped, *p.UsedBytes, p.Size)
				}
				if mapped != p.BytesRead+d.BytesOutside || d.BytesOutside > fi.Size()-p.Size {
					t.Fatalf("mapped %d, read %d in the partition and %d outside", mapped, p.BytesRead, d.BytesOutside)
				}
			})
		}
	}
}

// TestMapNoSkip: --no-fs-skip finds the filesystem and counts its used
// bytes, but skips nothing and says why in the description (not in a
// warning: it was asked for).
func TestMapNoSkip(t *testing.T) {
	fs := makeFS(t, fsKinds[0])
	d, warns, mapped := mapFile(t, fs, MapOptions{NoSkip: true})
	p := d.Partitions[0]
	if p.BytesSkipped != 0 || p.UsedBytes == nil || p.ImagedInFull != "free-space skipping is off (--no-fs-skip)" || mapped != p.BytesRead {
		t.Fatalf("partition: %+v (mapped %d)", p, mapped)
	}
	if len(warns) != 0 {
		t.Fatalf("warnings: %q", warns)
	}
}

// TestWarnings: what is imaged in full is said through the callback:
// early for what the layout shows, late for damage met while the map is
// read, each once; the description says it too.
func TestWarnings(t *testing.T) {
	need(t, "dumpe2fs", "e2fsprogs")
	noFS := sparseFile(t, "nofs.img", 4<<20)
	os.WriteFile(noFS, bytes.Repeat([]byte("not a filesystem "), 60000), 0o600)
	unknownPart := partitioned(t, "dos", 8<<20, 6<<20, noFS)
	// An ext4 whose first block bitmap fails its checksum.
	csum := sparseFile(t, "csum.img", 32<<20)
	run(t, "mkfs.ext4", "-F", "-q", "-b", "1024", "-O", "metadata_csum", csum)
	out, err := exec.Command("dumpe2fs", csum).Output()
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`Block bitmap at (\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("dumpe2fs: no block bitmap:\n%s", out)
	}
	bb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	f, _ := os.OpenFile(csum, os.O_RDWR, 0)
	f.WriteAt([]byte{0x5a}, bb*1024+900)
	f.Close()
	for _, tc := range []struct {
		name  string
		path  string
		early []string
		late  []string
		full  string // the partition's ImagedInFull
	}{
		{"no filesystem", noFS, []string{"no partition table or filesystem that sauve can map: the whole disk is imaged in full"}, nil, ""},
		{"unknown partition", unknownPart, []string{"partition 1 (Linux, 6.0 MiB): no filesystem that sauve can map: imaged in full"}, nil, "no filesystem that sauve can map"},
		{"damaged bitmap", csum, nil, []string{"the disk (ext4, 32.0 MiB): block bitmap of group 0 fails its checksum: the group's 8192 blocks are imaged in full"},
			"in part: block bitmap of group 0 fails its checksum: the group's 8192 blocks are imaged in full"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			s := mustOpen(t, tc.path)
			defer s.Close()
			d, err := OpenDisk(Live(s), Options{})
			if err != nil {
				t.Fatal(err)
			}
			l, err := d.Map(MapOptions{Warn: func(w string) { got = append(got, w) }})
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.early) {
				t.Fatalf("early warnings %q, want %q", got, tc.early)
			}
			got = nil
			// A window asked twice (the layout is asked again, directly)
			// reports its damage once.
			walk(t, l.Map(), d.Size)
			walk(t, l.tally.Layout(), d.Size)
			l.WarnLate()
			if fmt.Sprint(got) != fmt.Sprint(tc.late) {
				t.Fatalf("late warnings %q, want %q", got, tc.late)
			}
			var rd repo.Disk
			l.Describe(&rd)
			if tc.full != "" && (len(rd.Partitions) == 0 || rd.Partitions[0].ImagedInFull != tc.full) {
				t.Fatalf("partitions %+v, want imaged in full: %q", rd.Partitions, tc.full)
			}
		})
	}
}

// TestStreamHasNoLayout: a stream is read whole, in order; nothing is
// described.
func TestStreamHasNoLayout(t *testing.T) {
	r, w, _ := os.Pipe()
	defer r.Close()
	w.Close()
	var s *Source
	asStdin(t, r, func() { s = mustOpen(t, "-") })
	defer s.Close()
	d, err := OpenDisk(Live(s), Options{})
	if err != nil {
		t.Fatal(err)
	}
	warned := false
	l, err := d.Map(MapOptions{Warn: func(string) { warned = true }})
	if err != nil {
		t.Fatal(err)
	}
	rd := repo.Disk{Name: "stdin"}
	l.Describe(&rd)
	l.WarnLate()
	if l.Map() != nil || l.Skipped() != 0 || warned || rd.PartitionTable != "" || rd.Partitions != nil {
		t.Fatalf("a stream's layout: map %v, described %+v, warned %v", l.Map(), rd, warned)
	}
}

// copies is a Provider that copies image files aside, as a reflink
// copy would, and reads other sources live.
type copies struct{ dir string }

func (c copies) Views(ctx context.Context, srcs []*Source) ([]*View, error) {
	var out []*View
	for _, s := range srcs {
		if s.Kind != File {
			out = append(out, Live(s))
			continue
		}
		name := filepath.Join(c.dir, filepath.Base(s.Path)+".copy")
		b, err := os.ReadFile(s.Path)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(name, b, 0o600); err != nil {
			return nil, err
		}
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		out = append(out, &View{Of: s, At: f, Size: s.Size, Holes: f, Release: func() error {
			f.Close()
			return os.Remove(name)
		}})
	}
	return out, nil
}

// TestProviderViews: a point-in-time copy taken between Open and OpenDisk
// is what is detected, mapped and read; the live source may change
// meanwhile.
func TestProviderViews(t *testing.T) {
	need(t, "qemu-img", "qemu-utils")
	guest := guestDisk(t)
	img := filepath.Join(t.TempDir(), "vm.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", guest, img)
	want, _ := os.ReadFile(guest)
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil { // a second source, read live
		t.Fatal(err)
	}
	var p Provider = copies{t.TempDir()}
	srcs := []*Source{mustOpen(t, img), mustOpen(t, fifo)}
	for _, s := range srcs {
		defer s.Close()
	}
	views, err := p.Views(context.Background(), srcs)
	if err != nil {
		t.Fatal(err)
	}
	if len(views) != 2 || views[0].Live || !views[1].Live || views[0].Of != srcs[0] {
		t.Fatalf("views: %+v", views)
	}
	// The live image changes after the copy: it becomes a raw file.
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDisk(views[0], Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	l, err := d.Map(MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, d.At, l.Map(), d.Size)
	var rd repo.Disk
	l.Describe(&rd)
	if d.Format != "qcow2" || d.Size != int64(len(want)) || len(rd.Partitions) != 1 || rd.Partitions[0].Filesystem != "ext4" {
		t.Fatalf("read the copy as %s of %d bytes: %+v", d.Format, d.Size, rd)
	}
	for off := int64(0); off < d.Size; off += 1 << 20 {
		rs, _ := l.tally.Layout().Data(off, 1<<20)
		for _, r := range rs {
			if !bytes.Equal(got[r.Start:r.End], want[r.Start:r.End]) {
				t.Fatalf("bytes [%d, %d) are not the copy's", r.Start, r.End)
			}
		}
	}
	if err := views[0].Release(); err != nil {
		t.Fatal(err)
	}
}
