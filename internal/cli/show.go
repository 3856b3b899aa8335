package cli

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

func newShowCmd(g *globals) *cobra.Command {
	var ff filterFlags
	cmd := &cobra.Command{
		Use:   "show SNAPSHOT",
		Short: "Show a snapshot's disks, partitions and filesystems",
		Long: `Show what SNAPSHOT (an ID prefix, or 'latest' with optional --host and --tag
filters) holds: its disks and, for each, the partition table and every
partition with its start, size, type, filesystem, label and the bytes the
filesystem used. "imaged in full" says why a partition's free space was
read and stored (unknown or damaged filesystem, mounted read-write,
--no-fs-skip).`,
		Example: `  sauve show latest
  sauve show 1a2b3c4d --json | jq '.disks[0].partitions[] | {number, filesystem, used_bytes}'`,
		Args: exactArgs(1, "one SNAPSHOT (an ID prefix or 'latest')"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, err := g.openSet(ctx, false)
			if err != nil {
				return err
			}
			_, sn, err := g.findSnapshot(ctx, set, args[0], &ff)
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(toJSON(sn))
			}
			if g.quiet {
				return nil
			}
			w := g.stdout
			fmt.Fprintf(w, "snapshot %s\n", sn.ID)
			fmt.Fprintf(w, "  time %s, host %s", sn.Time.Local().Format("2006-01-02 15:04:05"), sn.Host)
			if len(sn.Tags) > 0 {
				fmt.Fprintf(w, ", tags %s", strings.Join(sn.Tags, ","))
			}
			fmt.Fprintf(w, "\n  signed by %s (%s key %x), written by %s\n", sn.Signer, signerKind(sn), sn.SignerKey[:8], sn.Program)
			for _, m := range sn.Marks {
				fmt.Fprintf(w, "  ! %s\n", m)
			}
			printQuiescing(w, "  ", sn.Quiesce)
			printMachine(w, sn.Machine)
			for _, d := range sn.Disks {
				fmt.Fprintf(w, "\ndisk %s: %s (%d bytes), %s %s\n", d.Name, bytesIEC(d.Size), d.Size, d.Kind, d.Source)
				switch {
				case d.PointInTime != "":
					fmt.Fprintf(w, "  read from a %s copy: the source as it was at one instant\n", d.PointInTime)
				case d.InUse != "":
					fmt.Fprintf(w, "  ! read as it was while in use (%s): not one instant, may be torn\n", d.InUse)
				case d.Kind != "stdin":
					fmt.Fprintln(w, "  read as it was, with no point-in-time copy")
				}
				if d.Base != nil {
					fmt.Fprintf(w, "  read only what changed since snapshot %s (%s unchanged, taken from it)\n", d.Base.Short(), bytesIEC(d.Stats.BytesUnchanged))
				}
				st := d.Stats
				fmt.Fprintf(w, "  read %s, new %s (%s compressed); chunks %d new, %d reused, %d zero\n",
					bytesIEC(st.BytesRead), bytesIEC(st.BytesNew), bytesIEC(st.BytesNewCoded), st.ChunksNew, st.ChunksReused, st.ChunksZero)
				if len(d.Partitions) == 0 {
					fmt.Fprintln(w, "  no partition table or filesystem recorded")
					continue
				}
				printPartitions(w, &d, false)
			}
			return nil
		},
	}
	ff.add(cmd)
	return cmd
}

// printMachine says what the backed-up machine was, when recorded.
func printMachine(w io.Writer, m *repo.Machine) {
	if m == nil {
		return
	}
	var parts []string
	if m.CPUs > 0 {
		parts = append(parts, fmt.Sprintf("%d CPUs", m.CPUs))
	}
	if m.MemoryMiB > 0 {
		parts = append(parts, bytesIEC(m.MemoryMiB<<20)+" memory")
	}
	if m.Firmware != "" {
		parts = append(parts, strings.ToUpper(m.Firmware))
	}
	for _, n := range m.NICs {
		parts = append(parts, strings.TrimSpace("NIC "+n.MAC+" "+n.Model))
	}
	fmt.Fprintf(w, "  machine (%s): %s\n", m.Kind, strings.Join(parts, ", "))
}
