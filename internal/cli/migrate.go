package cli

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/disk"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/shadow"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

// migrateOptions are migrate's flags, read once.
type migrateOptions struct {
	final         bool
	untilDelta    int64 // -1: one pass
	limitRate     int64
	statePath     string
	reset         bool
	noFSSkip      bool
	maxPasses     int
	freezeTimeout time.Duration
	boot          testBootFlags
	// size is the size of a new target (0: the source's); grow what
	// --final does with a larger raw target.
	size int64
	grow growFlags
	vm   migrateQEMUFlags // for qemu:SOCKET sources (migrate_qemu.go)
	// subformat is that of a new VHD or VDI target (--subformat).
	subformat string
	// holdFlags are the flags that hold applications still for the
	// final pass, quiesce what they ask for (nil: none).
	holdFlags quiesceFlags
	quiesce   *quiescer
	// snap selects a repository snapshot as SOURCE (migrate_snapshot.go).
	snap migrateSnapshotFlags
}

// exitDiverging is migrate's exit status when --until-delta is not
// reached because the source changes faster than the copy.
const exitDiverging = 3

func newMigrateCmd(g *globals) *cobra.Command {
	var (
		o          migrateOptions
		untilDelta string
		limitRate  string
	)
	cmd := &cobra.Command{
		Use:   "migrate SOURCE TARGET",
		Short: "Copy a disk in use onto another by delta passes, with a short final cut-over",
		Long: `Copy SOURCE (a block device or a disk image file, in use or not, a
running QEMU VM's drive: qemu:SOCKET, or a disk of a snapshot in the
repository; both below) onto TARGET
(see TARGETS below, created if missing) by passes, as a
migration of a running machine does. The first pass copies every used
block of SOURCE; each later pass reads and hashes SOURCE again and writes
only the chunks (1 MiB) whose BLAKE3 hash changed since the previous
pass, known from a local state file: TARGET is never read back. Free
space is skipped as backups skip it, a chunk at a time: a chunk holding
a used block is read in full (blocks freed since the previous pass keep
their old bytes, and the chunk its hash); one holding none is not read,
and TARGET keeps what it had there (zeros on a new TARGET; an existing
one's old bytes are zeroed once). Filesystems mounted read-write from
SOURCE, whose free space changes while they are read, are read in full,
except by the final pass, which freezes them.

--final quiesces SOURCE for the last pass: the filesystems mounted
read-write from it are frozen (fsfreeze, under the same thaw guard as
backups: they are thawed at the end, on error, on Ctrl-C, after
--freeze-timeout, and even if sauve is killed), the delta is applied, and
the cut-over time is reported: how long writes were frozen. TARGET then
holds SOURCE as it was frozen. Without an earlier pass, --final runs a
first pass unfrozen before it. Applications are held still around the
freeze as backup holds them (--pre-freeze and --post-thaw hooks,
--writer postgresql or mariadb, --quiesce agent://): they are flushed
and held first and let go after the thaw; a failing hook or writer runs
no final pass (the filesystems thawed, post-thaw run, TARGET as the
previous pass left it) unless --hook-failure continue. The summary says
how they were held.

After each pass sauve prints what it read and wrote, the chunks changed,
the source's rate of change since the previous pass against the copy
rate, and an estimate of the next pass; with --json, one JSON object per
pass and one summary, a line each. --until-delta SIZE repeats passes
until a pass changes at most SIZE; when the delta has not shrunk by a
tenth over 3 passes (the source changes faster than the copy: without
change tracking every pass reads all used blocks, so its delta is what
changes while it runs), or after --max-passes, sauve says so and exits
with status 3 (no final pass is run). --limit-rate throttles reads and
writes together, for disks and links shared with production.

The state file (in $XDG_CACHE_HOME/sauve/migrate/ or --cache-dir, one
per SOURCE and TARGET, or --state) records which source and target it is of (device
numbers or inode, size, disk ID, filesystem UUIDs): a state of another
source or target is refused, nothing written; --reset starts over with a
full pass. A pass interrupted at any instant (Ctrl-C, kill -9, a crash)
leaves a target that the next pass makes exact: a chunk's hash is kept
only once its write is durable.

Refused, each with nothing written: a TARGET smaller than SOURCE, a
TARGET in use (mounted, a partition of it mounted, backing a mounted
loop device, or opened by a running QEMU: its image locks), TARGET being SOURCE, and a SOURCE that is a stream.

TARGETS: a raw image file or a block device; a VM disk image updated in
place at every pass (.qcow2: qcow2 v3; .vmdk: monolithicSparse; .vhd and
.vdi: dynamic, or fixed with --subformat fixed (Azure takes fixed VHDs
only) or when the image exists already; .vhdx), valid for
'qemu-img check' after each pass (after a crash, at worst with leaked
qcow2 clusters; the next pass repairs what a crash left in VHD and VDI
tables); or ssh://USER@HOST[:PORT]/PATH, a block device or file on
another machine, written by sauve there ('sauve migrate-receive', started
over SSH; --remote-sauve names it, "sudo sauve" works), compressed on the
wire, with the host-key rules of sftp:// repositories (the key must be in
known_hosts).

--size makes a new TARGET, a raw file or a VM image (its virtual size),
larger than SOURCE (an existing one, a device, must be as large); after
the final pass --final moves a GPT's backup to the end of it, and
--grow-last-partition (GPT or MBR) grows the last partition. --grow-fs
(ext4, XFS; as root) grows its filesystem too, on raw targets only: a
filesystem grows through the kernel, so grow that of a VM image inside
the VM. The passes' state no longer describes the grown target: it is
removed, and a later pass copies everything again. Remote targets are
not grown.

qemu:SOCKET migrates a drive of a running QEMU VM (QEMU 7 or newer,
through its QMP socket; --drive names it when the VM has more than one
writable drive). Each pass reads a new instant of the drive, taken as
'sauve backup qemu:SOCKET' takes it (fleecing, read over NBD; the guest's
filesystems frozen around the instant through its guest agent when it
has one, --guest-freeze), and, on a qcow2 drive, only the chunks (of
256 KiB for a VM drive) that the VM wrote since the previous pass's
instant, known from a persistent dirty bitmap (QEMU keeps it in the
image): a pass that dies leaves the bitmaps that the next one needs. Without one (a raw drive, --no-bitmaps, a bitmap
lost: QEMU stopped uncleanly, or it was removed; or a 'sauve backup' of
the same drive since, which retires the pass's bitmap) a pass reads the
drive in full and says why. The state is of the VM (its UUID, or name)
and drive, not of the socket. --final takes the last instant and reports
the guest's freeze as the cut-over; the VM runs on, and its writes after
that instant are not on TARGET. --stop-source pauses the VM (QMP stop)
before the final instant and leaves it paused once TARGET is complete,
saying how long it has been paused: resume it with cont, or end it with
quit; if the final pass fails, the VM is resumed.

SOURCE may be a snapshot of the repository (-r): 'latest' or an ID
prefix that is no existing path, found as 'sauve restore' finds it
(--host, --tag, --source, --before, --after; --disk NAME for a snapshot
of several disks; a write-only key is refused). A migration is then
seeded from last night's backup, with no load on the machine in
production, and finished live: each pass from a snapshot reads it from
the repository (every chunk verified against its ID; zero chunks cost
no fetch), a pass from a later snapshot only the chunks whose IDs
differ from those of the previous pass's snapshot; then passes from the
live SOURCE onto the same TARGET, with the same state, and the last
one with --final. The state's default path is the one of a live pass
from the path the disk was backed up from, when absolute (--state FILE
otherwise). A snapshot and a device or file are taken for one disk when
their size, disk ID and filesystem UUIDs match (nothing to compare
without any: refused); once a live pass has run, its device or inode
guards the later ones. A pass reads in full, and says why, after a live pass, or
when the previous pass's snapshot was forgotten or pruned, no longer
loads, or is of another repository or disk size. A snapshot is one
instant already: --final, --stop-source and the flags that hold
applications are refused with it (run them with the live SOURCE), and
--no-fs-skip changes nothing (every chunk is read: the repository
stores free and zero chunks alike). Each pass says the snapshot and its
time, and what it fetched from the repository (--json: source_snapshot,
bytes_fetched).

--test-boot boots TARGET after the passes under QEMU, with no network and
its writes going to a throw-away overlay (TARGET is not changed), while
SOURCE keeps running, and reports whether the guest printed --boot-marker
("login:") on its first serial port within --boot-timeout: a Linux guest
does when its console is on ttyS0 (console=ttyS0, as cloud images have);
one that writes only to its screen never does, and the report shows the
serial console's last lines. Exit status 4 when the marker was not seen.
An ssh:// target is booted on its own machine, by the sauve there, with
the same rules (QEMU must be installed there; --boot-uefi names a
firmware file there; the console is not copied, its last lines come back
in the report).`,
		Example: `  sauve migrate /dev/sda /dev/sdb                        # first pass; rerun for a delta pass
  sauve migrate /dev/vg0/web /srv/web.img --until-delta 64M --limit-rate 50M
  sauve migrate /dev/vg0/web /srv/web.img --final         # freeze, last delta, thaw
  sauve migrate /var/lib/images/db.img /dev/vdc --until-delta 32M --final --json
  sauve migrate /dev/sda /srv/p2v/web1.img --test-boot --boot-marker 'web1 login:'
  sauve migrate /dev/sda /var/lib/libvirt/images/web1.qcow2 --until-delta 64M --final
  sauve migrate /dev/sda ssh://root@newhost/dev/vdb --until-delta 64M --final
  sauve migrate qemu:/run/vm1.qmp --drive virtio0 /srv/vm1.qcow2 --until-delta 64M
  sauve migrate qemu:/run/vm1.qmp --drive virtio0 /srv/vm1.qcow2 --final --stop-source
  sauve migrate -r /backup/repo latest --host web1 /srv/web1.qcow2      # seed from the nightly backup`,
		Args: exactArgs(2, "SOURCE and TARGET"),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.untilDelta = -1
			if untilDelta != "" {
				n, err := parseSize(untilDelta)
				if err != nil {
					return usageError{fmt.Errorf("--until-delta: %w", err)}
				}
				o.untilDelta = n
			}
			if limitRate != "" {
				n, err := parseSize(strings.TrimSuffix(strings.TrimSuffix(limitRate, "/s"), "ps"))
				if err != nil || n <= 0 {
					return usageError{fmt.Errorf("--limit-rate %q: want a rate such as 50M (bytes a second)", limitRate)}
				}
				o.limitRate = n
			}
			if o.maxPasses < 1 {
				return usageError{errors.New("--max-passes: at least 1")}
			}
			// Before the checks of the flags that a snapshot refuses:
			// they would send the user to add --final.
			if err := o.snap.check(cmd, args[0]); err != nil {
				return err
			}
			if err := o.readQuiesce(g.warn); err != nil {
				return err
			}
			return g.migrate(cmd.Context(), args[0], args[1], &o)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&o.final, "final", false, "hold the applications (hooks, writers) and freeze the filesystems mounted from SOURCE for the last pass, and report the cut-over time")
	f.StringVar(&untilDelta, "until-delta", "", "repeat passes until one changes at most this `SIZE` (e.g. 64M); exit status 3 when the delta stops shrinking")
	f.StringVar(&limitRate, "limit-rate", "", "throttle reads and writes together to this many bytes a second (e.g. 50M)")
	f.StringVar(&o.statePath, "state", "", "the state `FILE` of the passes (default: migrate/ID.state in the cache folder, --cache-dir or $XDG_CACHE_HOME/sauve)")
	f.BoolVar(&o.reset, "reset", false, "forget the state file's passes (or a state of another source or target) and copy everything again")
	f.BoolVar(&o.noFSSkip, "no-fs-skip", false, "read and copy free space too")
	f.IntVar(&o.maxPasses, "max-passes", 20, "with --until-delta: give up after this many passes (exit status 3)")
	f.DurationVar(&o.freezeTimeout, "freeze-timeout", 5*time.Minute, "with --final: longest time the filesystems stay frozen (they are thawed then even if sauve is killed, and the final pass fails)")
	addTestBootFlags(cmd, &o.boot)
	addMigrateGrowFlags(cmd, &o)
	addMigrateQEMUFlags(cmd, &o)
	addMigrateSubformatFlag(cmd, &o)
	addMigrateQuiesceFlags(cmd, &o)
	o.snap.add(cmd)
	return cmd
}

