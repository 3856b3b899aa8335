package cli

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

// pruneFlags are prune's flags, shared with forget --prune.
type pruneFlags struct {
	maxUnused, maxRepack string
	dryRun               bool
	parity               int
}

func (f *pruneFlags) add(cmd *cobra.Command, withDryRun bool) {
	cmd.Flags().StringVar(&f.maxUnused, "max-unused", "5%", "repack a pack once more than this share of it is unused (`PERCENT`; 0% repacks every partly used pack)")
	cmd.Flags().StringVar(&f.maxRepack, "max-repack-size", "", "copy at most this much of partly used packs in one run (`SIZE`, e.g. 10GiB; default: no bound)")
	cmd.Flags().IntVar(&f.parity, "parity", 0, "store a parity object over every `N` packs that repacking writes (as 'backup --parity')")
	if withDryRun {
		cmd.Flags().BoolVar(&f.dryRun, "dry-run", false, "say what prune would delete, condemn and repack, changing nothing")
	}
}

func (f *pruneFlags) options() (repo.PruneOptions, error) {
	s := strings.TrimSuffix(strings.TrimSpace(f.maxUnused), "%")
	pct, err := strconv.ParseFloat(s, 64)
	if err != nil || pct < 0 || pct > 100 {
		return repo.PruneOptions{}, usageError{fmt.Errorf("--max-unused %q: give a percentage from 0%% to 100%%", f.maxUnused)}
	}
	opts := repo.PruneOptions{MaxUnused: pct / 100, DryRun: f.dryRun, Parity: f.parity}
	if f.maxRepack != "" {
		if opts.MaxRepackBytes, err = parseSize(f.maxRepack); err != nil || opts.MaxRepackBytes <= 0 {
			return repo.PruneOptions{}, usageError{fmt.Errorf("--max-repack-size %q: give a size such as 10GiB", f.maxRepack)}
		}
	}
	return opts, nil
}

func newPruneCmd(g *globals) *cobra.Command {
	var f pruneFlags
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Delete the data no snapshot needs any more",
		Long: `Delete the packs that hold only chunks no snapshot refers to (after
'sauve forget'), and repack the packs that are mostly unused: their chunks
that snapshots still need are copied, verified, into new packs, and the old
packs deleted. Needs the owner's key.

prune is safe against backups running at the same time, on this host or any
other, with write-only keys that cannot delete: it deletes in two phases.
It first records in the repository's ledger the packs it condemns; every
backup reads that record after announcing itself, and never reuses a
condemned pack. A condemned pack is deleted only once every backup that
announced itself before the record has ended (or stopped renewing its
announcement for 6 hours: killed, cut off). With no backup running, that is
at once; otherwise this prune says which backups it waits for, and the next
prune deletes the packs. Packs stored after a running backup began are not
touched: they may be that backup's.

A pack that cannot be read while repacking (damaged, truncated) stops prune
with the pack named and nothing deleted. A prune that is interrupted
(Ctrl-C, kill -9, a lost connection) leaves a repository that checks
clean; the next prune finishes the work. Only one prune runs at a time.

Figures: bytes read are the packs downloaded to repack; bytes written the
new packs. Nothing else is downloaded but chunk lists and index objects.`,
		Example: `  sauve forget --keep-daily 7 --keep-weekly 4 && sauve prune
  sauve prune --dry-run
  sauve prune --max-unused 20% --max-repack-size 50GiB`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := f.options()
			if err != nil {
				return err
			}
			return g.prune(cmd.Context(), opts)
		},
	}
	f.add(cmd, true)
	return cmd
}

// prune runs a prune on the repository and each isolated namespace.
func (g *globals) prune(ctx context.Context, opts repo.PruneOptions) error {
	set, err := g.openSet(ctx, false)
	if err != nil {
		return err
	}
	var reports []any
	err = g.eachRepo(set, func(r *repo.Repository) error {
		if !r.Keys().IsOwner() {
			return repo.ErrPruneOwner
		}
		m := g.stageMeter()
		opts.Progress = m.progress
		rep, err := r.Prune(ctx, opts)
		m.stop()
		if err != nil {
			return err
		}
		reports = append(reports, rep)
		if !g.json {
			printPrune(g, rep)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if g.json {
		return g.printSetJSON(set, reports)
	}
	return nil
}

func printPrune(g *globals, rep *repo.PruneReport) {
	would := ""
	if rep.DryRun {
		would = "would be "
	}
	g.printf("%d snapshots; %d packs stored (%s): %s used, %s unused\n",
		rep.Snapshots, rep.Stored.Packs, bytesIEC(rep.Stored.Bytes), bytesIEC(rep.UsedBytes), bytesIEC(rep.UnusedBytes))
	if rep.Condemned.Packs > 0 {
		g.printf("%d packs (%s) %scondemned, %d of them (%s) repacked: %d chunks copied\n",
			rep.Condemned.Packs, bytesIEC(rep.Condemned.Bytes), would, rep.Repacked.Packs, bytesIEC(rep.Repacked.Bytes), rep.RepackedBlobs)
	}
	if rep.Young.Packs > 0 {
		g.printf("%d unused packs (%s) left alone: stored after a running backup began\n", rep.Young.Packs, bytesIEC(rep.Young.Bytes))
	}
	if rep.DryRun {
		g.printf("about %s would be read and %s written; about %s would stay stored\n", bytesIEC(rep.BytesRead), bytesIEC(rep.BytesWritten), bytesIEC(rep.After.Bytes))
		if rep.Condemned.Packs > 0 {
			g.printf("(packs condemned now are deleted at once if no backup runs meanwhile, otherwise by the next prune)\n")
		}
		return
	}
	g.printf("%d packs deleted (%s); read %s, wrote %s\n", rep.Deleted.Packs, bytesIEC(rep.Deleted.Bytes), bytesIEC(rep.BytesRead), bytesIEC(rep.BytesWritten))
	if rep.Waiting.Packs > 0 {
		g.printf("%d condemned packs (%s) wait for the next prune:", rep.Waiting.Packs, bytesIEC(rep.Waiting.Bytes))
		if len(rep.WaitingFor) == 0 {
			g.printf(" %s\n", rep.WaitReason)
		} else {
			g.printf(" these backups may still use them\n")
		}
		for _, s := range rep.WaitingFor {
			host := s.Host
			if host == "" {
				host = "an unnamed host"
			}
			g.printf("  %s on %s, signed by %s, since %s\n", s.Purpose, host, s.Writer, s.First.Local().Format("2006-01-02 15:04:05"))
		}
	}
	g.printf("repository: %d packs, %s\n", rep.After.Packs, bytesIEC(rep.After.Bytes))
}

// stageMeter shows one progress bar per stage of a multi-stage job.
type stageMeter struct {
	g           *globals
	label       string
	done, total atomic.Int64
	m           *meter
}

func (g *globals) stageMeter() *stageMeter { return &stageMeter{g: g} }

func (s *stageMeter) progress(stage string, done, total int64) {
	if stage != s.label {
		s.stop()
		s.label = stage
		s.done.Store(0)
		s.total.Store(total)
		s.m = startMeter(s.g.stderr, s.g.showProgress(), meterSource{label: stage, total: s.total.Load, current: s.done.Load})
	}
	s.done.Store(done)
	s.total.Store(total)
}

func (s *stageMeter) stop() {
	if s.m != nil {
		s.m.Stop()
		s.m = nil
	}
}
