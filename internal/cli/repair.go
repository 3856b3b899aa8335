package cli

import (
	"sync/atomic"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
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
  sauve repair index --read-data`,
	}
	cmd.AddCommand(newRepairIndexCmd(g))
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
			r, err := g.openRepo(ctx, false)
			if err != nil {
				return err
			}
			var done, total atomic.Int64
			m := startMeter(g.stderr, g.showProgress() && readData, meterSource{label: "verify packs", total: total.Load, current: done.Load})
			rep, err := r.RepairIndex(ctx, repo.RepairOptions{DryRun: dry, ReadData: readData, Progress: func(d, t int) {
				done.Store(int64(d))
				total.Store(int64(t))
			}})
			m.Stop()
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(rep)
			}
			printRepairIndex(g, rep)
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
