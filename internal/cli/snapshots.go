package cli

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

type filterFlags struct {
	host   string
	tags   []string
	source string
	// before and after are --before and --after, for the commands that
	// take them (addDates); empty otherwise.
	before, after string
}

func (f *filterFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.host, "host", "", "only snapshots of this host")
	cmd.Flags().StringArrayVar(&f.tags, "tag", nil, "only snapshots with this tag (repeatable: all must match)")
	cmd.Flags().StringVar(&f.source, "source", "", "only snapshots of this source (its path as backed up, e.g. /dev/vda, or the disk's name)")
}

// addDates adds --before and --after.
func (f *filterFlags) addDates(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.before, "before", "", "only snapshots dated before this: 2026-11-30 (local midnight), '2026-11-30 14:00', RFC 3339, or a time ago such as 3d, 2w, 1y2m, 36h")
	cmd.Flags().StringVar(&f.after, "after", "", "only snapshots dated at or after this (same forms as --before)")
}

func (f *filterFlags) filter() (repo.Filter, error) {
	flt := repo.Filter{Host: f.host, Tags: f.tags, Path: f.source}
	now := time.Now()
	for _, d := range []struct {
		name, val string
		to        *time.Time
	}{{"--before", f.before, &flt.Before}, {"--after", f.after, &flt.After}} {
		if d.val == "" {
			continue
		}
		t, err := parseWhen(d.val, now)
		if err != nil {
			return flt, usageError{fmt.Errorf("%s %w", d.name, err)}
		}
		*d.to = t
	}
	if !flt.Before.IsZero() && !flt.After.IsZero() && !flt.After.Before(flt.Before) {
		return flt, usageError{fmt.Errorf("--after %s is not before --before %s: no snapshot can match", flt.After.Local().Format(time.RFC3339), flt.Before.Local().Format(time.RFC3339))}
	}
	return flt, nil
}

// snapshots loads every snapshot; those failing verification are warned
// about and left out.
func (g *globals) snapshots(ctx context.Context, r *repo.Repository) ([]*repo.Snapshot, error) {
	return r.Snapshots(ctx, func(id string, err error) { g.warnf("%v", err) })
}

// findSnapshot resolves a SNAPSHOT argument ('latest' or an ID prefix)
// with the --host/--tag/--source filters among the snapshots of the set
// (the repository and its isolated namespaces), returns it with the
// repository that holds it, and warns when it is marked (see
// repo.Snapshot.Marks): 'latest' never picks one.
func (g *globals) findSnapshot(ctx context.Context, set *repoSet, spec string, f *filterFlags) (*repo.Repository, *repo.Snapshot, error) {
	all, in, err := g.setSnapshots(ctx, set)
	if err != nil {
		return nil, nil, err
	}
	flt, err := f.filter()
	if err != nil {
		return nil, nil, err
	}
	sn, err := repo.FindSnapshot(all, spec, flt)
	if err != nil {
		return nil, nil, err
	}
	for _, m := range sn.Marks {
		g.warnf("snapshot %s (signed by %s) %s", sn.ID.Short(), sn.Signer, m)
	}
	return in[sn], sn, nil
}

// signerKind says whether a snapshot was signed by the owner or a writer.
func signerKind(sn *repo.Snapshot) string {
	if sn.Writer == repo.OwnerWriter {
		return "owner"
	}
	return "writer"
}

type snapshotJSON struct {
	ID     string    `json:"id"`
	Short  string    `json:"short_id"`
	Time   time.Time `json:"time"`
	Host   string    `json:"host"`
	Tags   []string  `json:"tags"`
	Parent string    `json:"parent,omitempty"`
	Signer string    `json:"signer"`
	// SignerKind is "owner" or "writer"; SignerKey the signing key's
	// first 8 bytes in hex; Marks why 'latest' skips the snapshot.
	SignerKind string     `json:"signer_kind"`
	SignerKey  string     `json:"signer_key"`
	Marks      []string   `json:"marks"`
	Disks      []diskJSON `json:"disks"`
	// Quiesce says how applications were held around the copy; null
	// when nothing was asked of them.
	Quiesce *repo.Quiescing `json:"quiesce"`
	Machine *repo.Machine   `json:"machine,omitempty"`
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
	PointInTime    string           `json:"point_in_time,omitempty"`
	InUse          string           `json:"in_use,omitempty"`
	ChangeTracker  string           `json:"change_tracker,omitempty"`
	Base           string           `json:"base,omitempty"`
}

