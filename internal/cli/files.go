package cli

import (
	"context"
	"fmt"
	"io"
	"path"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/fsread"
	"github.com/sauve-backup/sauve/internal/repo"
)

// fileSystem is what file-level restore needs of a filesystem reader;
// paths are absolute and slash-separated. A reader for another
// filesystem (XFS, NTFS, FAT) implements it and is added to fsReaders (fsopen.go).
type fileSystem interface {
	Lstat(p string) (fsread.Stat, error)
	ReadDir(p string) ([]fsread.DirEntry, error)
	Readlink(p string) (string, error)
	Open(p string) (fsread.File, error)
	Xattrs(p string) ([]fsread.Xattr, error)
}

// fileSpec is SNAPSHOT[:PART][/PATH] split.
type fileSpec struct {
	snap, part, path string
	hasPart          bool
}

func parseFileSpec(s string) fileSpec {
	colon, slash := strings.IndexByte(s, ':'), strings.IndexByte(s, '/')
	var fs fileSpec
	if colon >= 0 && (slash < 0 || colon < slash) {
		fs.snap, fs.hasPart = s[:colon], true
		rest := s[colon+1:]
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			fs.part, fs.path = rest[:i], rest[i:]
		} else {
			fs.part = rest
		}
	} else if slash >= 0 {
		fs.snap, fs.path = s[:slash], s[slash:]
	} else {
		fs.snap = s
	}
	fs.path = path.Clean("/" + fs.path)
	return fs
}

// fileFlags are the flags ls, get and find share.
type fileFlags struct {
	ff       filterFlags
	diskName string
	noReplay bool
}

func (f *fileFlags) add(cmd *cobra.Command) {
	f.ff.add(cmd)
	cmd.Flags().StringVar(&f.diskName, "disk", "", "the disk of a multi-disk snapshot")
	cmd.Flags().BoolVar(&f.noReplay, "no-replay", false, "do not replay the journal of a filesystem backed up while mounted: read its metadata as it is on disk (possibly stale)")
}

// fileView is one filesystem of a snapshot, open for reading files.
type fileView struct {
	sn     *repo.Snapshot
	disk   *repo.Disk
	dr     *repo.DiskReader
	fs     fileSystem
	prefix string // SNAPSHOT:PART, as find prints it
}

func (v *fileView) Close() error { return v.dr.Close() }

// filesCache is the cache of the reader: metadata blocks are read again
// and again, file data once.
const filesCache = 32 << 20

// openDiskFor opens the disk of spec's snapshot that file commands read.
func (g *globals) openDiskFor(ctx context.Context, what string, spec fileSpec, f *fileFlags) (*repo.Snapshot, *repo.Disk, *repo.DiskReader, error) {
	r, sn, err := g.openSnapshotData(ctx, what, spec.snap, &f.ff)
	if err != nil {
		return nil, nil, nil, err
	}
	d, err := pickDisk(sn, f.diskName)
	if err != nil {
		return nil, nil, nil, err
	}
	// No read-ahead: only the chunks the files use are fetched.
	dr, err := r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: filesCache, ReadAhead: -1, Warn: g.warnf})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s of snapshot %s: %w", what, sn.ID.Short(), err)
	}
	return sn, d, dr, nil
}

// openFiles opens the filesystem spec names.
func (g *globals) openFiles(ctx context.Context, what string, spec fileSpec, f *fileFlags) (*fileView, error) {
	sn, d, dr, err := g.openDiskFor(ctx, what, spec, f)
	if err != nil {
		return nil, err
	}
	v, err := g.openView(sn, d, dr, spec, f)
	if err != nil {
		dr.Close()
		return nil, err
	}
	return v, nil
}

