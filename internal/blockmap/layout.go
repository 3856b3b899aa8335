package blockmap

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/sauve-backup/sauve/internal/blockmap/ptable"
	"github.com/sauve-backup/sauve/internal/extent"
)

// LayoutOptions say how to map a disk.
type LayoutOptions struct {
	// SectorSize is the logical sector size of a device; 0 when unknown
	// (an image file).
	SectorSize int
	// NoSkip finds partitions and filesystems and counts their used
	// bytes, but maps everything as data.
	NoSkip bool
	// Busy are byte ranges of the disk in use read-write (a mounted
	// filesystem): a filesystem overlapping one is imaged in full.
	Busy []Busy
	// Under, when set, is intersected with the layout's map: bytes it
	// calls holes are not read either (a sparse image file).
	Under extent.Map
}

// Busy is a range of the disk that something writes to while it is read.
type Busy struct {
	Start, End int64
	What       string // e.g. "mounted read-write at /srv"
}

// Part is a partition, or (Number 0) a filesystem that fills a disk
// without a partition table, and how it is mapped. What a backup read of
// it is counted by a Tally, not here: the layout is only asked.
type Part struct {
	ptable.Partition
	FS *Filesystem // nil: no filesystem recognised
	// Full says why the partition's free space was not skipped; "" when
	// it was.
	Full string
	// Notes are problems found while reading the filesystem's map (a
	// bitmap that fails its checksum): those parts were imaged in full.
	Notes []string
	// UsedKnown says whether the filesystem's map can be read, so that
	// its used bytes are counted (Share.Used, Stats.Used).
	UsedKnown bool
}

// Layout is the Map of a whole disk: partition table, partitions and
// their filesystems. Everything outside a partition whose filesystem it
// can map is data.
//
// Asking it which ranges hold data (Data, Window) counts nothing: the
// answer depends only on the window asked, so a window may be asked twice
// or out of order. The one thing a query can add is a note on damage met
// in a filesystem's map (Late, Part.Notes), each note once however often
// it is met. What a backup read is counted by a Tally. A Layout is not
// safe for concurrent use: the filesystem maps keep the piece of their
// bitmap read last.
type Layout struct {
	Table *ptable.Table // nil: no partition table
	Parts []*Part
	// Warnings say what is imaged in full and why, found when the layout
	// was read; Late are those found while the map was read.
	Warnings []string
	Late     []string

	size  int64
	under extent.Map
	segs  []segment
}

// segment is a stretch of the disk with one owner (a partition, or -1
// for outside every partition) and, in a filesystem, its map.
type segment struct {
	start, end int64
	owner      int
	m          extent.Map // nil: all data
	skip       bool
}

// NewLayout reads the partition table and filesystems of a disk of size
// bytes. It fails only on I/O errors: what it cannot trust is imaged in
// full and reported in Warnings.
func NewLayout(r io.ReaderAt, size int64, opts LayoutOptions) (*Layout, error) {
	l := &Layout{size: size, under: opts.Under}
	t, err := ptable.Read(r, size, opts.SectorSize)
	if err != nil {
		return nil, fmt.Errorf("read partition table: %w", err)
	}
	for _, w := range warningsOf(t) {
		l.Warnings = append(l.Warnings, "partition table: "+w)
	}
	var parts []ptable.Partition
	switch {
	case t != nil && t.Damaged():
		l.Table = t
		l.Warnings = append(l.Warnings, "the partition table is damaged: the whole disk is imaged in full")
	case t != nil && t.Kind == ptable.GPT:
		l.Table, parts = t, t.Partitions
	default:
		// No table, or an MBR: a filesystem at the start of the disk is
		// either the disk's only one or, with an MBR, a conflict.
		fs0, err := Probe(r, size, l.lateWarn(0))
		if err != nil {
			return nil, fmt.Errorf("read filesystem at the start of the disk: %w", err)
		}
		switch {
		case t != nil && fs0 != nil:
			l.Table = t
			l.Warnings = append(l.Warnings, fmt.Sprintf("found both an MBR partition table and %s at the start of the disk (a leftover of an earlier layout?): which is current is unknown, so the whole disk is imaged in full", article(fs0.Type)))
		case t != nil:
			l.Table, parts = t, t.Partitions
		case fs0 != nil:
			p := &Part{Partition: ptable.Partition{Number: 0, Size: size}, FS: fs0}
			l.Parts = append(l.Parts, p)
			l.addFS(p, fs0, opts)
		default:
			l.Warnings = append(l.Warnings, "no partition table or filesystem that sauve can map: the whole disk is imaged in full")
		}
	}
	for _, pt := range parts {
		p := &Part{Partition: pt}
		l.Parts = append(l.Parts, p)
		switch {
		case pt.Container:
			continue
		case pt.Problem != "":
			p.Full = pt.Problem
			l.Warnings = append(l.Warnings, fmt.Sprintf("%s %s: imaged in full", l.label(p), pt.Problem))
			continue
		}
		fs, err := Probe(io.NewSectionReader(r, pt.Start, pt.Size), pt.Size, l.lateWarn(len(l.Parts)-1))
		if err != nil {
			return nil, fmt.Errorf("read filesystem of partition %d: %w", pt.Number, err)
		}
		if fs == nil {
			p.Full = "no filesystem that sauve can map"
			l.Warnings = append(l.Warnings, fmt.Sprintf("%s: no filesystem that sauve can map: imaged in full", l.label(p)))
			continue
		}
		p.FS = fs
		l.addFS(p, fs, opts)
	}
	l.build()
	return l, nil
}

