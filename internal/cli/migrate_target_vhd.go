package cli

import (
	"os"

	"github.com/sauve-backup/sauve/internal/vdisk/vhd"
)

// vhdTargetKind is a vhd image as a migration's target, updated in
// place: a dynamic or fixed disk that exists, or a new dynamic one.
func vhdTargetKind() targetKind { return vhdTargetKindOf(false) }

// vhdTargetKindOf is vhdTargetKind whose new disks are fixed (Azure takes
// only those) or dynamic.
func vhdTargetKindOf(fixed bool) targetKind {
	return imageTargetKind("vhd", []string{".vhd"},
		func(f *os.File, path string) (imageUpdater, error) { return vhd.OpenUpdate(f, path) },
		func(f *os.File, path string, size int64) (imageUpdater, error) {
			return vhd.CreateUpdate(f, path, size, fixed)
		})
}
