package cli

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

func newStatsCmd(g *globals) *cobra.Command {
	var ff filterFlags
	cmd := &cobra.Command{
		Use:   "stats [SNAPSHOT...]",
		Short: "Show the repository's size, deduplication, and what each snapshot costs",
		Long: `Show what the repository stores: its objects by kind, the logical size of
every snapshot's disks against the stored size of the distinct chunks they
refer to (the deduplication ratio), and the stored data no snapshot refers
to (what 'sauve prune' frees).

For each snapshot (or those named, or matching --host, --tag, --source):
  added      the stored size of its chunks no earlier snapshot refers to:
             what its backup added
  exclusive  the stored size of those no other snapshot refers to: what
             forgetting only this snapshot frees (after prune repacks)
and the same summed per host and source. Stored sizes are compressed and
encrypted, one copy a chunk. stats reads every chunk list once; a
write-only key can run it (it holds the metadata key).`,
		Example: `  sauve stats
  sauve stats --host web1 --json
  sauve stats latest`,
		RunE: func(cmd *cobra.Command, args []string) error {
			flt, err := ff.filter()
			if err != nil {
				return err
			}
			return g.stats(cmd.Context(), args, flt)
		},
	}
	ff.add(cmd)
	ff.addDates(cmd)
	return cmd
}

func (g *globals) stats(ctx context.Context, specs []string, flt repo.Filter) error {
	r, err := g.openRepo(ctx, true)
	if err != nil {
		return err
	}
	progress, stop := g.countMeter("read chunk lists", true)
	rep, err := r.Stats(ctx, progress)
	stop()
	if err != nil {
		return err
	}
	keep, err := g.statsSelection(ctx, r, specs, flt)
	if err != nil {
		return err
	}
	var sel []repo.SnapshotCost
	for _, c := range rep.PerSnapshot {
		if keep == nil || keep[c.ID] {
			sel = append(sel, c)
		}
	}
	rep.PerSnapshot = sel
	if g.json {
		return g.printJSON(rep)
	}
	printStats(g, rep)
	return nil
}

// statsSelection returns the snapshots named or matching, or nil for all.
func (g *globals) statsSelection(ctx context.Context, r *repo.Repository, specs []string, flt repo.Filter) (map[repo.ID]bool, error) {
	if len(specs) == 0 && flt.Host == "" && len(flt.Tags) == 0 && flt.Path == "" && flt.Before.IsZero() && flt.After.IsZero() {
		return nil, nil
	}
	all, err := g.snapshots(ctx, r)
	if err != nil {
		return nil, err
	}
	keep := map[repo.ID]bool{}
	for _, spec := range specs {
		sn, err := repo.FindSnapshot(all, spec, flt)
		if err != nil {
			return nil, err
		}
		keep[sn.ID] = true
	}
	if len(specs) == 0 {
		for _, sn := range all {
			if flt.Match(sn) {
				keep[sn.ID] = true
			}
		}
	}
	return keep, nil
}

func printStats(g *globals, rep *repo.StatsReport) {
	var kinds []string
	for _, k := range []string{"data", "index", "snapshots", "ledger", "sessions", "parity"} {
		if c := rep.Objects[k]; c.Packs > 0 {
			kinds = append(kinds, fmt.Sprintf("%s %d (%s)", k, c.Packs, bytesIEC(c.Bytes)))
		}
	}
	g.printf("repository: %s stored: %s\n", bytesIEC(rep.StoredBytes), strings.Join(kinds, ", "))
	g.printf("%d snapshots, %s of disks; %s in %d distinct chunks, stored as %s: deduplication %.1fx\n",
		rep.Snapshots, bytesIEC(rep.LogicalBytes), bytesIEC(rep.UniqueBytes), rep.DataBlobs, bytesIEC(rep.UniqueStoredBytes), rep.DedupRatio)
	if rep.UnreferencedBytes > 0 {
		g.printf("%s stored that no snapshot refers to (%d packs hold nothing else): 'sauve prune' frees it\n", bytesIEC(rep.UnreferencedBytes), rep.UnusedPacks)
	}
	if len(rep.PerSnapshot) > 0 {
		g.printf("\n%-8s  %-20s  %-12s  %10s  %10s  %10s  %s\n", "ID", "time", "host", "size", "added", "exclusive", "sources")
		for _, c := range rep.PerSnapshot {
			g.printf("%-8s  %-20s  %-12s  %10s  %10s  %10s  %s\n", c.ID.Short(), c.Time, c.Host, bytesIEC(c.Logical), bytesIEC(c.Added), bytesIEC(c.Exclusive), c.Sources)
		}
	}
	if len(rep.PerGroup) > 0 {
		g.printf("\n%-12s  %9s  %10s  %10s  %10s  %s\n", "host", "snapshots", "size", "added", "exclusive", "source")
		for _, c := range rep.PerGroup {
			g.printf("%-12s  %9d  %10s  %10s  %10s  %s\n", c.Host, c.Snapshots, bytesIEC(c.Logical), bytesIEC(c.Added), bytesIEC(c.Exclusive), c.Source)
		}
	}
}
