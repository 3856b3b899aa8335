// Package shadow makes the point-in-time copies a backup reads, so that a
// source in use is imaged as it was at one instant rather than torn
// between old and new writes: a reflink copy (FICLONE) of an image file on
// XFS or btrfs, a read-only btrfs snapshot of the subvolume holding an
// image file, an LVM snapshot of a logical volume, and (qemu.go) a
// running QEMU VM's drives read through fleecing. Filesystems mounted from
// a source (an image file through a loop device) are frozen for the
// instant the copy is taken, under a guard process that thaws them even
// if sauve dies.
//
// A Provider implements source.Provider: given the opened sources of one
// backup it plans a copy of each (checking what it can without changing
// anything), freezes what must be frozen, takes every copy, thaws, and
// returns a view of each; every view's Release drops its copy. Copies
// never outlive the process that made them for long: what a crash leaves
// is found by its name on the next run, removed, and reported.
package shadow

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/source"
)

// Mode says which kind of copy to take.
type Mode string

// The modes of --snapshot.
const (
	// Auto takes the copy the source allows, and none where there is no
	// way to take one (a stream, a plain partition, an image file on
	// ext4).
	Auto Mode = "auto"
	// None reads the source as it is.
	None Mode = "none"
	// LVM snapshots a logical volume (lvcreate -s) and fails elsewhere.
	LVM Mode = "lvm"
	// Btrfs snapshots the subvolume holding an image file, read-only.
	Btrfs Mode = "btrfs"
	// Reflink clones an image file (XFS with reflink, btrfs) and fails
	// where it cannot.
	Reflink Mode = "reflink"
	// QEMU reads a running VM's drives through fleecing; it is the mode of
	// qemu: sources and of no other.
	QEMU Mode = "qemu"
)

// Modes lists the modes of --snapshot, for --help.
var Modes = []Mode{Auto, None, LVM, Btrfs, Reflink, QEMU}

// ParseMode reads a --snapshot value.
func ParseMode(s string) (Mode, error) {
	for _, m := range Modes {
		if string(m) == s {
			return m, nil
		}
	}
	names := make([]string, len(Modes))
	for i, m := range Modes {
		names[i] = string(m)
	}
	return "", fmt.Errorf("--snapshot %q: choose %s", s, strings.Join(names, ", "))
}

// DefaultFreezeTimeout is how long filesystems stay frozen at most when
// Options.FreezeTimeout is 0.
const DefaultFreezeTimeout = 10 * time.Second

// Options tune a Provider.
type Options struct {
	Mode Mode
	// Warn hears what is worth saying that is not an error: a leftover
	// copy removed, why auto took no copy.
	Warn func(string)
	// FreezeTimeout is how long the thaw guard lets filesystems stay
	// frozen, whatever happens to sauve (DefaultFreezeTimeout when 0).
	FreezeTimeout time.Duration
	// NoFreeze takes copies without freezing the filesystems mounted
	// from the sources.
	NoFreeze bool
	// Guard is the command that runs the thaw guard (GuardMain): sauve's
	// own executable and its hidden thaw-guard command when nil.
	Guard []string
	// SnapshotSize is lvcreate's --size for the COW space of an LVM
	// snapshot ("" picks one from the origin's size).
	SnapshotSize string
	// Quiesce, when set, holds applications still around the instant
	// of the copies (hooks, writers, an agent). It needs a copy: a
	// backup whose sources are all read as they are is refused.
	Quiesce Quiescer
}

// Provider takes the point-in-time copies of one backup. Each view's Copy
// says which kind of copy it is (empty for a source read as it is).
type Provider struct {
	opts   Options
	report Report
}

// Report says what taking the copies did, for the backup's output.
type Report struct {
	// Frozen is how long writes to the Mounts were frozen (0: none were).
	Frozen time.Duration
	Mounts []string
}

// New returns a Provider for opts.
func New(opts Options) *Provider {
	if opts.Mode == "" {
		opts.Mode = Auto
	}
	if opts.Warn == nil {
		opts.Warn = func(string) {}
	}
	if opts.FreezeTimeout <= 0 {
		opts.FreezeTimeout = DefaultFreezeTimeout
	}
	return &Provider{opts: opts}
}

// Report returns what the last Views did.
func (p *Provider) Report() Report { return p.report }

// plan is the copy to take of one source, once every source has been
// planned: take runs while the filesystems of freeze are frozen, so it
// must be quick (one ioctl, one command).
type plan struct {
	src    *source.Source
	mode   Mode     // None: the source as it is
	freeze []string // mount points to freeze around take
	take   func(ctx context.Context) (*source.View, error)
}

func livePlan(src *source.Source) *plan {
	return &plan{src: src, mode: None, take: func(context.Context) (*source.View, error) { return source.Live(src), nil }}
}

// Views implements source.Provider: every copy is taken in one freeze,
// so that the sources are captured together. On error, the copies
// already taken are released.
func (p *Provider) Views(ctx context.Context, srcs []*source.Source) ([]*source.View, error) {
	plans := make([]*plan, len(srcs))
	for i, src := range srcs {
		pl, err := p.plan(ctx, src)
		if err != nil {
			return nil, err
		}
		plans[i] = pl
	}
	return p.take(ctx, plans)
}

