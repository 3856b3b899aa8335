// Command sauve backs up, restores and migrates whole disks.
package main

import (
	"os"

	"github.com/sauve-backup/sauve/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:]))
}
