package cli

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/sauve-backup/sauve/internal/repo"
)

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