// migration is one migrate command's source, target and state.
type migration struct {
	o    *migrateOptions
	src  *source.Source
	disk *source.Disk
	// vm, when set, is the source, a drive of a running VM, read at a new
	// instant each pass (migrate_qemu.go); src then only names it, and
	// disk is the last pass's instant.
	vm *qemuSource
	// snap, when set, is the source, a disk of a repository snapshot
	// (migrate_snapshot.go); src then only names it.
	snap   *snapshotSource
	target migrationTarget
	state  *migrate.State
	limit  *migrate.Limiter
	lock   *os.File // held while the state is in use
	warned map[string]bool
	// prevStart is when the previous pass started (zero: unknown).
	prevStart time.Time
	passes    []migrate.Pass
	// grown is what --final did to a larger target (for --json).
	grown map[string]any
	// frozen is set during the final pass while the filesystems mounted
	// read-write from the source are frozen.
	frozen bool
}

// refuseMigrateTarget refuses what cannot be a migration's target at
// all; the kinds of targets (migrationTargetKinds) refuse the rest.
func refuseMigrateTarget(path string) error {
	if path == "-" {
		return errors.New("target -: a migration writes its target again at every pass, not to standard output")
	}
	if strings.ToLower(filepath.Ext(path)) == ".ova" {
		return fmt.Errorf("target %s: an OVA is an archive written once: migrate into a VM disk image or a raw image, then 'sauve export' or 'sauve convert' it to an OVA", path)
	}
	return nil
}

