package cli

// A migration's source may be a drive of a running QEMU VM
// (qemu:SOCKET): each pass takes a new instant of it by fleecing, as
// 'sauve backup qemu:SOCKET' does (shadow.OpenQEMU), and, on a qcow2
// drive, reads only what the VM wrote since the instant of the previous
// pass, known from the persistent dirty bitmaps that backups keep
// (their generations are shared: a backup between two passes retires
// the pass's bitmap, and the next pass reads the drive in full).
//
// Why a killed pass leaves the next one exact: the state names the
// bitmap generation of the last completed pass's instant, and records
// it only once the pass's writes are durable and its copy held; the
// older generations are retired (Commit) only after that. A pass that
// dies leaves the state naming the previous generation, which QEMU
// keeps; the next pass merges it with every later one, a superset of
// what changed since the target's chunks were read, and the chunks the
// dead pass left unknown are read whatever the bitmaps say.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/qmp"
	"github.com/sauve-backup/sauve/internal/shadow"
	"github.com/sauve-backup/sauve/internal/source"
)

// migrateQEMUFlags are migrate's flags for qemu: sources.
type migrateQEMUFlags struct {
	qemuFlags
	drive      string
	stopSource bool
}

func addMigrateQEMUFlags(cmd *cobra.Command, o *migrateOptions) {
	f := cmd.Flags()
	f.StringVar(&o.vm.drive, "drive", "", "with qemu:SOCKET: the drive to migrate (its -drive id, device id or node name; needed when the VM has more than one writable drive)")
	f.BoolVar(&o.vm.stopSource, "stop-source", false, "with qemu:SOCKET and --final: pause the VM (QMP stop) before the final instant and leave it paused once TARGET is complete (resumed if the final pass fails)")
	o.vm.add(f, "every pass reads the drive in full")
}

// checkMigrateQEMU refuses the flags of VM sources where they mean
// nothing.
func checkMigrateQEMU(srcPath string, o *migrateOptions) error {
	v := &o.vm
	if !strings.HasPrefix(srcPath, qemuPrefix) {
		if v.drive != "" || v.stopSource {
			return usageError{errors.New("--drive and --stop-source apply to a QEMU VM's drive (qemu:SOCKET)")}
		}
		return nil
	}
	if err := v.checkGuestFreeze(); err != nil {
		return err
	}
	if o.quiesce != nil {
		return usageError{errors.New("--pre-freeze, --post-thaw, --writer and --quiesce are not supported with a qemu: source yet: the guest agent freezes its filesystems (--guest-freeze)")}
	}
	if v.stopSource && !o.final {
		return usageError{errors.New("--stop-source pauses the VM for the final pass: add --final")}
	}
	if v.stopSource && v.guestFreeze == "on" {
		return usageError{errors.New("--stop-source with --guest-freeze on: a paused guest's agent cannot freeze it (nothing writes while it is paused; use --guest-freeze auto)")}
	}
	return nil
}

// qemuSource is a drive of a running VM, read at a new instant each
// pass.
type qemuSource struct {
	g      *globals
	f      *migrateQEMUFlags
	socket string
	vm     vmID
	drive  shadow.QEMUDrive
	files  []string // the image files of the VM's drives: never a target

	// paused is when --stop-source paused the VM (zero: it runs);
	// wasPaused says it was paused already, and is left so.
	paused    time.Time
	wasPaused bool

	// The pass under way: its instant, and why it reads the drive in
	// full ("" when it reads what the bitmap marks, or for a first pass).
	qb       *shadow.QEMUBackup
	views    []*source.View
	fullRead string
	report   shadow.QEMUReport
}

