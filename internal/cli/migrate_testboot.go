package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/bootcheck"
)

// exitBootFailed is migrate's exit status when --test-boot did not see
// the guest reach its marker.
const exitBootFailed = 4

// testBootFlags are migrate's --test-boot options.
type testBootFlags struct {
	enabled bool
	marker  string
	timeout time.Duration
	accel   string
	memory  string
	uefi    string
	console bool
}

func addTestBootFlags(cmd *cobra.Command, f *testBootFlags) {
	fl := cmd.Flags()
	fl.BoolVar(&f.enabled, "test-boot", false, "after the passes, boot TARGET under QEMU (no network, writes to a throw-away overlay) and report whether the guest reached --boot-marker on its serial console (exit status 4 if not)")
	fl.StringVar(&f.marker, "boot-marker", "login:", "with --test-boot: the text on the guest's first serial port that says it booted")
	fl.DurationVar(&f.timeout, "boot-timeout", 5*time.Minute, "with --test-boot: how long the guest may take")
	fl.StringVar(&f.accel, "boot-accel", "", "with --test-boot: QEMU accelerator, kvm or tcg (default: kvm when /dev/kvm opens)")
	fl.StringVar(&f.memory, "boot-memory", "1G", "with --test-boot: the guest's memory")
	fl.StringVar(&f.uefi, "boot-uefi", "", "with --test-boot: boot with this UEFI firmware (OVMF_CODE.fd) instead of the BIOS")
	fl.BoolVar(&f.console, "boot-console", false, "with --test-boot: copy the guest's serial console to standard error")
}

// qemuFormats are QEMU's names of the formats of migration targets.
var qemuFormats = map[string]string{"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}

// testBoot boots the target as it stands after the passes and reports.
func (g *globals) testBoot(ctx context.Context, m *migration, f *testBootFlags) error {
	kind := migrationTargetKind(m.target.Path())
	format, ok := qemuFormats[kind.name]
	if !ok {
		return fmt.Errorf("--test-boot: a %s target is not booted here (QEMU boots local image files and devices)", kind.name)
	}
	o := bootcheck.Options{Format: format, Marker: f.marker, Timeout: f.timeout, Accel: f.accel, Memory: f.memory,
		UEFI: f.uefi != "", Firmware: f.uefi}
	if f.console {
		o.Console = g.stderr
	}
	if !g.quiet && !g.json {
		fmt.Fprintf(g.stderr, "test boot of %s (QEMU, no network, writes discarded), waiting up to %s for %q\n", m.target.Path(), f.timeout, f.marker)
	}
	res, err := bootcheck.Boot(ctx, m.target.Path(), o)
	if err != nil {
		return err
	}
	if g.json {
		if err := g.printJSONLine(map[string]any{"test_boot": true, "target": m.target.Path(), "reached": res.Reached,
			"marker": f.marker, "seconds": res.Seconds, "console_tail": res.Tail}); err != nil {
			return err
		}
	} else if res.Reached {
		g.printf("test boot: %s reached %q after %s\n", m.target.Path(), f.marker, seconds(res.Seconds))
	} else {
		g.printf("test boot: %s did not reach %q in %s; the console's last lines:\n", m.target.Path(), f.marker, seconds(res.Seconds))
		io.WriteString(g.stdout, indentTail(res.Tail))
	}
	if !res.Reached {
		return &ExitError{Code: exitBootFailed}
	}
	return nil
}

// indentTail is the console's last few lines, indented for a report.
func indentTail(s string) string {
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(s, "\r", ""), "\n"), "\n")
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	var b strings.Builder
	for _, l := range lines {
		b.WriteString("  | " + l + "\n")
	}
	return b.String()
}
