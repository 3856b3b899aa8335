package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

func newStatsCmd(g *globals) *cobra.Command {
	var ff filterFlags
	cmd := &cobra.Command{
		Use:   "stats [SNAPSHOT...]",
		Short: "Show what the repository stores and what each snapshot costs",
		Long: `Show what the repository stores and what its snapshots cost, from the index
and the snapshots' chunk lists (no chunk is downloaded).

Repository: every object's bytes (packs, index objects, manifests, ledger,
write-session announcements), the packs, the distinct blobs (data chunks
and chunk lists) and the snapshots.

For the snapshots selected (SNAPSHOT IDs or 'latest', or --host, --tag and
--source; all without them): the logical size of their disks, the distinct
data chunks they reference (unique) with their plaintext and stored size
(compressed and encrypted; chunks of zeros cost nothing), and the
deduplication ratio: logical size / stored size of the unique chunks.

Per snapshot, oldest first:
  added      the stored bytes of the chunks no earlier snapshot references
             (of the whole repository, selected or not): what its backup added
  exclusive  the stored bytes of the chunks no other snapshot references:
             what forgetting only this snapshot would free, before repacking
Chunk lists are counted apart (list_added_bytes, list_exclusive_bytes).
Per host and per source (a host's disk source): snapshots, logical bytes,
and the bytes only those snapshots reference (what forgetting them all
would free).

Unreferenced: the blobs no snapshot references and the packs that hold
only such blobs: what a prune could free, unless a backup still running
references them. Stored packs that no index names are counted apart.

A write-only key can run stats: it holds the metadata key that opens the
index, manifests and chunk lists. With the owner's key, each isolated
namespace is shown after the repository, with figures of its own.`,
		Example: `  sauve stats
  sauve stats --host web1
  sauve stats latest --host web1 --source /dev/vda
  sauve stats --json | jq '.per_snapshot[] | {id, added_bytes, exclusive_bytes}'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, err := g.openSet(ctx, true)
			if err != nil {
				return err
			}
			all, in, err := g.setSnapshots(ctx, set)
			if err != nil {
				return err
			}
			f, err := ff.filter()
			if err != nil {
				return err
			}
			pick := map[*repo.Snapshot]bool{}
			for _, spec := range args {
				sn, err := repo.FindSnapshot(all, spec, f)
				if err != nil {
					return err
				}
				pick[sn] = true
			}
			selected := func(sn *repo.Snapshot) bool {
				if len(args) > 0 {
					return pick[sn]
				}
				return f.Match(sn)
			}
			var reports []any
			err = g.eachRepo(set, func(r *repo.Repository) error {
				var snaps []*repo.Snapshot
				for _, sn := range all {
					if in[sn] == r {
						snaps = append(snaps, sn)
					}
				}
				progress, stop := g.countMeter("read chunk lists", true)
				st, err := r.Stats(ctx, snaps, repo.StatsOptions{Select: selected, Progress: progress})
				stop()
				if err != nil {
					return fmt.Errorf("stats: %w", err)
				}
				reports = append(reports, st)
				if !g.json && !g.quiet {
					printStats(g, r, st)
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
	ff.add(cmd)
	ff.addDates(cmd)
	return cmd
}

// ratio formats a ratio such as 2.47x ("-" when nothing is stored).
func ratio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", x)
}

func printStats(g *globals, r *repo.Repository, st *repo.Stats) {
	out := g.stdout
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Repository\t%s\n", r.Backend().Location())
	fmt.Fprintf(tw, "  stored\t%s\n", bytesIEC(st.StoredBytes))
	fmt.Fprintf(tw, "  packs\t%d\t%s\n", st.Packs, bytesIEC(st.PackBytes))
	fmt.Fprintf(tw, "  index objects\t%d\t%s\n", st.IndexObjects, bytesIEC(st.IndexBytes))
	fmt.Fprintf(tw, "  snapshots\t%d\t%s\n", st.Snapshots, bytesIEC(st.SnapshotBytes))
	fmt.Fprintf(tw, "  ledger, sessions\t%d, %d\t%s\n", st.LedgerRecords, st.SessionObjects, bytesIEC(st.LedgerBytes+st.SessionBytes))
	if st.ParityObjects > 0 {
		fmt.Fprintf(tw, "  parity\t%d\t%s\n", st.ParityObjects, bytesIEC(st.ParityBytes))
	}
	fmt.Fprintf(tw, "  blobs\t%d data, %d chunk lists\n", st.DataBlobs, st.MetaBlobs)
	fmt.Fprintf(tw, "Selected\t%d snapshots\n", st.SelectedSnapshots)
	fmt.Fprintf(tw, "  logical\t%s\tsum of the disks' sizes\n", bytesIEC(st.LogicalBytes))
	fmt.Fprintf(tw, "  unique\t%s\t%d distinct chunks, zeros excluded\n", bytesIEC(st.UniqueBytes), st.UniqueChunks)
	fmt.Fprintf(tw, "  stored\t%s\tcompression %s; chunk lists %s\n", bytesIEC(st.UniqueStoredBytes), ratio(st.CompressionRatio), bytesIEC(st.ListStoredBytes))
	fmt.Fprintf(tw, "  deduplication\t%s\tlogical / stored\n", ratio(st.DedupRatio))
	if st.MissingChunks > 0 {
		fmt.Fprintf(tw, "  missing\t%d chunks\tin no stored pack: run 'sauve check'\n", st.MissingChunks)
	}
	fmt.Fprintf(tw, "Unreferenced\t%s\t%d blobs no snapshot references\n", bytesIEC(st.UnreferencedBytes), st.UnreferencedBlobs)
	fmt.Fprintf(tw, "  packs\t%d\t%s in packs holding only those\n", st.UnreferencedPacks, bytesIEC(st.UnreferencedPackBytes))
	if st.DuplicateBytes > 0 {
		fmt.Fprintf(tw, "  duplicates\t%s\textra copies of referenced blobs\n", bytesIEC(st.DuplicateBytes))
	}
	if st.UnindexedPacks > 0 {
		fmt.Fprintf(tw, "  unindexed\t%d packs\t%s in no index ('sauve repair index')\n", st.UnindexedPacks, bytesIEC(st.UnindexedPackBytes))
	}
	tw.Flush()
	if len(st.PerSnapshot) == 0 {
		return
	}
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTime\tHost\tSource\tLogical\tAdded\tExclusive")
	for _, s := range st.PerSnapshot {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID.Short(), s.Time.Local().Format("2006-01-02 15:04:05"), s.Host,
			strings.Join(s.Sources, ","), bytesIEC(s.LogicalBytes), bytesIEC(s.AddedBytes), bytesIEC(s.ExclusiveBytes))
	}
	tw.Flush()
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Host\tSource\tSnapshots\tLogical\tExclusive")
	for _, h := range st.PerHost {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", h.Host, "(all)", h.Snapshots, bytesIEC(h.LogicalBytes), bytesIEC(h.ExclusiveBytes))
		for _, s := range st.PerSource {
			if s.Host == h.Host {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", "", s.Source, s.Snapshots, bytesIEC(s.LogicalBytes), bytesIEC(s.ExclusiveBytes))
			}
		}
	}
	tw.Flush()
}
