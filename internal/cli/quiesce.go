package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/agent/writer"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/shadow"
)

// quiesceFlags are backup's flags for holding applications still around
// the instant of the point-in-time copies.
type quiesceFlags struct {
	preFreeze, postThaw []string
	hookTimeout         time.Duration
	hookFailure         string
	writers             []string
	writerTimeout       time.Duration
	agents              []string
	agentWindow         time.Duration
	postBackup          []string
	hooksFile           string
	caller              agentCallerFlags
}

// add registers backup's flags: the holding flags, and --post-backup.
func (f *quiesceFlags) add(fs *pflag.FlagSet) {
	f.addHolding(fs, backupHolding)
	fs.StringArrayVar(&f.postBackup, "post-backup", nil, "run this shell command once the snapshot is stored (repeatable, in order), with $SAUVE_SNAPSHOT set: what may happen only then, such as pruning an archive; a failure exits 1 (the snapshot stays)")
}

// holdingUse says what the holding flags hold applications still for,
// in their help: a backup's copies, or a migration's final pass.
type holdingUse struct {
	instant  string // what the pre-freeze commands run just before
	abort    string // what --hook-failure abort does
	degrade  string // what --hook-failure continue does
	hooksExt string // the hooks file's keys beyond pre-freeze and post-thaw
}

var backupHolding = holdingUse{
	instant:  "the point-in-time copy",
	abort:    "store no snapshot, say which failed and what it printed",
	degrade:  "store a crash-consistent snapshot, and say why",
	hooksExt: "post-backup CMD, ",
}

// addHolding registers the flags that hold applications still: hooks,
// writers and agents, and what their failure does.
func (f *quiesceFlags) addHolding(fs *pflag.FlagSet, u holdingUse) {
	fs.StringArrayVar(&f.preFreeze, "pre-freeze", nil, "run this shell command just before "+u.instant+" (repeatable, in order); $SAUVE_DISKS and $SAUVE_PROVIDER say what is copied")
	fs.StringArrayVar(&f.postThaw, "post-thaw", nil, "run this shell command just after the copy (repeatable); it always runs once a pre-freeze command has started, also on error, timeout and Ctrl-C")
	fs.StringVar(&f.hooksFile, "hooks-file", "", "read hooks and writers from this file, one per line, before the flags': pre-freeze CMD, post-thaw CMD, "+u.hooksExt+"writer SPEC, quiesce ADDRESS ('#' starts a comment)")
	fs.DurationVar(&f.hookTimeout, "hook-timeout", writer.DefaultHookTimeout, "longest time each --pre-freeze or --post-thaw command may run (its process group is killed then)")
	fs.StringVar(&f.hookFailure, "hook-failure", "abort", "what a failing hook or writer does: abort ("+u.abort+") or continue ("+u.degrade+")")
	fs.StringArrayVar(&f.writers, "writer", nil, "flush and hold an application for the copy (repeatable): postgresql[:DSN] (CHECKPOINT first), mariadb[:DSN] or mysql[:DSN] (FLUSH TABLES WITH READ LOCK held until the copy is taken)")
	fs.DurationVar(&f.writerTimeout, "writer-timeout", writer.DefaultDeadline, "longest time each writer may take to flush and hold its application")
	fs.StringArrayVar(&f.agents, "quiesce", nil, "ask the sauve agent at agent://HOST:PORT (or unix:PATH, a VM's virtio-serial chardev) to freeze its writers and filesystems for the copy (repeatable); both sides authenticate with Ed25519 keys")
	fs.DurationVar(&f.agentWindow, "agent-window", 0, "with --quiesce: the longest freeze to ask of the agent (default: the agent's own)")
	f.caller.addForBackup(fs)
}

// quiescer returns the Quiescer the flags ask for, nil when none.
func (f *quiesceFlags) quiescer() (*quiescer, error) {
	if err := f.readHooksFile(); err != nil {
		return nil, err
	}
	q, err := f.empty()
	if err != nil {
		return nil, err
	}
	if len(f.preFreeze) > 0 || len(f.postThaw) > 0 {
		q.hooks = &writer.Hooks{PreFreeze: f.preFreeze, PostThaw: f.postThaw, Timeout: f.hookTimeout}
		q.set.Writers = append(q.set.Writers, q.hooks)
	}
	for _, spec := range f.writers {
		w, err := writer.Parse(spec)
		if err != nil {
			return nil, usageError{fmt.Errorf("--writer %s: %w", spec, err)}
		}
		q.set.Writers = append(q.set.Writers, w)
	}
	if len(f.agents) > 0 {
		cfg, err := f.caller.config()
		if err != nil {
			return nil, err
		}
		for _, spec := range f.agents {
			w, err := newAgentWriter(spec, cfg, f.agentWindow)
			if err != nil {
				return nil, usageError{fmt.Errorf("--quiesce %s: %w", spec, err)}
			}
			q.set.Writers = append(q.set.Writers, w)
		}
	}
	if len(q.set.Writers) == 0 {
		return nil, nil
	}
	return q, nil
}

// empty is a quiescer of no writer yet, with the flags' deadline and
// --hook-failure policy.
func (f *quiesceFlags) empty() (*quiescer, error) {
	policy, err := writer.ParsePolicy(f.hookFailure)
	if err != nil {
		return nil, usageError{fmt.Errorf("--hook-failure %q: choose abort or continue", f.hookFailure)}
	}
	return &quiescer{set: writer.Set{Deadline: f.writerTimeout, Policy: policy}}, nil
}