func (g *globals) migrate(ctx context.Context, srcPath, tgtPath string, o *migrateOptions) error {
	if err := refuseMigrateTarget(tgtPath); err != nil {
		return err
	}
	if err := checkMigrateGrow(tgtPath, o); err != nil {
		return err
	}
	if err := checkMigrateQEMU(srcPath, o); err != nil {
		return err
	}
	m, err := g.openMigration(ctx, srcPath, tgtPath, o)
	if m != nil {
		defer m.close()
	}
	if err != nil {
		return err
	}
	if o.final && m.vm == nil {
		// Before any pass: the final one could not write these.
		mounts, err := shadow.MountsToFreeze(m.src)
		if err != nil {
			return err
		}
		if err := refuseFrozenPaths(mounts, m.target.Path(), filepath.Dir(m.state.Path())); err != nil {
			return err
		}
	}
	// --final alone after earlier passes goes straight to the frozen
	// pass; a first pass is never run frozen.
	if !o.final || o.untilDelta >= 0 || m.state.Header.Passes == 0 {
		if err := g.migratePasses(ctx, m); err != nil {
			return err
		}
	}
	var fr *finalResult
	if o.final {
		if fr, err = g.finalPass(ctx, m); err != nil {
			return err
		}
		if err := g.growMigrated(ctx, m); err != nil {
			return err
		}
	}
	if err := g.printMigrateSummary(m, fr); err != nil || !o.boot.enabled {
		return err
	}
	return g.testBoot(ctx, m, &o.boot)
}

// migratePasses runs one pass, or passes until --until-delta.
func (g *globals) migratePasses(ctx context.Context, m *migration) error {
	conv := migrate.Convergence{Goal: m.o.untilDelta}
	for n := 1; ; n++ {
		p, err := g.migratePass(ctx, m, false)
		if err != nil {
			return err
		}
		if m.o.untilDelta < 0 {
			return nil
		}
		switch conv.Add(p.BytesChanged) {
		case migrate.Converged:
			g.printf("delta %s is at most --until-delta %s: converged after %d passes\n", bytesIEC(p.BytesChanged), bytesIEC(m.o.untilDelta), n)
			return nil
		case migrate.Diverging:
			return g.diverging(m, fmt.Sprintf("the delta has not shrunk over %d passes (%s): the source changes faster than the copy (each pass reads every used block again, so its delta is what changes while it runs); stop or slow the writers, raise --until-delta, or cut over with --final", migrate.Stalls, m.lastDeltas(migrate.Stalls+1)))
		}
		if n >= m.o.maxPasses {
			return g.diverging(m, fmt.Sprintf("no pass reached --until-delta %s in %d passes (%s)", bytesIEC(m.o.untilDelta), n, m.lastDeltas(4)))
		}
	}
}

