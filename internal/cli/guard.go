package cli

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/shadow"
)

// newThawGuardCmd is the hidden command backup runs as a separate process
// to freeze filesystems and thaw them even if sauve dies (shadow.GuardMain).
func newThawGuardCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "thaw-guard --timeout D -- MOUNT...",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if code := shadow.GuardMain(args, os.Stdin, os.Stdout); code != 0 {
				return &ExitError{Code: code}
			}
			return nil
		},
	}
}
