package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/sauve-backup/sauve/internal/blockmap"
	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// sourceMap is the block map of a backup source: its partition table and
// filesystems (free space not read), intersected with the holes of a
// sparse image file.
type sourceMap struct {
	m      extent.Map
	layout *blockmap.Layout
	tally  *blockmap.Tally
}

// mapSource reads the layout of a file or device source and prints what
// will be imaged in full and why. Streams get no map.
func (g *globals) mapSource(src *disk.Source, noSkip bool) (*sourceMap, error) {
	sm := &sourceMap{}
	if src.Kind == disk.Stream {
		return sm, nil
	}
	var under extent.Map
	if src.Kind == disk.File {
		if s := extent.NewSparse(src.File(), src.Size); s != nil {
			under = s
		}
	}
	opts := blockmap.LayoutOptions{SectorSize: src.SectorSize(), NoSkip: noSkip, Under: under}
	for _, m := range disk.Mounts(src.Path, src.Size) {
		if m.ReadWrite {
			opts.Busy = append(opts.Busy, blockmap.Busy{Start: m.Start, End: m.End,
				What: fmt.Sprintf("%s is mounted read-write at %s", m.Device, m.Point)})
		}
	}
	l, err := blockmap.NewLayout(src, src.Size, opts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src.Path, err)
	}
	for _, w := range l.Warnings {
		g.warnf("%s", w)
	}
	sm.tally = blockmap.NewTally(l)
	sm.m, sm.layout = sm.tally, l
	return sm, nil
}

// Map returns the map to back up with (nil: everything).
func (sm *sourceMap) Map() extent.Map {
	if sm.m == nil {
		return nil
	}
	return sm.m
}

// describe records the partitions in the disk's manifest entry.
func (sm *sourceMap) describe(d *repo.Disk) {
	l := sm.layout
	if l == nil {
		return
	}
	if l.Table != nil {
		d.PartitionTable, d.DiskID, d.SectorSize = l.Table.Kind, l.Table.ID, l.Table.SectorSize
	}
	d.BytesOutside = sm.tally.Outside()
	for i, p := range l.Parts {
		st := sm.tally.Part(i)
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
		if len(p.Notes) > 0 {
			note := strings.Join(p.Notes, "; ")
			if rp.ImagedInFull == "" {
				rp.ImagedInFull = "in part: " + note
			}
		}
		d.Partitions = append(d.Partitions, rp)
	}
}

// warnLate prints the problems found while the map was read.
func (sm *sourceMap) warnLate(g *globals) {
	if sm.layout == nil {
		return
	}
	for _, w := range sm.layout.Late {
		g.warnf("%s", w)
	}
}

// partitionsOf returns a disk's partitions for JSON output (never null).
func partitionsOf(d *repo.Disk) []repo.Partition {
	if d.Partitions == nil {
		return []repo.Partition{}
	}
	return d.Partitions
}

// skippedOf totals the bytes skipped as free.
func skippedOf(d *repo.Disk) int64 {
	var n int64
	for _, p := range d.Partitions {
		n += p.BytesSkipped
	}
	return n
}

// printPartitions writes a disk's partitions as a table.
func printPartitions(w io.Writer, d *repo.Disk, withIO bool) {
	if len(d.Partitions) == 0 {
		return
	}
	table := "none"
	if d.PartitionTable != "" {
		table = d.PartitionTable
		if d.DiskID != "" {
			table += " (disk ID " + d.DiskID + ")"
		}
	}
	fmt.Fprintf(w, "  partition table: %s\n", table)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "  #\tStart\tSize\tType\tFilesystem\tLabel\tUsed"
	if withIO {
		head += "\tRead\tSkipped"
	}
	fmt.Fprintln(tw, head+"\tNote")
	for _, p := range d.Partitions {
		num := fmt.Sprint(p.Number)
		if p.Number == 0 {
			num = "-"
		}
		typ := p.TypeName
		if typ == "" {
			typ = p.Type
		}
		used := "?"
		if p.UsedBytes != nil {
			used = bytesIEC(*p.UsedBytes)
		}
		fs := p.Filesystem
		if p.Extended {
			fs, used = "(logical partitions)", ""
		} else if fs == "" {
			fs = "-"
		}
		line := fmt.Sprintf("  %s\t%s\t%s\t%s\t%s\t%s\t%s", num, bytesIEC(p.Start), bytesIEC(p.Size), typ, fs, p.Label, used)
		if withIO {
			line += fmt.Sprintf("\t%s\t%s", bytesIEC(p.BytesRead), bytesIEC(p.BytesSkipped))
		}
		note := ""
		if p.ImagedInFull != "" {
			note = "imaged in full: " + p.ImagedInFull
		}
		fmt.Fprintln(tw, line+"\t"+note)
	}
	tw.Flush()
}
