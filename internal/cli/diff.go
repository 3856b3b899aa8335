package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/source"
)

type diffFlags struct {
	ff        filterFlags
	diskName  string
	noFiles   bool
	content   bool
	noFSSkip  bool
	allRanges bool
}

func newDiffCmd(g *globals) *cobra.Command {
	var f diffFlags
	cmd := &cobra.Command{
		Use:   "diff SNAPSHOT[:PART] SNAPSHOT2|DEVICE|IMAGE",
		Short: "Show which byte ranges and which files differ between two snapshots, or a snapshot and a disk",
		Long: `Compare a disk of SNAPSHOT with the same disk of SNAPSHOT2, or with a device
or image file as it is now (after a restore, before a cut-over): which byte
ranges differ, and, for the ext2/3/4 and FAT partitions on both sides, which
files were added (+), removed (-), modified (M), changed type (T) or only
their metadata (U).

Between two snapshots the ranges come from their chunk lists alone: nothing
is fetched, and a write-only key is enough for them. Against a device, the
device is read and hashed chunk by chunk as a backup would read it, free
space skipped (--no-fs-skip compares every byte). The second argument is a
path when it names an existing file or device.

Files are compared by type, size and modification time (M), symlink
target (M), mode, owner and change time (U); --content also compares the
bytes of files whose size and modification time are the same. SNAPSHOT:PART compares that partition's files only
(a number or label, as in 'sauve ls'); --no-files compares ranges only.

The exit status is 0 when nothing differs, 1 when something does, 2 on
error, as diff(1) and cmp(1).`,
		Example: `  sauve diff 1a2b3c4d latest              # what changed since that backup
  sauve diff 1a2b3c4d:root 5e6f7a8b        # the files of the partition labelled root
  sauve diff latest /dev/sdb               # verify a restore
  sauve diff latest:2 /dev/sdb --content   # and compare the contents of files`,
		Args: exactArgs(2, "SNAPSHOT and SNAPSHOT2, DEVICE or IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			sopts, err := sourceOptions(cmd)
			if err != nil {
				return err
			}
			err = g.diff(cmd.Context(), args[0], args[1], &f, sopts)
			var ee *ExitError
			if err != nil && !errors.As(err, &ee) {
				err = codedError{err, 2}
			}
			return err
		},
	}
	f.ff.add(cmd)
	f.ff.addDates(cmd)
	cmd.Flags().StringVar(&f.diskName, "disk", "", "the disk to compare, in a snapshot of several")
	cmd.Flags().BoolVar(&f.noFiles, "no-files", false, "compare byte ranges only")
	cmd.Flags().BoolVar(&f.content, "content", false, "also compare the contents of files whose metadata is the same")
	cmd.Flags().BoolVar(&f.noFSSkip, "no-fs-skip", false, "against a device: compare free space too")
	cmd.Flags().BoolVar(&f.allRanges, "all-ranges", false, "list every differing range (the first 20 otherwise)")
	addImportFlags(cmd)
	return cmd
}

// diffSide is one side of a comparison: a snapshot's disk, or a device
// or image read now.
type diffSide struct {
	name string
	sn   *repo.Snapshot // nil for a device
	// disk describes the side: its size and partitions (a device's as
	// a backup would record them).
	disk *repo.Disk
	// id returns the ID of chunk i as a backup would store it.
	id func(ctx context.Context, i int64) (repo.ID, error)
	// at reads the side's bytes, for the files; nil when the key cannot.
	at    io.ReaderAt
	close func()
}

