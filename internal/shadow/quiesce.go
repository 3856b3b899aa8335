package shadow

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// A Quiescer holds applications still for the instant of the copies, as
// VSS writers do on Windows: Quiesce returns once they are flushed and
// held, or fails. The thaw it returns lets them go; it is never nil, and
// is called once whatever happened (also when Quiesce failed: a hook's
// post-thaw runs once its pre-freeze has started), with a context that
// no Ctrl-C has cancelled. A thaw error stores no snapshot.
type Quiescer interface {
	Quiesce(ctx context.Context, at Instant) (thaw func(context.Context) error, err error)
}

// Instant says which copies are about to be taken, for the hooks'
// environment and the agent's log.
type Instant struct {
	Disks    []string // the sources' paths, or a VM's drives
	Provider string   // the kinds of copy taken, e.g. "reflink" or "qemu"
	// Mounts are the mount points of the filesystems the copies hold
	// (those mounted from the sources, here); none for a VM, whose
	// filesystems are the guest's.
	Mounts []string
}

// quiesceThawTimeout bounds the thaw of the applications, which runs on
// a context of its own.
const quiesceThawTimeout = time.Minute

// quiesce holds the applications of q still around take (the copies and
// the freeze of the filesystems): applications first, filesystems last,
// and in the reverse order after.
func quiesce(ctx context.Context, q Quiescer, at Instant, take func() error) error {
	if q == nil {
		return take()
	}
	thaw, err := q.Quiesce(ctx, at)
	if err == nil {
		err = take()
	}
	if thaw != nil {
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), quiesceThawTimeout)
		defer cancel()
		if terr := thaw(tctx); terr != nil {
			err = errors.Join(err, fmt.Errorf("thaw the applications: %w", terr))
		}
	}
	return err
}
