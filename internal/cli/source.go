package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/source"
)

// addImportFlags adds backup's and convert's --source-format and
// --allow-backing-outside flags.
func addImportFlags(cmd *cobra.Command) {
	cmd.Flags().String("source-format", "auto", "auto: read a VM disk image (qcow2, vmdk, vhd, vhdx, vdi, or the disk of an ova, recognised by its headers) as the disk it holds, and refuse formats sauve does not read (parallels, dmg, gzip, ...); raw: read the file's bytes as they are")
	cmd.Flags().Bool("allow-backing-outside", false, "follow qcow2 backing files and VMDK extents that lie outside the image's folder (by default an image may refer only to files in its folder or below)")
}

// sourceOptions turns --source-format and --allow-backing-outside into
// how a source is read as a disk.
func sourceOptions(cmd *cobra.Command) (source.Options, error) {
	format, _ := cmd.Flags().GetString("source-format")
	allow, _ := cmd.Flags().GetBool("allow-backing-outside")
	o := source.Options{AllowOutside: allow}
	switch format {
	case "", "auto":
	case "raw":
		o.Raw = true
	default:
		return o, usageError{fmt.Errorf("--source-format %q: choose auto or raw", format)}
	}
	return o, nil
}
