package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/restore"
)

func newRestoreCmd(g *globals) *cobra.Command {
	var (
		ff       filterFlags
		delta    bool
		diskName string
	)
	cmd := &cobra.Command{
		Use:   "restore SNAPSHOT TARGET",
		Short: "Restore a disk from a snapshot to a file, a device or stdout",
		Long: `Restore a disk of SNAPSHOT (an ID prefix, or 'latest' with optional --host,
--source and --tag filters) to TARGET:

  a new file     written sparse: zero chunks stay holes
  an existing    every byte made equal to the snapshot (zeros written or
  file/device    punched where needed); a file is cut to the image's size
  -              the raw image on standard output, zeros included

With --delta, the target is read and hashed first and only the chunks that
differ are fetched and written: a fast rollback, or the last pass of a
migration. Every chunk is verified against its ID before it is written.
A mounted device, or one smaller than the image, is refused.

'latest' is the newest snapshot of one machine's disk: when the snapshots
that match are of several hosts or sources, restore lists them and asks for
--host and --source, so that one machine's disk is never written with
another's. It skips snapshots marked in 'sauve snapshots' (a host outside
its writer's certificate, a date in the future, a revoked writer).
Every chunk is read from the copy its snapshot's writer stored, else from
any other copy that verifies.`,
		Example: `  sauve restore latest /var/tmp/vda.img
  sauve restore 1a2b3c4d /dev/vdb
  sauve restore latest --host web1 /dev/vda --delta
  sauve restore latest - | qemu-img convert -f raw -O qcow2 /dev/stdin web.qcow2`,
		Args: exactArgs(2, "SNAPSHOT and TARGET"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if args[1] == "-" {
				if delta {
					return usageError{errors.New("--delta needs a file or device target, not stdout")}
				}
				if term.IsTerminal(int(os.Stdout.Fd())) {
					return usageError{errors.New("refusing to write a disk image to a terminal: redirect stdout")}
				}
			}
			r, sn, d, err := g.openDisk(ctx, "restore", args[0], &ff, diskName)
			if err != nil {
				return err
			}
			prog := new(restore.Progress)
			prog.Total.Store(d.Size)
			m := startMeter(g.stderr, g.showProgress(), meterSource{
				label: "restore " + d.Name, total: prog.Total.Load, current: prog.Done.Load,
				extra: func() string { return "written " + bytesIEC(prog.Written.Load()) },
			})
			var res *restore.Result
			if args[1] == "-" {
				res, err = restore.ToStream(ctx, r, d, os.Stdout, restore.Options{Progress: prog, Warn: g.warnf})
			} else {
				res, err = restoreToTarget(ctx, r, d, args[1], delta, prog, g.warnf)
			}
			m.Stop()
			if err != nil {
				return fmt.Errorf("restore of snapshot %s to %s: %w", sn.ID.Short(), args[1], err)
			}
			if g.json {
				return g.printJSON(map[string]any{
					"snapshot": sn.ID.String(), "disk": d.Name, "target": args[1], "delta": delta,
					"size": res.Size, "bytes_written": res.BytesWritten, "bytes_fetched": res.BytesFetched,
					"chunks_written": res.ChunksWritten, "chunks_unchanged": res.ChunksSame, "chunks_zero": res.ChunksZero,
					"seconds": res.Seconds,
				})
			}
			if args[1] == "-" {
				if !g.quiet {
					fmt.Fprintf(g.stderr, "restored snapshot %s (%s, %s) to stdout in %s\n", sn.ID.Short(), d.Name, bytesIEC(d.Size), seconds(res.Seconds))
				}
				return nil
			}
			g.printf("restored snapshot %s (%s, %s, host %s, signed by %s) to %s\n", sn.ID.Short(), d.Name, bytesIEC(d.Size), sn.Host, sn.Signer, args[1])
			if delta {
				g.printf("  delta: %d chunks unchanged, %d written, %s written in all\n", res.ChunksSame, res.ChunksWritten, bytesIEC(res.BytesWritten))
			} else {
				g.printf("  wrote %s (%d chunks, %d zero), fetched %s\n", bytesIEC(res.BytesWritten), res.ChunksWritten, res.ChunksZero, bytesIEC(res.BytesFetched))
			}
			g.printf("  took %s (%s)\n", seconds(res.Seconds), rate(d.Size, res.Seconds))
			return nil
		},
	}
	ff.add(cmd)
	cmd.Flags().BoolVar(&delta, "delta", false, "read the target and write only the chunks that differ")
	cmd.Flags().StringVar(&diskName, "disk", "", "which disk of a multi-disk snapshot")
	return cmd
}

// openDisk opens the repository for reading chunk data (what: "restore",
// "export"), finds the snapshot that spec names and the disk of it that
// name picks.
func (g *globals) openDisk(ctx context.Context, what, spec string, ff *filterFlags, name string) (*repo.Repository, *repo.Snapshot, *repo.Disk, error) {
	r, err := g.openRepo(ctx, true)
	if err != nil {
		return nil, nil, nil, err
	}
	sn, err := g.findSnapshot(ctx, r, spec, ff)
	if err != nil {
		return nil, nil, nil, err
	}
	d, err := pickDisk(sn, name)
	if err != nil {
		return nil, nil, nil, err
	}
	if !r.CanDecrypt() {
		return nil, nil, nil, fmt.Errorf("%s of snapshot %s: %w", what, sn.ID.Short(), errWriteOnly(r))
	}
	return r, sn, d, nil
}

func errWriteOnly(r *repo.Repository) error {
	_, err := r.Keys().DataOpener()
	return err
}

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
	return nil, fmt.Errorf("snapshot %s has no disk %q", sn.ID.Short(), name)
}

func restoreToTarget(ctx context.Context, r *repo.Repository, d *repo.Disk, path string, delta bool, prog *restore.Progress, warn func(string, ...any)) (*restore.Result, error) {
	t, err := disk.OpenTarget(path, disk.TargetOptions{ImageSize: d.Size})
	if err != nil {
		return nil, err
	}
	if delta && t.Created {
		delta = false // nothing to compare against
	}
	res, err := restore.ToTarget(ctx, r, d, t, restore.Options{Delta: delta, Fresh: t.Created, Progress: prog, Warn: warn})
	if err == nil {
		err = t.Finish(d.Size)
	}
	if cerr := t.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", path, cerr)
	}
	if err != nil {
		// A half-written new file is worse than none; an existing target
		// is left as it is, and a rerun (with --delta) completes it.
		t.Remove()
		return nil, err
	}
	return res, nil
}