// quiescer holds the writers of a backup still for the instant of its
// copies (shadow.Quiescer), and remembers what that achieved.
type quiescer struct {
	set    writer.Set
	hooks  *writer.Hooks
	warn   func(string)
	report *writer.Report
}

// Quiesce implements shadow.Quiescer.
func (q *quiescer) Quiesce(ctx context.Context, at shadow.Instant) (func(context.Context) error, error) {
	if q.hooks != nil {
		q.hooks.Env = []string{writer.EnvDisks + "=" + strings.Join(at.Disks, " "), writer.EnvProvider + "=" + at.Provider}
	}
	if err := q.set.MissingVolume(ctx, writer.OnFilesystems(at.Mounts)); err != nil {
		return func(context.Context) error { return nil }, err
	}
	held, err := q.set.Freeze(ctx)
	if err != nil {
		// Set.Freeze thawed what it had started.
		return func(context.Context) error { return nil }, err
	}
	return func(ctx context.Context) error {
		err := held.Thaw(ctx)
		rep := held.Report()
		q.report = &rep
		if err != nil && q.set.Policy == writer.Abort {
			return err
		}
		if err != nil && q.warn != nil {
			q.warn(fmt.Sprintf("%v (--hook-failure continue: the snapshot is stored)", err))
		}
		return nil
	}, nil
}

// record is what the snapshot's manifest records of the writers; nil
// before they were thawed.
func (q *quiescer) record() *repo.Quiescing {
	if q == nil || q.report == nil {
		return nil
	}
	r := q.report
	out := &repo.Quiescing{Consistency: r.Consistency, Reason: r.Reason, WindowSeconds: r.WindowSeconds}
	for _, w := range r.Writers {
		out.Writers = append(out.Writers, repo.QuiescingWriter{Name: w.Name, Frozen: w.Frozen, Seconds: w.Seconds, Detail: w.Detail, Error: w.Error})
	}
	return out
}

// printQuiescing says how the applications were held, one line.
func printQuiescing(w io.Writer, indent string, q *repo.Quiescing) {
	if q == nil {
		return
	}
	var names []string
	for _, x := range q.Writers {
		s := x.Name
		if !x.Frozen {
			s += " (not held)"
		}
		names = append(names, s)
	}
	switch q.Consistency {
	case "application":
		fmt.Fprintf(w, "%sapplication-consistent: %s held for %s\n", indent, strings.Join(names, ", "), seconds(q.WindowSeconds))
	default:
		fmt.Fprintf(w, "%s! crash-consistent: %s (%s)\n", indent, q.Reason, strings.Join(names, ", "))
	}
}

// quiescerOrNil keeps a nil *quiescer from becoming a non-nil
// shadow.Quiescer.
func quiescerOrNil(q *quiescer) shadow.Quiescer {
	if q == nil {
		return nil
	}
	return q
}

// hasAgent says whether an agent is among the writers: a VM's guest then
// freezes through it, not through qemu-ga as well (the second FIFREEZE
// of a filesystem fails).
func (q *quiescer) hasAgent() bool {
	if q == nil {
		return false
	}
	for _, w := range q.set.Writers {
		if _, ok := w.(*agentWriter); ok {
			return true
		}
	}
	return false
}

// runPostBackup runs --post-backup once snapshot is stored.
func (g *globals) runPostBackup(ctx context.Context, f *quiesceFlags, sn *repo.Snapshot) error {
	if f == nil || len(f.postBackup) == 0 {
		return nil
	}
	var disks []string
	for _, d := range sn.Disks {
		disks = append(disks, d.Source)
	}
	env := []string{writer.EnvSnapshot + "=" + sn.ID.String(), writer.EnvDisks + "=" + strings.Join(disks, " ")}
	if err := writer.PostBackup(ctx, f.postBackup, env, f.hookTimeout); err != nil {
		return fmt.Errorf("snapshot %s is stored, but %w", sn.ID.Short(), err)
	}
	return nil
}

// maxHooksFile bounds --hooks-file.
const maxHooksFile = 1 << 20

// readHooksFile puts the lines of --hooks-file before the flags' own.
func (f *quiesceFlags) readHooksFile() error {
	if f.hooksFile == "" {
		return nil
	}
	b, err := readFileMax(f.hooksFile, maxHooksFile)
	if err != nil {
		return fmt.Errorf("--hooks-file: %w", err)
	}
	lists := map[string]*[]string{"pre-freeze": &f.preFreeze, "post-thaw": &f.postThaw, "post-backup": &f.postBackup, "writer": &f.writers, "quiesce": &f.agents}
	from := map[string][]string{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, _ := strings.Cut(line, " ")
		value = strings.TrimSpace(value)
		if _, ok := lists[key]; !ok || value == "" {
			return usageError{fmt.Errorf("--hooks-file %s, line %d: want pre-freeze, post-thaw, post-backup, writer or quiesce and a value, not %.60q", f.hooksFile, i+1, line)}
		}
		from[key] = append(from[key], value)
	}
	for key, l := range lists {
		*l = append(from[key], *l...)
	}
	return nil
}

// readFileMax reads a file of at most max bytes.
func readFileMax(path string, max int64) ([]byte, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, max)
	}
	return b, nil
}
