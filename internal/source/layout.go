package source

import (
	"fmt"
	"strings"

	"github.com/sauve-backup/sauve/internal/blockmap"
	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

// MapOptions say how a disk is mapped.
type MapOptions struct {
	// NoSkip finds partitions and filesystems and counts their used
	// bytes, but maps everything as data.
	NoSkip bool
	// Warn, when set, is given each warning: what is imaged in full and
	// why, from Map, and the problems found while the map was read, from
	// WarnLate.
	Warn func(string)
	// Frozen says that every filesystem mounted read-write from the
	// disk is frozen (FIFREEZE) while the map is read and used: their
	// metadata is on disk and their free space stands still, so they
	// are mapped as if unmounted, free space skipped.
	Frozen bool
}

// Layout is what holds data on a disk: its partition table and
// filesystems (free space left out), within what the container holds
// (holes of a sparse file, regions an image allocates). It counts what is
// read through Map, for Describe and Skipped; a stream has no layout, and
// everything in it is read.
type Layout struct {
	tally *blockmap.Tally // nil for a stream
	warn  func(string)
	inUse []string
}

// Map reads the partition table and filesystems of the disk. Where the
// view is Live and the disk is the source's own bytes, the ranges of it
// that are mounted read-write are imaged in full, unless o.Frozen: their
// free space changes while it is read. It fails only on I/O errors.
func (d *Disk) Map(o MapOptions) (*Layout, error) {
	warn := o.Warn
	if warn == nil {
		warn = func(string) {}
	}
	if d.At == nil {
		return &Layout{warn: warn}, nil
	}
	opts := blockmap.LayoutOptions{NoSkip: o.NoSkip, Under: d.Alloc}
	if d.Format == vdisk.Raw {
		opts.SectorSize = d.View.SectorSize
		if d.View.Live && !o.Frozen {
			opts.Busy = busy(d.View.Of.Path, d.View.Size)
		}
	}
	var inUse []string
	for _, b := range opts.Busy {
		inUse = append(inUse, b.What)
	}
	l, err := blockmap.NewLayout(d.At, d.Size, opts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", d.View.Of.Path, err)
	}
	for _, w := range l.Warnings {
		warn(w)
	}
	return &Layout{tally: blockmap.NewTally(l), warn: warn, inUse: inUse}, nil
}

// busy returns the ranges of the file or device at path (size bytes)
// that a filesystem mounted read-write uses.
func busy(path string, size int64) []blockmap.Busy {
	var out []blockmap.Busy
	for _, m := range disk.Mounts(path, size) {
		if m.ReadWrite {
			out = append(out, blockmap.Busy{Start: m.Start, End: m.End,
				What: fmt.Sprintf("%s is mounted read-write at %s", m.Device, m.Point)})
		}
	}
	return out
}

// InUse says why the disk is read as it is while others write to it
// (a filesystem on it mounted read-write, and where): the snapshot is not
// of one instant. Empty for a point-in-time copy, or a source not in use.
func (l *Layout) InUse() string { return strings.Join(l.inUse, "; ") }

// Map returns the map to read the disk with; nil for a stream (all of
// it, in order).
func (l *Layout) Map() extent.Map {
	if l.tally == nil {
		return nil
	}
	return l.tally
}

// Skipped returns the bytes read through Map so far that the filesystems
// mark free and were not read.
func (l *Layout) Skipped() int64 {
	if l.tally == nil {
		return 0
	}
	return l.tally.Skipped()
}

// WarnLate gives the Warn callback the problems found while the map was
// read (a bitmap that fails its checksum): those parts were imaged in
// full. Call it once the disk has been read.
func (l *Layout) WarnLate() {
	if l.tally == nil {
		return
	}
	for _, w := range l.tally.Layout().Late {
		l.warn(w)
	}
}

// Describe records in a snapshot's disk entry its partition table and
// partitions, with what was read of each through Map. It is the
// backup.Source Describe callback.
func (l *Layout) Describe(d *repo.Disk) {
	if l.tally == nil {
		return
	}
	bl := l.tally.Layout()
	if bl.Table != nil {
		d.PartitionTable, d.DiskID, d.SectorSize = bl.Table.Kind, bl.Table.ID, bl.Table.SectorSize
	}
	d.BytesOutside = l.tally.Outside()
	d.InUse = l.InUse()
	for i, p := range bl.Parts {
		d.Partitions = append(d.Partitions, partition(p, l.tally.Part(i)))
	}
}

// partition describes p, of which st was read.
func partition(p *blockmap.Part, st blockmap.Stats) repo.Partition {
	rp := repo.Partition{
		Number: p.Number, Start: p.Start, Size: p.Size, Type: p.Type, TypeName: p.TypeName,
		Name: p.Name, UUID: p.UUID, Bootable: p.Bootable, Extended: p.Container,
		BytesRead: st.Read, BytesSkipped: st.Skipped, ImagedInFull: p.Full,
	}
	if p.Container {
		rp.ImagedInFull = ""
	}
	if fs := p.FS; fs != nil {
		rp.Filesystem, rp.Label, rp.FSUUID, rp.BlockSize = fs.Type, fs.Label, fs.UUID, fs.BlockSize
	}
	if p.UsedKnown {
		u := st.Used
		rp.UsedBytes = &u
	}
	if len(p.Notes) > 0 && rp.ImagedInFull == "" {
		rp.ImagedInFull = "in part: " + strings.Join(p.Notes, "; ")
	}
	return rp
}