func (g *globals) openView(sn *repo.Snapshot, d *repo.Disk, dr *repo.DiskReader, spec fileSpec, f *fileFlags) (*fileView, error) {
	p, err := pickPartition(sn, d, spec)
	if err != nil {
		return nil, err
	}
	where := fmt.Sprintf("disk %s of snapshot %s", d.Name, sn.ID.Short())
	if p.Number != 0 {
		where = fmt.Sprintf("partition %d of %s", p.Number, where)
	}
	fs, err := openFS(io.NewSectionReader(dr, p.Start, p.Size), p, f.noReplay, func(s string) { g.warnf("%s: %s", where, s) })
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	prefix := sn.ID.Short()
	if p.Number != 0 {
		prefix += ":" + strconv.Itoa(p.Number)
	}
	return &fileView{sn: sn, disk: d, dr: dr, fs: fs, prefix: prefix}, nil
}

// pickPartition finds PART: a number, a filesystem label or a GPT name;
// a disk without a partition table is one filesystem.
func pickPartition(sn *repo.Snapshot, d *repo.Disk, spec fileSpec) (repo.Partition, error) {
	if d.PartitionTable == "" {
		whole := repo.Partition{Start: 0, Size: d.Size}
		if len(d.Partitions) == 1 {
			whole = d.Partitions[0]
		}
		if spec.part != "" && spec.part != "0" && spec.part != whole.Label {
			return repo.Partition{}, usageError{fmt.Errorf("disk %s of snapshot %s has no partition table: leave PART out (SNAPSHOT/PATH)", d.Name, sn.ID.Short())}
		}
		return whole, nil
	}
	if spec.part == "" {
		return repo.Partition{}, usageError{fmt.Errorf("disk %s of snapshot %s is partitioned: name one as SNAPSHOT:PART/PATH ('sauve ls %s' lists them)", d.Name, sn.ID.Short(), sn.ID.Short())}
	}
	n, numErr := strconv.Atoi(spec.part)
	var found []repo.Partition
	for _, p := range d.Partitions {
		if p.Extended {
			continue
		}
		if (numErr == nil && p.Number == n) || (numErr != nil && (p.Label == spec.part || p.Name == spec.part)) {
			found = append(found, p)
		}
	}
	switch len(found) {
	case 0:
		return repo.Partition{}, fmt.Errorf("disk %s of snapshot %s has no partition %q ('sauve ls %s' lists them)", d.Name, sn.ID.Short(), spec.part, sn.ID.Short())
	case 1:
		return found[0], nil
	}
	return repo.Partition{}, fmt.Errorf("disk %s of snapshot %s has %d partitions labelled %q: name one by number", d.Name, sn.ID.Short(), len(found), spec.part)
}

// lsEntry is a file as ls --json prints it.
type lsEntry struct {
	Path   string    `json:"path"`
	Type   string    `json:"type"`
	Mode   string    `json:"mode"` // permissions in octal
	Ino    uint64    `json:"ino"`
	Nlink  uint32    `json:"nlink"`
	UID    uint32    `json:"uid"`
	GID    uint32    `json:"gid"`
	Size   int64     `json:"size"`
	Mtime  time.Time `json:"mtime"`
	Target string    `json:"target,omitempty"`
	Major  *uint32   `json:"major,omitempty"`
	Minor  *uint32   `json:"minor,omitempty"`
}

var typeNames = map[uint32]string{
	fsread.TypeDir: "dir", fsread.TypeRegular: "file", fsread.TypeSymlink: "symlink", fsread.TypeChar: "char",
	fsread.TypeBlock: "block", fsread.TypeFIFO: "fifo", fsread.TypeSocket: "socket",
}