func toJSON(sn *repo.Snapshot) snapshotJSON {
	out := snapshotJSON{ID: sn.ID.String(), Short: sn.ID.Short(), Time: sn.Time, Host: sn.Host, Tags: sn.Tags, Signer: sn.Signer,
		SignerKind: signerKind(sn), SignerKey: fmt.Sprintf("%x", sn.SignerKey[:8]), Marks: sn.Marks, Quiesce: sn.Quiesce, Machine: sn.Machine}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if out.Marks == nil {
		out.Marks = []string{}
	}
	if sn.Parent != nil {
		out.Parent = sn.Parent.String()
	}
	for _, d := range sn.Disks {
		out.Disks = append(out.Disks, diskJSON{Name: d.Name, Source: d.Source, Kind: d.Kind, Size: d.Size, ChunkSize: d.ChunkSize, Stats: d.Stats,
			PartitionTable: d.PartitionTable, DiskID: d.DiskID, SectorSize: d.SectorSize, Partitions: partitionsOf(&d), PointInTime: d.PointInTime,
			InUse: d.InUse, ChangeTracker: d.ChangeTracker, Base: idString(d.Base)})
	}
	return out
}

func idString(id *repo.ID) string {
	if id == nil {
		return ""
	}
	return id.String()
}

// appsColumn says whether applications were held for the snapshot:
// "app" (application-consistent), "crash!" (asked, but not all held) or
// "-" (nothing asked of them).
func appsColumn(sn *repo.Snapshot) string {
	switch {
	case sn.Quiesce == nil:
		return "-"
	case sn.Quiesce.Consistency == "application":
		return "app"
	}
	return "crash!"
}

// copyColumn says how a disk was read: the point-in-time copy, "in use"
// when it was read torn while a filesystem on it was mounted read-write,
// "-" when it was read as it was, not in use.
func copyColumn(d *repo.Disk) string {
	switch {
	case d.PointInTime != "":
		return d.PointInTime
	case d.InUse != "":
		return "in use!"
	}
	return "-"
}

func newSnapshotsCmd(g *globals) *cobra.Command {
	var ff filterFlags
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "List snapshots",
		Long: `List the snapshots in the repository, oldest first, with the disks each
holds and who signed each: the owner, or the writer key (by its name) that
backed it up. Every manifest's signature is verified; one that fails is
reported and left out.

A snapshot marked with ! is one 'latest' never picks, for the reason given
below the table: its host is not one its writer's certificate allows, it is
dated in the future, its writer was revoked ('sauve key revoke'), or data
it holds was lost for good. Name it by its ID to restore it anyway.

The Apps column says whether applications were held still for the copy
(--writer, hooks, an agent): app (application-consistent), crash! (asked,
but one failed: crash-consistent; 'sauve show' says why) or - (nothing
asked). The Copy column says how each disk was read: from a point-in-time copy
(lvm, btrfs, reflink, qemu), as it was (-), or "in use!" when a
filesystem on it was mounted read-write while it was read with no copy,
so that its contents may be torn; 'sauve show' says where.`,
		Example: `  sauve snapshots
  sauve snapshots --host web1 --tag nightly
  sauve snapshots --json | jq -r '.[-1].id'`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, err := g.openSet(ctx, false)
			if err != nil {
				return err
			}
			all, _, err := g.setSnapshots(ctx, set)
			if err != nil {
				return err
			}
			f, err := ff.filter()
			if err != nil {
				return err
			}
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
			fmt.Fprintln(tw, "ID\tTime\tHost\tTags\tSigned by\tApps\tDisk\tSize\tCopy\tSource")
			var marked []*repo.Snapshot
			for _, sn := range list {
				id := sn.ID.Short()
				if len(sn.Marks) > 0 {
					id += " !"
					marked = append(marked, sn)
				}
				for i, d := range sn.Disks {
					id, t, h, tags, who, apps := id, sn.Time.Local().Format("2006-01-02 15:04:05"), sn.Host, strings.Join(sn.Tags, ","), sn.Signer, appsColumn(sn)
					if i > 0 {
						id, t, h, tags, who, apps = "", "", "", "", "", ""
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", id, t, h, tags, who, apps, d.Name, bytesIEC(d.Size), copyColumn(&d), d.Source)
				}
			}
			tw.Flush()
			fmt.Fprintf(g.stdout, "%d snapshots\n", len(list))
			for _, sn := range marked {
				for _, m := range sn.Marks {
					fmt.Fprintf(g.stdout, "! %s %s\n", sn.ID.Short(), m)
				}
			}
			return nil
		},
	}
	ff.add(cmd)
	return cmd
}
