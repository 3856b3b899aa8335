package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/resize"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func addMigrateGrowFlags(cmd *cobra.Command, o *migrateOptions) {
	cmd.Flags().Func("size", "TARGET's `SIZE` (e.g. 100G, larger than SOURCE; a new file or VM image is made this size, a device must have it): --final then moves a GPT's backup to its end, and --grow-last-partition, --grow-fs grow the last partition and its filesystem", func(v string) error {
		n, err := parseSize(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("want a size such as 100G")
		}
		o.size = n
		return nil
	})
	o.grow.add(cmd.Flags())
}

// checkMigrateGrow refuses growth where it cannot be done, before any
// pass: it is done once, after the final pass (every pass rewrites the
// partition table from SOURCE); a remote target is not grown, and a VM
// image's filesystem is not either.
func checkMigrateGrow(tgtPath string, o *migrateOptions) error {
	if err := o.grow.check(); err != nil {
		return err
	}
	growing := o.grow.lastPartition || o.grow.fs
	if growing && !o.final {
		return usageError{errors.New("--grow-last-partition and --grow-fs apply after the final pass: add --final")}
	}
	kind := migrationTargetKind(tgtPath)
	if (growing || o.size > 0) && kind.remote() {
		return usageError{fmt.Errorf("target %s: --size and growing apply to local targets (raw files, block devices, VM images) for now: grow the remote disk there after the final pass", tgtPath)}
	}
	if o.grow.fs && kind.name != "raw" {
		// resize2fs and xfs_growfs need the filesystem as a block
		// device, which a VM image is only through qemu-nbd and the
		// nbd module: not worth a migration's dependency.
		return usageError{fmt.Errorf("--grow-fs on the %s target %s: growing a filesystem needs the kernel; grow it inside the VM (resize2fs, xfs_growfs), or migrate into a raw target (--grow-last-partition alone grows the partition here)", kind.name, tgtPath)}
	}
	return nil
}

// growMigrated fixes the partition table of a target larger than SOURCE
// after the final pass, and grows its last partition (and, on a raw
// target, its filesystem) when asked. The state no longer describes the
// target then: it is removed, and a later pass copies everything again.
func (g *globals) growMigrated(ctx context.Context, m *migration) error {
	if m.o.size == 0 && !m.o.grow.lastPartition && !m.o.grow.fs {
		return nil // not asked: the target stays as the passes keep it
	}
	if m.target.Size() <= m.disk.Size {
		if m.o.grow.lastPartition {
			g.warnf("%s is not larger than %s: no partition to grow", m.target.Path(), m.src.Path)
		}
		return nil
	}
	if err := m.target.Sync(); err != nil {
		return err
	}
	var out map[string]any
	var err error
	if it, ok := m.target.(*imageTarget); ok {
		out, err = g.growImage(it, m.disk.Size, m.o.grow)
	} else {
		out, err = g.growDisk(ctx, m.target.Path(), m.disk.Size, m.o.grow)
	}
	if err != nil || out == nil {
		return err
	}
	m.grown = out
	state := m.state.Path()
	if err := m.state.Close(); err != nil {
		return err
	}
	for _, p := range []string{state, state + ".journal"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the state of the grown target: %w", err)
		}
	}
	g.printf("  the target no longer matches the passes' state (%s removed): a later pass copies everything again\n", state)
	return nil
}

// growImage fixes the partition table of the disk of oldSize bytes at the
// start of a VM image target, synced: the table is read through the
// format's reader (the updaters only write) and patched through the
// updater, which keeps the image valid. A table resize refuses is left as
// it is, with a warning, unless --grow-last-partition asked for more.
func (g *globals) growImage(t *imageTarget, oldSize int64, f growFlags) (map[string]any, error) {
	fi, err := t.f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", t.path, err)
	}
	img, err := vdisk.Open(t.f, fi.Size(), t.path, nil)
	if err != nil {
		return nil, fmt.Errorf("read back %s to fix its partition table: %w", t.path, err)
	}
	defer img.Close()
	newSize := t.Size()
	res, err := resize.Plan(img, oldSize, newSize, resize.Options{GrowLastPartition: f.lastPartition})
	if err != nil {
		if f.lastPartition || !errors.Is(err, resize.ErrRefused) {
			return nil, fmt.Errorf("fix the partition table for the larger %s (left as migrated): %w", t.path, err)
		}
		g.warnf("the partition table of %s is left as migrated (its backup GPT, if any, not at the end): %v", t.path, err)
		return nil, nil
	}
	for _, p := range res.Patches {
		if _, err := t.WriteAt(p.Data, p.Off); err != nil {
			return nil, fmt.Errorf("write the partition table of %s at byte %d: %w", t.path, p.Off, err)
		}
	}
	if err := t.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", t.path, err)
	}
	out := map[string]any{"target_size": newSize, "partition_table": res.Kind}
	if res.Kind == "gpt" && len(res.Patches) > 0 {
		g.printf("  moved the backup GPT to the end of %s (%s)\n", t.path, bytesIEC(newSize))
	}
	if gr := res.Grown; gr != nil {
		out["grown_partition"], out["partition_size"] = gr.Number, gr.NewSize
		g.printf("  grew partition %d from %s to %s\n", gr.Number, bytesIEC(gr.OldSize), bytesIEC(gr.NewSize))
	}
	return out, nil
}
