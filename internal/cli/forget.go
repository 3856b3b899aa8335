package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/retention"
)

// reasonVerified keeps the newest snapshot of a group that check
// --read-data verified, whatever the rules say.
const reasonVerified = "newest verified by check --read-data"

type forgetFlags struct {
	last, hourly, daily, weekly, monthly, yearly int
	within                                       string
	keepTags                                     []string
	groupBy                                      string
	dryRun                                       bool
}

func (f *forgetFlags) policy() (retention.Policy, error) {
	p := retention.Policy{Last: f.last, Hourly: f.hourly, Daily: f.daily, Weekly: f.weekly, Monthly: f.monthly, Yearly: f.yearly, Tags: f.keepTags}
	if f.within != "" {
		sp, err := parseSpan(f.within)
		if err != nil {
			return p, usageError{fmt.Errorf("--keep-within %w", err)}
		}
		if p.Within = sp.duration(); p.Within <= 0 {
			return p, usageError{fmt.Errorf("--keep-within %q keeps nothing", f.within)}
		}
	}
	if err := p.Validate(); err != nil {
		return p, usageError{err}
	}
	return p, nil
}

func newForgetCmd(g *globals) *cobra.Command {
	var (
		ff        filterFlags
		kf        forgetFlags
		pf        pruneFlags
		withPrune bool
	)
	cmd := &cobra.Command{
		Use:   "forget [SNAPSHOT...] [flags]",
		Short: "Remove snapshots by keep rules (--keep-last, --keep-daily ...) or by ID",
		Long: `Remove snapshots from the repository: those that no keep rule keeps, or, with
SNAPSHOT arguments (ID prefixes), exactly those. A forget with neither a
rule nor a SNAPSHOT is refused (exit status 2): it removes nothing rather
than everything. Forget removes manifests only; the chunks that only the
removed snapshots used take space until a prune removes them.

The rules keep a snapshot when any of them keeps it:

  --keep-last N      the N newest
  --keep-hourly N    the newest of each of the last N hours that have one
  --keep-daily N     ... days, --keep-weekly N ISO weeks, --keep-monthly N
                     months, --keep-yearly N years
  --keep-within D    every snapshot younger than D, counted from the newest
                     of its group (30d, 2w, 1y2m3d, 12h: m is months, as in
                     restic; a month counts 30 days, a year 365; or a Go
                     duration such as 36h)
  --keep-tag TAG     every snapshot with this tag (repeatable)

Snapshot times are read in the time zone of the machine running forget
(TZ=UTC sauve forget ... for UTC days), as restic does. The rules apply to
each group of snapshots on its own: by default a host's disks (host and
the snapshot's sources); --group-by host,source,tags changes it, and
--group-by '' makes one group. --host, --tag, --source, --before and
--after restrict the snapshots considered; the others are left alone.

The newest snapshot of each group that 'sauve check --read-data' verified
whole is always kept (three rotated image files meant that one damaged
file spoiled one backup; deduplicated snapshots share chunks, so a
verified one is worth keeping). Forget warns when a group has none.

Marked snapshots (! in 'sauve snapshots': a host outside its writer's
certificate, dated more than an hour in the future, signed by a revoked
writer, data lost for good) are neither counted by the rules nor removed
by them: they are kept and listed apart. So a snapshot dated next year, or
one a hostile writer claims for another host, cannot take the place of
real ones in --keep-last or --keep-daily and make forget remove them.
Name a marked snapshot by its ID to remove it.

Forget needs the owner's key. It records the snapshots it removes in the
repository's ledger before deleting their manifests, so an interrupted
forget has removed them for every reader, and the next forget finishes
deleting them. With isolated namespaces, forget applies to the repository
and every namespace, as 'sauve snapshots' lists them.

--dry-run prints the same report, "would remove", and changes nothing.

--prune runs 'sauve prune' once the snapshots are removed, with its
--max-unused and --max-repack-size; see 'sauve prune --help' for why it is
safe beside running backups. With --json, forget's JSON object is followed
by prune's (a stream of two objects, as json.Decoder or jq read them).`,
		Example: `  sauve forget --keep-last 3                        # the old img_1/img_2/img_3 rotation
  sauve forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
  sauve forget --keep-within 30d --host web1
  sauve forget --keep-last 1 --before 2026-01-01 # thin out what is older than a date
  sauve forget 1a2b3c4d 5e6f7a8b
  sauve forget --keep-daily 7 --keep-weekly 4 --prune`,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := kf.policy()
			if err != nil {
				return err
			}
			if len(args) > 0 && !p.Empty() {
				return usageError{errors.New("give keep rules or SNAPSHOT IDs, not both")}
			}
			if len(args) == 0 && p.Empty() {
				return usageError{retention.ErrNoRule}
			}
			by := retention.DefaultGroupBy()
			if cmd.Flags().Changed("group-by") {
				if by, err = retention.ParseGroupBy(kf.groupBy); err != nil {
					return usageError{err}
				}
			}
			flt, err := ff.filter()
			if err != nil {
				return err
			}
			opts, err := pf.options()
			if err != nil {
				return err
			}
			if err := g.forget(cmd.Context(), args, p, by, flt, kf.dryRun); err != nil || !withPrune {
				return err
			}
			// --json: forget's object, then prune's.
			opts.DryRun = kf.dryRun
			g.printf("\n")
			return g.prune(cmd.Context(), opts)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&withPrune, "prune", false, "run 'sauve prune' afterwards (with --dry-run: a dry run of it)")
	pf.add(cmd, false)
	f.IntVar(&kf.last, "keep-last", 0, "keep the N newest snapshots")
	f.IntVar(&kf.hourly, "keep-hourly", 0, "keep the newest snapshot of each of the last N hours")
	f.IntVar(&kf.daily, "keep-daily", 0, "keep the newest snapshot of each of the last N days")
	f.IntVar(&kf.weekly, "keep-weekly", 0, "keep the newest snapshot of each of the last N ISO weeks")
	f.IntVar(&kf.monthly, "keep-monthly", 0, "keep the newest snapshot of each of the last N months")
	f.IntVar(&kf.yearly, "keep-yearly", 0, "keep the newest snapshot of each of the last N years")
	f.StringVar(&kf.within, "keep-within", "", "keep every snapshot younger than this, counted from the group's newest (30d, 2w, 1y2m3d, 12h)")
	f.StringArrayVar(&kf.keepTags, "keep-tag", nil, "keep every snapshot with this tag (repeatable)")
	f.StringVar(&kf.groupBy, "group-by", "host,source", "apply the rules to each group of snapshots alike in these: host, source, tags ('' for one group)")
	f.BoolVarP(&kf.dryRun, "dry-run", "n", false, "print what would be kept and removed, and remove nothing")
	ff.add(cmd)
	ff.addDates(cmd)
	return cmd
}

