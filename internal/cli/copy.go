package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/copier"
	"github.com/sauve-backup/sauve/internal/repo"
)

// sourceFlags name the repository a copy reads from, and its key.
type sourceFlags struct {
	repo, keyFile string
}

func (f *sourceFlags) add(cmd *cobra.Command, what string) {
	cmd.Flags().StringVar(&f.repo, "from-repo", os.Getenv("SAUVE_FROM_REPO"), what+" ($SAUVE_FROM_REPO; any location --repo takes)")
	cmd.Flags().StringVar(&f.keyFile, "from-key", os.Getenv("SAUVE_FROM_KEY"), "key file of the source repository ($SAUVE_FROM_KEY; default: the one 'sauve init' saved for it); its passphrase from $SAUVE_FROM_PASSPHRASE or $SAUVE_FROM_PASSPHRASE_FILE")
}

// globals returns the globals of the source repository: g's, with its
// location and key.
func (f *sourceFlags) globals(g *globals) *globals {
	sg := *g
	sg.repo, sg.keyFile, sg.usingDefault = f.repo, f.keyFile, false
	sg.keyNames = sourceKeyNames
	return &sg
}

// openSource opens the source repository, and its index when loadIndex
// is set; it writes nothing there.
func (f *sourceFlags) openSource(ctx context.Context, g *globals, loadIndex bool) (*repo.Repository, error) {
	if f.repo == "" {
		return nil, usageError{errors.New("no source repository: give it with --from-repo or SAUVE_FROM_REPO")}
	}
	r, err := f.globals(g).openRepo(ctx, loadIndex)
	if err != nil {
		return nil, fmt.Errorf("source repository: %w", err)
	}
	return r, nil
}

func newCopyCmd(g *globals) *cobra.Command {
	var from sourceFlags
	var f filterFlags
	cmd := &cobra.Command{
		Use:   "copy --from-repo SOURCE [SNAPSHOT...]",
		Short: "Copy snapshots from another repository into this one",
		Long: `Copy snapshots from the repository SOURCE into the repository of --repo
(the target): every snapshot of SOURCE, those that --host, --tag and
--source select, or the snapshots named (IDs or 'latest'). Each copy is a
snapshot of the target, signed by the target's key, with the original's
time, host, tags and disks, and a record of where it came from: a
snapshot the target holds a copy of already is skipped, so copying every
night copies only the new ones.

The chunks are read from SOURCE, verified, and sealed again for the
target, which stores only the chunks it lacks. The source needs its full
key (--from-key; a write-only key cannot open chunk data); the target's
may be write-only (copying only writes). Nothing is written to SOURCE.

When both repositories have the same chunk size and ID key (a target made
with 'sauve init --from-repo SOURCE'), chunks keep their IDs: chunk lists
carry over and only missing chunks are read. Otherwise every disk is read
through and hashed again (another ID key), or cut again into the target's
chunks (another chunk size). The output says which.

An interrupted copy (Ctrl-C, a lost connection, kill -9) keeps the
snapshots it finished; run it again to go on: the packs it stored are
reused, not uploaded again (with the local cache, as for backups).

Marked snapshots ('sauve snapshots' says why) are copied only when named
by ID. Isolated namespaces are not copied: only the repository given (or
the namespace of an isolated writer's key) on each side.`,
		Example: `  sauve copy --repo s3://offsite/sauve --from-repo /srv/backup/sauve
  sauve copy --repo /mnt/usb/sauve --from-repo azure://acct/backups --from-key /root/azure.key --host web1 --tag nightly
  sauve init --repo /mnt/usb/sauve --from-repo /srv/backup/sauve   # same chunk IDs: the cheapest copies`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.runCopy(cmd.Context(), &from, &f, args)
		},
	}
	from.add(cmd, "repository to copy snapshots from")
	f.add(cmd)
	f.addDates(cmd)
	return cmd
}

