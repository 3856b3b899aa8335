package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"

	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/resize"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

// growFlags are the flags of restore and export that say what to do with
// the room a larger target has past the disk.
type growFlags struct {
	lastPartition bool
	fs            bool
}

func (f *growFlags) add(fs *pflag.FlagSet) {
	fs.BoolVar(&f.lastPartition, "grow-last-partition", false, "on a target larger than the disk, grow the partition that ends last to the end of the target")
	fs.BoolVar(&f.fs, "grow-fs", false, "with --grow-last-partition, grow its ext2/3/4 or XFS filesystem too (raw file or device targets; needs root, resize2fs or xfs_growfs)")
}

func (f growFlags) check() error {
	if f.fs && !f.lastPartition {
		return usageError{errors.New("--grow-fs grows the filesystem of the partition --grow-last-partition grows: give both")}
	}
	return nil
}

// keepSize is the size a restore leaves its target at. An existing file
// is cut to the disk's size, so that it ends equal to the disk, unless
// --grow-last-partition says the room past the disk is for it.
func keepSize(job restoreJob, t *restoreTarget) int64 {
	if job.grow.lastPartition && job.only == nil && !t.Created && t.Kind == disk.File && t.Size > job.target.Size {
		return t.Size
	}
	return job.target.Size
}

// growRestored fixes the partition table of a whole disk restored onto a
// larger target (see growDisk).
func (g *globals) growRestored(ctx context.Context, job restoreJob, t *restoreTarget, f growFlags) (map[string]any, error) {
	if job.only != nil || t.Created {
		// A new file is made the disk's size: there is no room to fix.
		if f.lastPartition && t.Created {
			g.warnf("a new file is made the size of the disk: no partition to grow (make the target file larger first, e.g. with truncate -s)")
		}
		return nil, nil
	}
	return g.growDisk(ctx, t.Path, job.disk.Size, f)
}

// growDisk fixes the partition table of the disk of oldSize bytes written
// at the start of the larger file or device at path: a GPT's backup
// always moves to the end (one left inside the disk is a defect fdisk and
// gdisk report); the last partition and its filesystem grow on request.
// A table resize refuses is left as it was written. It returns what it
// did for --json, nil when the target is not larger.
func (g *globals) growDisk(ctx context.Context, path string, oldSize int64, f growFlags) (map[string]any, error) {
	file, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	newSize, err := file.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("size of %s: %w", path, err)
	}
	if newSize <= oldSize {
		if f.lastPartition {
			g.warnf("%s is not larger than the disk: no partition to grow", path)
		}
		return nil, nil
	}
	fi, err := file.Stat()
	if err != nil {
		return nil, err
	}
	device := fi.Mode()&os.ModeDevice != 0
	ss := 0
	if device {
		ss = disk.SectorSize(file)
	}
	res, err := resize.Apply(file, oldSize, newSize, resize.Options{GrowLastPartition: f.lastPartition, SectorSize: ss})
	if err != nil {
		return nil, fmt.Errorf("fix the partition table for the larger %s (left as restored): %w", path, err)
	}
	if err := file.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", path, err)
	}
	out := map[string]any{"target_size": newSize, "partition_table": res.Kind}
	if res.Kind == "gpt" && len(res.Patches) > 0 {
		g.printf("  moved the backup GPT to the end of %s (%s)\n", path, bytesIEC(newSize))
	}
	if res.Grown == nil {
		return out, nil
	}
	gr := res.Grown
	out["grown_partition"], out["partition_size"] = gr.Number, gr.NewSize
	g.printf("  grew partition %d from %s to %s\n", gr.Number, bytesIEC(gr.OldSize), bytesIEC(gr.NewSize))
	if device {
		// Best effort: the kernel's view of the partitions is stale
		// until it re-reads the table, which a busy device refuses.
		if err := exec.CommandContext(ctx, "partx", "-u", path).Run(); err != nil {
			g.warnf("the kernel still sees the old partition sizes of %s (partx -u: %v)", path, err)
		}
	}
	if !f.fs {
		return out, nil
	}
	if err := file.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", path, err)
	}
	fs, err := resize.GrowFS(ctx, path, *gr)
	if err != nil {
		return nil, fmt.Errorf("grow the filesystem of partition %d of %s (the partition is grown): %w", gr.Number, path, err)
	}
	out["grown_fs"] = fs
	g.printf("  grew its %s filesystem\n", fs)
	return out, nil
}

// checkExportGrow refuses --grow-fs on an export it cannot apply to: the
// filesystem tools need the image as a raw file.
func checkExportGrow(opts vdisk.Options, f growFlags) error {
	if opts.Format != vdisk.Raw && f.fs {
		return usageError{fmt.Errorf("--grow-fs works on raw exports only (not %s): export raw, or grow the filesystem in the machine", opts.Format)}
	}
	return nil
}

// streamGrow plans the partition table patches of a VM format export
// larger than the disk: those formats are written front to back, so the
// patches go into the stream (resize.Overlay) instead of being applied
// afterwards as for raw. It returns nil when there is nothing to patch. A
// table the automatic GPT move refuses is exported as it is, with a
// warning; with --grow-last-partition the refusal is an error.
func (g *globals) streamGrow(dr io.ReaderAt, d *repo.Disk, opts vdisk.Options, f growFlags) (*resize.Result, error) {
	if opts.Format == vdisk.Raw || opts.Size <= d.Size {
		return nil, nil
	}
	res, err := resize.Plan(dr, d.Size, opts.Size, resize.Options{GrowLastPartition: f.lastPartition, SectorSize: d.SectorSize})
	if err != nil {
		if f.lastPartition || !errors.Is(err, resize.ErrRefused) {
			return nil, fmt.Errorf("fix the partition table for the larger image: %w", err)
		}
		g.warnf("the partition table is exported as it is (its backup GPT, if any, not at the end): %v", err)
		return nil, nil
	}
	if len(res.Patches) == 0 {
		return nil, nil
	}
	if res.Kind == "gpt" {
		g.printf("  moving the backup GPT to the end of the %s image\n", opts.Format)
	}
	if gr := res.Grown; gr != nil {
		g.printf("  growing partition %d from %s to %s\n", gr.Number, bytesIEC(gr.OldSize), bytesIEC(gr.NewSize))
	}
	return res, nil
}
