package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/bootcheck"
	"github.com/sauve-backup/sauve/internal/remote"
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
	if !g.quiet && !g.json {
		fmt.Fprintf(g.stderr, "test boot of %s (QEMU, no network, writes discarded), waiting up to %s for %q\n", m.target.Path(), f.timeout, f.marker)
	}
	var res *bootcheck.Result
	var err error
	if st, ok := m.target.(*sshTarget); ok {
		res, err = st.boot(ctx, f)
	} else {
		res, err = localBoot(ctx, m.target.Path(), f, g)
	}
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

// localBoot boots a local target under QEMU here.
func localBoot(ctx context.Context, path string, f *testBootFlags, g *globals) (*bootcheck.Result, error) {
	kind := migrationTargetKind(path)
	format, ok := qemuFormats[kind.name]
	if !ok {
		return nil, fmt.Errorf("--test-boot: a %s target is not booted here (QEMU boots local image files and devices)", kind.name)
	}
	o := bootcheck.Options{Format: format, Marker: f.marker, Timeout: f.timeout, Accel: f.accel, Memory: f.memory,
		UEFI: f.uefi != "", Firmware: f.uefi}
	if f.console {
		o.Console = g.stderr
	}
	return bootcheck.Boot(ctx, path, o)
}

// boot test-boots a remote target on its machine, by sauve there: the
// same rules as a local boot; --boot-uefi names a firmware file there,
// and the console is not copied (its last lines come back in the
// report).
func (t *sshTarget) boot(ctx context.Context, f *testBootFlags) (*bootcheck.Result, error) {
	res, err := t.c.Boot(ctx, remote.BootRequest{Marker: f.marker, Timeout: f.timeout, Memory: f.memory, Accel: f.accel, Firmware: f.uefi})
	if err != nil {
		if strings.Contains(err.Error(), "unexpected message of type 'B'") {
			return nil, fmt.Errorf("--test-boot: the sauve on %s is older and cannot test-boot: install the same sauve version there", t.loc.host)
		}
		return nil, fmt.Errorf("--test-boot on %s: %w", t.loc.host, t.withStderr(err))
	}
	return &bootcheck.Result{Reached: res.Reached, Seconds: res.Seconds, Tail: res.Tail}, nil
}
