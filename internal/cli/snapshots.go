package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

type filterFlags struct {
	host string
	tags []string
}

func (f *filterFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.host, "host", "", "only snapshots of this host")
	cmd.Flags().StringArrayVar(&f.tags, "tag", nil, "only snapshots with this tag (repeatable: all must match)")
}

func (f *filterFlags) filter() repo.Filter { return repo.Filter{Host: f.host, Tags: f.tags} }

type snapshotJSON struct {
	ID     string     `json:"id"`
	Short  string     `json:"short_id"`
	Time   time.Time  `json:"time"`
	Host   string     `json:"host"`
	Tags   []string   `json:"tags"`
	Parent string     `json:"parent,omitempty"`
	Signer string     `json:"signer"`
	Disks  []diskJSON `json:"disks"`
}

type diskJSON struct {
	Name           string           `json:"name"`
	Source         string           `json:"source"`
	Kind           string           `json:"kind"`
	Size           int64            `json:"size"`
	ChunkSize      int              `json:"chunk_size"`
	Stats          repo.DiskStats   `json:"stats"`
	PartitionTable string           `json:"partition_table"`
	DiskID         string           `json:"disk_id,omitempty"`
	SectorSize     int              `json:"sector_size,omitempty"`
	Partitions     []repo.Partition `json:"partitions"`
}

func toJSON(sn *repo.Snapshot) snapshotJSON {
	out := snapshotJSON{ID: sn.ID.String(), Short: sn.ID.Short(), Time: sn.Time, Host: sn.Host, Tags: sn.Tags, Signer: sn.Signer}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if sn.Parent != nil {
		out.Parent = sn.Parent.String()
	}
	for _, d := range sn.Disks {
		out.Disks = append(out.Disks, diskJSON{Name: d.Name, Source: d.Source, Kind: d.Kind, Size: d.Size, ChunkSize: d.ChunkSize, Stats: d.Stats,
			PartitionTable: d.PartitionTable, DiskID: d.DiskID, SectorSize: d.SectorSize, Partitions: partitionsOf(&d)})
	}
	return out
}

func newSnapshotsCmd(g *globals) *cobra.Command {
	var ff filterFlags
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "List snapshots",
		Long: `List the snapshots in the repository, oldest first, with the disks each
holds. Every manifest's signature is verified; one that fails is reported
and left out.`,
		Example: `  sauve snapshots
  sauve snapshots --host web1 --tag nightly
  sauve snapshots --json | jq -r '.[-1].id'`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := g.openRepo(ctx, false)
			if err != nil {
				return err
			}
			all, err := r.Snapshots(ctx, func(id string, err error) { g.warnf("%v", err) })
			if err != nil {
				return err
			}
			f := ff.filter()
			var list []*repo.Snapshot
			for _, sn := range all {
				if f.Match(sn) {
					list = append(list, sn)
				}
			}
			if g.json {
				out := make([]snapshotJSON, 0, len(list))
				for _, sn := range list {
					out = append(out, toJSON(sn))
				}
				return g.printJSON(out)
			}
			if g.quiet {
				return nil
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTime\tHost\tTags\tDisk\tSize\tSource")
			for _, sn := range list {
				for i, d := range sn.Disks {
					id, t, h, tags := sn.ID.Short(), sn.Time.Local().Format("2006-01-02 15:04:05"), sn.Host, strings.Join(sn.Tags, ",")
					if i > 0 {
						id, t, h, tags = "", "", "", ""
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", id, t, h, tags, d.Name, bytesIEC(d.Size), d.Source)
				}
			}
			tw.Flush()
			fmt.Fprintf(g.stdout, "%d snapshots\n", len(list))
			return nil
		},
	}
	ff.add(cmd)
	return cmd
}
