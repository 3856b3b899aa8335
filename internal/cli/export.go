package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func newExportCmd(g *globals) *cobra.Command {
	var (
		o        outFlags
		ff       filterFlags
		diskName string
		skipFree bool
	)
	cmd := &cobra.Command{
		Use:   "export SNAPSHOT OUTPUT",
		Short: "Write a disk of a snapshot as a VM disk image (raw, qcow2, vmdk, vhd, vhdx, vdi, ova)",
		Long: `Export a disk of SNAPSHOT (an ID prefix, or 'latest' with optional --host
and --tag filters) straight from the repository into a VM disk image: a
backed-up machine becomes a virtual machine without restoring it first (P2V).

OUTPUT's format is --format, or guessed from its extension (.img .qcow2
.vmdk .vhd .vhdx .vdi .ova); see 'sauve convert --help' for the formats and
their subformats. Zero chunks stay unallocated in the output; --size grows
the virtual disk. Every chunk is verified against its ID as it is read.

With --skip-free, the partition table and filesystems of the snapshot's
disk are read (from the snapshot, as 'sauve convert --skip-free' reads a
device) and the blocks the filesystems mark free are neither read nor
written: the output holds the same files, and free space reads as zeros.
A backup leaves free space out already, unless it was made with
--no-fs-skip or a filesystem was mounted read-write while it ran (then
imaged in full): --skip-free makes such snapshots export small.

OUTPUT is written under a temporary name and renamed into place when
complete; an existing OUTPUT is refused unless --force.`,
		Example: `  sauve export latest --host web1 /srv/vm/web1.qcow2
  sauve export 1a2b3c4d web1.vmdk --size 100G
  sauve export latest web1.vhdx --skip-free
  sauve export latest web1.ova --cpus 2 --memory 4G --controller scsi`,
		Args: exactArgs(2, "SNAPSHOT and OUTPUT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			start := time.Now()
			r, sn, d, err := g.openDisk(ctx, "export", args[0], &ff, diskName)
			if err != nil {
				return err
			}
			opts, err := o.resolve(args[1], d.Size, cmd.Flags())
			if err != nil {
				return err
			}
			fail := func(err error) error {
				return fmt.Errorf("export of snapshot %s to %s: %w", sn.ID.Short(), args[1], err)
			}
			// A copy reads in order, once: the cache only holds what is read
			// ahead, a few runs per CPU.
			dr, err := r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: exportCache, ReadAhead: exportCache / 2, Warn: g.warnf})
			if err != nil {
				return fail(err)
			}
			defer dr.Close()
			var m extent.Map = dr
			var layout *source.Layout
			if skipFree {
				// The disk's partitions and filesystems, read through the
				// reader within the chunks the snapshot stores.
				sd := source.Stored(fmt.Sprintf("disk %s of snapshot %s", d.Name, sn.ID.Short()), dr, d.Size, d.SectorSize, dr)
				if layout, err = sd.Map(source.MapOptions{Warn: g.warn}); err != nil {
					return fail(err)
				}
				m = layout.Map()
			}
			prog := new(vdisk.Progress)
			data, err := g.writeImage(ctx, args[1], o.force, opts, "export "+d.Name, prog.Done.Load, func(w vdisk.Writer) error {
				return vdisk.Copy(ctx, w, dr, m, d.Size, prog)
			})
			if err != nil {
				return fail(err)
			}
			fetched := dr.Stats().BytesFetched
			fields := map[string]any{"snapshot": sn.ID.String(), "disk": d.Name, "disk_size": d.Size, "bytes_fetched": fetched}
			if layout != nil {
				layout.WarnLate()
				fields["bytes_skipped"] = layout.Skipped()
				g.printf("free space of the filesystems left unallocated: %s\n", bytesIEC(layout.Skipped()))
			}
			return g.writeResult(fmt.Sprintf("snapshot %s (%s, %s)", sn.ID.Short(), d.Name, bytesIEC(d.Size)),
				fields, opts, args[1], data, fetched, time.Since(start).Seconds())
		},
	}
	o.add(cmd)
	ff.add(cmd)
	cmd.Flags().StringVar(&diskName, "disk", "", "which disk of a multi-disk snapshot")
	cmd.Flags().BoolVar(&skipFree, "skip-free", false, "leave the free space of ext2/3/4, XFS, NTFS, FAT and swap in the snapshot's disk unallocated (it reads as zeros)")
	return cmd
}

// exportCache is the export reader's cache budget.
const exportCache = 32 << 20
