package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/resize"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func newExportCmd(g *globals) *cobra.Command {
	var (
		o        outFlags
		ff       filterFlags
		diskName string
		skipFree bool
		grow     growFlags
	)
	cmd := &cobra.Command{
		Use:   "export SNAPSHOT OUTPUT",
		Short: "Write a disk of a snapshot as a VM disk image (raw, qcow2, vmdk, vhd, vhdx, vdi, ova)",
		Long: `Export a disk of SNAPSHOT (an ID prefix, or 'latest' with optional --host,
--tag, --before and --after filters) straight from the repository into a VM disk image: a
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
complete; an existing OUTPUT is refused unless --force.

A snapshot of several disks exports them all into the folder OUTPUT, one
image per disk named after it, in the --format given; --disk NAME exports
one.

An OUTPUT larger than the disk (--size) gets its GPT's backup moved to
the end, as 'sgdisk -e' does; --grow-last-partition grows the partition
that ends last (GPT or MBR) and, for raw OUTPUT only, --grow-fs its
ext2/3/4 or XFS filesystem (root; resize2fs or xfs_growfs).`,
		Example: `  sauve export latest --host web1 /srv/vm/web1.qcow2
  sauve export 1a2b3c4d web1.vmdk --size 100G
  sauve export latest web1.img --size 100G --grow-last-partition --grow-fs
  sauve export latest web1.vhdx --skip-free
  sauve export latest web1.ova --cpus 2 --memory 4G --controller scsi
  sauve export latest --host vm1 /srv/vm/vm1/ --format qcow2   # every disk of the snapshot`,
		Args: exactArgs(2, "SNAPSHOT and OUTPUT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if err := grow.check(); err != nil {
				return err
			}
			r, sn, disks, err := g.openDisks(ctx, "export", args[0], &ff, diskName)
			if err != nil {
				return err
			}
			outputs, err := exportOutputs(sn, disks, args[1], o.format)
			if err != nil {
				return err
			}
			for i, d := range disks {
				if err := g.exportDisk(ctx, r, sn, d, outputs[i], &o, cmd.Flags(), skipFree, grow); err != nil {
					return err
				}
			}
			return nil
		},
	}
	o.add(cmd)
	ff.add(cmd)
	ff.addDates(cmd)
	cmd.Flags().StringVar(&diskName, "disk", "", "export only this disk of a multi-disk snapshot")
	grow.add(cmd.Flags())
	cmd.Flags().BoolVar(&skipFree, "skip-free", false, "leave the free space of ext2/3/4, XFS, NTFS, FAT and swap in the snapshot's disk unallocated (it reads as zeros)")
	return cmd
}

// exportOutputs names the image each disk is exported to: OUTPUT for
// one disk; for several, a file per disk in the folder OUTPUT (made if
// missing), named after the disk with --format's extension.
func exportOutputs(sn *repo.Snapshot, disks []*repo.Disk, output, format string) ([]string, error) {
	if len(disks) == 1 {
		return []string{output}, nil
	}
	if format == "" || format == vdisk.OVA {
		return nil, usageError{fmt.Errorf("snapshot %s holds %d disks (%s): export them into a folder with --format (raw, qcow2, vmdk, vhd, vhdx, vdi), or one with --disk NAME", sn.ID.Short(), len(disks), diskNames(disks))}
	}
	if fi, err := os.Stat(output); err == nil && !fi.IsDir() {
		return nil, usageError{fmt.Errorf("snapshot %s holds %d disks: %s is a file, not a folder to export them into (or choose one with --disk NAME)", sn.ID.Short(), len(disks), output)}
	}
	if err := os.MkdirAll(output, 0o755); err != nil {
		return nil, fmt.Errorf("export of snapshot %s: %w", sn.ID.Short(), err)
	}
	ext := format
	if format == vdisk.Raw {
		ext = "img"
	}
	out := make([]string, len(disks))
	for i, d := range disks {
		out[i] = filepath.Join(output, diskFileName(d.Name)+"."+ext)
	}
	return out, nil
}

// exportDisk writes disk d of sn to output.
func (g *globals) exportDisk(ctx context.Context, r *repo.Repository, sn *repo.Snapshot, d *repo.Disk, output string, o *outFlags, flags *pflag.FlagSet, skipFree bool, grow growFlags) error {
	start := time.Now()
	opts, err := o.resolve(output, d.Size, flags)
	if err != nil {
		return err
	}
	if opts.Format == vdisk.OVA {
		machineDefaults(&opts.OVA, sn.Machine, d.Name, flags)
	}
	if err := checkExportGrow(opts, grow); err != nil {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("export of snapshot %s to %s: %w", sn.ID.Short(), output, err)
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
	var src io.ReaderAt = dr
	copySize := d.Size
	grown, err := g.streamGrow(dr, d, opts, grow)
	if err != nil {
		return fail(err)
	}
	if grown != nil {
		src, m = resize.Overlay(dr, m, d.Size, grown.Patches)
		copySize = opts.Size
	}
	prog := new(vdisk.Progress)
	data, err := g.writeImage(ctx, output, o.force, opts, "export "+d.Name, prog.Done.Load, func(w vdisk.Writer) error {
		return vdisk.Copy(ctx, w, src, m, copySize, prog)
	})
	if err != nil {
		return fail(err)
	}
	fetched := dr.Stats().BytesFetched
	fields := map[string]any{"snapshot": sn.ID.String(), "disk": d.Name, "disk_size": d.Size, "bytes_fetched": fetched}
	if opts.Format == vdisk.Raw && opts.Size > d.Size {
		grown, err := g.growDisk(ctx, output, d.Size, grow)
		if err != nil {
			return fail(err)
		}
		fields["resize"] = grown
	}
	if layout != nil {
		layout.WarnLate()
		fields["bytes_skipped"] = layout.Skipped()
		g.printf("free space of the filesystems left unallocated: %s\n", bytesIEC(layout.Skipped()))
	}
	return g.writeResult(fmt.Sprintf("snapshot %s (%s, %s)", sn.ID.Short(), d.Name, bytesIEC(d.Size)),
		fields, opts, output, data, fetched, time.Since(start).Seconds())
}

// exportCache is the export reader's cache budget.
const exportCache = 32 << 20