// openQEMUSource connects to the VM, picks the drive, removes what a
// sauve that died left in the VM, and returns the drive's identity (its
// layout is checked at each pass, from the pass's instant).
func (g *globals) openQEMUSource(ctx context.Context, m *migration, socket string) (migrate.Identity, error) {
	qs := &qemuSource{g: g, f: &m.o.vm, socket: socket}
	o := qs.options(m, nil)
	if qs.f.drive != "" {
		o.Drives = []string{qs.f.drive}
	}
	qb, err := shadow.OpenQEMU(ctx, o)
	if err != nil {
		return migrate.Identity{}, err
	}
	defer qb.Close()
	qs.vm = vmIdentity(qb)
	drives := qb.Drives()
	if len(drives) != 1 {
		ids := make([]string, len(drives))
		for i, d := range drives {
			ids[i] = d.ID
		}
		return migrate.Identity{}, usageError{fmt.Errorf("VM %s has %d writable drives (%s): name the one to migrate with --drive", qs.vm.host, len(drives), strings.Join(ids, ", "))}
	}
	qs.drive = drives[0]
	if qs.drive.Size <= 0 {
		return migrate.Identity{}, fmt.Errorf("drive %s of VM %s holds no byte: nothing to migrate", qs.drive.ID, qs.vm.host)
	}
	if qs.files, err = driveFiles(ctx, qb.QMP()); err != nil {
		return migrate.Identity{}, fmt.Errorf("VM %s: %w", qs.vm.host, err)
	}
	m.vm = qs
	m.src = &source.Source{Path: qemuPrefix + socket + "#" + qs.drive.ID, Kind: source.Kind("qemu"), Size: qs.drive.Size}
	m.disk = &source.Disk{Size: qs.drive.Size} // until a pass's instant
	return migrate.Identity{Path: qs.key(), Size: qs.drive.Size, VM: qs.vm.key, Drive: qs.drive.ID}, nil
}

// chunkSize is the chunk size of a new state of the drive: a delta pass
// reads whole chunks around what the bitmap (64 KiB blocks) marks, and
// 256 KiB chunks read a third less than 1 MiB ones for the reference
// disk's churn, at a first pass about 15% slower (64 KiB ones make every
// pass slower: the cost of a chunk dominates); larger for drives over
// 256 GiB, so that the state keeps at most 1 Mi chunks (32 MiB).
func (qs *qemuSource) chunkSize() int {
	cs := 256 << 10
	for cs < migrate.DefaultChunkSize && qs.drive.Size/int64(cs) > 1<<20 {
		cs <<= 1
	}
	return cs
}

// key names the drive whatever the VM's socket.
func (qs *qemuSource) key() string { return qs.vm.path(qs.drive.ID) }

// options are the fleecing's options for a pass; since gives the
// tracker the state records.
func (qs *qemuSource) options(m *migration, since func(string) string) shadow.QEMUOptions {
	f := qs.f
	o := shadow.QEMUOptions{Socket: qs.socket, GuestFreeze: f.guestFreeze, GuestAgent: f.guestAgent,
		FleeceDir: f.fleeceDir, NBDServer: f.nbdServer, Bitmaps: !f.noBitmaps, FreezeTimeout: m.o.freezeTimeout,
		Warn: qs.g.warn, Since: since}
	if !qs.paused.IsZero() || qs.wasPaused {
		// The agent of a paused guest does not answer; nothing writes.
		o.GuestFreeze = "off"
	}
	return o
}

// driveFiles returns the image files of the VM's drives.
func driveFiles(ctx context.Context, c *qmp.Client) ([]string, error) {
	var blocks []struct {
		Inserted *struct {
			File string `json:"file"`
		} `json:"inserted"`
	}
	if err := c.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return nil, err
	}
	var files []string
	for _, b := range blocks {
		if b.Inserted != nil && b.Inserted.File != "" {
			files = append(files, b.Inserted.File)
		}
	}
	return files, nil
}

// refuseTarget refuses a target that is an image file of the VM.
func (qs *qemuSource) refuseTarget(tgtPath string, tfi os.FileInfo) error {
	for _, f := range qs.files {
		if fi, err := os.Stat(f); err == nil && os.SameFile(fi, tfi) {
			return fmt.Errorf("target %s is a drive of VM %s (%s): refusing to migrate a VM onto its own disk", tgtPath, qs.vm.host, f)
		}
	}
	return nil
}

