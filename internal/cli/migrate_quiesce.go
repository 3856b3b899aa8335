package cli

// The final pass of a migration holds the source's applications still
// as a backup's copy does (quiesce.go): hooks, writers and agents hold
// them first, the filesystems are frozen last, and both are let go in
// the reverse order once the last delta is durable.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/shadow"
)

// migrateHolding is the holding flags' help for migrate.
var migrateHolding = holdingUse{
	instant: "the filesystems are frozen for the final pass",
	abort:   "run no final pass, thaw, say which failed and what it printed",
	degrade: "run the final pass anyway, crash-consistent for the applications, and say why",
}

// addMigrateQuiesceFlags registers the flags that hold applications
// still for --final (backup's, without --post-backup: a migration stores
// no snapshot).
func addMigrateQuiesceFlags(cmd *cobra.Command, o *migrateOptions) {
	o.holdFlags.addHolding(cmd.Flags(), migrateHolding)
}

// readQuiesce builds the quiescer of the flags, once they are parsed.
func (o *migrateOptions) readQuiesce(warn func(string)) error {
	q, err := o.holdFlags.quiescer()
	if err != nil {
		return err
	}
	if len(o.holdFlags.postBackup) > 0 {
		return usageError{fmt.Errorf("--hooks-file %s: post-backup lines are for backups; a migration stores no snapshot", o.holdFlags.hooksFile)}
	}
	if q != nil && !o.final {
		return usageError{errors.New("--pre-freeze, --post-thaw, --writer and --quiesce hold applications still for the final pass: add --final")}
	}
	if q != nil {
		q.warn = warn
	}
	o.quiesce = q
	return nil
}

// migrateThawTimeout bounds the thaw of the applications, which runs on
// a context of its own (also after Ctrl-C).
const migrateThawTimeout = time.Minute

// holdApplications runs pass with the applications held still, when the
// flags ask for it, and records in fr what they achieved. A failure to
// hold them under --hook-failure abort runs no pass: the state and the
// target stay as the previous pass left them. The applications are let
// go whatever happens, post-thaw commands run.
func (g *globals) holdApplications(ctx context.Context, m *migration, mounts []string, fr *finalResult, pass func() error) error {
	q := m.o.quiesce
	if q == nil {
		return pass()
	}
	thaw, err := q.Quiesce(ctx, shadow.Instant{Disks: []string{m.src.Path}, Provider: "migrate", Mounts: mounts})
	if err != nil {
		err = fmt.Errorf("hold the applications still: %w; no final pass was run (the target is as the previous pass left it)", err)
	} else {
		err = pass()
	}
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), migrateThawTimeout)
	defer cancel()
	if terr := thaw(tctx); terr != nil {
		err = errors.Join(err, fmt.Errorf("the final pass is written, but thawing the applications failed: %w; it may not hold them consistent: run --final again", terr))
	}
	fr.quiesce = q.record()
	return err
}