func (m *migration) lastDeltas(k int) string {
	var s []string
	for _, p := range m.passes[max(0, len(m.passes)-k):] {
		s = append(s, bytesIEC(p.BytesChanged))
	}
	return strings.Join(s, ", ")
}

func (g *globals) diverging(m *migration, why string) error {
	if err := g.printMigrateSummary(m, nil); err != nil {
		return err
	}
	return codedError{errors.New(why), exitDiverging}
}

// openMigration opens the source, the target and the state, and refuses
// what must not be migrated before anything is written. It returns what
// it opened also on error, for close.
func (g *globals) openMigration(ctx context.Context, srcPath, tgtPath string, o *migrateOptions) (*migration, error) {
	m := &migration{o: o, limit: migrate.NewLimiter(o.limitRate), warned: map[string]bool{}}
	srcID, err := g.openSource(ctx, m, srcPath)
	if err != nil {
		return m, err
	}
	kind, exists, err := m.openTarget(tgtPath)
	if err != nil {
		return m, err
	}
	return m, g.openState(m, srcID, kind, tgtPath, exists)
}

// openSource opens the source, a VM's drive, a repository snapshot or a
// device or file, and returns its identity.
func (g *globals) openSource(ctx context.Context, m *migration, srcPath string) (migrate.Identity, error) {
	if socket, ok := strings.CutPrefix(srcPath, qemuPrefix); ok {
		return g.openQEMUSource(ctx, m, socket)
	}
	if m.o.snap.is {
		return g.openSnapshotSource(ctx, m, srcPath)
	}
	return g.openMigrationSource(ctx, m, srcPath)
}

// openTarget opens an existing target and refuses one that must not be
// written; it says whether the target exists (a new one is created once
// the state is known).
func (m *migration) openTarget(tgtPath string) (kind targetKind, exists bool, err error) {
	if kind, err = migrationTargetKindFor(tgtPath, m.o.subformat); err != nil {
		return kind, false, err
	}
	if exists, err = m.openRemoteTarget(kind, tgtPath); err != nil {
		return kind, false, err
	}
	var tgtFI os.FileInfo
	if !kind.remote() {
		tgtFI, err = os.Stat(tgtPath)
		exists = err == nil
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return kind, false, fmt.Errorf("target: %w", err)
		}
	}
	if !exists {
		return kind, false, nil
	}
	if tgtFI != nil {
		if err := m.refuseSame(tgtPath, tgtFI); err != nil {
			return kind, true, err
		}
		if err := disk.RefuseLocked(tgtPath); err != nil {
			return kind, true, err
		}
		if m.target, err = kind.open(tgtPath); err != nil {
			return kind, true, err
		}
	}
	if m.target.Size() < max(m.disk.Size, m.o.size) {
		return kind, true, fmt.Errorf("target %s holds %d bytes, source %s %d (--size %d): refusing a migration that would not fit", tgtPath, m.target.Size(), m.src.Path, m.disk.Size, m.o.size)
	}
	return kind, true, nil
}

// openState locks and loads the state of the pair, or creates the target
// and a new state.
func (g *globals) openState(m *migration, srcID migrate.Identity, kind targetKind, tgtPath string, exists bool) error {
	o := m.o
	statePath, err := g.migrateStatePath(o, m.stateKey(), tgtPath)
	if err != nil {
		return err
	}
	if m.lock, err = lockState(statePath); err != nil {
		return err
	}
	if m.state, err = loadMigrateState(statePath, srcID, tgtPath, exists, o.reset); err != nil {
		return err
	}
	if !exists {
		if m.target, err = kind.create(tgtPath, max(m.disk.Size, o.size)); err != nil {
			return err
		}
	}
	tgtID, err := m.target.Identity()
	if err != nil {
		return err
	}
	if m.state != nil {
		if why := m.state.Header.Target.Mismatch(tgtID); why != "" {
			return fmt.Errorf("state file %s is of another target than %s (it has %s): give another --state, or --reset to copy everything again", statePath, tgtPath, why)
		}
		adoptSource(&m.state.Header, srcID)
		return nil
	}
	h := migrate.Header{ChunkSize: migrate.DefaultChunkSize, Source: srcID, Target: tgtID}
	switch {
	case m.vm != nil:
		h.ChunkSize = m.vm.chunkSize()
	case m.snap != nil:
		h.ChunkSize = m.snap.chunkSize()
	}
	var initial func(int64) migrate.Hash
	if !exists {
		// A new file reads as zeros: its zero chunks need no write.
		initial = migrate.NewTargetHashes(srcID.Size, h.ChunkSize)
	}
	m.state, err = migrate.Create(statePath, h, initial)
	return err
}

