package shadow

import (
	"context"
	"time"

	"github.com/sauve-backup/sauve/internal/source"
)

// Frozen is a set of filesystems frozen under a thaw guard, for callers
// that hold a freeze of their own, such as the quiescing agent in a
// guest. The guard thaws them when Thaw is called, when the timeout
// passes, and when the process that froze them dies (even by kill -9).
type Frozen struct{ f *frozen }

// FreezeMounts freezes the filesystems mounted at mounts (FIFREEZE, in
// order) under a thaw guard and returns once all are frozen. Of opts,
// only FreezeTimeout, Guard and Warn apply. On error nothing is left
// frozen.
func FreezeMounts(ctx context.Context, mounts []string, opts Options) (*Frozen, error) {
	f, err := freeze(ctx, append([]string(nil), mounts...), opts)
	if err != nil {
		return nil, err
	}
	return &Frozen{f: f}, nil
}

// Mounts returns the mount points that were frozen.
func (z *Frozen) Mounts() []string { return append([]string(nil), z.f.mounts...) }

// Done is closed once every mount is thawed again, by Thaw, by the
// guard's timeout, or because the guard died.
func (z *Frozen) Done() <-chan struct{} { return z.f.done }

// Thaw thaws the filesystems and says how long writes were frozen. It
// fails when they were thawed before it was called (the timeout passed,
// or the guard died): what was done meanwhile was not frozen.
func (z *Frozen) Thaw() (time.Duration, error) { return z.f.thaw() }

// MountsToFreeze lists the mount points of the filesystems mounted
// read-write from src (through loop devices and partitions), one per
// filesystem: what a freeze of src must hold, for callers that freeze
// with FreezeMounts (a migration's final pass).
func MountsToFreeze(src *source.Source) ([]string, error) { return mountsToFreeze(src) }
