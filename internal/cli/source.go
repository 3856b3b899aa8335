package cli

import (
	"fmt"

	"github.com/sauve-backup/sauve/internal/disk"
)

// refuseEmpty refuses a source that holds no byte unless allow: an empty
// stream is most often a pipeline whose first command failed, and an
// empty file a mistake. doing says what would have been done ("store an
// empty snapshot"), allowed what --allow-empty does instead.
func refuseEmpty(src *disk.Source, allow bool, doing, allowed string) error {
	if allow {
		return nil
	}
	empty, err := src.Empty()
	if err != nil || !empty {
		return err
	}
	what := fmt.Sprintf("source %s is empty (0 bytes)", src.Path)
	if src.Kind == disk.Stream {
		what = fmt.Sprintf("source %s ended before its first byte (did the command feeding it fail?)", streamName(src.Path))
	}
	return fmt.Errorf("%s: refusing to %s (--allow-empty %s)", what, doing, allowed)
}

func streamName(path string) string {
	if path == "-" {
		return "- (standard input)"
	}
	return path
}
