package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func addMigrateGrowFlags(cmd *cobra.Command, o *migrateOptions) {
	cmd.Flags().Func("size", "the raw TARGET's `SIZE` (e.g. 100G, larger than SOURCE; a new file is made this size, a device must have it): --final then moves a GPT's backup to its end, and --grow-last-partition, --grow-fs grow the last partition and its filesystem", func(v string) error {
		n, err := parseSize(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("want a size such as 100G")
		}
		o.size = n
		return nil
	})
	o.grow.add(cmd.Flags())
}

// checkMigrateGrow refuses growth where it cannot be done: it is done
// once, after the final pass (every pass rewrites the partition table
// from SOURCE), and on raw targets only.
func checkMigrateGrow(tgtPath string, o *migrateOptions) error {
	if err := o.grow.check(); err != nil {
		return err
	}
	growing := o.grow.lastPartition || o.grow.fs
	if growing && !o.final {
		return usageError{errors.New("--grow-last-partition and --grow-fs apply after the final pass: add --final")}
	}
	if (growing || o.size > 0) && migrationTargetKind(tgtPath).name != "raw" {
		return usageError{fmt.Errorf("target %s: --size and growing apply to raw image files and block devices for now (grow a VM image with qemu-img resize after the final pass)", tgtPath)}
	}
	return nil
}

// growMigrated fixes the partition table of a raw target larger than
// SOURCE after the final pass, and grows its last partition and
// filesystem when asked. The state no longer describes the target then:
// it is removed, and a later pass copies everything again.
func (g *globals) growMigrated(ctx context.Context, m *migration) error {
	if m.o.size == 0 && !m.o.grow.lastPartition && !m.o.grow.fs {
		return nil // not asked: the target stays as the passes keep it
	}
	if m.target.Size() <= m.disk.Size || migrationTargetKind(m.target.Path()).name != "raw" {
		if m.o.grow.lastPartition {
			g.warnf("%s is not larger than %s: no partition to grow", m.target.Path(), m.src.Path)
		}
		return nil
	}
	if err := m.target.Sync(); err != nil {
		return err
	}
	out, err := g.growDisk(ctx, m.target.Path(), m.disk.Size, m.o.grow)
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
