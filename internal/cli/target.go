package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/term"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/restore"
)

// restoreTarget is where a restore writes: an existing file or device,
// written in place, or a new file, written under a temporary name beside
// it and put in place only once complete (as export does), so that a
// failed, interrupted or killed restore leaves nothing under its name.
type restoreTarget struct {
	*disk.Target
	out *outputFile // the new file; nil for an existing target
}

// overwriteCheck says how to treat a target that holds another disk.
type overwriteCheck struct {
	force bool
	// confirm asks the user whether to overwrite (a terminal), or is nil.
	confirm func(question string) (bool, error)
}

// openRestoreTarget opens path for a restore of disk d. An existing
// target holding a partition table or filesystem other than d's is
// written only with --force or the user's confirmation.
func openRestoreTarget(path string, d *repo.Disk, oc overwriteCheck) (*restoreTarget, error) {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		out, err := createOutput(path, false)
		if err != nil {
			return nil, err
		}
		out.mode = 0o600 // a disk image may hold anything: only its owner reads it
		return &restoreTarget{Target: disk.NewFileTarget(out.f), out: out}, nil
	}
	t, err := disk.OpenTarget(path, disk.TargetOptions{ImageSize: d.Size})
	if err != nil {
		return nil, err
	}
	if err := checkOverwrite(t, d, oc); err != nil {
		t.Close()
		return nil, err
	}
	return &restoreTarget{Target: t}, nil
}

// checkOverwrite refuses, unless forced or confirmed, to overwrite a
// target whose content is not the snapshot disk's own (see
// restore.Content.SameDisk).
func checkOverwrite(t *disk.Target, d *repo.Disk, oc overwriteCheck) error {
	if oc.force || t.Size == 0 {
		return nil
	}
	have, err := restore.ReadContent(t, t.Size, t.SectorSize())
	if err != nil {
		return fmt.Errorf("read what %s holds: %w", t.Path, err)
	}
	snap := restore.DiskContent(d)
	if have.SameDisk(snap) {
		return nil
	}
	theirs := snap.String()
	if snap.Empty() {
		theirs = "which records no partition table or filesystem"
	}
	what := fmt.Sprintf("%s holds %s, not the snapshot's disk (%s)", t.Path, have, theirs)
	if oc.confirm != nil {
		ok, err := oc.confirm(what + ". Overwrite it? [y/N] ")
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		return fmt.Errorf("%s: not overwritten", what)
	}
	return fmt.Errorf("%s: add --force to overwrite it", what)
}

// terminalConfirm returns a confirm function that asks on stderr and
// reads the answer from standard input, or nil when standard input is
// not a terminal. Ctrl-C (ctx's end) stops the wait for an answer.
func (g *globals) terminalConfirm(ctx context.Context) func(string) (bool, error) {
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return nil
	}
	return func(q string) (bool, error) {
		type answer struct {
			yes bool
			err error
		}
		got := make(chan answer, 1)
		go func() {
			// A blocking read of the terminal cannot be interrupted: on
			// Ctrl-C it is abandoned, and the process exits.
			yes, err := confirm(g.stderr, os.Stdin, "sauve: "+q)
			got <- answer{yes, err}
		}()
		select {
		case a := <-got:
			return a.yes, a.err
		case <-ctx.Done():
			fmt.Fprintln(g.stderr)
			return false, ctx.Err()
		}
	}
}

// confirm writes question to w and reads a yes or no from r.
func confirm(w io.Writer, r io.Reader, question string) (bool, error) {
	fmt.Fprint(w, question)
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && line == "" {
		return false, fmt.Errorf("read the answer: %w", err)
	}
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return true, nil
	}
	return false, nil
}

// finish completes the restore: the target synced and closed, a new file
// put in place.
func (rt *restoreTarget) finish(size int64) error {
	err := rt.Finish(size)
	if cerr := rt.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", rt.Path, cerr)
	}
	if rt.out == nil {
		return err
	}
	if err != nil {
		rt.out.abort()
		return err
	}
	return rt.out.commit()
}

// abort closes the target after a failure: a new file is removed; an
// existing target is left as it is (a rerun, with --delta, completes it).
func (rt *restoreTarget) abort() {
	rt.Close()
	if rt.out != nil {
		rt.out.abort()
	}
}
