package cli

import (
	"os"

	"github.com/sauve-backup/sauve/internal/vdisk/vmdk"
)

// vmdkTargetKind is a monolithicSparse vmdk image as a migration's
// target, updated in place by each pass.
func vmdkTargetKind() targetKind {
	return imageTargetKind("vmdk", []string{".vmdk"},
		func(f *os.File, path string) (imageUpdater, error) { return vmdk.OpenUpdate(f, path) },
		func(f *os.File, path string, size int64) (imageUpdater, error) {
			return vmdk.CreateUpdate(f, size, path)
		})
}
