package cli

import (
	"os"

	"github.com/sauve-backup/sauve/internal/vdisk/vhdx"
)

// vhdxTargetKind is a vhdx image as a migration's target, updated in
// place: a dynamic or fixed disk that exists, or a new dynamic one.
func vhdxTargetKind() targetKind {
	return imageTargetKind("vhdx", []string{".vhdx"},
		func(f *os.File, path string) (imageUpdater, error) { return vhdx.OpenUpdate(f, path) },
		func(f *os.File, path string, size int64) (imageUpdater, error) {
			return vhdx.CreateUpdate(f, path, size)
		})
}