func newLsCmd(g *globals) *cobra.Command {
	var (
		f         fileFlags
		recursive bool
	)
	cmd := &cobra.Command{
		Use:   "ls SNAPSHOT[:PART][/PATH]",
		Short: "List files in a filesystem of a snapshot, without restoring it",
		Long: `List the files at PATH (default /) in partition PART of SNAPSHOT's disk, read
straight from the repository: only the chunks holding the metadata read are
fetched. PART is a partition number or a filesystem label; leave it out for
a disk without a partition table. With no PART on a partitioned disk, the
partitions are listed.

The long listing shows mode, links, owner and group (numeric), size,
modification time, name and a symlink's target. Filesystems read: ext2,
ext3, ext4. A filesystem backed up while mounted has a journal that needs
recovery: it is replayed in memory (--no-replay reads it as it is on disk).`,
		Example: `  sauve ls latest
  sauve ls latest:1/etc
  sauve ls 1a2b3c4d:root/var/log -R --json`,
		Args: exactArgs(1, "SNAPSHOT[:PART][/PATH]"),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := parseFileSpec(args[0])
			sn, d, dr, err := g.openDiskFor(cmd.Context(), "ls", spec, &f)
			if err != nil {
				return err
			}
			defer dr.Close()
			if !spec.hasPart && d.PartitionTable != "" {
				if g.json {
					return g.printJSON(map[string]any{"snapshot": sn.ID.String(), "disk": d.Name, "partition_table": d.PartitionTable, "partitions": partitionsOf(d)})
				}
				fmt.Fprintf(g.stdout, "snapshot %s, disk %s (%s):\n", sn.ID.Short(), d.Name, bytesIEC(d.Size))
				printPartitions(g.stdout, d, false)
				return nil
			}
			v, err := g.openView(sn, d, dr, spec, &f)
			if err != nil {
				return err
			}
			return g.ls(v, spec.path, recursive)
		},
	}
	f.add(cmd)
	cmd.Flags().BoolVarP(&recursive, "recursive", "R", false, "list subdirectories recursively")
	return cmd
}

