// Package shadow makes the point-in-time copies a backup reads, so that a
// source in use is imaged as it was at one instant rather than torn
// between old and new writes: a reflink copy (FICLONE) of an image file on
// XFS or btrfs, today; LVM and btrfs snapshots, fsfreeze and QEMU
// fleecing are to come (issue 11).
//
// A Provider implements source.Provider: given the opened sources of one
// backup it returns a view of each, and every view's Release drops its
// copy. Copies never outlive the process that made them: a reflink copy
// is unlinked as soon as it is open, so even kill -9 leaves nothing once
// the file is closed; what a crash in between leaves is found by its
// name on the next run, removed, and reported.
package shadow

import (
	"context"
	"fmt"
	"strings"

	"github.com/sauve-backup/sauve/internal/source"
)

// Mode says which kind of copy to take.
type Mode string

// The modes of --snapshot.
const (
	// Auto takes the copy the source allows, and none where there is no
	// way to take one (a device, a stream, an image file on a filesystem
	// without reflink).
	Auto Mode = "auto"
	// None reads the source as it is.
	None Mode = "none"
	// Reflink clones an image file (XFS with reflink, btrfs) and fails
	// where it cannot.
	Reflink Mode = "reflink"
)

// Modes lists the modes this version takes, for --help.
var Modes = []Mode{Auto, None, Reflink}

// ParseMode reads a --snapshot value.
func ParseMode(s string) (Mode, error) {
	for _, m := range Modes {
		if string(m) == s {
			return m, nil
		}
	}
	switch s {
	case "lvm", "btrfs", "qemu":
		return "", fmt.Errorf("--snapshot %s: not available in this version of sauve (use auto, none or reflink)", s)
	}
	names := make([]string, len(Modes))
	for i, m := range Modes {
		names[i] = string(m)
	}
	return "", fmt.Errorf("--snapshot %q: choose %s", s, strings.Join(names, ", "))
}

// Options tune a Provider.
type Options struct {
	Mode Mode
	// Warn hears what is worth saying that is not an error: a leftover
	// copy removed, why auto took no copy.
	Warn func(string)
}

// Provider takes the point-in-time copies of one backup. Each view's Copy
// says which kind of copy it is (empty for a source read as it is).
type Provider struct {
	opts Options
}

// New returns a Provider for opts.
func New(opts Options) *Provider {
	if opts.Mode == "" {
		opts.Mode = Auto
	}
	if opts.Warn == nil {
		opts.Warn = func(string) {}
	}
	return &Provider{opts: opts}
}

// Views implements source.Provider. On error, the copies already taken
// are released.
func (p *Provider) Views(ctx context.Context, srcs []*source.Source) ([]*source.View, error) {
	var views []*source.View
	for _, src := range srcs {
		v, err := p.view(ctx, src)
		if err != nil {
			Release(views)
			return nil, err
		}
		views = append(views, v)
	}
	return views, nil
}

func (p *Provider) view(ctx context.Context, src *source.Source) (*source.View, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if p.opts.Mode == None {
		return source.Live(src), nil
	}
	if src.Kind != source.File {
		if p.opts.Mode == Reflink {
			return nil, fmt.Errorf("--snapshot reflink: %s is not an image file (a %s): a reflink copy is only taken of files", src.Path, src.Kind)
		}
		return source.Live(src), nil
	}
	v, err := reflinkView(src, p.opts.Warn)
	if err == nil {
		return v, nil
	}
	if !isUnsupported(err) {
		return nil, err
	}
	if p.opts.Mode == Reflink {
		return nil, fmt.Errorf("--snapshot reflink: no reflink copy of %s: %w", src.Path, err)
	}
	// Most image files live where no copy can be taken (ext4): auto
	// then reads them as they are, as sauve always did, without a word;
	// the view's empty Copy says so.
	return source.Live(src), nil
}

// Release drops every copy of views, once they are no longer read.
func Release(views []*source.View) error {
	var first error
	for _, v := range views {
		if v != nil && v.Release != nil {
			if err := v.Release(); err != nil && first == nil {
				first = err
			}
		}
	}
	return first
}
