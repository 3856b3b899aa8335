package cli

import (
	"os"

	"github.com/sauve-backup/sauve/internal/vdisk/vdi"
)

// vdiTargetKind is a vdi image as a migration's target, updated in
// place: a dynamic or fixed image that exists, or a new dynamic one.
func vdiTargetKind() targetKind { return vdiTargetKindOf(false) }

// vdiTargetKindOf is vdiTargetKind whose new images are fixed or dynamic.
func vdiTargetKindOf(fixed bool) targetKind {
	return imageTargetKind("vdi", []string{".vdi"},
		func(f *os.File, path string) (imageUpdater, error) { return vdi.OpenUpdate(f, path) },
		func(f *os.File, path string, size int64) (imageUpdater, error) {
			return vdi.CreateUpdate(f, path, size, fixed)
		})
}