func (g *globals) ls(v *fileView, p string, recursive bool) error {
	st, err := v.fs.Lstat(p)
	if err != nil {
		return err
	}
	var all []lsEntry
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 1, ' ', tabwriter.AlignRight)
	list := func(dir string, ents []fsread.DirEntry) error {
		for _, e := range ents {
			le, err := lsOf(v.fs, path.Join(dir, e.Name), e.Stat)
			if err != nil {
				return err
			}
			if g.json {
				all = append(all, le)
				continue
			}
			fmt.Fprintln(tw, lsLine(le, e.Name))
		}
		return tw.Flush()
	}
	if !st.IsDir() {
		return g.lsDone(all, list(path.Dir(p), []fsread.DirEntry{{Name: path.Base(p), Stat: st}}))
	}
	seen := map[uint64]bool{}
	var walk func(dir string, ino uint64, depth int) error
	walk = func(dir string, ino uint64, depth int) error {
		if seen[ino] || depth > 256 {
			return fmt.Errorf("%s: directory loop (damaged filesystem)", dir)
		}
		seen[ino] = true
		defer delete(seen, ino)
		ents, err := v.fs.ReadDir(dir)
		if err != nil {
			return err
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
		if recursive && !g.json {
			fmt.Fprintf(g.stdout, "%s:\n", dir)
		}
		if err := list(dir, ents); err != nil {
			return err
		}
		if !recursive {
			return nil
		}
		for _, e := range ents {
			if e.Stat.IsDir() {
				if !g.json {
					fmt.Fprintln(g.stdout)
				}
				if err := walk(path.Join(dir, e.Name), e.Stat.Ino, depth+1); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return g.lsDone(all, walk(p, st.Ino, 0))
}

func (g *globals) lsDone(all []lsEntry, err error) error {
	if err != nil || !g.json {
		return err
	}
	if all == nil {
		all = []lsEntry{}
	}
	return g.printJSON(all)
}

func lsOf(fs fileSystem, p string, st fsread.Stat) (lsEntry, error) {
	le := lsEntry{Path: p, Type: typeNames[st.Type()], Mode: fmt.Sprintf("%04o", st.Mode&0o7777), Ino: st.Ino,
		Nlink: st.Nlink, UID: st.UID, GID: st.GID, Size: st.Size, Mtime: st.Mtime}
	switch st.Type() {
	case fsread.TypeSymlink:
		t, err := fs.Readlink(p)
		if err != nil {
			return le, err
		}
		le.Target = t
	case fsread.TypeChar, fsread.TypeBlock:
		le.Major, le.Minor = &st.Major, &st.Minor
	}
	return le, nil
}

func lsLine(le lsEntry, name string) string {
	mode, _ := strconv.ParseUint(le.Mode, 8, 32)
	size := strconv.FormatInt(le.Size, 10)
	if le.Major != nil {
		size = fmt.Sprintf("%d, %d", *le.Major, *le.Minor)
	}
	line := fmt.Sprintf("%s\t%d\t%d\t%d\t%s\t%s\t %s", modeString(le.Type, uint32(mode)), le.Nlink, le.UID, le.GID, size,
		le.Mtime.Local().Format("2006-01-02 15:04"), strconv.Quote(name)[1:len(strconv.Quote(name))-1])
	if le.Type == "symlink" {
		line += " -> " + le.Target
	}
	return line
}

// modeString is the mode as ls -l prints it.
func modeString(typ string, m uint32) string {
	c := map[string]byte{"dir": 'd', "symlink": 'l', "char": 'c', "block": 'b', "fifo": 'p', "socket": 's'}[typ]
	if c == 0 {
		c = '-'
	}
	b := []byte{c}
	for i, special := range []struct {
		bit      uint32
		set, not byte
	}{{0o4000, 's', 'S'}, {0o2000, 's', 'S'}, {0o1000, 't', 'T'}} {
		shift := uint(6 - 3*i)
		r, w, x := byte('-'), byte('-'), byte('-')
		if m&(4<<shift) != 0 {
			r = 'r'
		}
		if m&(2<<shift) != 0 {
			w = 'w'
		}
		if m&(1<<shift) != 0 {
			x = 'x'
		}
		if m&special.bit != 0 {
			x = special.not
			if m&(1<<shift) != 0 {
				x = special.set
			}
		}
		b = append(b, r, w, x)
	}
	return string(b)
}

func newFindCmd(g *globals) *cobra.Command {
	var (
		f        fileFlags
		fullPath bool
	)
	cmd := &cobra.Command{
		Use:   "find SNAPSHOT[:PART][/PATH] PATTERN",
		Short: "Find files by name in a filesystem of a snapshot",
		Long: `Print SNAPSHOT:PART/PATH for every file under PATH (default /) whose name
matches the shell pattern PATTERN (* ? [...]); with --path, PATTERN matches
the whole path from the filesystem's root (/etc/*.conf). The lines printed
are what 'sauve get' takes.`,
		Example: `  sauve find latest:1 '*.conf'
  sauve find latest:root --path '/home/*/.bashrc'`,
		Args: exactArgs(2, "SNAPSHOT[:PART][/PATH] and PATTERN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := path.Match(args[1], ""); err != nil {
				return usageError{fmt.Errorf("pattern %q: %w", args[1], err)}
			}
			spec := parseFileSpec(args[0])
			v, err := g.openFiles(cmd.Context(), "find", spec, &f)
			if err != nil {
				return err
			}
			defer v.Close()
			found := []string{}
			err = walkFS(v.fs, spec.path, func(p string, _ fsread.Stat) error {
				subject := path.Base(p)
				if fullPath {
					subject = p
				}
				if ok, _ := path.Match(args[1], subject); ok {
					if g.json {
						found = append(found, v.prefix+p)
					} else {
						fmt.Fprintln(g.stdout, v.prefix+p)
					}
				}
				return nil
			})
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(found)
			}
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().BoolVar(&fullPath, "path", false, "match PATTERN against the whole path, not the name")
	return cmd
}

// walkFS calls fn for p and everything under it, parents first, names
// in order; a directory loop (a damaged filesystem) is an error.
func walkFS(fs fileSystem, p string, fn func(p string, st fsread.Stat) error) error {
	st, err := fs.Lstat(p)
	if err != nil {
		return err
	}
	seen := map[uint64]bool{}
	var walk func(p string, st fsread.Stat, depth int) error
	walk = func(p string, st fsread.Stat, depth int) error {
		if err := fn(p, st); err != nil || !st.IsDir() {
			return err
		}
		if seen[st.Ino] || depth > 256 {
			return fmt.Errorf("%s: directory loop (damaged filesystem)", p)
		}
		seen[st.Ino] = true
		defer delete(seen, st.Ino)
		ents, err := fs.ReadDir(p)
		if err != nil {
			return err
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
		for _, e := range ents {
			if err := walk(path.Join(p, e.Name), e.Stat, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	return walk(p, st, 0)
}