// forgetEntry is one snapshot of forget's report.
type forgetEntry struct {
	ID      string    `json:"id"`
	Short   string    `json:"short_id"`
	Time    time.Time `json:"time"`
	Host    string    `json:"host"`
	Tags    []string  `json:"tags"`
	Sources []string  `json:"sources"`
	Reasons []string  `json:"reasons,omitempty"`
	Marks   []string  `json:"marks,omitempty"`

	sn *repo.Snapshot
}

type forgetGroup struct {
	Host    string        `json:"host,omitempty"`
	Sources []string      `json:"sources,omitempty"`
	Tags    []string      `json:"tags,omitempty"`
	Keep    []forgetEntry `json:"keep"`
	Remove  []forgetEntry `json:"remove"`
	// Verified is false when no snapshot of the group was verified by
	// check --read-data.
	Verified bool `json:"verified"`
}

type forgetReport struct {
	DryRun bool          `json:"dry_run"`
	Groups []forgetGroup `json:"groups"`
	// Marked are the marked snapshots, kept and not counted.
	Marked  []forgetEntry `json:"marked"`
	Removed int           `json:"removed"`
	Kept    int           `json:"kept"`
}

func entryOf(sn *repo.Snapshot, reasons []string) forgetEntry {
	e := forgetEntry{ID: sn.ID.String(), Short: sn.ID.Short(), Time: sn.Time, Host: sn.Host, Tags: sn.Tags, Sources: snapshotSources(sn), Reasons: reasons, Marks: sn.Marks, sn: sn}
	if e.Tags == nil {
		e.Tags = []string{}
	}
	return e
}

func snapshotSources(sn *repo.Snapshot) []string {
	src := make([]string, len(sn.Disks))
	for i, d := range sn.Disks {
		src[i] = d.Source
	}
	return src
}