// begin takes the pass's instant of the drive and returns the ranges
// the VM wrote since the previous pass's (nil: every chunk is read). It
// refuses a drive whose layout is not the state's.
func (qs *qemuSource) begin(ctx context.Context, m *migration) (extent.Map, error) {
	h := &m.state.Header
	o := qs.options(m, func(string) string { return h.Tracker })
	o.Drives = []string{qs.drive.ID}
	qb, err := shadow.OpenQEMU(ctx, o)
	if err != nil {
		return nil, err
	}
	qs.qb = qb
	if id := vmIdentity(qb); id.key != qs.vm.key {
		return nil, fmt.Errorf("the VM at %s is no longer %s (it is %s)", qs.socket, qs.vm.host, id.host)
	}
	if d := qb.Drives()[0]; d.Size != qs.drive.Size {
		return nil, fmt.Errorf("drive %s of VM %s now holds %d bytes, not %d: --reset to copy it again", d.ID, qs.vm.host, d.Size, qs.drive.Size)
	}
	if qs.views, err = qb.Views(ctx); err != nil {
		return nil, err
	}
	v := qs.views[0]
	disk, err := source.OpenDisk(v, source.Options{Raw: true}) // the disk as the guest sees it
	if err != nil {
		return nil, err
	}
	m.disk = disk
	got := h.Source
	if err := describeIdentity(disk, &got); err != nil {
		return nil, err
	}
	if h.Passes == 0 {
		h.Source = got // recorded with the pass
	} else if why := h.Source.Mismatch(got); why != "" {
		return nil, fmt.Errorf("state file %s is of another disk than drive %s of VM %s (it has %s): give another --state, or --reset to copy everything again", m.state.Path(), qs.drive.ID, qs.vm.host, why)
	}
	if v.Changes != nil && h.Tracker != "" && v.Changes.Since == h.Tracker {
		qs.fullRead = ""
		return v.Changes.Map, nil
	}
	qs.fullRead = qs.whyFull(h, v)
	if qs.fullRead != "" && !m.warned["full read: "+qs.fullRead] {
		m.warned["full read: "+qs.fullRead] = true
		qs.g.printf("drive %s is read in full: %s\n", qs.drive.ID, qs.fullRead)
	}
	return nil, nil
}

// whyFull says why the pass reads every chunk; "" for a first pass,
// which does anyway.
func (qs *qemuSource) whyFull(h *migrate.Header, v *source.View) string {
	switch {
	case qs.f.noBitmaps:
		return "--no-bitmaps"
	case v.Tracker == "":
		return v.FullRead // not a drive QEMU keeps bitmaps of
	case h.Tracker == "" && h.Passes == 0:
		return ""
	case h.Tracker == "":
		return "the previous pass left no dirty bitmap of the drive"
	}
	return v.FullRead
}

// verify checks, once the pass's writes are durable, that the instant's
// copy held, and records its bitmap generation as the state's tracker
// (the state is written next).
func (qs *qemuSource) verify(m *migration) error {
	v := qs.views[0]
	if err := v.Verify(); err != nil {
		return fmt.Errorf("drive %s of VM %s: %w (what the pass wrote is on the target and in the state; the next pass reads again what changed since the previous one)", qs.drive.ID, qs.vm.host, err)
	}
	if v.Tracker != "" {
		// Without one (--no-bitmaps), the tracker recorded stays valid:
		// its generation records on.
		m.state.Header.Tracker = v.Tracker
	}
	qs.report = qs.qb.Report()
	return nil
}

// commit retires the bitmap generations before the pass's, now that the
// state names it.
func (qs *qemuSource) commit(ctx context.Context) {
	if err := qs.qb.Commit(ctx); err != nil {
		qs.g.warnf("the pass is complete, but retiring the VM's older dirty bitmaps failed (the next pass reads a little more): %v", err)
	}
}

