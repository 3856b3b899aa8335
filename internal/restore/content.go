package restore

import (
	"fmt"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/blockmap"
	"github.com/sauve-backup/sauve/internal/repo"
)

// Content is what a disk holds as far as sauve recognises it: a partition
// table and the filesystems in it (or one filesystem filling the disk),
// with their identifiers. A restore compares the target's content with
// the snapshot's disk before it writes: overwriting another disk's
// partitions and filesystems is not something to do by mistake.
type Content struct {
	Table  string // "mbr", "gpt", or "" (none)
	DiskID string // MBR disk signature or GPT disk GUID
	Parts  []ContentPart
}

// ContentPart is a partition (Number 0: a filesystem filling the disk).
type ContentPart struct {
	Number      int
	Start, Size int64
	Filesystem  string // "" when none is recognised
	Label, UUID string
}

// ReadContent identifies what the disk r of size bytes holds, with the
// readers a backup maps disks with (so that identifiers compare with the
// ones a snapshot records). sectorSize is a device's logical sector size,
// 0 for an image file.
func ReadContent(r io.ReaderAt, size int64, sectorSize int) (*Content, error) {
	l, err := blockmap.NewLayout(r, size, blockmap.LayoutOptions{SectorSize: sectorSize, NoSkip: true})
	if err != nil {
		return nil, err
	}
	c := &Content{}
	if l.Table != nil {
		c.Table, c.DiskID = l.Table.Kind, l.Table.ID
	}
	for _, p := range l.Parts {
		if p.Container {
			continue
		}
		cp := ContentPart{Number: p.Number, Start: p.Start, Size: p.Size}
		if p.FS != nil {
			cp.Filesystem, cp.Label, cp.UUID = p.FS.Type, p.FS.Label, p.FS.UUID
		}
		c.Parts = append(c.Parts, cp)
	}
	return c, nil
}

// DiskContent is what a snapshot's disk held when it was backed up, as
// its manifest records it.
func DiskContent(d *repo.Disk) *Content {
	c := &Content{Table: d.PartitionTable, DiskID: d.DiskID}
	for _, p := range d.Partitions {
		if p.Extended {
			continue
		}
		c.Parts = append(c.Parts, ContentPart{Number: p.Number, Start: p.Start, Size: p.Size,
			Filesystem: p.Filesystem, Label: p.Label, UUID: p.FSUUID})
	}
	return c
}

// Empty reports whether nothing was recognised: no partition table and
// no filesystem (zeros, random bytes, an unknown format).
func (c *Content) Empty() bool { return c.Table == "" && len(c.filesystems()) == 0 }

// SameDisk reports whether c, a restore target's content, is the disk
// that snap describes, so that restoring over it rolls that disk back
// rather than destroying another one. A partition table is identified by
// its disk ID; without one (or with a blank ID), the filesystems by their
// UUIDs, each of which must be one the snapshot records; without either,
// the partitions' places and filesystem types must match. Empty content
// is nobody's disk: it matches.
func (c *Content) SameDisk(snap *Content) bool {
	if c.Empty() {
		return true
	}
	if id := c.diskID(); id != "" {
		return c.Table == snap.Table && strings.EqualFold(id, snap.diskID())
	}
	known := map[string]bool{}
	for _, p := range snap.Parts {
		if p.UUID != "" {
			known[strings.ToLower(p.UUID)] = true
		}
	}
	seen := false
	for _, p := range c.Parts {
		if p.UUID == "" {
			continue
		}
		if !known[strings.ToLower(p.UUID)] {
			return false
		}
		seen = true
	}
	if seen {
		return true
	}
	return c.sameGeometry(snap)
}

// diskID returns the table's ID, "" when there is none or it is blank
// (an MBR written without a signature).
func (c *Content) diskID() string {
	if c.Table == "" || strings.Trim(c.DiskID, "0-") == "" {
		return ""
	}
	return c.DiskID
}

func (c *Content) sameGeometry(snap *Content) bool {
	if c.Table != snap.Table || len(c.Parts) != len(snap.Parts) {
		return false
	}
	for i, p := range c.Parts {
		q := snap.Parts[i]
		if p.Number != q.Number || p.Start != q.Start || p.Size != q.Size || p.Filesystem != q.Filesystem {
			return false
		}
	}
	return true
}

func (c *Content) filesystems() []ContentPart {
	var out []ContentPart
	for _, p := range c.Parts {
		if p.Filesystem != "" {
			out = append(out, p)
		}
	}
	return out
}

// maxListed bounds the filesystems a description names.
const maxListed = 4

// String describes the content for messages: "a GPT disk 1234-... with
// ext4 'data' (uuid ...), swap (uuid ...)", "an ext4 filesystem 'data'
// (uuid ...)", "nothing sauve recognises".
func (c *Content) String() string {
	fss := c.filesystems()
	if c.Table == "" {
		switch len(fss) {
		case 0:
			return "nothing sauve recognises"
		case 1:
			return article(describeFS(fss[0], true))
		}
		return "filesystems " + listFS(fss)
	}
	s := article(strings.ToUpper(c.Table)) + " disk"
	if id := c.diskID(); id != "" {
		s += " " + id
	}
	switch {
	case len(fss) > 0:
		s += " with " + listFS(fss)
	case len(c.Parts) == 1:
		s += " with 1 partition and no filesystem sauve recognises"
	case len(c.Parts) > 1:
		s += fmt.Sprintf(" with %d partitions and no filesystem sauve recognises", len(c.Parts))
	default:
		s += " with no partitions"
	}
	return s
}

func listFS(fss []ContentPart) string {
	var names []string
	for i, p := range fss {
		if i == maxListed {
			names = append(names, fmt.Sprintf("%d more", len(fss)-maxListed))
			break
		}
		names = append(names, describeFS(p, false))
	}
	return strings.Join(names, ", ")
}

// describeFS names a filesystem: "ext4 'data' (uuid ...)", or "ext4
// filesystem 'data' (uuid ...)" alone.
func describeFS(p ContentPart, alone bool) string {
	s := p.Filesystem
	if alone {
		s += " filesystem"
	}
	if p.Label != "" {
		s += " '" + p.Label + "'"
	}
	if p.UUID != "" {
		s += " (uuid " + p.UUID + ")"
	}
	return s
}

func article(s string) string {
	if s != "" && strings.ContainsRune("aeiouAEIOU", rune(s[0])) || strings.HasPrefix(s, "MBR") || strings.HasPrefix(s, "xfs") || strings.HasPrefix(s, "ntfs") {
		return "an " + s
	}
	return "a " + s
}
