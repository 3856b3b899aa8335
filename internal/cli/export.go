package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/restore"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func newExportCmd(g *globals) *cobra.Command {
	var (
		o        outFlags
		ff       filterFlags
		diskName string
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

OUTPUT is written under a temporary name and renamed into place when
complete; an existing OUTPUT is refused unless --force.`,
		Example: `  sauve export latest --host web1 /srv/vm/web1.qcow2
  sauve export 1a2b3c4d web1.vmdk --size 100G
  sauve export latest web1.vhdx
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
			prog := new(restore.Progress)
			var res *restore.Result
			data, err := g.writeImage(ctx, args[1], o.force, opts, "export "+d.Name, prog.Done.Load, func(w vdisk.Writer) error {
				var err error
				res, err = restore.Each(ctx, r, d, restore.Options{Progress: prog, Warn: g.warnf}, func(off, n int64, data []byte) error {
					if data == nil {
						return nil
					}
					_, err := w.WriteAt(data, off)
					return err
				})
				return err
			})
			if err != nil {
				return fmt.Errorf("export of snapshot %s to %s: %w", sn.ID.Short(), args[1], err)
			}
			return g.writeResult(fmt.Sprintf("snapshot %s (%s, %s)", sn.ID.Short(), d.Name, bytesIEC(d.Size)),
				map[string]any{"snapshot": sn.ID.String(), "disk": d.Name, "disk_size": d.Size, "bytes_fetched": res.BytesFetched},
				opts, args[1], data, res.BytesFetched, time.Since(start).Seconds())
		},
	}
	o.add(cmd)
	ff.add(cmd)
	cmd.Flags().StringVar(&diskName, "disk", "", "which disk of a multi-disk snapshot")
	return cmd
}
