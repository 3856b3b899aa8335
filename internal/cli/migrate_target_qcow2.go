package cli

import (
	"os"

	"github.com/sauve-backup/sauve/internal/vdisk/qcow2"
)

// qcow2TargetKind is a qcow2 image as a migration's target, updated in
// place by each pass.
func qcow2TargetKind() targetKind {
	return imageTargetKind("qcow2", []string{".qcow2", ".qcow"},
		func(f *os.File, path string) (imageUpdater, error) { return qcow2.OpenUpdate(f, path) },
		func(f *os.File, path string, size int64) (imageUpdater, error) {
			return qcow2.CreateUpdate(f, size, path)
		})
}
