package cli

import (
	"fmt"
	"sort"
	"strings"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
)

// restoreJob is what one restore writes: a whole disk, one partition of
// it shifted to the target's start, or only its boot areas in place.
type restoreJob struct {
	disk *repo.Disk
	// target is the disk the target is checked and sized against: the
	// disk itself, or a partition seen as a disk of its own.
	target *repo.Disk
	what   string
	// only and shift are restore.Options' Only and Shift.
	only      []extent.Range
	shift     int64
	partition *repo.Partition
	grow      growFlags // a whole disk's only
}

func wholeDisk(d *repo.Disk) restoreJob {
	return restoreJob{disk: d, target: d, what: d.Name}
}

// size is the bytes the job restores.
func (j restoreJob) size() int64 {
	if j.only == nil {
		return j.disk.Size
	}
	var n int64
	for _, r := range j.only {
		n += r.Len()
	}
	return n
}

// partialJob is the job of SNAPSHOT:PART or --boot-only.
func partialJob(sn *repo.Snapshot, d *repo.Disk, spec fileSpec, bootOnly bool) (restoreJob, error) {
	if bootOnly {
		areas, err := bootAreas(d)
		if err != nil {
			return restoreJob{}, fmt.Errorf("restore --boot-only of snapshot %s: %w", sn.ID.Short(), err)
		}
		return restoreJob{disk: d, target: d, what: "boot areas of " + d.Name, only: areas}, nil
	}
	if d.PartitionTable == "" {
		return restoreJob{}, usageError{fmt.Errorf("disk %s of snapshot %s has no partition table: restore it whole (SNAPSHOT without :PART)", d.Name, sn.ID.Short())}
	}
	p, err := pickPartition(sn, d, spec)
	if err != nil {
		return restoreJob{}, err
	}
	if p.Size <= 0 || p.Start < 0 || p.Start > d.Size-p.Size {
		return restoreJob{}, fmt.Errorf("partition %d of disk %s of snapshot %s lies outside the disk (%d+%d of %d bytes)", p.Number, d.Name, sn.ID.Short(), p.Start, p.Size, d.Size)
	}
	// The target is checked as a disk holding the partition's
	// filesystem alone, with no table.
	target := &repo.Disk{Name: fmt.Sprintf("%s:%d", d.Name, p.Number), Size: p.Size, ChunkSize: d.ChunkSize,
		Partitions: []repo.Partition{{Start: 0, Size: p.Size, Filesystem: p.Filesystem, Label: p.Label, FSUUID: p.FSUUID}}}
	what := fmt.Sprintf("partition %d of %s", p.Number, d.Name)
	if desc := strings.TrimSpace(p.Filesystem + " " + quoteIf(p.Label)); desc != "" {
		what += ", " + desc
	}
	return restoreJob{disk: d, target: target, what: what, only: []extent.Range{{Start: p.Start, End: p.Start + p.Size}},
		shift: p.Start, partition: &p}, nil
}

func quoteIf(s string) string {
	if s == "" {
		return ""
	}
	return fmt.Sprintf("%q", s)
}

// biosBoot is the GPT type of a BIOS boot partition, where GRUB puts its
// core image on a GPT disk booted by a BIOS.
const biosBoot = "21686148-6449-6E6F-744E-656564454649"

// bootAreas returns the ranges of d outside its partitions (the MBR or
// GPT and its backup, gaps, EBRs) and its BIOS boot partitions.
func bootAreas(d *repo.Disk) ([]extent.Range, error) {
	if d.PartitionTable == "" {
		return nil, fmt.Errorf("disk %s has no partition table: it has no boot areas apart from its content", d.Name)
	}
	var parts []extent.Range
	for _, p := range d.Partitions {
		if p.Extended || p.Size <= 0 || strings.EqualFold(p.Type, biosBoot) {
			continue
		}
		parts = append(parts, extent.Range{Start: max(0, p.Start), End: min(d.Size, p.Start+p.Size)})
	}
	sort.Slice(parts, func(i, j int) bool { return parts[i].Start < parts[j].Start })
	var out []extent.Range
	pos := int64(0)
	for _, p := range parts {
		if p.Start > pos {
			out = append(out, extent.Range{Start: pos, End: p.Start})
		}
		pos = max(pos, p.End)
	}
	if pos < d.Size {
		out = append(out, extent.Range{Start: pos, End: d.Size})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("disk %s: its partitions cover all of it, leaving no boot areas", d.Name)
	}
	return out, nil
}