// adoptSource makes a device's or file's identity the state's source
// once it continues a snapshot's passes (their identities matched by
// size, disk ID and filesystem UUIDs): its device or inode then guard
// the later live passes, which a snapshot's pass leaves alone. It is
// written with the pass's state.
func adoptSource(h *migrate.Header, srcID migrate.Identity) {
	if h.Source.Snapshot && !srcID.Snapshot {
		h.Source = srcID
	}
}

// openMigrationSource opens a device or image file as the source and
// returns its identity.
func (g *globals) openMigrationSource(ctx context.Context, m *migration, srcPath string) (migrate.Identity, error) {
	src, err := source.Open(ctx, srcPath)
	if err != nil {
		return migrate.Identity{}, err
	}
	m.src = src
	if src.Kind == source.Stream {
		return migrate.Identity{}, fmt.Errorf("source %s is a stream (standard input, a FIFO or a character device): a migration reads its source again at every pass; give a block device or an image file", srcPath)
	}
	if err := src.RefuseEmpty("migrate it", "nothing to migrate"); err != nil {
		return migrate.Identity{}, err
	}
	v := source.Live(src) // a device reads with O_DIRECT: see source.Open
	if m.disk, err = source.OpenDisk(v, source.Options{}); err != nil {
		return migrate.Identity{}, err
	}
	if err := m.disk.RefuseEmpty("migrate it", "nothing to migrate"); err != nil {
		return migrate.Identity{}, err
	}
	return g.sourceIdentity(m)
}

// refuseSame refuses a target that is the source (refuseSame), or one
// of a source VM's drives.
func (m *migration) refuseSame(tgtPath string, tfi os.FileInfo) error {
	switch {
	case m.vm != nil:
		return m.vm.refuseTarget(tgtPath, tfi)
	case m.snap != nil:
		return nil // a snapshot is in the repository, never a target
	}
	return refuseSame(m.src, tgtPath, tfi)
}

// stateKey is what names the source in the default state path: its
// absolute path, or a VM's UUID and drive (qemu:UUID/DRIVE), whatever
// its socket, or a snapshot's disk's path as backed up.
func (m *migration) stateKey() string {
	switch {
	case m.vm != nil:
		return m.vm.key()
	case m.snap != nil:
		return m.snap.key()
	}
	return m.src.Path
}

func (m *migration) close() {
	if m.state != nil {
		m.state.Close()
	}
	if m.target != nil {
		m.target.Close()
	}
	if m.disk != nil {
		m.disk.Close()
	}
	if m.lock != nil {
		m.lock.Close()
	}
	if m.snap != nil {
		m.snap.close()
	}
	if m.src != nil && m.vm == nil && m.snap == nil {
		m.src.Close()
	}
}

// lockState takes the lock of the state file at path (a file beside it:
// the state itself is replaced by renames), so that two migrations never
// write one state at once.
func lockState(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state folder: %w", err)
	}
	f, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock migration state: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state file %s is in use by another sauve migrate", path)
		}
		return nil, fmt.Errorf("lock migration state %s: %w", path, err)
	}
	return f, nil
}

// sourceIdentity says which source this is: its device or inode, size,
// and the disk ID and filesystem UUIDs its layout holds.
func (g *globals) sourceIdentity(m *migration) (migrate.Identity, error) {
	id, err := fileIdentity("/proc/self/fd/"+fmt.Sprint(m.src.File().Fd()), m.disk.Size)
	if err != nil {
		return id, err
	}
	id.Path = m.src.Path
	if abs, err := filepath.Abs(m.src.Path); err == nil {
		id.Path = abs
	}
	return id, describeIdentity(m.disk, &id)
}

// describeIdentity sets id's disk ID and filesystem UUIDs, those of the
// layout disk holds.
func describeIdentity(disk *source.Disk, id *migrate.Identity) error {
	layout, err := disk.Map(source.MapOptions{NoSkip: true})
	if err != nil {
		return err
	}
	var d repo.Disk
	layout.Describe(&d)
	id.DiskID, id.FSUUIDs = d.DiskID, nil
	for _, p := range d.Partitions {
		if p.FSUUID != "" {
			id.FSUUIDs = append(id.FSUUIDs, p.FSUUID)
		}
	}
	return nil
}

// fileIdentity identifies the file or device at path, of size bytes.
func fileIdentity(path string, size int64) (migrate.Identity, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return migrate.Identity{}, fmt.Errorf("stat %s: %w", path, err)
	}
	id := migrate.Identity{Path: path, Size: size}
	if abs, err := filepath.Abs(path); err == nil {
		id.Path = abs
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		id.Device = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	} else {
		id.FileDev, id.Inode = st.Dev, st.Ino
	}
	return id, nil
}

// refuseSame refuses a target that is the source: the same file or
// device, a partition of the other, or a loop device backed by it.
func refuseSame(src *source.Source, tgtPath string, tfi os.FileInfo) error {
	sfi, err := src.File().Stat()
	if err != nil {
		return fmt.Errorf("stat source: %w", err)
	}
	same := fmt.Errorf("target %s is the source %s: refusing to migrate a disk onto itself", tgtPath, src.Path)
	if os.SameFile(sfi, tfi) {
		return same
	}
	ss, ts := sfi.Sys().(*syscall.Stat_t), tfi.Sys().(*syscall.Stat_t)
	if ss == nil || ts == nil || tfi.Mode()&os.ModeDevice == 0 {
		return nil
	}
	tdev := sysBlockPath(ts.Rdev)
	if sfi.Mode()&os.ModeDevice != 0 {
		if sdev := sysBlockPath(ss.Rdev); sdev != "" && tdev != "" && (strings.HasPrefix(sdev, tdev+"/") || strings.HasPrefix(tdev, sdev+"/") || sdev == tdev) {
			return same
		}
		return nil
	}
	// A loop device over the source file.
	b, err := os.ReadFile(filepath.Join("/sys/dev/block", fmt.Sprintf("%d:%d", unix.Major(ts.Rdev), unix.Minor(ts.Rdev)), "loop", "backing_file"))
	if err != nil {
		return nil
	}
	if bfi, err := os.Stat(strings.TrimSpace(string(b))); err == nil && os.SameFile(bfi, sfi) {
		return fmt.Errorf("target %s is a loop device over the source %s: refusing to migrate a disk onto itself", tgtPath, src.Path)
	}
	return nil
}