// take freezes what the plans ask for, takes every copy and thaws.
func (p *Provider) take(ctx context.Context, plans []*plan) ([]*source.View, error) {
	var mounts []string
	for _, pl := range plans {
		for _, m := range pl.freeze {
			if !contains(mounts, m) {
				mounts = append(mounts, m)
			}
		}
	}
	at, err := p.instant(plans)
	if err != nil {
		return nil, err
	}
	views := make([]*source.View, 0, len(plans))
	err = quiesce(ctx, p.opts.Quiesce, at, func() error {
		var fz *frozen
		if len(mounts) > 0 && !p.opts.NoFreeze {
			var err error
			if fz, err = freeze(ctx, mounts, p.opts); err != nil {
				return err
			}
		}
		var err error
		for _, pl := range plans {
			var v *source.View
			if v, err = pl.take(ctx); err != nil {
				break
			}
			views = append(views, v)
		}
		if fz != nil {
			d, terr := fz.thaw()
			p.report = Report{Frozen: d, Mounts: mounts}
			if err == nil {
				err = terr
			}
		}
		return err
	})
	if err != nil {
		Release(views)
		return nil, err
	}
	return views, nil
}

// instant describes the copies the plans take, for a Quiescer; it
// refuses to quiesce around sources that get no copy, since their read
// lasts the whole backup.
func (p *Provider) instant(plans []*plan) (Instant, error) {
	var at Instant
	for _, pl := range plans {
		if pl.mode == None && p.opts.Quiesce != nil {
			return at, fmt.Errorf("%s gets no point-in-time copy (--snapshot %s), so there is no instant to quiesce the applications for: "+
				"drop --pre-freeze, --writer and --quiesce, or back it up from an LVM volume, an image file on XFS or btrfs, or through QEMU", pl.src.Path, p.opts.Mode)
		}
		at.Disks = append(at.Disks, pl.src.Path)
		ms := pl.freeze // a file's plan found its mounts already
		if pl.src.Kind != source.File {
			// An LVM plan freezes nothing (device-mapper's suspend does),
			// but its filesystems are in the copy all the same. Not
			// finding them fails safe: a writer's volumes are then on
			// no disk of the backup, and the backup is refused.
			ms, _ = mountsToFreeze(pl.src)
		}
		at.Mounts = append(at.Mounts, ms...)
		if !contains(strings.Split(at.Provider, ","), string(pl.mode)) {
			at.Provider = strings.TrimPrefix(at.Provider+","+string(pl.mode), ",")
		}
	}
	return at, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// plan chooses the copy of one source. Auto tries, in order, what the
// source's kind allows and takes the first that can be made; a named mode
// fails where its copy cannot be made.
func (p *Provider) plan(ctx context.Context, src *source.Source) (*plan, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	mode := p.opts.Mode
	if mode == None {
		return livePlan(src), nil
	}
	if mode == QEMU {
		return nil, fmt.Errorf("--snapshot qemu: %s is not a QEMU VM (name its QMP socket: qemu:/run/vm1.qmp)", src.Path)
	}
	type try struct {
		mode Mode
		plan func() (*plan, error)
	}
	var tries []try
	switch src.Kind {
	case source.File:
		tries = []try{
			{Btrfs, func() (*plan, error) { return planBtrfs(src, p.opts) }},
			{Reflink, func() (*plan, error) { return planReflink(src, p.opts.Warn) }},
		}
	case source.Device:
		tries = []try{{LVM, func() (*plan, error) { return planLVM(ctx, src, p.opts) }}}
	}
	var last error
	for _, t := range tries {
		if mode != Auto && mode != t.mode {
			continue
		}
		pl, err := t.plan()
		if err == nil {
			if src.Kind == source.File && pl.freeze == nil {
				if pl.freeze, err = mountsToFreeze(src); err != nil {
					return nil, err
				}
			}
			return pl, nil
		}
		if !isUnsupported(err) {
			return nil, err
		}
		last = err
	}
	if mode == Auto {
		// Most sources have no copy to take (an image file on ext4, a
		// partition): auto then reads them as they are, as sauve always
		// did; the view's empty Copy says so.
		return livePlan(src), nil
	}
	if last == nil {
		return nil, fmt.Errorf("--snapshot %s: %s is %s: %s", mode, src.Path, kindPhrase(src.Kind), modeNeeds(mode))
	}
	return nil, fmt.Errorf("--snapshot %s: no %s copy of %s: %w", mode, mode, src.Path, last)
}

func kindPhrase(k source.Kind) string {
	switch k {
	case source.Stream:
		return "a stream"
	case source.Device:
		return "a device"
	}
	return "an image file"
}

func modeNeeds(m Mode) string {
	switch m {
	case LVM:
		return "an LVM snapshot is only taken of a logical volume (/dev/VG/LV)"
	case Btrfs:
		return "a btrfs snapshot is only taken of an image file on btrfs"
	}
	return "a reflink copy is only taken of files"
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
