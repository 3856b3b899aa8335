package blockmap

import "github.com/sauve-backup/sauve/internal/extent"

// Stats is what a backup did with one partition.
type Stats struct {
	Used    int64 // bytes the filesystem uses (when Part.UsedKnown)
	Read    int64 // bytes of the partition mapped for reading
	Skipped int64 // bytes not read because the filesystem marks them free
}

// Tally is the Map of a Layout that counts what the windows asked of it
// hold, per partition and outside them, as a backup or a conversion
// reports it. Windows are counted from the end of the highest one counted
// so far, so that each byte is counted once when windows come in
// increasing order (as Map's contract has them), even if one is asked
// again. The Layout itself stays a pure query; the counts live here. A
// Tally is not safe for concurrent use.
type Tally struct {
	l       *Layout
	parts   []Stats // one per Layout.Parts
	outside int64
	counted int64 // bytes below it are counted
	shares  []Share
}

// NewTally returns a Tally of l with nothing counted.
func NewTally(l *Layout) *Tally {
	return &Tally{l: l, parts: make([]Stats, len(l.Parts))}
}

// Layout returns the layout counted.
func (t *Tally) Layout() *Layout { return t.l }

// Data implements Map: the layout's data, counted.
func (t *Tally) Data(off, n int64) ([]extent.Range, error) {
	from := max(off, t.counted)
	if from >= off+n {
		return t.l.Data(off, n)
	}
	data, shares, err := t.l.window(from, off+n-from, t.shares[:0], true)
	if err != nil {
		return nil, err
	}
	t.shares = shares
	for _, sh := range shares {
		if sh.Part < 0 {
			t.outside += sh.Read
			continue
		}
		s := &t.parts[sh.Part]
		s.Used += sh.Used
		s.Read += sh.Read
		s.Skipped += sh.Skipped
	}
	t.counted = off + n
	if from == off {
		return data, nil
	}
	// Part of the window was counted already: answer for all of it.
	return t.l.Data(off, n)
}

// Part returns what was counted of Layout().Parts[i].
func (t *Tally) Part(i int) Stats { return t.parts[i] }

// Outside returns the bytes read outside every partition: boot code,
// gaps, partition tables, the tail of the disk.
func (t *Tally) Outside() int64 { return t.outside }

// Skipped returns the bytes of all partitions skipped as free.
func (t *Tally) Skipped() int64 {
	var n int64
	for _, s := range t.parts {
		n += s.Skipped
	}
	return n
}