// forget decides and removes. The decisions are made on every snapshot
// of the set (the repository and its isolated namespaces); each removal
// is made in the repository that holds the snapshot.
func (g *globals) forget(ctx context.Context, specs []string, p retention.Policy, by retention.GroupBy, flt repo.Filter, dryRun bool) error {
	set, err := g.openSet(ctx, false)
	if err != nil {
		return err
	}
	if !dryRun {
		// Refuse before deciding anything: a write-only key, a
		// version-1 repository.
		if err := set.main.CanForget(); err != nil {
			return err
		}
	}
	all, in, err := g.setSnapshots(ctx, set)
	if err != nil {
		return err
	}
	var list []*repo.Snapshot
	for _, sn := range all {
		if flt.Match(sn) {
			list = append(list, sn)
		}
	}
	rep := &forgetReport{DryRun: dryRun, Groups: []forgetGroup{}, Marked: []forgetEntry{}}
	// Each snapshot's verification is in the ledger of the repository
	// that holds it; an unreadable ledger fails the forget rather than
	// let the newest verified snapshot go.
	ledgers := map[*repo.Repository]*repo.Ledger{}
	for _, r := range set.all {
		if ledgers[r], err = r.Ledger(ctx); err != nil {
			return namespaceErr(r, err)
		}
	}
	verified := func(sn *repo.Snapshot) bool {
		_, ok := ledgers[in[sn]].Verified[sn.ID]
		return ok
	}
	var unreadable []repo.ID
	stored := func(id repo.ID) bool {
		_, err := set.main.Backend().Stat(ctx, backend.Handle{Type: backend.SnapshotFile, Name: id.String()})
		return err == nil
	}
	if len(specs) > 0 {
		err = g.forgetNamed(rep, list, specs, stored, &unreadable)
		rep.Removed += len(unreadable)
	} else {
		err = decideForget(rep, list, p, by, verified)
	}
	if err != nil {
		return err
	}
	if !dryRun {
		byRepo := map[*repo.Repository][]repo.ID{}
		for _, gr := range rep.Groups {
			for _, e := range gr.Remove {
				byRepo[in[e.sn]] = append(byRepo[in[e.sn]], e.sn.ID)
			}
		}
		byRepo[set.main] = append(byRepo[set.main], unreadable...)
		// Every repository of the set, even with nothing to remove:
		// Forget also deletes what an interrupted forget left.
		for _, r := range set.all {
			if err := r.Forget(ctx, byRepo[r]); err != nil {
				return namespaceErr(r, err)
			}
		}
	}
	for _, id := range unreadable {
		verb := "removed"
		if dryRun {
			verb = "would remove"
		}
		g.printf("%s snapshot %s, whose manifest cannot be read\n", verb, id.Short())
	}
	return g.printForget(rep, by)
}

// forgetNamed puts the snapshots specs name in rep's removal list.
//
// A full ID may also name a manifest that is stored but cannot be read
// (damaged, or forged by a holder of a write key): it cannot be listed,
// and prune refuses to run while it is there, so forget must remove it.
// Those go to unreadable, when stored says they are stored.
func (g *globals) forgetNamed(rep *forgetReport, list []*repo.Snapshot, specs []string, stored func(repo.ID) bool, unreadable *[]repo.ID) error {
	seen := map[repo.ID]bool{}
	var gr forgetGroup
	for _, spec := range specs {
		if spec == "latest" {
			return usageError{errors.New("forget takes snapshot IDs, not 'latest'")}
		}
		sn, err := repo.FindSnapshot(list, spec, repo.Filter{})
		if err != nil {
			if id, perr := repo.ParseID(spec); perr == nil && stored(id) {
				*unreadable = append(*unreadable, id)
				continue
			}
			return err
		}
		if !seen[sn.ID] {
			seen[sn.ID] = true
			gr.Remove = append(gr.Remove, entryOf(sn, nil))
		}
	}
	gr.Keep, gr.Verified = []forgetEntry{}, true
	rep.Groups = append(rep.Groups, gr)
	rep.Removed = len(gr.Remove)
	rep.Kept = len(list) - rep.Removed
	return nil
}

