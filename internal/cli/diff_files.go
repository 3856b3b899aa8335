package cli

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/sauve-backup/sauve/internal/fsread"
	"github.com/sauve-backup/sauve/internal/repo"
)

// diffPartition is what differs between the files of one partition.
type diffPartition struct {
	Number     int    `json:"number"`
	Filesystem string `json:"filesystem,omitempty"`
	Label      string `json:"label,omitempty"`
	// Skipped says why the files were not compared.
	Skipped string       `json:"skipped,omitempty"`
	Changes []fileChange `json:"changes"`
}

// fileChange is a path and how it changed: added, removed, modified,
// type or metadata.
type fileChange struct {
	Path   string `json:"path"`
	Change string `json:"change"`
}

var changeMarks = map[string]string{"added": "+", "removed": "-", "modified": "M", "type": "T", "metadata": "U"}

// diffFiles compares the files of the partitions both sides hold (or of
// the one spec names).
func (g *globals) diffFiles(a, b *diffSide, spec fileSpec, content bool) ([]diffPartition, error) {
	var parts []repo.Partition
	if spec.hasPart {
		p, err := pickPartition(a.sn, a.disk, spec)
		if err != nil {
			return nil, err
		}
		parts = []repo.Partition{p}
	} else {
		parts = filePartitions(a.disk)
	}
	if a.at == nil || b.at == nil {
		if spec.hasPart {
			return nil, errors.New("comparing files needs a key that reads chunk data: this one is write-only")
		}
		return []diffPartition{{Skipped: "files not compared: the key is write-only"}}, nil
	}
	var out []diffPartition
	for _, pa := range parts {
		dp := diffPartition{Number: pa.Number, Filesystem: pa.Filesystem, Label: pa.Label, Changes: []fileChange{}}
		pb, ok := samePartition(b.disk, pa)
		if !ok {
			dp.Skipped = fmt.Sprintf("%s has no partition %d at the same place", b.name, pa.Number)
			out = append(out, dp)
			continue
		}
		err := g.diffPartitionFiles(a, b, pa, pb, content, &dp)
		if err != nil && spec.hasPart {
			return nil, err
		}
		if err != nil {
			dp.Skipped = err.Error()
		}
		out = append(out, dp)
	}
	return out, nil
}

// filePartitions lists the partitions of d that hold a filesystem, or
// the whole disk when it has no partition table.
func filePartitions(d *repo.Disk) []repo.Partition {
	if d.PartitionTable == "" {
		if len(d.Partitions) == 1 {
			return d.Partitions
		}
		return []repo.Partition{{Start: 0, Size: d.Size}}
	}
	var out []repo.Partition
	for _, p := range d.Partitions {
		if !p.Extended && p.Filesystem != "" && p.Filesystem != "swap" {
			out = append(out, p)
		}
	}
	return out
}

// samePartition finds in d the partition of p's number, at p's place.
func samePartition(d *repo.Disk, p repo.Partition) (repo.Partition, bool) {
	if p.Number == 0 {
		q := filePartitions(d)
		return q[0], len(q) == 1 && q[0].Start == p.Start
	}
	for _, q := range d.Partitions {
		if q.Number == p.Number && q.Start == p.Start && !q.Extended {
			return q, true
		}
	}
	return repo.Partition{}, false
}

func (g *globals) diffPartitionFiles(a, b *diffSide, pa, pb repo.Partition, content bool, dp *diffPartition) error {
	where := func(s *diffSide, p repo.Partition) string {
		if p.Number == 0 {
			return s.name
		}
		return fmt.Sprintf("partition %d of %s", p.Number, s.name)
	}
	open := func(s *diffSide, p repo.Partition) (fileSystem, error) {
		w := where(s, p)
		fs, err := openFS(io.NewSectionReader(s.at, p.Start, p.Size), p, false, func(m string) { g.warnf("%s: %s", w, m) })
		if err != nil {
			return nil, fmt.Errorf("%s: %w", w, err)
		}
		return fs, nil
	}
	fa, err := open(a, pa)
	if err != nil {
		return err
	}
	fb, err := open(b, pb)
	if err != nil {
		return err
	}
	c := &treeCompare{a: fa, b: fb, content: content, add: func(p, change string) {
		dp.Changes = append(dp.Changes, fileChange{Path: p, Change: change})
	}}
	return c.dir("/", 0)
}

