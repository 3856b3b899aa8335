package cli

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repair"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/source"
)

func newRepairCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repair",
		Short: "Rebuild what damage or interrupted runs left: the index, leftover files",
		Long: `Repair a repository after damage or interrupted runs. Each subcommand needs
the owner's key, reports what it did (or with --dry-run what it would do),
and never removes anything that still holds data.`,
		Example: `  sauve check --read-data
  sauve repair index --dry-run
  sauve repair index --read-data
  sauve repair snapshots --from /dev/vda --dry-run`,
	}
	cmd.AddCommand(newRepairIndexCmd(g), newRepairSnapshotsCmd(g), newRepairPacksCmd(g), newRepairParityCmd(g))
	return cmd
}

func newRepairParityCmd(g *globals) *cobra.Command {
	var (
		dry bool
		k   int
	)
	cmd := &cobra.Command{
		Use:   "parity",
		Short: "Give parity to the packs that have none (written without --parity, or after a prune)",
		Long: `Store parity objects over the stored packs that no parity object covers:
those of backups made without --parity, and those whose group lost a
member to prune. Packs are grouped --parity N at a time, in pack ID
order, each read whole and checked against its name first (parity over a
damaged pack would only rebuild the damage; such packs are named and left
out). Afterwards 'sauve repair packs' can rebuild any one lost or damaged
pack of each group. Reads every unprotected pack once; needs the right
to create objects in parity/.`,
		Example: `  sauve repair parity --parity 8 --dry-run
  sauve repair parity --parity 8`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := g.openRepo(ctx, true)
			if err != nil {
				return err
			}
			progress, stop := g.countMeter("read packs", true)
			rep, err := r.ProtectPacks(ctx, k, dry, progress)
			stop()
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(rep)
			}
			for _, id := range rep.Damaged {
				g.warnf("pack %s does not match its name (damaged): left without parity; run 'sauve check --read-data' and 'sauve repair packs'", id.Short())
			}
			verb := "stored"
			if dry {
				verb = "would be stored"
			}
			g.printf("%d packs had parity; %d given parity now: %d parity objects (%s) %s, %s read\n",
				rep.Covered, rep.Protected, rep.Groups, bytesIEC(rep.ParityBytes), verb, bytesIEC(rep.BytesRead))
			return nil
		},
	}
	cmd.Flags().IntVar(&k, "parity", 8, "packs per parity group (`N`, 2-64; 1/N more space)")
	cmd.Flags().BoolVar(&dry, "dry-run", false, "read and compute, storing nothing")
	return cmd
}

func newRepairPacksCmd(g *globals) *cobra.Command {
	var dry bool
	cmd := &cobra.Command{
		Use:   "packs",
		Short: "Rebuild lost or damaged packs from parity ('backup --parity N')",
		Long: `Rebuild from parity the packs the index names that are missing from the
repository or that 'sauve check --read-data' recorded as damaged, and store
them again. Backups made with --parity N store a parity object over every N
packs they write: any one lost or damaged pack of each group comes back
exactly (a rebuilt pack is kept only if it hashes to its own name), for
1/N more space. Two lost packs of one group cannot be rebuilt; those are
named, with why.

With the owner's key the rebuilt packs are recorded sound in the ledger,
so backups reuse their chunks again. Run 'sauve check --read-data' first
to find packs damaged in place; missing packs are found without it.`,
		Example: `  sauve backup /dev/vda --parity 8
  sauve check --read-data; sauve repair packs --dry-run; sauve repair packs`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := g.openRepo(ctx, true)
			if err != nil {
				return err
			}
			rep, err := r.RepairPacks(ctx, dry)
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(rep)
			}
			verb := "rebuilt"
			if dry {
				verb = "would be rebuilt"
			}
			for _, id := range rep.Rebuilt {
				g.printf("pack %s %s from parity\n", id.Short(), verb)
			}
			for id, why := range rep.Unrecoverable {
				fmt.Fprintf(g.stderr, "sauve: pack %s cannot be rebuilt: %s\n", id[:8], why)
			}
			for name, why := range rep.BadParity {
				g.warnf("parity object %s ignored: %s", name[:min(8, len(name))], why)
			}
			g.printf("%d packs, %d covered by parity; %d %s, %d cannot be\n", rep.Packs, rep.Protected, len(rep.Rebuilt), verb, len(rep.Unrecoverable))
			if len(rep.Unrecoverable) > 0 {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&dry, "dry-run", false, "rebuild in memory and say what would be stored, storing nothing")
	return cmd
}