func (g *globals) runCopy(ctx context.Context, from *sourceFlags, f *filterFlags, args []string) error {
	// The source first: a source that cannot be read (missing, wrong or
	// write-only key) leaves the target untouched.
	src, err := from.openSource(ctx, g, true)
	if err != nil {
		return err
	}
	if !src.CanDecrypt() {
		return fmt.Errorf("source repository %s: %w", src.Backend().Location(), copier.ErrWriteOnlySource)
	}
	snaps, err := g.copySelection(ctx, src, f, args)
	if err != nil {
		return fmt.Errorf("source repository: %w", err)
	}
	dst, err := g.openRepo(ctx, true)
	if err != nil {
		return err
	}
	mode := copier.ModeOf(src, dst)
	g.printf("copying from repository %s (%s) into %s (%s): %s\n", src.Config().ID, src.Backend().Location(), dst.Config().ID, dst.Backend().Location(), mode.Describe())
	prog := new(backup.Progress)
	m := startMeter(g.stderr, g.showProgress(), meterSource{label: "copy", total: prog.Total.Load, current: prog.Done.Load})
	res, err := copier.Run(ctx, src, dst, snaps, copier.Options{Program: "sauve " + Version, Progress: prog, Warn: g.warn})
	m.Stop()
	if res.Adopted > 0 {
		g.warnf("indexed %d packs left by an interrupted copy or backup; their chunks are reused", res.Adopted)
	}
	if err != nil {
		for _, p := range res.Copied {
			g.printf("  snapshot %s copied as %s\n", p.Source.Short(), p.Target.Short())
		}
		if n := len(res.Copied); n > 0 {
			return fmt.Errorf("copy: %w (the %d snapshots copied before are in the target; run the copy again to go on)", err, n)
		}
		return fmt.Errorf("copy: %w (run it again to go on: what it stored is reused)", err)
	}
	if g.json {
		return g.printJSON(copyJSON(src, dst, res))
	}
	for _, p := range res.Copied {
		g.printf("  snapshot %s copied as %s  %s  %s  %s\n", p.Source.Short(), p.Target.Short(), p.Host, p.Time.Local().Format("2006-01-02 15:04:05"), bytesIEC(p.Size))
	}
	if n := len(res.Skipped); n > 0 {
		g.printf("skipped %d already copied\n", n)
	}
	if len(res.Copied) == 0 {
		g.printf("nothing to copy\n")
		return nil
	}
	st := res.Stats
	g.printf("copied %d snapshots: chunks %d copied / %d reused / %d zero; read %s from the source, wrote %s to the target (%d packs) in %s\n",
		len(res.Copied), st.ChunksNew, st.ChunksReused, st.ChunksZero, bytesIEC(st.BytesRead), bytesIEC(res.BytesWritten), res.Packs, seconds(res.Seconds))
	return nil
}

// copySelection returns the source's snapshots to copy: those named, or
// every one the filters pass but marked ones.
func (g *globals) copySelection(ctx context.Context, src *repo.Repository, f *filterFlags, args []string) ([]*repo.Snapshot, error) {
	all, err := g.snapshots(ctx, src)
	if err != nil {
		return nil, err
	}
	flt, err := f.filter()
	if err != nil {
		return nil, err
	}
	if len(args) > 0 {
		var out []*repo.Snapshot
		for _, a := range args {
			sn, err := repo.FindSnapshot(all, a, flt)
			if err != nil {
				return nil, err
			}
			for _, m := range sn.Marks {
				g.warnf("snapshot %s (signed by %s) %s; its copy is signed by the target's key", sn.ID.Short(), sn.Signer, m)
			}
			out = append(out, sn)
		}
		return out, nil
	}
	var out []*repo.Snapshot
	matched, marked := 0, 0
	for _, sn := range all {
		if !flt.Match(sn) {
			continue
		}
		matched++
		if len(sn.Marks) > 0 {
			// A copy is signed by the target's key: copying a marked
			// snapshot unasked would launder what marked it.
			marked++
			continue
		}
		out = append(out, sn)
	}
	if marked > 0 {
		g.warnf("left out %d marked snapshots ('sauve snapshots' says why): name one by its ID to copy it anyway", marked)
	}
	if matched == 0 && len(all) > 0 {
		return nil, errors.New("no snapshot matches (host/tag/source filters?)")
	}
	return out, nil
}

type copyPairJSON struct {
	Source string    `json:"source"`
	Target string    `json:"target"`
	Host   string    `json:"host"`
	Time   time.Time `json:"time"`
	Size   int64     `json:"size"`
}

func pairsJSON(ps []copier.Pair) []copyPairJSON {
	out := []copyPairJSON{}
	for _, p := range ps {
		out = append(out, copyPairJSON{Source: p.Source.String(), Target: p.Target.String(), Host: p.Host, Time: p.Time, Size: p.Size})
	}
	return out
}

func copyJSON(src, dst *repo.Repository, res *copier.Result) map[string]any {
	st := res.Stats
	return map[string]any{
		"source":            map[string]string{"id": src.Config().ID, "location": src.Backend().Location()},
		"target":            map[string]string{"id": dst.Config().ID, "location": dst.Backend().Location()},
		"mode":              res.Mode.String(),
		"mode_description":  res.Mode.Describe(),
		"snapshots_copied":  len(res.Copied),
		"snapshots_skipped": len(res.Skipped),
		"copied":            pairsJSON(res.Copied),
		"skipped":           pairsJSON(res.Skipped),
		"chunks_copied":     st.ChunksNew,
		"chunks_reused":     st.ChunksReused,
		"chunks_zero":       st.ChunksZero,
		"bytes_read":        st.BytesRead,
		"bytes_new":         st.BytesNew,
		"bytes_written":     res.BytesWritten,
		"packs":             res.Packs,
		"packs_adopted":     res.Adopted,
		"seconds":           res.Seconds,
	}
}