// sysBlockPath is the sysfs path of a block device ("" if unknown): a
// partition's lies under its disk's.
func sysBlockPath(rdev uint64) string {
	p, err := filepath.EvalSymlinks(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev)))
	if err != nil {
		return ""
	}
	return p
}

// migrateStatePath is --state, or the default state file of the pair.
func (g *globals) migrateStatePath(o *migrateOptions, src, tgt string) (string, error) {
	if o.statePath != "" {
		return o.statePath, nil
	}
	base := g.cacheBase()
	if base == "" {
		return "", usageError{errors.New("no cache folder for the migration's state (--no-cache, or no $HOME): give --state FILE")}
	}
	a := src // a VM's drive, a snapshot's disk is no path
	if !strings.HasPrefix(src, qemuPrefix) && !strings.HasPrefix(src, snapshotKeyPrefix) {
		a, _ = filepath.Abs(src)
	}
	b := tgt // a remote target's URL is not relative to here
	if !migrationTargetKind(tgt).remote() {
		b, _ = filepath.Abs(tgt)
	}
	sum := blake3.Sum256([]byte("sauve migrate\x00" + a + "\x00" + b))
	return filepath.Join(base, "migrate", hex.EncodeToString(sum[:16])+".state"), nil
}

// loadMigrateState loads the state at path and checks it is of the
// source srcID; nil when there is none (or --reset).
func loadMigrateState(path string, srcID migrate.Identity, tgtPath string, tgtExists, reset bool) (*migrate.State, error) {
	if reset {
		return nil, nil
	}
	st, err := migrate.Load(path)
	if errors.Is(err, migrate.ErrNoState) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if srcID.VM != "" {
		// A VM drive's layout is read from each pass's instant, and
		// checked then (qemuSource.begin).
		srcID.DiskID, srcID.FSUUIDs = st.Header.Source.DiskID, st.Header.Source.FSUUIDs
	}
	if why := st.Header.Source.Mismatch(srcID); why != "" {
		st.Close()
		return nil, fmt.Errorf("state file %s is of another source than %s (it has %s; the state's is %s): give another --state, or --reset to copy everything again", path, srcID.Path, why, st.Header.Source.Path)
	}
	if !tgtExists {
		st.Close()
		return nil, fmt.Errorf("state file %s records passes onto %s, which no longer exists: --reset to copy everything again", path, tgtPath)
	}
	return st, nil
}

// createRawTarget creates a new raw file target of size bytes, all
// holes, durably.
func createRawTarget(path string, size int64) (migrationTarget, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create target: %w", err)
	}
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err == nil {
		var d *os.File
		if d, err = os.Open(filepath.Dir(path)); err == nil {
			err = d.Sync()
			d.Close()
		}
	}
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create target %s: %w", path, err)
	}
	return openRawTarget(path)
}

// migratePass runs a pass: the source mapped again (its free space
// changes), read, and its changed chunks written.
func (g *globals) migratePass(ctx context.Context, m *migration, final bool) (migrate.Pass, error) {
	if m.vm != nil {
		defer m.vm.end()
	}
	src, layout, err := g.passSource(ctx, m)
	if err != nil {
		return migrate.Pass{}, err
	}
	prog := new(migrate.Progress)
	label := "pass"
	if final {
		label = "final pass"
	}
	meter := startMeter(g.stderr, g.showProgress(), meterSource{
		label: label + " " + m.sourceLabel(), total: func() int64 { return m.disk.Size }, current: prog.Done.Load,
		extra: func() string {
			return fmt.Sprintf("changed %s, written %s", bytesIEC(prog.Changed.Load()), bytesIEC(prog.Written.Load()))
		},
	})
	p, err := migrate.Run(ctx, src, m.target, m.state, migrate.Options{Limit: m.limit, Progress: prog})
	meter.Stop()
	if err != nil {
		return p, fmt.Errorf("migrate %s to %s: %w", m.src.Path, m.target.Path(), err)
	}
	if layout != nil {
		layout.WarnLate()
	}
	if m.vm != nil {
		// The writes are durable: record the instant's tracker, if its
		// copy held.
		if err := m.vm.verify(m); err != nil {
			return p, err
		}
	}
	if m.snap != nil {
		m.snap.done(&m.state.Header) // recorded with the pass's hashes
	}
	h := &m.state.Header
	if m.prevStart.IsZero() && h.Passes > 0 {
		m.prevStart = h.LastStart
	}
	h.Passes++
	p.Number = h.Passes
	h.LastStart = p.Start
	if err := m.state.Compact(); err != nil {
		return p, err
	}
	note := passNote{final: final}
	switch {
	case m.vm != nil:
		m.vm.commit(ctx)
		note.fullRead, note.unread = m.vm.fullRead, "unchanged since the previous pass (dirty bitmap)"
	case m.snap != nil:
		note.fullRead, note.unread, note.snapshot, note.fetched = m.snap.fullRead, m.snap.unreadWhy(), m.snap.json(), m.snap.fetched()
	}
	rates := migrate.Estimate(m.prevStart, p)
	m.prevStart = p.Start
	m.passes = append(m.passes, p)
	return p, g.printPass(p, rates, note)
}