func (g *globals) diff(ctx context.Context, a, b string, f *diffFlags, sopts source.Options) error {
	spec := parseFileSpec(a)
	if spec.hasPart && spec.path != "/" {
		return usageError{fmt.Errorf("%s: diff compares partitions whole, not a PATH", a)}
	}
	set, err := g.openSet(ctx, true)
	if err != nil {
		return err
	}
	left, r, err := g.snapshotSide(ctx, set, spec.snap, f)
	if err != nil {
		return err
	}
	defer left.close()
	var right *diffSide
	if isPath(b) {
		right, err = g.deviceSide(ctx, b, r, left.disk.ChunkSize, f, sopts)
	} else {
		right, _, err = g.snapshotSide(ctx, set, b, f)
	}
	if err != nil {
		return err
	}
	defer right.close()
	rep, err := diffRanges(ctx, left, right, f.allRanges)
	if err != nil {
		return err
	}
	if !f.noFiles {
		if rep.Partitions, err = g.diffFiles(left, right, spec, f.content); err != nil {
			return err
		}
	}
	if g.json {
		if err := g.printJSON(rep); err != nil {
			return err
		}
	} else {
		g.printDiff(rep)
	}
	if rep.differs() {
		return &ExitError{Code: 1}
	}
	return nil
}

// isPath says whether the second argument names a file or device rather
// than a snapshot.
func isPath(s string) bool {
	if strings.HasPrefix(s, "/") || strings.HasPrefix(s, "./") || strings.HasPrefix(s, "../") {
		return true
	}
	_, err := os.Stat(s)
	return err == nil
}

func (g *globals) snapshotSide(ctx context.Context, set *repoSet, spec string, f *diffFlags) (*diffSide, *repo.Repository, error) {
	r, sn, err := g.findSnapshot(ctx, set, spec, &f.ff)
	if err != nil {
		return nil, nil, err
	}
	d, err := pickDisk(sn, f.diskName)
	if err != nil {
		return nil, nil, err
	}
	list := r.ChunkList(d)
	s := &diffSide{name: fmt.Sprintf("snapshot %s (disk %s)", sn.ID.Short(), d.Name), sn: sn, disk: d, close: func() {},
		id: func(ctx context.Context, i int64) (repo.ID, error) { return list.At(ctx, i) }}
	if f.noFiles || !r.CanDecrypt() {
		return s, r, nil
	}
	dr, err := r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: filesCache, ReadAhead: -1, Warn: g.warnf})
	if err != nil {
		return nil, nil, fmt.Errorf("diff of snapshot %s: %w", sn.ID.Short(), err)
	}
	s.at, s.close = dr, func() { dr.Close() }
	return s, r, nil
}

// deviceSide reads path as a backup would, hashing its chunks with r's
// ID key so that they compare with a snapshot's.
func (g *globals) deviceSide(ctx context.Context, path string, r *repo.Repository, chunkSize int, f *diffFlags, sopts source.Options) (*diffSide, error) {
	src, err := source.Open(ctx, path)
	if err != nil {
		return nil, err
	}
	if src.Kind == source.Stream {
		src.Close()
		return nil, usageError{fmt.Errorf("%s: diff reads a file or device, not a stream", path)}
	}
	img, err := source.OpenDisk(source.Live(src), sopts)
	if err != nil {
		src.Close()
		return nil, err
	}
	closeAll := func() { img.Close(); src.Close() }
	layout, err := img.Map(source.MapOptions{NoSkip: f.noFSSkip, Warn: func(s string) { g.warnf("%s: %s", path, s) }})
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("map %s: %w", path, err)
	}
	d := &repo.Disk{Name: path, Size: img.Size, ChunkSize: chunkSize}
	layout.Describe(d)
	m := layout.Map()
	if m == nil {
		m = extent.Full{}
	}
	buf := make([]byte, chunkSize)
	id := func(_ context.Context, i int64) (repo.ID, error) {
		off := i * int64(chunkSize)
		n := min(int64(chunkSize), img.Size-off)
		ranges, err := m.Data(off, n)
		if err != nil {
			return repo.ID{}, fmt.Errorf("map %s at %d: %w", path, off, err)
		}
		if _, err := extent.ReadRanges(img.At, buf[:n], off, ranges); err != nil {
			return repo.ID{}, fmt.Errorf("read %s at %d: %w", path, off, err)
		}
		if extent.IsZero(buf[:n]) {
			return repo.ID{}, nil
		}
		return r.ChunkID(buf[:n]), nil
	}
	return &diffSide{name: path, disk: d, id: id, at: img.At, close: closeAll}, nil
}
