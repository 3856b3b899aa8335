package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/bootcheck"
	"github.com/sauve-backup/sauve/internal/remote"
)

// addMigrateRemote adds what remote migration targets need: the hidden
// command that is their other end, and migrate's --remote-sauve.
func addMigrateRemote(root *cobra.Command) {
	root.AddCommand(newMigrateReceiveCmd())
	for _, c := range root.Commands() {
		if c.Name() == "migrate" {
			c.Flags().Var(remoteSauveFlag{}, "remote-sauve", "the `COMMAND` that runs sauve on the machine of an ssh:// target (default sauve, or $SAUVE_REMOTE_SAUVE); it may be \"sudo sauve\"")
		}
	}
}

// remoteSauveFlag sets $SAUVE_REMOTE_SAUVE for this process, where the
// ssh:// target kind reads it: target kinds are opened from their path
// alone.
type remoteSauveFlag struct{}

func (remoteSauveFlag) String() string { return "" }
func (remoteSauveFlag) Type() string   { return "string" }
func (remoteSauveFlag) Set(v string) error {
	if v == "" {
		return errors.New("empty command")
	}
	return os.Setenv("SAUVE_REMOTE_SAUVE", v)
}

var _ pflag.Value = remoteSauveFlag{}

func newMigrateReceiveCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "migrate-receive TARGET",
		Short:  "The remote end of sauve migrate onto an ssh:// target (speaks on standard input and output)",
		Hidden: true,
		Args:   exactArgs(1, "TARGET"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return remote.Serve(cmd.Context(), os.Stdin, os.Stdout, receiveOpener)
		},
	}
}

// receiveOpener opens the target of a remote migration as a local
// migration opens its own: refused when in use, too small, or not a
// file or block device.
func receiveOpener(path string, create int64) (remote.Target, remote.Info, error) {
	var (
		t       migrationTarget
		err     error
		created bool
	)
	if _, serr := os.Stat(path); errors.Is(serr, os.ErrNotExist) && create > 0 {
		t, err = createRawTarget(path, create)
		created = true
	} else {
		t, err = openRawTarget(path)
	}
	if err != nil {
		return nil, remote.Info{}, err
	}
	if t.Size() < create {
		t.Close()
		return nil, remote.Info{}, fmt.Errorf("target %s holds %d bytes, the source %d: refusing a migration that would not fit", path, t.Size(), create)
	}
	id, err := t.Identity()
	if err != nil {
		t.Close()
		return nil, remote.Info{}, err
	}
	host, _ := os.Hostname()
	return &receiveTarget{t, path}, remote.Info{Size: t.Size(), Device: id.Device, FileDev: id.FileDev, Inode: id.Inode, Host: host, Created: created}, nil
}

// receiveTarget is a remote migration's target, test-booted here on
// request, with the rules of a local --test-boot (bootcheck).
type receiveTarget struct {
	migrationTarget
	path string
}

func (t *receiveTarget) Boot(ctx context.Context, req remote.BootRequest) (*remote.BootResult, error) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		host, _ := os.Hostname()
		return nil, fmt.Errorf("%s has no qemu-system-x86_64: install QEMU there (Debian: qemu-system-x86), or migrate a copy into a local target to test-boot it", host)
	}
	if err := t.Sync(); err != nil {
		return nil, err
	}
	res, err := bootcheck.Boot(ctx, t.path, bootcheck.Options{Format: "raw", Marker: req.Marker, Timeout: req.Timeout,
		Memory: req.Memory, Accel: req.Accel, UEFI: req.Firmware != "", Firmware: req.Firmware})
	if err != nil {
		return nil, err
	}
	return &remote.BootResult{Reached: res.Reached, Seconds: res.Seconds, Tail: res.Tail}, nil
}