// end removes the pass's copy from the VM, whatever happened.
func (qs *qemuSource) end() {
	if qs.qb == nil {
		return
	}
	if err := shadow.Release(qs.views); err != nil {
		qs.g.warnf("VM %s: %v", qs.vm.host, err)
	}
	if err := qs.qb.Close(); err != nil {
		qs.g.warnf("%v (the next sauve run on this VM removes it)", err)
	}
	qs.qb, qs.views = nil, nil
}

// finalQEMUPass runs the final pass of a VM's drive: its instant is
// taken as every pass's (frozen through the guest agent when it has
// one), after --stop-source paused the VM.
func (g *globals) finalQEMUPass(ctx context.Context, m *migration) (*finalResult, error) {
	qs := m.vm
	if qs.f.stopSource {
		if err := qs.pause(ctx); err != nil {
			return nil, err
		}
	}
	_, err := g.migratePass(ctx, m, true)
	if err != nil {
		if !qs.paused.IsZero() {
			if rerr := qs.resume(); rerr != nil {
				return nil, fmt.Errorf("%w; resuming VM %s failed too (%v): resume it with the QMP command cont", err, qs.vm.host, rerr)
			}
			g.warnf("the final pass failed: VM %s was resumed (QMP cont)", qs.vm.host)
		}
		return nil, err
	}
	return qs.cutover(m), nil
}

// cutover says what the final pass's instant was.
func (qs *qemuSource) cutover(m *migration) *finalResult {
	rep, tgt, drive := qs.report, m.target.Path(), qs.drive.ID
	fr := &finalResult{frozen: rep.Frozen, json: map[string]any{"vm": qs.vm.host, "drive": drive,
		"vm_paused": qs.wasPaused || !qs.paused.IsZero(), "paused_seconds": 0.0, "guest_freeze": rep.NoFreeze}}
	var b strings.Builder
	switch {
	case !qs.paused.IsZero():
		took := time.Since(qs.paused)
		fr.json["paused_seconds"] = took.Seconds()
		fmt.Fprintf(&b, "cut-over: VM %s has been paused for %s; %s now holds drive %s as the paused VM left it\n", qs.vm.host, seconds(took.Seconds()), tgt, drive)
		fmt.Fprintf(&b, "  the VM stays paused: resume it with the QMP command cont (virsh resume) to go back to it, or end it with quit (virsh destroy): a shutdown inside the guest would write after the copy\n")
	case qs.wasPaused:
		fmt.Fprintf(&b, "cut-over: VM %s was paused already, and stays so; %s now holds drive %s as it is\n", qs.vm.host, tgt, drive)
	default:
		if rep.Frozen > 0 {
			fmt.Fprintf(&b, "cut-over: the guest's filesystems were frozen for %s (guest agent) at the final instant; %s now holds drive %s as it was then\n", seconds(rep.Frozen.Seconds()), tgt, drive)
		} else {
			fmt.Fprintf(&b, "cut-over: the final instant was taken without a guest freeze (%s); %s holds drive %s as a power cut then would have left it\n", rep.NoFreeze, tgt, drive)
		}
		fmt.Fprintf(&b, "  VM %s runs on: what it writes after that instant is not on %s (--stop-source pauses it for the final pass)\n", qs.vm.host, tgt)
	}
	fr.cutover = b.String()
	return fr
}

// pause stops the VM's CPUs (QMP stop) for the final instant.
func (qs *qemuSource) pause(ctx context.Context) error {
	c, err := qmp.Dial(ctx, qs.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("VM %s: %w", qs.vm.host, err)
	}
	if !st.Running {
		qs.wasPaused = true
		qs.g.printf("VM %s is not running (%s): it is left so\n", qs.vm.host, st.Status)
		return nil
	}
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("VM %s: pause it: %w", qs.vm.host, err)
	}
	qs.paused = time.Now()
	qs.g.printf("VM %s paused (QMP stop) for the final pass\n", qs.vm.host)
	return nil
}

// resume runs the VM that pause stopped again (QMP cont), even when the
// command's context is done.
func (qs *qemuSource) resume() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, qs.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		return err
	}
	qs.paused = time.Time{}
	return nil
}