// treeCompare walks two filesystems side by side.
type treeCompare struct {
	a, b    fileSystem
	content bool
	add     func(path, change string)
}

func (c *treeCompare) dir(p string, depth int) error {
	if depth > 256 {
		return fmt.Errorf("%s: directory loop (damaged filesystem)", p)
	}
	ea, err := c.a.ReadDir(p)
	if err != nil {
		return err
	}
	eb, err := c.b.ReadDir(p)
	if err != nil {
		return err
	}
	byName := make(map[string]fsread.Stat, len(eb))
	for _, e := range eb {
		byName[e.Name] = e.Stat
	}
	names := make([]string, 0, len(ea)+len(eb))
	inA := make(map[string]fsread.Stat, len(ea))
	for _, e := range ea {
		inA[e.Name] = e.Stat
		names = append(names, e.Name)
	}
	for _, e := range eb {
		if _, ok := inA[e.Name]; !ok {
			names = append(names, e.Name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		x, okA := inA[name]
		y, okB := byName[name]
		if err := c.entry(path.Join(p, name), x, y, okA, okB, depth); err != nil {
			return err
		}
	}
	return nil
}

func (c *treeCompare) entry(p string, x, y fsread.Stat, okA, okB bool, depth int) error {
	switch {
	case !okB:
		c.add(p, "removed")
		return nil
	case !okA:
		c.add(p, "added")
		return nil
	case x.Type() != y.Type():
		c.add(p, "type")
		return nil
	}
	changed, err := c.changed(p, x, y)
	if err != nil {
		return err
	}
	switch {
	case changed:
		c.add(p, "modified")
	case x.Mode != y.Mode || x.UID != y.UID || x.GID != y.GID || !x.Ctime.Equal(y.Ctime) && !x.IsDir():
		// A change time that moved alone: attributes, links, or bytes
		// rewritten with their time put back (--content tells).
		c.add(p, "metadata")
	}
	if x.IsDir() {
		return c.dir(p, depth+1)
	}
	return nil
}

// changed says whether a file's content differs: size and modification
// time for regular files, as rsync's quick check (and the bytes with
// --content), targets for symlinks, numbers for devices. Directories are
// compared by their entries.
func (c *treeCompare) changed(p string, x, y fsread.Stat) (bool, error) {
	switch x.Type() {
	case fsread.TypeDir:
		return false, nil
	case fsread.TypeSymlink:
		ta, err := c.a.Readlink(p)
		if err != nil {
			return false, err
		}
		tb, err := c.b.Readlink(p)
		return ta != tb, err
	case fsread.TypeRegular:
		if x.Size != y.Size || !x.Mtime.Equal(y.Mtime) {
			return true, nil
		}
		if c.content {
			return c.contentDiffers(p)
		}
		return false, nil
	}
	return x.Major != y.Major || x.Minor != y.Minor, nil
}

func (c *treeCompare) contentDiffers(p string) (bool, error) {
	fa, err := c.a.Open(p)
	if err != nil {
		return false, err
	}
	fb, err := c.b.Open(p)
	if err != nil {
		return false, err
	}
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < fa.Size(); off += int64(len(ba)) {
		n := min(int64(len(ba)), fa.Size()-off)
		if _, err := fa.ReadAt(ba[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return false, fmt.Errorf("read %s: %w", p, err)
		}
		if _, err := fb.ReadAt(bb[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return false, fmt.Errorf("read %s: %w", p, err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			return true, nil
		}
	}
	return false, nil
}

func (g *globals) printPartitionDiff(p diffPartition) {
	name := "files"
	if p.Number != 0 {
		name = "partition " + strconv.Itoa(p.Number)
	}
	if desc := strings.TrimSpace(p.Filesystem + " " + quoteIf(p.Label)); desc != "" {
		name += " (" + desc + ")"
	}
	if p.Skipped != "" {
		g.printf("%s: %s\n", name, p.Skipped)
		return
	}
	count := map[string]int{}
	for _, ch := range p.Changes {
		count[ch.Change]++
	}
	if len(p.Changes) == 0 {
		g.printf("%s: no file differs\n", name)
		return
	}
	g.printf("%s: %d added, %d removed, %d modified, %d changed type, %d metadata only\n", name,
		count["added"], count["removed"], count["modified"], count["type"], count["metadata"])
	for _, ch := range p.Changes {
		g.printf("  %s %s\n", changeMarks[ch.Change], ch.Path)
	}
}
