package cli

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/machine"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/shadow"
)

// qemuFlags are backup's flags for qemu: sources.
type qemuFlags struct {
	drives      []string
	guestFreeze string
	guestAgent  string
	fleeceDir   string
	nbdServer   string
	noBitmaps   bool
}

const qemuPrefix = "qemu:"

// add declares the flags of qemu: sources that backup and migrate share
// (--drive differs: backup takes several); full says what --no-bitmaps
// costs.
func (q *qemuFlags) add(f *pflag.FlagSet, full string) {
	f.StringVar(&q.guestFreeze, "guest-freeze", "auto", "with qemu:SOCKET: freeze the guest's filesystems through its guest agent around the instant: auto (when it has one; a copy without a freeze is said), on (fail without), off")
	f.StringVar(&q.guestAgent, "guest-agent", "", "with qemu:SOCKET: the guest agent's socket (default: found among the VM's chardevs)")
	f.StringVar(&q.fleeceDir, "fleece-dir", "", "with qemu:SOCKET: where the fleecing images grow while the VM writes (default: $TMPDIR or /tmp)")
	f.StringVar(&q.nbdServer, "nbd-server", "", "with qemu:SOCKET: the NBD server the VM already runs, to export the copies on (default: sauve starts one)")
	f.BoolVar(&q.noBitmaps, "no-bitmaps", false, "with qemu:SOCKET: keep no dirty bitmaps in the VM ("+full+")")
}

// checkGuestFreeze refuses a --guest-freeze that is none of its values.
func (q *qemuFlags) checkGuestFreeze() error {
	switch q.guestFreeze {
	case "auto", "on", "off":
		return nil
	}
	return usageError{fmt.Errorf("--guest-freeze %q: choose auto, on or off", q.guestFreeze)}
}

// backupQEMU backs up the drives of the running VM whose QMP socket is
// socket, at one instant, into one snapshot.
func (g *globals) backupQEMU(ctx context.Context, socket string, o *backupOptions, q *qemuFlags) error {
	if o.mode != shadow.Auto && o.mode != shadow.QEMU {
		return usageError{fmt.Errorf("--snapshot %s: a QEMU VM is read through fleecing (--snapshot qemu or auto)", o.mode)}
	}
	if err := q.checkGuestFreeze(); err != nil {
		return err
	}
	var since func(drive string) string
	qb, err := shadow.OpenQEMU(ctx, shadow.QEMUOptions{
		Socket: socket, Drives: q.drives, GuestFreeze: q.guestFreeze, GuestAgent: q.guestAgent,
		FleeceDir: q.fleeceDir, NBDServer: q.nbdServer, Bitmaps: !q.noBitmaps, FreezeTimeout: o.freezeTimeout, Warn: g.warn,
		Since:   func(drive string) string { return since(drive) },
		Quiesce: quiescerOrNil(o.quiesce),
	})
	if err != nil {
		return err
	}
	defer qb.Close()
	if err := g.qemuQuiesce(ctx, qb, o); err != nil {
		return err
	}
	id := vmIdentity(qb)
	if o.host == "" {
		o.host = id.host
	}
	drives := qb.Drives()
	r, parentID, err := g.openForBackup(ctx, o, id.path(drives[0].ID))
	if err != nil {
		return err
	}
	parent := g.loadParent(ctx, r, parentID)
	since = func(drive string) string {
		if d := diskOf(parent, id.path(drive)); d != nil {
			return d.ChangeTracker
		}
		return ""
	}
	views, err := qb.Views(ctx)
	if err != nil {
		return err
	}
	defer shadow.Release(views)
	disks := make([]*backupDisk, len(views))
	bss := make([]backup.Source, len(views))
	o.source.Raw = true // the guest's disk as it sees it: never an image format
	for i, v := range views {
		disks[i] = &backupDisk{src: v.Of, name: drives[i].ID, path: id.path(drives[i].ID), view: v, fullRead: v.FullRead}
		if bss[i], err = g.prepareDisk(disks[i], o); err != nil {
			return err
		}
		bss[i].Kind = "qemu"
		bss[i].Base = g.qemuBase(parent, disks[i])
	}
	defer func() {
		for _, d := range disks {
			if d.disk != nil {
				d.disk.Close()
			}
		}
	}()
	prog := new(backup.Progress)
	m := startMeter(g.stderr, g.showProgress(), meterSource{
		label: "backup " + id.host, total: prog.Total.Load, current: prog.Done.Load,
		extra: func() string {
			return fmt.Sprintf("read %s, new %s, unchanged or dedup %s", bytesIEC(prog.Read.Load()), bytesIEC(prog.New.Load()), bytesIEC(prog.Reused.Load()))
		},
	})
	qdevs := make(map[string]string, len(drives))
	for _, d := range drives {
		qdevs[d.ID] = d.QDev
	}
	res, err := backup.RunDisks(ctx, r, bss, backup.Options{Host: o.host, Tags: o.tags, Parent: parentID, Progress: prog, Program: "sauve " + Version, Warn: g.warn,
		Quiesce: o.quiesce.record(), Machine: machine.QEMU(ctx, qb.QMP(), qdevs)})
	m.Stop()
	if err != nil {
		return fmt.Errorf("backup of VM %s: %w", id.host, err)
	}
	// The snapshot is stored: only now may the bitmaps of earlier
	// generations go.
	if err := qb.Commit(ctx); err != nil {
		g.warnf("snapshot %s is stored, but retiring the VM's older dirty bitmaps failed (the next backup reads a little more): %v", res.Snapshot.ID.Short(), err)
	}
	for _, d := range disks {
		d.layout.WarnLate()
	}
	if err := g.printQEMUBackup(res, disks, qb.Report()); err != nil {
		return err
	}
	return g.runPostBackup(ctx, o.agentFlags, res.Snapshot)
}