func warningsOf(t *ptable.Table) []string {
	if t == nil {
		return nil
	}
	return t.Warnings
}

func article(s string) string {
	if s != "" && strings.ContainsRune("aeiouAEIOU", rune(s[0])) {
		return "an " + s
	}
	return "a " + s
}

// addFS decides whether a partition's free space is skipped.
func (l *Layout) addFS(p *Part, fs *Filesystem, opts LayoutOptions) {
	for _, b := range opts.Busy {
		if b.Start < p.Start+p.Size && p.Start < b.End {
			p.Full = b.What + ": its free space changes while it is read"
		}
	}
	if p.Full == "" {
		p.Full = fs.Full
	}
	if p.Full != "" {
		l.Warnings = append(l.Warnings, fmt.Sprintf("%s: %s: imaged in full", l.label(p), p.Full))
		if fs.Full != "" {
			return
		}
	}
	p.UsedKnown = true
	if opts.NoSkip && p.Full == "" {
		p.Full = "free-space skipping is off (--no-fs-skip)"
	}
}

// label names a partition in messages.
func (l *Layout) label(p *Part) string {
	var s string
	if p.Number == 0 {
		s = "the disk"
	} else {
		s = fmt.Sprintf("partition %d", p.Number)
	}
	var what []string
	if p.FS != nil {
		what = append(what, p.FS.Type)
	} else if p.TypeName != "" {
		what = append(what, p.TypeName)
	}
	what = append(what, bytesIEC(p.Size))
	return s + " (" + strings.Join(what, ", ") + ")"
}

// Label names a partition for messages: "partition 2 (ext4, 20 GiB)".
func (l *Layout) Label(p *Part) string { return l.label(p) }

// maxNotes bounds the problems listed per partition: a badly damaged
// filesystem could report one per block group.
const maxNotes = 8

func (l *Layout) lateWarn(i int) func(string) {
	n := 0
	seen := map[string]bool{}
	return func(msg string) {
		// A piece of a map read again (a window asked twice) reports its
		// damage again: note it once.
		if seen[msg] || n > maxNotes {
			return
		}
		seen[msg] = true
		n++
		if n == maxNotes+1 {
			msg = "more problems of this kind: further ones are not listed (those parts are imaged in full too)"
		}
		if i < len(l.Parts) {
			p := l.Parts[i]
			p.Notes = append(p.Notes, msg)
			msg = l.label(p) + ": " + msg
		}
		l.Late = append(l.Late, msg)
	}
}