// passSource prepares the pass's source: a new instant of a VM's drive,
// a snapshot's disk, or the device or file mapped again (its layout is
// then returned, for its late warnings). It returns with the state's
// header saying what the pass may write, durably.
func (g *globals) passSource(ctx context.Context, m *migration) (migrate.Source, *source.Layout, error) {
	switch {
	case m.snap != nil:
		changes, err := m.snap.begin(ctx, m)
		if err != nil {
			return migrate.Source{}, nil, err
		}
		// No map: a free chunk and a zero one are both the zero ID in
		// the repository, and a used zero chunk left alone would keep
		// stale bytes on the target. Zero chunks read as zeros with no
		// fetch, and hash as a new target's initial zeros.
		return migrate.Source{At: m.snap.dr, Size: m.disk.Size, Changes: changes}, nil, nil
	case m.vm != nil:
		// A new instant of the VM's drive, and what was written since
		// the previous pass's. (A VM drive's state never continues a
		// snapshot's, but what a state claims is checked, not assumed.)
		if err := forgetSnapshots(m.state); err != nil {
			return migrate.Source{}, nil, err
		}
		changes, err := m.vm.begin(ctx, m)
		if err != nil {
			return migrate.Source{}, nil, err
		}
		layout, err := g.passLayout(m)
		if err != nil {
			return migrate.Source{}, nil, err
		}
		return m.diskSource(layout, changes), layout, nil
	}
	if err := forgetSnapshots(m.state); err != nil {
		return migrate.Source{}, nil, err
	}
	layout, err := g.passLayout(m)
	if err != nil {
		return migrate.Source{}, nil, err
	}
	return m.diskSource(layout, nil), layout, nil
}

// diskSource is the pass's source of a device, file or VM drive.
func (m *migration) diskSource(layout *source.Layout, changes extent.Map) migrate.Source {
	src := migrate.Source{At: m.disk.At, Size: m.disk.Size, Map: layout.Map(), Changes: changes}
	if m.disk.Format == vdisk.Raw && m.disk.View != nil {
		src.Readers = m.disk.View.Readers // a VM's drive, read over NBD
	}
	return src
}

// passLayout maps the source's disk again: its free space changes.
func (g *globals) passLayout(m *migration) (*source.Layout, error) {
	return m.disk.Map(source.MapOptions{NoSkip: m.o.noFSSkip, Frozen: m.frozen, Warn: func(w string) {
		if !m.warned[w] {
			m.warned[w] = true
			g.warn(w)
		}
	}})
}

// sourceLabel names the source on the progress meter.
func (m *migration) sourceLabel() string {
	if m.snap != nil {
		return m.snap.label()
	}
	return filepath.Base(m.src.Path)
}

// passJSON is a pass's --json line.
type passJSON struct {
	migrate.Pass
	migrate.Rates
	Final bool `json:"final"`
	// FullRead says why a source with change tracking was read in full.
	FullRead string `json:"full_read,omitempty"`
	// SourceSnapshot is the snapshot a pass read (nil: a device, file or
	// VM drive).
	SourceSnapshot *snapshotJSONRef `json:"source_snapshot,omitempty"`
	// BytesFetched is what a pass from a snapshot fetched from the
	// repository (zero chunks cost none).
	BytesFetched *int64 `json:"bytes_fetched,omitempty"`
}

// passNote is what printPass says of a pass besides its counts.
type passNote struct {
	final    bool
	fullRead string           // why a source with change tracking was read in full
	unread   string           // why chunks were not read
	snapshot *snapshotJSONRef // the snapshot read, if any
	fetched  *int64           // bytes fetched from the repository, if any
}

func (g *globals) printPass(p migrate.Pass, r migrate.Rates, n passNote) error {
	if g.json {
		return g.printJSONLine(passJSON{p, r, n.final, n.fullRead, n.snapshot, n.fetched})
	}
	name := fmt.Sprintf("pass %d", p.Number)
	if n.snapshot != nil {
		name += fmt.Sprintf(" from snapshot %s (%s)", n.snapshot.Short, n.snapshot.Time.Local().Format("2006-01-02 15:04"))
	}
	if n.final {
		name = "final pass (" + name + ")"
	}
	g.printf("%s: read %s, wrote %s, zeroed %s; %d of %d chunks changed (%s) in %s (%s)\n", name,
		bytesIEC(p.BytesRead), bytesIEC(p.BytesWritten), bytesIEC(p.BytesZeroed), p.ChunksChanged, p.Chunks, bytesIEC(p.BytesChanged),
		seconds(p.Seconds), rate(p.BytesRead+p.BytesWritten+p.BytesZeroed, p.Seconds))
	if p.ChunksUnread > 0 {
		g.printf("  %d chunks not read: %s\n", p.ChunksUnread, n.unread)
	}
	if n.fetched != nil {
		g.printf("  fetched %s from the repository (zero chunks need no fetch)\n", bytesIEC(*n.fetched))
	}
	switch {
	case n.snapshot != nil:
		// Between two snapshots the rate of change of the source says
		// nothing of the next live pass.
		g.printf("  copied at %s/s\n", bytesIEC(int64(r.CopyRate)))
	case r.ChangeRate > 0 || p.Number > 1:
		g.printf("  source changed at %s/s since the previous pass, copied at %s/s; next pass about %s\n",
			bytesIEC(int64(r.ChangeRate)), bytesIEC(int64(r.CopyRate)), seconds(r.NextSeconds))
	default:
		g.printf("  copied at %s/s; next pass about %s\n", bytesIEC(int64(r.CopyRate)), seconds(r.NextSeconds))
	}
	return nil
}

