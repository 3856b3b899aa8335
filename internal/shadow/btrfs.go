package shadow

import (
	"errors"

	"github.com/sauve-backup/sauve/internal/source"
)

// planBtrfs plans a read-only snapshot of the btrfs subvolume holding the
// image file of src. (To be written.)
func planBtrfs(src *source.Source, o Options) (*plan, error) {
	return nil, errUnsupported{errors.New("btrfs snapshots are not available yet")}
}
