package shadow

import (
	"context"
	"errors"

	"github.com/sauve-backup/sauve/internal/source"
)

// planLVM plans an LVM snapshot of the logical volume src. (To be
// written.)
func planLVM(ctx context.Context, src *source.Source, o Options) (*plan, error) {
	return nil, errUnsupported{errors.New("LVM snapshots are not available yet")}
}
