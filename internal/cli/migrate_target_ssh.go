package cli

import "strings"

// sshTargetKind is a disk on another machine, reached over SSH, as a
// migration's target.
func sshTargetKind() targetKind {
	return notYetKind("ssh", func(p string) bool { return strings.Contains(p, "://") },
		"remote targets (ssh://) are not available yet: migrate writes a raw image file or a block device on this machine")
}
