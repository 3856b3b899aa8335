package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/restore"
)

func newCheckCmd(g *globals) *cobra.Command {
	var (
		readData, noRecord bool
		ff                 filterFlags
		diskName           string
	)
	cmd := &cobra.Command{
		Use:   "check [SNAPSHOT]",
		Short: "Verify the repository's structure, and with --read-data all its data",
		Long: `Verify that the repository is whole: every index object readable, every pack
the index names present and long enough, every snapshot's signature valid,
and for every chunk of every snapshot at least one copy in a pack that
exists. A chunk stored twice (by two backups at once) is damaged only when
every copy is.

Without --read-data, check trusts that a stored copy holds what the index
says it holds. With --read-data, it also downloads every pack, checks it
against its name and its writer's signature, and decrypts and verifies
every chunk in it (a write-only key can verify packs and chunk lists but
not decrypt chunks): only that finds a pack damaged in place, or garbage a
hostile writer stored under other writers' chunk IDs.

Damage is named exactly: the damaged packs and index objects, and the
snapshots, disks and byte ranges they cost; the exit status is then 1, and
the report is the same on every run. A damaged index object does not hide
intact packs: they are read from their own trailers.

With the owner's key, check --read-data records what it found in the
repository's ledger (unless --no-record): later backups store again the
chunks of packs found damaged instead of reusing them, and packs written by
write-only keys that verified are endorsed, so that every writer may reuse
their chunks. It only adds objects; check without --read-data writes
nothing. 'sauve repair index' rebuilds damaged index objects.

check also says which write sessions (backups, repairs) are running, by
their announcements in the repository: information, never an error.

With SNAPSHOT, check instead reads every chunk of the snapshot's disks
(--disk NAME: of one) as a restore would, from the copies a restore would
read, and verifies each against its ID: the snapshot restores, or check
says which disk and offset does not (exit status 1).`,
		Example: `  sauve check
  sauve check --read-data --json
  sauve check --read-data && sauve repair index
  sauve check latest --host vm1 --disk vdb`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("give at most one SNAPSHOT, not %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if len(args) == 1 {
				return g.checkSnapshot(ctx, args[0], &ff, diskName)
			}
			if diskName != "" {
				return usageError{fmt.Errorf("--disk needs a SNAPSHOT")}
			}
			set, err := g.openSet(ctx, false)
			if err != nil {
				return err
			}
			var reports []any
			ok := true
			err = g.eachRepo(set, func(r *repo.Repository) error {
				progress, stop := g.countMeter("read packs", readData)
				rep, err := r.Check(ctx, repo.CheckOptions{ReadData: readData, Record: !noRecord, Progress: progress})
				stop()
				if err != nil {
					return err
				}
				reports = append(reports, rep)
				ok = ok && rep.OK()
				if !g.json {
					printCheck(g, rep, readData)
				}
				return nil
			})
			if err != nil {
				return err
			}
			if g.json {
				if err := g.printSetJSON(set, reports); err != nil {
					return err
				}
			}
			if !ok {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "download and verify every pack and chunk")
	cmd.Flags().BoolVar(&noRecord, "no-record", false, "with --read-data: do not record the findings in the repository's ledger")
	cmd.Flags().StringVar(&diskName, "disk", "", "with SNAPSHOT: verify only this disk")
	ff.add(cmd)
	return cmd
}

// checkSnapshot reads and verifies every chunk of a snapshot's disks.
func (g *globals) checkSnapshot(ctx context.Context, spec string, ff *filterFlags, name string) error {
	r, sn, disks, err := g.openDisks(ctx, "check", spec, ff, name)
	if err != nil {
		return err
	}
	var results []any
	for _, d := range disks {
		prog := new(restore.Progress)
		prog.Total.Store(d.Size)
		m := startMeter(g.stderr, g.showProgress(), meterSource{label: "verify " + d.Name, total: prog.Total.Load, current: prog.Done.Load})
		res, err := restore.Each(ctx, r, d, restore.Options{Progress: prog, Warn: g.warnf}, func(int64, int64, []byte) error { return nil })
		m.Stop()
		if err != nil {
			fmt.Fprintf(g.stderr, "sauve: error: disk %s of snapshot %s does not restore: %v\n", d.Name, sn.ID.Short(), err)
			return &ExitError{Code: 1}
		}
		g.printf("disk %s of snapshot %s: %s verified (%s fetched) in %s\n", d.Name, sn.ID.Short(), bytesIEC(d.Size), bytesIEC(res.BytesFetched), seconds(res.Seconds))
		results = append(results, map[string]any{"snapshot": sn.ID.String(), "disk": d.Name, "size": d.Size, "bytes_fetched": res.BytesFetched, "seconds": res.Seconds, "ok": true})
	}
	if g.json {
		return g.printJSON(map[string]any{"snapshot": sn.ID.String(), "disks": results})
	}
	g.printf("no errors found\n")
	return nil
}

func printCheck(g *globals, rep *repo.CheckReport, readData bool) {
	for _, w := range rep.Warnings {
		g.warnf("%s", w)
	}
	for _, e := range rep.Errors {
		fmt.Fprintf(g.stderr, "sauve: error: %s\n", e)
	}
	for _, d := range rep.Damaged {
		fmt.Fprintf(g.stderr, "sauve: damaged: snapshot %s disk %s: %d chunks in", d.Snapshot.Short(), d.Disk, d.Chunks)
		for i, s := range d.Ranges {
			if i == 8 {
				fmt.Fprintf(g.stderr, " … (%d more ranges)", len(d.Ranges)-i)
				break
			}
			fmt.Fprintf(g.stderr, " [%d, %d)", s.Offset, s.Offset+s.Length)
		}
		fmt.Fprintln(g.stderr)
	}
	g.printf("%d snapshots, %d packs, %d blobs, %d index objects checked\n", rep.Snapshots, rep.Packs, rep.Blobs, rep.Indexes)
	printSessions(g, rep)
	if readData {
		g.printf("read %d packs (%s)\n", rep.PacksRead, bytesIEC(rep.BytesRead))
		if rep.DataSkipped {
			g.printf("the key is write-only: chunk data was checked against pack names, not decrypted\n")
		}
		if rep.Recorded {
			g.printf("findings recorded in the repository's ledger\n")
		}
	}
	if rep.OK() {
		g.printf("no errors found\n")
		return
	}
	snaps := map[repo.ID]bool{}
	for _, d := range rep.Damaged {
		snaps[d.Snapshot] = true
	}
	fmt.Fprintf(g.stderr, "sauve: check found %d errors: %d damaged packs, %d damaged index objects; %d snapshots cannot be restored whole\n",
		len(rep.Errors), len(rep.DamagedPacks), len(rep.DamagedIndex), len(snaps))
	if len(rep.DamagedIndex) > 0 || rep.Unindexed > 0 {
		fmt.Fprintf(g.stderr, "sauve: 'sauve repair index' rewrites the index from the packs' trailers\n")
	}
}

// printSessions says which write sessions (backups, repairs) are running:
// information for whoever plans a prune, never a problem.
func printSessions(g *globals, rep *repo.CheckReport) {
	switch rep.LiveSessions {
	case 0:
		return
	case 1:
		g.printf("1 write session running\n")
	default:
		g.printf("%d write sessions running\n", rep.LiveSessions)
	}
	for _, s := range rep.Sessions {
		host := s.Host
		if host == "" {
			host = "an unnamed host"
		}
		g.printf("  %s on %s, signed by %s, since %s\n", s.Purpose, host, s.Writer, s.First.Local().Format("2006-01-02 15:04:05"))
	}
}