// vmID is how a VM is known across reboots: its UUID (or, without one,
// its name), never its monitor socket's path.
type vmID struct {
	host string // the snapshot's host: the VM's name
	key  string // UUID, or name
}

func vmIdentity(qb *shadow.QEMUBackup) vmID {
	uuid, name := qb.VM()
	id := vmID{host: name, key: uuid}
	if uuid == "" || strings.Trim(uuid, "0-") == "" {
		id.key = "name=" + name
	}
	if id.host == "" {
		id.host = "vm-" + uuid
	}
	return id
}

// path is the source path a drive of the VM is recorded under.
func (id vmID) path(drive string) string { return qemuPrefix + id.key + "/" + drive }

// loadParent loads the parent snapshot, or nil.
func (g *globals) loadParent(ctx context.Context, r *repo.Repository, id *repo.ID) *repo.Snapshot {
	if id == nil {
		return nil
	}
	sn, err := r.LoadSnapshot(ctx, *id)
	if err != nil {
		g.warnf("cannot load the previous snapshot %s (%v): every drive is read in full", id.Short(), err)
		return nil
	}
	return sn
}

func diskOf(sn *repo.Snapshot, path string) *repo.Disk {
	if sn == nil {
		return nil
	}
	for i := range sn.Disks {
		if sn.Disks[i].Source == path {
			return &sn.Disks[i]
		}
	}
	return nil
}

// qemuBase is the base of an incremental read of d: the parent's disk of
// the same drive, when the view's dirty bitmap counts from it.
func (g *globals) qemuBase(parent *repo.Snapshot, d *backupDisk) *backup.Base {
	v := d.view
	if v.Changes == nil {
		return nil
	}
	pd := diskOf(parent, d.path)
	if pd == nil || pd.ChangeTracker == "" || pd.ChangeTracker != v.Changes.Since || pd.Size != v.Size {
		d.fullRead = "the previous snapshot of drive " + d.name + " does not match its dirty bitmap"
		return nil
	}
	return &backup.Base{Snapshot: parent, Disk: pd, Changed: v.Changes.Map}
}

// printQEMUBackup says what a VM backup stored and read.
func (g *globals) printQEMUBackup(res *backup.Result, disks []*backupDisk, rep shadow.QEMUReport) error {
	if g.json {
		out := backupJSON(res, disks, shadow.Report{})
		out["guest_frozen_seconds"] = rep.Frozen.Seconds()
		out["guest_freeze"] = rep.NoFreeze
		out["fleece_bytes"] = rep.FleeceUsed
		out["drives_skipped"] = nonNil(rep.Skipped)
		return g.printJSON(out)
	}
	if err := g.printBackup(res, disks, shadow.Report{}); err != nil {
		return err
	}
	for i, d := range res.Snapshot.Disks {
		switch {
		case d.Base != nil:
			g.printf("  drive %s: read %s of %s (what its dirty bitmap marks), %s unchanged since snapshot %s\n",
				d.Name, bytesIEC(d.Stats.BytesRead), bytesIEC(d.Size), bytesIEC(d.Stats.BytesUnchanged), d.Base.Short())
		case disks[i].fullRead != "":
			g.printf("  drive %s: read in full (%s of %s): %s\n", d.Name, bytesIEC(d.Stats.BytesRead), bytesIEC(d.Size), disks[i].fullRead)
		}
	}
	for _, s := range rep.Skipped {
		g.printf("  not backed up: %s\n", s)
	}
	if rep.Frozen > 0 {
		g.printf("  the guest's filesystems were frozen for %s (guest agent)\n", seconds(rep.Frozen.Seconds()))
	} else if rep.NoFreeze != "" {
		g.printf("  guest not frozen (%s): crash-consistent\n", rep.NoFreeze)
	}
	g.printf("  fleecing took %s\n", bytesIEC(rep.FleeceUsed))
	return nil
}

// qemuQuiesce sets the VM backup's quiescing: the flags', and the sauve
// agent in the guest when the VM exposes its channel (a chardev for the
// virtio-serial port org.sauve.agent.0) and no --quiesce names one.
func (g *globals) qemuQuiesce(ctx context.Context, qb *shadow.QEMUBackup, o *backupOptions) error {
	if !o.quiesce.hasAgent() && o.agentFlags != nil {
		path, err := qb.SauveAgent(ctx)
		if err != nil {
			return err
		}
		if path != "" {
			if err := g.addVMAgent(o, "unix:"+path); err != nil {
				return err
			}
		}
	}
	if o.quiesce != nil {
		qb.SetQuiesce(o.quiesce, o.quiesce.hasAgent())
	}
	return nil
}

// addVMAgent adds the guest's sauve agent at addr to the backup's
// writers; without a caller key the backup goes on crash-consistent.
func (g *globals) addVMAgent(o *backupOptions, addr string) error {
	cfg, err := o.agentFlags.caller.config()
	if err != nil {
		g.warnf("the VM has a sauve agent channel (%s), but it cannot be asked to freeze: %v; the guest is frozen through qemu-ga if it can be", addr, err)
		return nil
	}
	w, err := newAgentWriter(addr, cfg, o.agentFlags.agentWindow)
	if err != nil {
		return err
	}
	if o.quiesce == nil {
		if o.quiesce, err = o.agentFlags.empty(); err != nil {
			return err
		}
		o.quiesce.warn = g.warn
	}
	o.quiesce.set.Writers = append(o.quiesce.set.Writers, w)
	g.printf("quiescing through the sauve agent in the guest (%s)\n", addr)
	return nil
}
