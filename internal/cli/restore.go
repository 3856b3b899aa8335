package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/restore"
)

func newRestoreCmd(g *globals) *cobra.Command {
	var (
		ff       filterFlags
		delta    bool
		force    bool
		diskName string
		bootOnly bool
		grow     growFlags
	)
	cmd := &cobra.Command{
		Use:   "restore SNAPSHOT[:PART] TARGET...",
		Short: "Restore a disk from a snapshot to a file, a device or stdout",
		Long: `Restore a disk of SNAPSHOT (an ID prefix, or 'latest' with optional --host,
--source and --tag filters) to TARGET. A snapshot of several disks
restores them all: into a folder (each disk a file named after it), or
onto one TARGET per disk in the snapshot's order; --disk NAME restores
one. TARGET is:

  a new file     written sparse (zero chunks stay holes) under a temporary
                 name beside TARGET, renamed into place once complete: a
                 failed or interrupted restore leaves nothing under TARGET
  an existing    written in place, every byte made equal to the snapshot
  file/device    (zeros written or punched where needed); a file is cut to
                 the image's size, unless --grow-last-partition
  -              the raw image on standard output, zeros included

With --delta, the target is read and hashed first and only the chunks that
differ are fetched and written: a fast rollback, or the last pass of a
migration. Every chunk is verified against its ID before it is written.

Refused, with nothing written: a device smaller than the image, and a
target that a mounted filesystem uses (mounted itself, a partition of it
mounted, or the backing file or device of a mounted loop device, through
any chain of loop devices and partitions).

An existing target that holds a partition table or filesystem other than
the snapshot's own (another disk ID, MBR signature or filesystem UUID than
the snapshot recorded) is another disk's data: on a terminal sauve asks
before overwriting it, otherwise it needs --force. Rolling a disk back
onto itself, and a target holding nothing sauve recognises (zeros, random
bytes), need neither.

'latest' is the newest snapshot of one machine's disk: when the snapshots
that match are of several hosts or sources, restore lists them and asks for
--host and --source, so that one machine's disk is never written with
another's. --before and --after select by date ('latest --before
2026-11-30' is the newest snapshot dated before that day, local time;
--after 3d the snapshots of the last three days). It skips snapshots marked in 'sauve snapshots' (a host outside
its writer's certificate, a date in the future, a revoked writer).
Every chunk is read from the copy its snapshot's writer stored, else from
any other copy that verifies.

SNAPSHOT:PART restores one partition alone (a number, or a label or GPT
name, as in 'sauve ls') onto a partition, a device or a file of its own,
as 'ntfsclone --restore-image' would: only that partition's chunks are
fetched, the target must hold its size, and --delta works as for disks.
--boot-only restores the boot areas of a partitioned disk in place and
nothing else: the MBR or the GPT (protective MBR, header, entries and the
backup at the end), the gaps between partitions (boot loaders such as
GRUB's core image, EBRs) and BIOS boot partitions, what 'dd' of the first
sectors saved before; the partitions' contents are left as they are.

On a device larger than the disk, a GPT's backup header and entry array
are moved to the end of the device (as 'sgdisk -e' does) and the
protective MBR made to cover it. --grow-last-partition (a device, or an
existing file that then keeps its larger size) also grows the partition
that ends last (GPT or MBR, never moving a partition), and --grow-fs its
ext2/3/4 or XFS filesystem (root; resize2fs or xfs_growfs). A damaged
table is refused and left as restored.`,
		Example: `  sauve restore latest /var/tmp/vda.img
  sauve restore 1a2b3c4d /dev/vdb
  sauve restore latest --host web1 /dev/vda --delta
  sauve restore latest /dev/sdb --force       # /dev/sdb holds another disk: overwrite it
  sauve restore latest --host vm1 /dev/vdc /dev/vdd   # a snapshot of two disks
  sauve restore latest --host vm1 --disk vdb /var/tmp/vdb.img
  sauve restore latest - | qemu-img convert -f raw -O qcow2 /dev/stdin web.qcow2
  sauve restore latest:2 /dev/sda2                   # partition 2 alone
  sauve restore latest:root /var/tmp/root.img        # the partition labelled root
  sauve restore latest --boot-only /dev/sda          # MBR/GPT and boot loader only
  sauve restore latest /dev/sdb --grow-last-partition --grow-fs  # onto a larger disk`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError{fmt.Errorf("%s: expects SNAPSHOT and TARGET (or a folder, or one TARGET per disk)", cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			spec := parseFileSpec(args[0])
			if err := grow.check(); err != nil {
				return err
			}
			if (spec.hasPart || bootOnly) && grow.lastPartition {
				return usageError{errors.New("--grow-last-partition grows a whole disk's last partition: not with SNAPSHOT:PART or --boot-only")}
			}
			if spec.hasPart && (spec.path != "/" || bootOnly) {
				return usageError{fmt.Errorf("%s: SNAPSHOT:PART restores a partition whole: no PATH (see 'sauve get'), no --boot-only", args[0])}
			}
			r, sn, disks, err := g.openDisks(ctx, "restore", spec.snap, &ff, diskName)
			if err != nil {
				return err
			}
			if spec.hasPart || bootOnly {
				if len(disks) != 1 || len(args) != 2 {
					return usageError{fmt.Errorf("a partition or the boot areas are restored from one disk onto one TARGET: choose the disk with --disk (snapshot %s holds %s)", sn.ID.Short(), diskNames(disks))}
				}
				job, err := partialJob(sn, disks[0], spec, bootOnly)
				if err != nil {
					return err
				}
				res, err := g.restoreDisk(ctx, r, sn, job, args[1], delta, force)
				if err != nil {
					return err
				}
				return g.maybeJSON(res)
			}
			targets, err := restoreTargets(sn, disks, args[1:])
			if err != nil {
				return err
			}
			var results []any
			for i, d := range disks {
				job := wholeDisk(d)
				job.grow = grow
				res, err := g.restoreDisk(ctx, r, sn, job, targets[i], delta, force)
				if err != nil {
					return err
				}
				results = append(results, res)
			}
			if len(results) == 1 {
				return g.maybeJSON(results[0])
			}
			return g.maybeJSON(map[string]any{"snapshot": sn.ID.String(), "disks": results})
		},
	}
	ff.add(cmd)
	ff.addDates(cmd)
	cmd.Flags().BoolVar(&delta, "delta", false, "read the target and write only the chunks that differ")
	cmd.Flags().BoolVarP(&force, "force", "f", false, "overwrite a target that holds another disk's partition table or filesystem")
	cmd.Flags().StringVar(&diskName, "disk", "", "restore only this disk of a multi-disk snapshot")
	cmd.Flags().BoolVar(&bootOnly, "boot-only", false, "restore only the partition table, boot code and gaps between partitions, in place")
	grow.add(cmd.Flags())
	return cmd
}

func (g *globals) maybeJSON(v any) error {
	if g.json {
		return g.printJSON(v)
	}
	return nil
}

// restoreTargets pairs the disks to restore with their targets: one
// TARGET for one disk; for several, one TARGET per disk in the
// snapshot's order, or one existing folder that receives each disk as a
// file named after it.
func restoreTargets(sn *repo.Snapshot, disks []*repo.Disk, args []string) ([]string, error) {
	if len(disks) == 1 {
		if len(args) != 1 {
			return nil, usageError{fmt.Errorf("one disk (%s) to restore: give one TARGET, not %d", disks[0].Name, len(args))}
		}
		return args, nil
	}
	for _, a := range args {
		if a == "-" {
			return nil, usageError{fmt.Errorf("snapshot %s holds %d disks: stdout takes one (choose it with --disk)", sn.ID.Short(), len(disks))}
		}
	}
	if len(args) == len(disks) {
		return args, nil
	}
	if len(args) == 1 {
		if fi, err := os.Stat(args[0]); err == nil && fi.IsDir() {
			out := make([]string, len(disks))
			for i, d := range disks {
				out[i] = filepath.Join(args[0], diskFileName(d.Name))
			}
			return out, nil
		}
	}
	return nil, usageError{fmt.Errorf("snapshot %s holds %d disks (%s): give a folder, one TARGET per disk in that order, or --disk NAME", sn.ID.Short(), len(disks), diskNames(disks))}
}

// diskFileName is the file a disk is restored or exported to in a
// folder: its name, with path separators replaced.
func diskFileName(name string) string {
	name = strings.NewReplacer("/", "_", "\\", "_").Replace(name)
	if name == "" || name == "." || name == ".." {
		name = "disk"
	}
	return name
}

func diskNames(disks []*repo.Disk) string {
	names := make([]string, len(disks))
	for i, d := range disks {
		names[i] = d.Name
	}
	return strings.Join(names, ", ")
}

// restoreDisk restores a disk of sn, or the part of it job says, to
// target and says what it did; it returns the --json result.
func (g *globals) restoreDisk(ctx context.Context, r *repo.Repository, sn *repo.Snapshot, job restoreJob, target string, delta, force bool) (map[string]any, error) {
	d := job.disk
	if target == "-" && job.only != nil {
		return nil, usageError{fmt.Errorf("restore of %s needs a file or device target, not stdout", job.what)}
	}
	if target == "-" {
		if delta {
			return nil, usageError{errors.New("--delta needs a file or device target, not stdout")}
		}
		if job.grow.lastPartition {
			return nil, usageError{errors.New("--grow-last-partition needs a file or device target, not stdout")}
		}
		if term.IsTerminal(int(os.Stdout.Fd())) {
			return nil, usageError{errors.New("refusing to write a disk image to a terminal: redirect stdout")}
		}
	}
	var t *restoreTarget
	var err error
	if target != "-" {
		// Before the progress bar starts: this may ask the user.
		if t, err = openRestoreTarget(target, job.target, overwriteCheck{force: force, confirm: g.terminalConfirm(ctx)}); err != nil {
			return nil, fmt.Errorf("restore of snapshot %s to %s: %w", sn.ID.Short(), target, err)
		}
	}
	prog := new(restore.Progress)
	prog.Total.Store(d.Size)
	m := startMeter(g.stderr, g.showProgress(), meterSource{
		label: "restore " + job.what, total: prog.Total.Load, current: prog.Done.Load,
		extra: func() string { return "written " + bytesIEC(prog.Written.Load()) },
	})
	var res *restore.Result
	if target == "-" {
		res, err = restore.ToStream(ctx, r, d, os.Stdout, restore.Options{Progress: prog, Warn: g.warnf})
	} else {
		res, err = restoreToTarget(ctx, r, job, t, delta, prog, g.warnf)
	}
	m.Stop()
	if err != nil {
		return nil, fmt.Errorf("restore of snapshot %s to %s: %w", sn.ID.Short(), target, err)
	}
	g.printRestore(sn, job, target, delta, res)
	var grown map[string]any
	if t != nil {
		if grown, err = g.growRestored(ctx, job, t, job.grow); err != nil {
			return nil, fmt.Errorf("restore of snapshot %s to %s: %w", sn.ID.Short(), target, err)
		}
	}
	out := map[string]any{
		"snapshot": sn.ID.String(), "disk": d.Name, "target": target, "delta": delta,
		"size": job.target.Size, "bytes_written": res.BytesWritten, "bytes_fetched": res.BytesFetched,
		"chunks_written": res.ChunksWritten, "chunks_unchanged": res.ChunksSame, "chunks_zero": res.ChunksZero,
		"seconds": res.Seconds,
	}
	if grown != nil {
		out["resize"] = grown
	}
	if job.partition != nil {
		out["partition"] = job.partition.Number
	}
	if job.only != nil && job.partition == nil {
		out["boot_only"] = true
	}
	return out, nil
}

func (g *globals) printRestore(sn *repo.Snapshot, job restoreJob, target string, delta bool, res *restore.Result) {
	d := job.disk
	if g.json {
		return
	}
	if target == "-" {
		if !g.quiet {
			fmt.Fprintf(g.stderr, "restored snapshot %s (%s, %s) to stdout in %s\n", sn.ID.Short(), d.Name, bytesIEC(d.Size), seconds(res.Seconds))
		}
		return
	}
	g.printf("restored snapshot %s (%s, %s, host %s, signed by %s) to %s\n", sn.ID.Short(), job.what, bytesIEC(job.target.Size), sn.Host, sn.Signer, target)
	if delta {
		g.printf("  delta: %d chunks unchanged, %d written, %s written in all\n", res.ChunksSame, res.ChunksWritten, bytesIEC(res.BytesWritten))
	} else {
		g.printf("  wrote %s (%d chunks, %d zero), fetched %s\n", bytesIEC(res.BytesWritten), res.ChunksWritten, res.ChunksZero, bytesIEC(res.BytesFetched))
	}
	g.printf("  took %s (%s)\n", seconds(res.Seconds), rate(job.size(), res.Seconds))
}

// openDisks is openDisk for commands that take every disk of a snapshot
// when name is empty.
func (g *globals) openDisks(ctx context.Context, what, spec string, ff *filterFlags, name string) (*repo.Repository, *repo.Snapshot, []*repo.Disk, error) {
	r, sn, err := g.openSnapshotData(ctx, what, spec, ff)
	if err != nil {
		return nil, nil, nil, err
	}
	if name != "" {
		d, err := pickDisk(sn, name)
		if err != nil {
			return nil, nil, nil, err
		}
		return r, sn, []*repo.Disk{d}, nil
	}
	disks := make([]*repo.Disk, len(sn.Disks))
	for i := range sn.Disks {
		disks[i] = &sn.Disks[i]
	}
	return r, sn, disks, nil
}

// openSnapshotData opens the repository to read chunk data (what:
// "restore", "export") and finds the snapshot spec names.
func (g *globals) openSnapshotData(ctx context.Context, what, spec string, ff *filterFlags) (*repo.Repository, *repo.Snapshot, error) {
	set, err := g.openSet(ctx, true)
	if err != nil {
		return nil, nil, err
	}
	r, sn, err := g.findSnapshot(ctx, set, spec, ff)
	if err != nil {
		return nil, nil, err
	}
	if !r.CanDecrypt() {
		return nil, nil, fmt.Errorf("%s of snapshot %s: %w", what, sn.ID.Short(), errWriteOnly(r))
	}
	return r, sn, nil
}

func errWriteOnly(r *repo.Repository) error { return r.CheckDataKey() }

func pickDisk(sn *repo.Snapshot, name string) (*repo.Disk, error) {
	if name == "" {
		if len(sn.Disks) != 1 {
			return nil, usageError{fmt.Errorf("snapshot %s holds %d disks: choose one with --disk", sn.ID.Short(), len(sn.Disks))}
		}
		return &sn.Disks[0], nil
	}
	for i := range sn.Disks {
		if sn.Disks[i].Name == name {
			return &sn.Disks[i], nil
		}
	}
	names := make([]string, len(sn.Disks))
	for i := range sn.Disks {
		names[i] = sn.Disks[i].Name
	}
	return nil, fmt.Errorf("snapshot %s has no disk %q (it has: %s)", sn.ID.Short(), name, strings.Join(names, ", "))
}

// restoreToTarget restores job onto t (see openRestoreTarget) and
// completes it, or, on failure, leaves no new file behind.
func restoreToTarget(ctx context.Context, r *repo.Repository, job restoreJob, t *restoreTarget, delta bool, prog *restore.Progress, warn func(string, ...any)) (*restore.Result, error) {
	if delta && t.Created {
		delta = false // nothing to compare against
	}
	o := restore.Options{Delta: delta, Fresh: t.Created, Progress: prog, Warn: warn, Only: job.only, Shift: job.shift}
	res, err := restore.ToTarget(ctx, r, job.disk, t.Target, o)
	if err != nil {
		t.abort()
		return nil, err
	}
	if err := t.finish(keepSize(job, t)); err != nil {
		return nil, err
	}
	return res, nil
}