func newRepairIndexCmd(g *globals) *cobra.Command {
	var dry, readData bool
	cmd := &cobra.Command{
		Use:   "index",
		Short: "Rebuild index objects from the packs' own trailers",
		Long: `Rebuild the index from the packs: every pack that no readable index object
names (its index object is damaged or missing, or a backup was interrupted
before writing it) is read from its trailer and written into a new index
object signed by the owner; index objects found damaged are then removed,
and temporary files older than a day (left by killed processes) are
deleted.

Without --read-data the rebuilt entries are trusted for restores (every
chunk is still verified when read) but not for deduplication: a trailer can
be copied onto other bytes by anyone who can write to the repository. With
--read-data each such pack is downloaded and verified chunk by chunk, and
its chunks may be reused by every writer again.`,
		Example: `  sauve repair index --dry-run
  sauve repair index --read-data --json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, err := g.openSet(ctx, false)
			if err != nil {
				return err
			}
			var reports []any
			err = g.eachRepo(set, func(r *repo.Repository) error {
				progress, stop := g.countMeter("verify packs", readData)
				rep, err := r.RepairIndex(ctx, repo.RepairOptions{DryRun: dry, ReadData: readData, Progress: progress})
				stop()
				if err != nil {
					return err
				}
				reports = append(reports, rep)
				if !g.json {
					printRepairIndex(g, rep)
				}
				return nil
			})
			if err != nil {
				return err
			}
			if g.json {
				return g.printSetJSON(set, reports)
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&dry, "dry-run", "n", false, "say what would be done, change nothing")
	cmd.Flags().BoolVar(&readData, "read-data", false, "download and verify each pack before indexing it (its chunks can then be deduplicated against)")
	return cmd
}

func printRepairIndex(g *globals, rep *repo.RepairReport) {
	would := ""
	if rep.DryRun {
		would = "would be "
	}
	for _, p := range rep.Unreadable {
		g.warnf("pack %s cannot be indexed: %s", p.Pack, p.Why)
	}
	for _, name := range rep.KeptIndex {
		g.warnf("index object %s could not be read and was left alone (run repair again)", name)
	}
	g.printf("%d packs %sindexed from their trailers (%d blobs), %d of them verified chunk by chunk\n", rep.Indexed, would, rep.Blobs, rep.Endorsed)
	g.printf("%d damaged index objects %sremoved\n", len(rep.RemovedIndex), would)
	for _, name := range rep.RemovedIndex {
		g.printf("  %s\n", name)
	}
	g.printf("%d temporary files (%s) %sremoved\n", rep.TempRemoved, bytesIEC(rep.TempBytes), would)
	if len(rep.Unreadable) > 0 {
		g.printf("%d packs could not be indexed: 'sauve check' names the snapshots they affect\n", len(rep.Unreadable))
	}
}

func newRepairSnapshotsCmd(g *globals) *cobra.Command {
	var (
		dry, readData bool
		from          []string
		fromRepo      string
		fromKey       string
	)
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "Store again lost chunks from a healthy source, and mark what cannot be recovered",
		Long: `Find every chunk that no usable copy in the repository holds any more (as
'sauve check' does; with --read-data, reading every pack), and store it
again from a healthy source:

  --from PATH        the disk itself, or an image of it (a device, a raw or
                     VM disk image), read at the offsets the snapshots had
                     the lost chunks (repeatable)
  --from-repo REPO   another repository holding snapshots of the same disks
                     (a copy, or another backup of the same machine), with
                     --from-key for its key

A chunk is taken from a source only if its content hashes to the lost
chunk's ID: a source can fill a hole, never change a byte, so any source
is safe to offer. Snapshots that still lose data afterwards are recorded
in the repository's ledger (signed by the owner) and marked in 'sauve
snapshots', so that 'latest' no longer picks them; a snapshot repaired
later is unmarked. Chunk lists that are lost cannot be rebuilt (which
chunks they held is unknown): their stretches stay marked. Needs the
owner's key.`,
		Example: `  sauve repair snapshots --dry-run
  sauve repair snapshots --from /dev/vda
  sauve repair snapshots --from /var/lib/libvirt/images/web1.qcow2 --read-data
  sauve repair snapshots --from-repo s3://offsite/web1 --from-key /root/offsite.key`,
		Args: exactArgs(0, "no arguments (the sources are --from and --from-repo)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, err := g.openSet(ctx, true)
			if err != nil {
				return err
			}
			if !set.main.Keys().IsOwner() {
				return errors.New("repair needs the repository owner's key")
			}
			sources, closeAll, err := g.repairSources(ctx, cmd, from, fromRepo, fromKey)
			defer closeAll()
			if err != nil {
				return err
			}
			var reports []any
			damaged := false
			err = g.eachRepo(set, func(r *repo.Repository) error {
				progress, stop := g.countMeter("recover chunks", true)
				rep, err := repair.Snapshots(ctx, r, repair.Options{DryRun: dry, ReadData: readData, Sources: sources, Progress: progress})
				stop()
				if err != nil {
					return err
				}
				reports = append(reports, rep)
				damaged = damaged || len(rep.Damaged) > 0
				if !g.json {
					printRepairSnapshots(g, rep)
				}
				return nil
			})
			if err != nil {
				return err
			}
			if g.json {
				if err := g.printSetJSON(set, reports); err != nil {
					return err
				}
			}
			if damaged {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&dry, "dry-run", "n", false, "find what could be recovered, store and record nothing")
	f.BoolVar(&readData, "read-data", false, "read every pack to find lost chunks (also those damaged in place)")
	f.StringArrayVar(&from, "from", nil, "a device or image of a backed-up disk to read lost chunks from (repeatable)")
	f.StringVar(&fromRepo, "from-repo", "", "another repository to read lost chunks from")
	f.StringVar(&fromKey, "from-key", "", "key file of --from-repo (default: the one saved for its repository ID)")
	addImportFlags(cmd)
	return cmd
}

// repairSources opens the sources of repair snapshots.
func (g *globals) repairSources(ctx context.Context, cmd *cobra.Command, from []string, fromRepo, fromKey string) ([]repair.Source, func(), error) {
	var closers []func()
	closeAll := func() {
		for _, c := range closers {
			c()
		}
	}
	sopts, err := sourceOptions(cmd)
	if err != nil {
		return nil, closeAll, err
	}
	var out []repair.Source
	for _, p := range from {
		src, err := source.Open(ctx, p)
		if err != nil {
			return nil, closeAll, err
		}
		closers = append(closers, func() { src.Close() })
		if src.Kind == source.Stream {
			return nil, closeAll, usageError{fmt.Errorf("--from %s: a source to repair from must be a file or device, not a stream", p)}
		}
		img, err := source.OpenDisk(source.Live(src), sopts)
		if err != nil {
			return nil, closeAll, fmt.Errorf("--from %s: %w", p, err)
		}
		closers = append(closers, func() { img.Close() })
		out = append(out, repair.Source{Name: p, R: img.At, Size: img.Size})
	}
	if fromRepo == "" {
		return out, closeAll, nil
	}
	other := *g
	other.repo, other.keyFile, other.usingDefault = fromRepo, fromKey, false
	or, err := other.openRepo(ctx, true)
	if err != nil {
		return nil, closeAll, fmt.Errorf("--from-repo %s: %w", fromRepo, err)
	}
	if !or.CanDecrypt() {
		return nil, closeAll, fmt.Errorf("--from-repo %s: %w", fromRepo, errWriteOnly(or))
	}
	snaps, err := other.snapshots(ctx, or)
	if err != nil {
		return nil, closeAll, err
	}
	// Newest first: the likeliest to hold a chunk that was lost lately.
	for i := len(snaps) - 1; i >= 0; i-- {
		sn := snaps[i]
		for di := range sn.Disks {
			d := &sn.Disks[di]
			// Every snapshot's reader is open at once and read at a few
			// places: a cache of two chunks each, no read-ahead.
			dr, err := or.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: 1, ReadAhead: -1, Warn: g.warnf})
			if err != nil {
				return nil, closeAll, fmt.Errorf("--from-repo %s: snapshot %s: %w", fromRepo, sn.ID.Short(), err)
			}
			closers = append(closers, func() { dr.Close() })
			out = append(out, repair.Source{Name: fmt.Sprintf("%s snapshot %s", fromRepo, sn.ID.Short()), R: dr, Size: d.Size, Disk: d.Name, Path: d.Source})
		}
	}
	return out, closeAll, nil
}

func printRepairSnapshots(g *globals, rep *repair.Report) {
	would := ""
	if rep.DryRun {
		would = "could be "
	}
	g.printf("%d chunks lost, %d %sstored again\n", rep.Lost, rep.Recovered, would)
	names := make([]string, 0, len(rep.From))
	for n := range rep.From {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		g.printf("  %d from %s\n", rep.From[n], n)
	}
	for _, d := range rep.Damaged {
		var n int64
		for _, s := range d.Ranges {
			n += s.Length
		}
		fmt.Fprintf(g.stderr, "sauve: still damaged: snapshot %s disk %s: %s in %d ranges\n", d.Snapshot.Short(), d.Disk, bytesIEC(n), len(d.Ranges))
	}
	for _, id := range rep.Whole {
		g.printf("snapshot %s is whole again\n", id.Short())
	}
	if len(rep.Damaged) > 0 && !rep.DryRun {
		g.printf("%d snapshots recorded as damaged: 'sauve snapshots' marks them, 'latest' skips them\n", countSnapshots(rep.Damaged))
	}
}

func countSnapshots(ds []repo.Damage) int {
	seen := map[repo.ID]bool{}
	for _, d := range ds {
		seen[d.Snapshot] = true
	}
	return len(seen)
}