func (g *globals) printJSONLine(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(g.stdout, "%s\n", b)
	return err
}

// finalResult is what the final pass froze, and how the applications
// were held (nil: no hook, writer or agent).
type finalResult struct {
	frozen  time.Duration
	mounts  []string
	quiesce *repo.Quiescing
	// cutover, when set, is said instead of the frozen mounts (a VM's
	// final instant), and json adds to the summary.
	cutover string
	json    map[string]any
}

// finalPass holds the applications still (hooks, writers, agents), then
// freezes the filesystems mounted read-write from the source, runs a
// pass and thaws them, whatever happens.
func (g *globals) finalPass(ctx context.Context, m *migration) (*finalResult, error) {
	if m.vm != nil {
		return g.finalQEMUPass(ctx, m)
	}
	mounts, err := shadow.MountsToFreeze(m.src)
	if err != nil {
		return nil, err
	}
	if err := refuseFrozenPaths(mounts, m.target.Path(), m.state.Path()); err != nil {
		return nil, err
	}
	fr := &finalResult{}
	err = g.holdApplications(ctx, m, mounts, fr, func() error {
		if len(mounts) == 0 {
			g.printf("no filesystem is mounted read-write from %s: nothing to freeze\n", m.src.Path)
			_, err := g.migratePass(ctx, m, true)
			return err
		}
		z, err := shadow.FreezeMounts(ctx, mounts, shadow.Options{FreezeTimeout: m.o.freezeTimeout, Warn: g.warn})
		if err != nil {
			return err
		}
		m.frozen = true // the frozen filesystems' free space is skipped
		_, perr := g.migratePass(ctx, m, true)
		m.frozen = false
		took, terr := z.Thaw()
		if perr != nil {
			return perr
		}
		if terr != nil {
			return fmt.Errorf("%w: the final pass was not of one instant; run it again, with a longer --freeze-timeout", terr)
		}
		fr.frozen, fr.mounts = took, mounts
		return nil
	})
	if err != nil {
		return nil, err
	}
	return fr, nil
}

// refuseFrozenPaths refuses a final pass whose target or state file lies
// on a filesystem it freezes: its writes would wait for the thaw.
func refuseFrozenPaths(mounts []string, paths ...string) error {
	for _, mp := range mounts {
		var ms unix.Stat_t
		if unix.Stat(mp, &ms) != nil {
			continue
		}
		for _, p := range paths {
			var ps unix.Stat_t
			if unix.Stat(p, &ps) == nil && ps.Dev == ms.Dev && ps.Mode&unix.S_IFMT != unix.S_IFBLK {
				return fmt.Errorf("%s is on %s, which the final pass freezes: put the target and the state (--state) on another filesystem", p, mp)
			}
		}
	}
	return nil
}

// printMigrateSummary says what the passes of this command did.
func (g *globals) printMigrateSummary(m *migration, fr *finalResult) error {
	var read, written, zeroed int64
	for _, p := range m.passes {
		read, written, zeroed = read+p.BytesRead, written+p.BytesWritten, zeroed+p.BytesZeroed
	}
	if g.json {
		out := map[string]any{"summary": true, "source": m.src.Path, "target": m.target.Path(), "state": m.state.Path(),
			"passes": len(m.passes), "passes_total": m.state.Header.Passes, "bytes_read": read, "bytes_written": written, "bytes_zeroed": zeroed,
			"final": fr != nil, "frozen_seconds": 0.0, "frozen_mounts": []string{}}
		if fr != nil {
			out["frozen_seconds"], out["frozen_mounts"] = fr.frozen.Seconds(), nonNil(fr.mounts)
			for k, v := range fr.json {
				out[k] = v
			}
			if fr.quiesce != nil {
				out["quiesce"] = fr.quiesce
			}
		}
		if m.grown != nil {
			out["grown"] = m.grown
		}
		if m.snap != nil {
			out["source_snapshot"] = m.snap.json()
		}
		return g.printJSONLine(out)
	}
	if m.snap != nil {
		m.snap.printSummary(m)
		return nil
	}
	if fr != nil && fr.cutover != "" {
		g.printf("%s", fr.cutover)
	} else if fr != nil && len(fr.mounts) > 0 {
		g.printf("cut-over: writes to %s were frozen for %s; %s now holds %s as it was frozen\n", strings.Join(fr.mounts, ", "), seconds(fr.frozen.Seconds()), m.target.Path(), m.src.Path)
	} else if fr != nil {
		g.printf("%s now holds %s\n", m.target.Path(), m.src.Path)
	}
	if fr != nil {
		printQuiescing(g.stdout, "", fr.quiesce)
	}
	return nil
}