// decideForget applies the policy to the unmarked snapshots of list, and
// keeps the newest verified snapshot of each group and every marked one.
func decideForget(rep *forgetReport, list []*repo.Snapshot, p retention.Policy, by retention.GroupBy, verified func(*repo.Snapshot) bool) error {
	byID := map[string]*repo.Snapshot{}
	var cands []retention.Snapshot
	for _, sn := range list {
		if len(sn.Marks) > 0 {
			rep.Marked = append(rep.Marked, entryOf(sn, nil))
			continue
		}
		byID[sn.ID.String()] = sn
		cands = append(cands, retention.Snapshot{ID: sn.ID.String(), Time: sn.Time, Host: sn.Host, Sources: snapshotSources(sn), Tags: sn.Tags})
	}
	rep.Kept = len(rep.Marked)
	if len(cands) == 0 {
		return nil
	}
	decisions, err := retention.Apply(cands, p, by, time.Local)
	if err != nil {
		return usageError{err}
	}
	// Decisions come group by group, each from the newest snapshot down.
	var groups [][]retention.Decision
	for i, d := range decisions {
		if i == 0 || d.Group != decisions[i-1].Group {
			groups = append(groups, nil)
		}
		groups[len(groups)-1] = append(groups[len(groups)-1], d)
	}
	for _, ds := range groups {
		first := byID[ds[0].Snapshot.ID]
		gr := forgetGroup{Keep: []forgetEntry{}, Remove: []forgetEntry{}}
		if by.Host {
			gr.Host = first.Host
		}
		if by.Sources {
			gr.Sources = snapshotSources(first)
		}
		if by.Tags {
			gr.Tags = first.Tags
		}
		protected := false
		for _, d := range ds {
			sn := byID[d.Snapshot.ID]
			reasons := d.Reasons
			if !protected && verified(sn) {
				protected = true
				reasons = append(reasons, reasonVerified)
			}
			if len(reasons) > 0 {
				gr.Keep = append(gr.Keep, entryOf(sn, reasons))
			} else {
				gr.Remove = append(gr.Remove, entryOf(sn, nil))
			}
		}
		gr.Verified = protected
		rep.Kept += len(gr.Keep)
		rep.Removed += len(gr.Remove)
		rep.Groups = append(rep.Groups, gr)
	}
	return nil
}

func (g *globals) printForget(rep *forgetReport, by retention.GroupBy) error {
	if g.json {
		return g.printJSON(rep)
	}
	remove := "remove"
	if rep.DryRun {
		remove = "would remove"
	}
	unverified := 0
	for _, gr := range rep.Groups {
		if !gr.Verified {
			unverified++
		}
		var head []string
		if by.Host && gr.Host != "" {
			head = append(head, "host "+gr.Host)
		}
		if len(gr.Sources) > 0 {
			head = append(head, "source "+strings.Join(gr.Sources, ","))
		}
		if by.Tags {
			head = append(head, "tags ["+strings.Join(gr.Tags, ",")+"]")
		}
		if len(head) > 0 {
			g.printf("%s:\n", strings.Join(head, ", "))
		}
		if len(gr.Keep) > 0 {
			g.printf("keep %d snapshots:\n", len(gr.Keep))
			g.printEntries(gr.Keep, true)
		}
		if len(gr.Remove) > 0 {
			g.printf("%s %d snapshots:\n", remove, len(gr.Remove))
			g.printEntries(gr.Remove, false)
		}
		g.printf("\n")
	}
	if len(rep.Marked) > 0 {
		g.printf("keep %d marked snapshots, not counted by the rules (name one to remove it):\n", len(rep.Marked))
		for _, e := range rep.Marked {
			g.printf("  %s  %s  %s  %s\n", e.Short, e.Time.Local().Format("2006-01-02 15:04:05"), e.Host, strings.Join(e.Marks, "; "))
		}
		g.printf("\n")
	}
	if unverified > 0 {
		g.warnf("%d of %d groups have no snapshot verified by 'sauve check --read-data': run it, so that forget always keeps one known whole", unverified, len(rep.Groups))
	}
	if rep.DryRun {
		g.printf("would remove %d snapshots, keep %d\n", rep.Removed, rep.Kept)
		return nil
	}
	g.printf("removed %d snapshots, kept %d\n", rep.Removed, rep.Kept)
	return nil
}

func (g *globals) printEntries(es []forgetEntry, reasons bool) {
	if g.quiet || g.json {
		return
	}
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	if reasons {
		fmt.Fprintln(tw, "  ID\tTime\tHost\tTags\tSource\tKept by")
	} else {
		fmt.Fprintln(tw, "  ID\tTime\tHost\tTags\tSource")
	}
	for _, e := range es {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s", e.Short, e.Time.Local().Format("2006-01-02 15:04:05"), e.Host, strings.Join(e.Tags, ","), strings.Join(e.Sources, ","))
		if reasons {
			fmt.Fprintf(tw, "\t%s", strings.Join(e.Reasons, ", "))
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}