// build cuts the disk into segments, each with one owner. Partitions
// that overlap (already marked with a Problem) keep only the part no
// earlier partition claimed.
func (l *Layout) build() {
	idx := make([]int, 0, len(l.Parts))
	for i, p := range l.Parts {
		if !p.Container && p.Size > 0 {
			idx = append(idx, i)
		}
	}
	sort.SliceStable(idx, func(a, b int) bool { return l.Parts[idx[a]].Start < l.Parts[idx[b]].Start })
	pos := int64(0)
	add := func(s segment) {
		if s.end > s.start {
			l.segs = append(l.segs, s)
		}
	}
	for _, i := range idx {
		p := l.Parts[i]
		start, end := max(p.Start, pos), min(p.Start+p.Size, l.size)
		if start >= end {
			continue
		}
		add(segment{start: pos, end: start, owner: -1})
		if fs := p.FS; fs != nil && fs.m != nil && p.UsedKnown && start == p.Start {
			fsEnd := min(start+fs.Size, end)
			add(segment{start: start, end: fsEnd, owner: i, m: fs.m, skip: p.Full == ""})
			add(segment{start: fsEnd, end: end, owner: i})
		} else {
			add(segment{start: start, end: end, owner: i})
		}
		pos = end
	}
	add(segment{start: pos, end: l.size, owner: -1})
}

// Share is what one owner of a window holds of it: a partition (Part is
// its index in Layout.Parts) or, with Part -1, the disk outside every
// partition (boot code, gaps, partition tables, the tail of the disk).
type Share struct {
	Part int
	// Read is the bytes of the owner's part of the window that hold data.
	Read int64
	// Used is the bytes the filesystem marks used, counted where its map
	// is read (Part.UsedKnown); Skipped those it marks free and the map
	// leaves out.
	Used, Skipped int64
}

// Data implements Map.
func (l *Layout) Data(off, n int64) ([]extent.Range, error) {
	data, _, err := l.window(off, n, nil, false)
	return data, err
}

// Window returns the ranges within [off, off+n) that hold data, as Data
// does, and what each owner of a part of the window holds of it, in the
// order of the disk. It changes nothing the layout reports.
func (l *Layout) Window(off, n int64) ([]extent.Range, []Share, error) {
	return l.window(off, n, nil, true)
}

// window is Window, appending the shares to shares when withShares.
func (l *Layout) window(off, n int64, shares []Share, withShares bool) ([]extent.Range, []Share, error) {
	end := min(off+n, l.size)
	if off < 0 || off >= end {
		return nil, shares, nil
	}
	var under []extent.Range
	if l.under != nil {
		var err error
		if under, err = l.under.Data(off, end-off); err != nil {
			return nil, shares, err
		}
	}
	var out []extent.Range
	// The first segment that ends after off: a search, not a cursor, so
	// that the answer cannot depend on the windows asked before.
	first := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].end > off })
	for i := first; i < len(l.segs) && l.segs[i].start < end; i++ {
		s := &l.segs[i]
		a, z := max(off, s.start), min(end, s.end)
		rs := []extent.Range{{Start: a, End: z}}
		sh := Share{Part: s.owner}
		if s.m != nil {
			p := l.Parts[s.owner]
			used, err := s.m.Data(a-p.Start, z-a)
			if err != nil {
				return nil, shares, fmt.Errorf("%s: %w", l.label(p), err)
			}
			for k := range used {
				used[k].Start += p.Start
				used[k].End += p.Start
				sh.Used += used[k].Len()
			}
			if s.skip {
				rs = used
				sh.Skipped = (z - a) - sh.Used
			}
		}
		if l.under != nil {
			rs = intersect(rs, under)
		}
		for _, r := range rs {
			sh.Read += r.Len()
			if k := len(out); k > 0 && out[k-1].End == r.Start {
				out[k-1].End = r.End
			} else {
				out = append(out, r)
			}
		}
		if withShares {
			shares = addShare(shares, sh)
		}
	}
	return out, shares, nil
}

// addShare appends sh to shares, adding it to the last one when both
// have one owner (a filesystem and the rest of its partition).
func addShare(shares []Share, sh Share) []Share {
	if k := len(shares); k > 0 && shares[k-1].Part == sh.Part {
		shares[k-1].Read += sh.Read
		shares[k-1].Used += sh.Used
		shares[k-1].Skipped += sh.Skipped
		return shares
	}
	return append(shares, sh)
}

// intersect returns the ranges in both a and b (each sorted, disjoint).
func intersect(a, b []extent.Range) []extent.Range {
	var out []extent.Range
	for i, j := 0, 0; i < len(a) && j < len(b); {
		s, e := max(a[i].Start, b[j].Start), min(a[i].End, b[j].End)
		if s < e {
			out = append(out, extent.Range{Start: s, End: e})
		}
		if a[i].End < b[j].End {
			i++
		} else {
			j++
		}
	}
	return out
}

func bytesIEC(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
