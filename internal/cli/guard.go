package cli

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/shadow"
)

// newThawGuardCmd is the process a backup starts to freeze the
// filesystems mounted from its sources and thaw them even if sauve dies
// (shadow.GuardMain). Hidden: nobody runs it by hand. It speaks on the
// process's own stdin and stdout, the pipes sauve gave it.
func newThawGuardCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "thaw-guard --timeout DURATION -- MOUNT...",
		Short:              "Freeze filesystems and thaw them when sauve asks, dies or times out",
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
