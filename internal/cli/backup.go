package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/machine"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/shadow"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func newBackupCmd(g *globals) *cobra.Command {
	var (
		o         backupOptions
		q         qemuFlags
		qf        quiesceFlags
		stdinSize string
		snapshot  string
	)
	cmd := &cobra.Command{
		Use:   "backup SOURCE...",
		Short: "Back up disks, partitions, image files or standard input",
		Long: `Back up SOURCE into the repository as a new snapshot. Several SOURCEs
(a machine's disks) make one snapshot that lists every disk; restore,
export and show take --disk NAME to pick one.

SOURCE is a block device (/dev/sda, /dev/nvme0n1p2, /dev/vg/lv), a disk image
file, or - for standard input (name it with --stdin-name). The disk is cut
into fixed-size chunks: chunks of zeros and holes of sparse image files are
neither read nor stored, and chunks the repository holds already (from any
earlier backup, of any host) are not stored again, so every snapshot is a
full restore point that costs only what changed.

Whole disks keep everything that makes them boot: the partition table (MBR
with extended and logical partitions, or GPT with its backup), the boot code
and the gap before the first partition are always imaged. Inside partitions,
sauve reads the allocation maps of ext2/3/4, XFS, NTFS, FAT12/16/32 and swap
and neither reads nor stores the blocks they mark free (they restore as
zeros). A partition whose filesystem is unknown, damaged, not cleanly
unmounted, or mounted read-write is imaged in full, and sauve says so.
--no-fs-skip images everything.

An empty source (a file or device of 0 bytes, or a stream that ends
before its first byte, as when the command piping into sauve failed) is
refused and nothing is stored, unless --allow-empty. A FIFO with no writer
yet is waited for; Ctrl-C or SIGTERM ends the wait, or a stalled stream,
at any time (exit status 130).

A disk that is written while it is backed up would be read torn between
old and new writes. --snapshot auto (the default) first takes a
point-in-time copy where the source allows one, reads the copy and drops
it: an LVM snapshot of a logical volume (lvcreate -s, its COW space set by
--snapshot-size; a snapshot that fills up fails the backup), a read-only
btrfs snapshot of the subvolume holding an image file, or a reflink copy
of an image file on XFS (mkfs.xfs -m reflink=1) beside it. Filesystems
mounted from an image file (through a loop device) are frozen (fsfreeze)
for the instant the copy is taken, at most --freeze-timeout, under a guard
process that thaws them even if sauve is killed. The output says which
copy was taken and how long writes were frozen. A qcow2 that a running
QEMU holds open is refused: back the VM up through its monitor instead
(see below). Where no copy can be taken, auto reads the source as it is
and, if a filesystem on it is mounted read-write, warns and records the
snapshot as not of one instant ('sauve snapshots' shows it);
--require-consistent refuses instead. A named --snapshot mode fails where
its copy cannot be made; --snapshot none never copies.

qemu:SOCKET backs up a running QEMU VM (QEMU 7 or newer) through its QMP
socket (-qmp unix:/run/vm1.qmp,server=on,wait=off, or a libvirt domain's
monitor): every writable drive, or those --drive names, is captured at
one instant in one QMP transaction (fleecing: QEMU keeps what the guest
overwrites in a fleecing image under --fleece-dir) and read over NBD; the
guest's filesystems are frozen through its guest agent (qemu-ga, found
among the VM's chardevs or named with --guest-agent) for that instant
when it has one (--guest-freeze). On qcow2 drives sauve keeps a persistent dirty
bitmap, so the next backup reads only what the guest wrote since, and
takes the rest from the previous snapshot; a missing or inconsistent
bitmap (QEMU killed, the image replaced) gives a full read, and the
output says why. The snapshot's host is the VM's name and its disks are
named after the drives, known by the VM's UUID, not by the socket's
path. Everything sauve adds to the VM but its bitmaps is removed at the
end, also after a failure or a kill.

A point-in-time copy of a running system is crash-consistent: what a
power cut would leave. To make it application-consistent, --writer
flushes and holds an application for the instant of the copy (postgresql:
CHECKPOINT; mariadb or mysql: FLUSH TABLES WITH READ LOCK, held on its own
connection, so a killed sauve never leaves it locked), and --pre-freeze
and --post-thaw run commands around it (with $SAUVE_DISKS, $SAUVE_PROVIDER
and $SAUVE_PHASE set; post-thaw always runs once pre-freeze has started).
They run before the filesystems are frozen and after they are thawed. A
hook or writer that fails stores no snapshot and says which and what it
printed; --hook-failure continue stores it as crash-consistent instead.
The snapshot records which it is ('sauve show'). --post-backup runs a
command only once the snapshot is stored ($SAUVE_SNAPSHOT), for what must
wait for that, such as pruning an archive. --quiesce agent://HOST:PORT asks
the sauve agent on that machine (or in a VM's guest, over a virtio-serial
port; a VM that exposes one is quiesced through it with no --quiesce) to
do the same from outside: 'sauve agent --help'.

The snapshot manifest is written last: an interrupted backup leaves no
snapshot, and the next backup reuses what it had uploaded.`,
		Example: `  sauve backup qemu:/run/vm1.qmp              # a running QEMU VM: every drive, one instant
  sauve backup /dev/vda --tag nightly
  sauve backup /dev/vg0/root /dev/vg0/data    # two LVM snapshots, one snapshot of both disks
  sauve backup /var/lib/libvirt/images/web.img   # a reflink copy on XFS or btrfs
  sauve backup /dev/vg0/db --writer postgresql     # CHECKPOINT, then the LVM snapshot
  sauve backup /dev/vg0/app --pre-freeze 'systemctl stop app' --post-thaw 'systemctl start app'
  sauve backup /dev/sda --no-fs-skip          # every byte, free space included
  dd if=/dev/sdb bs=1M | sauve backup - --stdin-name sdb.img --stdin-size 500G
  sauve backup /srv/empty.img --allow-empty    # a 0-byte file: store it anyway
  sauve backup /dev/vda --repo 'https://acct.blob.core.windows.net/backups?sp=rcwl&se=...&sig=...'
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... sauve backup /dev/vda --repo s3://bucket/vm1`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{fmt.Errorf("%s: expects one or more SOURCEs (a device, an image file, a QEMU VM's qemu:SOCKET, or - for stdin)", cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			sopts, err := sourceOptions(cmd)
			if err != nil {
				return err
			}
			mode, err := shadow.ParseMode(snapshot)
			if err != nil {
				return usageError{err}
			}
			o.mode, o.source = mode, sopts
			if o.quiesce, err = qf.quiescer(); err != nil {
				return err
			}
			if o.quiesce != nil {
				o.quiesce.warn = g.warn
			}
			o.agentFlags = &qf
			if stdinSize != "" {
				n, err := parseSize(stdinSize)
				if err != nil || n <= 0 {
					return usageError{fmt.Errorf("--stdin-size %q: want a size such as 20G", stdinSize)}
				}
				o.stdinSize = n
			}
			if o.snapshotSize != "" {
				if n, err := parseSize(o.snapshotSize); err != nil || n <= 0 {
					return usageError{fmt.Errorf("--snapshot-size %q: want a size such as 10G", o.snapshotSize)}
				}
			}
			for _, a := range args {
				if strings.HasPrefix(a, qemuPrefix) {
					if len(args) > 1 {
						return usageError{fmt.Errorf("%s is a VM: it is backed up alone (all its drives, or those --drive names)", a)}
					}
					return g.backupQEMU(cmd.Context(), strings.TrimPrefix(a, qemuPrefix), &o, &q)
				}
			}
			if len(q.drives) > 0 {
				return usageError{errors.New("--drive applies to a QEMU VM (qemu:SOCKET)")}
			}
			return g.backup(cmd.Context(), args, &o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.stdinName, "stdin-name", "stdin", "name of the disk read from standard input")
	f.StringVar(&stdinSize, "stdin-size", "", "expected size of standard input (e.g. 20G), for progress and ETA")
	f.StringVar(&o.host, "host", "", "host name recorded in the snapshot (default: this machine's)")
	f.StringArrayVar(&o.tags, "tag", nil, "tag the snapshot (repeatable)")
	f.IntVar(&o.parity, "parity", 0, "store a parity object over every `N` packs the backup writes (2-64; 1/N more space), so that 'sauve repair packs' can rebuild any one lost or damaged pack of each group")
	f.StringVar(&snapshot, "snapshot", "auto", "point-in-time copy to read: auto (what the source allows: an LVM snapshot of a logical volume, a btrfs snapshot or reflink copy of an image file on btrfs or XFS, else the source as it is), lvm, btrfs, reflink (fail where that copy cannot be made), qemu (for qemu: sources), none")
	f.BoolVar(&o.requireConsistent, "require-consistent", false, "refuse to read a source that is in use (mounted read-write) when no point-in-time copy of it can be taken")
	f.BoolVar(&o.noFreeze, "no-freeze", false, "take the point-in-time copies without freezing the filesystems mounted from the sources (when something else freezes them around the copy: --quiesce's agent on this machine, a hook)")
	f.DurationVar(&o.listingAge, "pack-listing-max-age", 24*time.Hour, "in a repository of over 100000 packs (about 3 TiB), list its packs (a request per 1000) only when this machine's last listing is older than this: in between, packs prune deleted and packs 'sauve check' found missing or damaged are still avoided, but a pack lost outside sauve since that listing is reused until the next one (0: list at every backup; smaller repositories are listed at every backup)")
	f.IntVar(&o.listingMin, "pack-listing-min-packs", listingMinPacks, "repositories of at most this many packs are listed at every backup")
	_ = f.MarkHidden("pack-listing-min-packs") // for tests
	f.DurationVar(&o.freezeTimeout, "freeze-timeout", shadow.DefaultFreezeTimeout, "longest time filesystems mounted from a source stay frozen while its copy is taken (thawed then even if sauve is killed)")
	f.StringVar(&o.snapshotSize, "snapshot-size", "", "COW space of an LVM snapshot (e.g. 20G; default: a tenth of the volume, at least 1 GiB)")
	f.BoolVar(&o.noFSSkip, "no-fs-skip", false, "read and store free space too (filesystems are still found and reported)")
	f.StringArrayVar(&q.drives, "drive", nil, "with qemu:SOCKET: back up this drive (its -drive id, device id or node name; repeatable; default: every writable drive)")
	q.add(f, "every backup reads every drive in full")
	f.BoolVar(&o.allowEmpty, "allow-empty", false, "store a snapshot of an empty source (0 bytes) instead of refusing it")
	// Hidden: tests of forget date their snapshots (RFC 3339). A manifest
	// says whatever time its writer likes anyway; one in the future is
	// marked.
	f.StringVar(&o.at, "time", "", "record this time (RFC 3339) as the snapshot's")
	_ = f.MarkHidden("time")
	qf.add(f)
	addImportFlags(cmd)
	return cmd
}

// copyName is a view's point-in-time copy for --json: "none" when the
// source was read as it is.
func copyName(v *source.View) string {
	if v.Copy == "" {
		return string(shadow.None)
	}
	return v.Copy
}

// backupOptions are backup's flags, read once.
type backupOptions struct {
	parity            int
	listingAge        time.Duration
	listingMin        int
	stdinName, host   string
	at                string // --time
	stdinSize         int64
	tags              []string
	noFSSkip          bool
	allowEmpty        bool
	requireConsistent bool
	mode              shadow.Mode
	source            source.Options
	freezeTimeout     time.Duration
	noFreeze          bool
	snapshotSize      string
	quiesce           *quiescer // nil: no writer, no hook
	// agentFlags build the writer of an agent found in a VM.
	agentFlags *quiesceFlags
}

const emptyDoing, emptyHint = "store an empty snapshot", "--allow-empty stores one"

// backupDisk is one disk of a backup being prepared: the source, the
// view the provider gave of it, and how it is read.
type backupDisk struct {
	src    *source.Source
	name   string
	path   string
	view   *source.View
	disk   *source.Disk
	layout *source.Layout
	// fullRead says why a disk that could have been read incrementally
	// was read in full (the view's reason, or the CLI's own).
	fullRead string
}

// localMachine describes this machine when a disk backed up is one of
// its block devices (nil for image files and streams: their machine is
// not this one).
func localMachine(disks []*backupDisk) *repo.Machine {
	devs := map[string]string{}
	for _, d := range disks {
		if d.src.Kind == source.Device {
			devs[d.name] = d.src.Path
		}
	}
	if len(devs) == 0 {
		return nil
	}
	return machine.Local(machine.DefaultRoots(), devs)
}

// backup backs up the sources named by args into one snapshot.
func (g *globals) backup(ctx context.Context, args []string, o *backupOptions) error {
	disks, err := openBackupSources(ctx, args, o)
	defer func() {
		for _, d := range disks {
			if d.disk != nil {
				d.disk.Close()
			}
			d.src.Close()
		}
	}()
	if err != nil {
		return err
	}
	if o.host == "" {
		o.host, _ = os.Hostname()
	}
	var at time.Time
	if o.at != "" {
		var err error
		if at, err = time.Parse(time.RFC3339Nano, o.at); err != nil {
			return usageError{fmt.Errorf("--time: %w", err)}
		}
	}
	r, parent, err := g.openForBackup(ctx, o, disks[0].path)
	if err != nil {
		return err
	}
	var total int64
	for _, d := range disks {
		total += d.src.Size
	}
	g.warnExpiry(backend.LimitsOf(r.Backend()), total)
	// The point-in-time copies are taken once the repository is open and
	// before anything of the sources is read.
	prov := shadow.New(shadow.Options{Mode: o.mode, Warn: g.warn, FreezeTimeout: o.freezeTimeout, SnapshotSize: o.snapshotSize, NoFreeze: o.noFreeze,
		Quiesce: quiescerOrNil(o.quiesce)})
	srcs := make([]*source.Source, len(disks))
	for i, d := range disks {
		srcs[i] = d.src
	}
	views, err := prov.Views(ctx, srcs)
	if err != nil {
		return err
	}
	defer shadow.Release(views)
	bss := make([]backup.Source, len(disks))
	maps := &readMaps{parent: parent, warn: g.warnf}
	if !o.noFSSkip {
		maps.cache = r.LocalCache()
	}
	var snapID *repo.ID
	defer func() { maps.finish(snapID) }()
	for i, d := range disks {
		d.view = views[i]
		if bss[i], err = g.prepareDisk(d, o); err != nil {
			return err
		}
		maps.attach(&bss[i])
	}
	prog := new(backup.Progress)
	prog.Total.Store(backup.TotalSize(bss))
	m := startMeter(g.stderr, g.showProgress(), meterSource{
		label: "backup " + backupLabel(disks),
		total: func() int64 {
			// A stream longer than --stdin-size said grows the bar.
			if t := prog.Total.Load(); t >= 0 && prog.Done.Load() > t {
				return prog.Done.Load()
			}
			return prog.Total.Load()
		},
		current: prog.Done.Load,
		extra: func() string {
			return fmt.Sprintf("new %s, dedup %s, zero %s", bytesIEC(prog.New.Load()), bytesIEC(prog.Reused.Load()), bytesIEC(prog.Zero.Load()))
		},
	})
	res, err := backup.RunDisks(ctx, r, bss, backup.Options{
		Host: o.host, Tags: o.tags, Parent: parent, Progress: prog, Program: "sauve " + Version, Warn: g.warn,
		Quiesce: o.quiesce.record(), Time: at, Machine: localMachine(disks),
	})
	m.Stop()
	if err != nil {
		return fmt.Errorf("backup of %s: %w", backupLabel(disks), err)
	}
	snapID = &res.Snapshot.ID
	for _, d := range disks {
		d.layout.WarnLate()
	}
	if err := g.printBackup(res, disks, prov.Report()); err != nil {
		return err
	}
	return g.runPostBackup(ctx, o.agentFlags, res.Snapshot)
}

// openBackupSources opens every source and refuses empty ones. It
// returns what it opened also on error, for the caller to close.
func openBackupSources(ctx context.Context, args []string, o *backupOptions) ([]*backupDisk, error) {
	var disks []*backupDisk
	for _, a := range args {
		if a == "-" && len(args) > 1 {
			return disks, usageError{errors.New("standard input (-) is backed up alone, not with other sources")}
		}
		src, err := source.Open(ctx, a)
		if err != nil {
			return disks, err
		}
		d := &backupDisk{src: src, name: filepath.Base(src.Path), path: src.Path}
		disks = append(disks, d)
		if !o.allowEmpty {
			if err := src.RefuseEmpty(emptyDoing, emptyHint); err != nil {
				return disks, err
			}
		}
		if src.Kind == source.Stream {
			d.name, d.path = o.stdinName, "-"
		} else if abs, err := filepath.Abs(src.Path); err == nil {
			d.path = abs
		}
	}
	seen := map[string]string{}
	for _, d := range disks {
		if p, ok := seen[d.name]; ok {
			return disks, usageError{fmt.Errorf("two sources named %s (%s and %s): a snapshot's disks need different names; back them up separately or through links with other names", d.name, p, d.path)}
		}
		seen[d.name] = d.path
	}
	return disks, nil
}

// listingMinPacks is the size of repository from which a backup may skip
// listing its packs: below it, the listing costs at most 100 requests.
const listingMinPacks = 100_000

// assumedRate is the upload rate a backup's duration is estimated with,
// to warn of credentials that expire before its end: a slow office link.
const assumedRate = 10 << 20

// warnExpiry warns when the credentials expire before the backup of total
// bytes may end, with a quarter of an hour to spare.
func (g *globals) warnExpiry(lim backend.Limits, total int64) {
	if lim.Expires.IsZero() {
		return
	}
	left := time.Until(lim.Expires)
	need := time.Duration(total/assumedRate)*time.Second + 15*time.Minute
	if left < need {
		g.warnf("%s expires at %s, in %s: a backup of %s at %s/s takes about %s; it fails if it has not ended by then",
			lim.Credential, lim.Expires.Local().Format(time.RFC3339), left.Round(time.Second), bytesIEC(total), bytesIEC(assumedRate), (need - 15*time.Minute).Round(time.Second))
	}
}

// openForBackup opens the repository to write, indexes what an
// interrupted backup left and finds the parent: the latest snapshot of
// the host whose first disk came from path.
func (g *globals) openForBackup(ctx context.Context, o *backupOptions, path string) (*repo.Repository, *repo.ID, error) {
	host := o.host
	r, err := g.openRepo(ctx, false, true)
	if err != nil {
		return nil, nil, err
	}
	if lim := backend.LimitsOf(r.Backend()); lim.NoList {
		// The classic recipe's token (read, write, create; no list): the
		// backup works, as dd | azcopy did, but knows nothing stored.
		g.warnf("%s cannot list the repository: this backup cannot read its index, so it reuses nothing stored before (every chunk is stored again), has no parent snapshot, and cannot adopt the packs of an interrupted backup; give the token l for deduplication", lim.Credential)
		if err := r.SetParity(o.parity); err != nil {
			return nil, nil, usageError{fmt.Errorf("--parity: %w", err)}
		}
		return r, nil, nil
	}
	r.ReuseListing(o.listingAge, o.listingMin)
	if err := r.LoadIndex(ctx); err != nil {
		return nil, nil, err
	}
	if err := r.SetParity(o.parity); err != nil {
		return nil, nil, usageError{fmt.Errorf("--parity: %w", err)}
	}
	if n, err := r.AdoptOrphanPacks(ctx); err != nil {
		return nil, nil, err
	} else if n > 0 {
		g.warnf("indexed %d packs left by an interrupted backup; their chunks are reused", n)
	}
	var parent *repo.ID
	if all, err := g.snapshots(ctx, r); err == nil {
		if p, err := repo.FindSnapshot(all, "latest", repo.Filter{Host: host, Path: path}); err == nil {
			parent = &p.ID
		}
	}
	return r, parent, nil
}

// prepareDisk reads the view of d as a disk and maps it.
func (g *globals) prepareDisk(d *backupDisk, o *backupOptions) (backup.Source, error) {
	sd, err := source.OpenDisk(d.view, o.source)
	if err != nil {
		return backup.Source{}, err
	}
	d.disk = sd
	if sd.Format != vdisk.Raw {
		g.printf("reading %s as a %s image (virtual size %s)\n", d.src.Path, strings.TrimSpace(sd.Format+" "+sd.Detail), bytesIEC(sd.Size))
	}
	if !o.allowEmpty {
		if err := sd.RefuseEmpty(emptyDoing, emptyHint); err != nil {
			return backup.Source{}, err
		}
	}
	layout, err := sd.Map(source.MapOptions{NoSkip: o.noFSSkip, Warn: g.warn})
	if err != nil {
		return backup.Source{}, err
	}
	d.layout = layout
	if why := layout.InUse(); why != "" && o.requireConsistent {
		return backup.Source{}, fmt.Errorf("%s is in use (%s) and no point-in-time copy of it can be taken: refusing to read it (--require-consistent); unmount it, or back it up from an LVM volume, an image file on XFS or btrfs, or through QEMU", d.src.Path, why)
	}
	v := d.view
	bs := backup.Source{Name: d.name, Path: d.path, Kind: string(d.src.Kind), Size: sd.Size,
		At: sd.At, Stream: sd.Stream, Map: layout.Map(), Verify: v.Verify, Describe: func(rd *repo.Disk) {
			layout.Describe(rd)
			rd.PointInTime = v.Copy
			rd.ChangeTracker = v.Tracker
		}}
	if d.src.Kind == source.Stream {
		bs.SizeHint = o.stdinSize
	}
	if sd.Format == vdisk.Raw {
		// An image format's reader on top decides its own reads.
		bs.Readers = v.Readers
		// A raw file, device or copy of one is read at any offset from
		// any goroutine (io.ReaderAt's contract; an NBD export has
		// Readers).
		bs.Concurrent = true
	}
	return bs, nil
}

func backupLabel(disks []*backupDisk) string {
	names := make([]string, len(disks))
	for i, d := range disks {
		names[i] = d.name
	}
	return strings.Join(names, ", ")
}

// printBackup says what a backup stored.
func (g *globals) printBackup(res *backup.Result, disks []*backupDisk, rep shadow.Report) error {
	sn, st := res.Snapshot, res.Stats
	if g.json {
		return g.printJSON(backupJSON(res, disks, rep))
	}
	if len(sn.Disks) == 1 {
		d := sn.Disks[0]
		g.printf("snapshot %s saved: %s, %s (%d chunks of %s)\n", sn.ID.Short(), d.Name, bytesIEC(d.Size), d.Chunks(), bytesIEC(int64(d.ChunkSize)))
	} else {
		var size int64
		for _, d := range sn.Disks {
			size += d.Size
		}
		g.printf("snapshot %s saved: %d disks, %s\n", sn.ID.Short(), len(sn.Disks), bytesIEC(size))
	}
	g.printf("  read %s, new %s (%s compressed), chunks %d new / %d reused / %d zero\n",
		bytesIEC(st.BytesRead), bytesIEC(st.BytesNew), bytesIEC(st.BytesNewCoded), st.ChunksNew, st.ChunksReused, st.ChunksZero)
	for i := range sn.Disks {
		d := &sn.Disks[i]
		if len(sn.Disks) > 1 {
			g.printf("  disk %s (%s): %s, read %s, new %s\n", d.Name, d.Source, bytesIEC(d.Size), bytesIEC(d.Stats.BytesRead), bytesIEC(d.Stats.BytesNew))
		}
		if len(d.Partitions) > 0 && !g.quiet {
			printPartitions(g.stdout, d, true)
			g.printf("  outside partitions: read %s; skipped as free space: %s\n", bytesIEC(d.BytesOutside), bytesIEC(skippedOf(d)))
		}
		g.printCopy(d, disks[i])
	}
	if rep.Frozen > 0 {
		g.printf("  writes to %s were frozen for %s while the copy was taken\n", strings.Join(rep.Mounts, ", "), seconds(rep.Frozen.Seconds()))
	}
	if !g.quiet {
		printQuiescing(g.stdout, "  ", sn.Quiesce)
	}
	g.printf("  took %s (%s)\n", seconds(st.Seconds), rate(totalSize(sn), st.Seconds))
	return nil
}

// printCopy says which point-in-time copy a disk was read from.
func (g *globals) printCopy(d *repo.Disk, bd *backupDisk) {
	v := bd.view
	switch {
	case v.Copy != "":
		g.printf("  read from a %s copy of %s taken before the backup read it (one instant)", v.Copy, bd.src.Path)
		if v.CopyUsed != nil {
			if n := v.CopyUsed(); n >= 0 {
				g.printf("; the copy took %s", bytesIEC(n))
			}
		}
		g.printf("\n")
	case d.InUse != "":
		g.printf("  read as it was while in use (%s): not one instant, may be torn\n", d.InUse)
	}
}

func totalSize(sn *repo.Snapshot) int64 {
	var n int64
	for _, d := range sn.Disks {
		n += d.Size
	}
	return n
}

// backupJSON is backup's --json result: the first disk's fields at the
// top, as for a one-disk snapshot, and every disk under "disks".
func backupJSON(res *backup.Result, disks []*backupDisk, rep shadow.Report) map[string]any {
	sn, st := res.Snapshot, res.Stats
	tags := sn.Tags
	if tags == nil {
		tags = []string{}
	}
	var list []map[string]any
	for i := range sn.Disks {
		d := &sn.Disks[i]
		v := disks[i].view
		copyBytes := int64(-1)
		if v.CopyUsed != nil {
			copyBytes = v.CopyUsed()
		}
		list = append(list, map[string]any{
			"copy_bytes": copyBytes, "full_read": disks[i].fullRead, "bytes_unchanged": d.Stats.BytesUnchanged, "base": idString(d.Base),
			"disk": d.Name, "source": d.Source, "size": d.Size, "bytes_read": d.Stats.BytesRead,
			"bytes_new": d.Stats.BytesNew, "chunks_new": d.Stats.ChunksNew, "chunks_reused": d.Stats.ChunksReused,
			"chunks_zero": d.Stats.ChunksZero, "chunks_unchanged": d.Stats.ChunksUnchanged,
			"partition_table": d.PartitionTable, "partitions": partitionsOf(d),
			"bytes_skipped": skippedOf(d), "bytes_outside_partitions": d.BytesOutside,
			"point_in_time_copy": copyName(disks[i].view), "in_use": d.InUse,
		})
	}
	d := list[0]
	out := map[string]any{
		"snapshot": sn.ID.String(), "short_id": sn.ID.Short(), "time": sn.Time, "host": sn.Host, "tags": tags, "quiesce": sn.Quiesce,
		"bytes_new_compressed": st.BytesNewCoded, "bytes_stored": st.BytesStored,
		"packs": res.Packs, "parity_bytes": res.ParityBytes, "seconds": st.Seconds, "disks": list,
		"frozen_seconds": rep.Frozen.Seconds(), "frozen_mounts": nonNil(rep.Mounts),
	}
	for _, k := range []string{"disk", "source", "size", "partition_table", "partitions", "bytes_skipped", "bytes_outside_partitions", "point_in_time_copy"} {
		out[k] = d[k]
	}
	// Totals over every disk.
	out["bytes_read"], out["bytes_new"] = st.BytesRead, st.BytesNew
	out["chunks_new"], out["chunks_reused"], out["chunks_zero"] = st.ChunksNew, st.ChunksReused, st.ChunksZero
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
