package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/snapfs"
)

// mountFlags are sauve mount's flags.
type mountFlags struct {
	ff         filterFlags
	files      bool
	noReplay   bool
	allowOther bool
	debug      bool
}

func newMountCmd(g *globals) *cobra.Command {
	var f mountFlags
	cmd := &cobra.Command{
		Use:   "mount [SNAPSHOT] DIR",
		Short: "Mount snapshots read-only as disk image files (FUSE), without restoring them",
		Long: fmt.Sprintf(`Mount the snapshots of the repository (those --host, --tag, --source,
--before and --after let through), or SNAPSHOT alone (an ID prefix, or
'latest'), read-only on DIR, an empty folder, with FUSE. DIR holds a folder
per snapshot, named by its time (UTC), host, disks and short ID (those
backed up later appear at the next mount):

  DIR/2026-12-03T053000Z_web1_vda_1a2b3c4d/
    vda.img          the whole disk, a raw image
    vda-part1.img    partition 1 alone
    vda-part1/       with --files: the files of partition 1
    vda-files/       with --files: the files of a disk without partitions

Any filesystem the kernel knows mounts from an image with
'mount -o loop,ro' (add noload for an ext3/4 backed up while mounted: its
journal needs recovery), and programs that read raw images (qemu-img,
fsck -n, file, testdisk) read them in place. Chunks are fetched and
verified as they are read, and the kernel keeps what it read in its page
cache; nothing is written anywhere. A read that fails verification gets
an I/O error, and a warning here.

--files also presents the files of each partition whose filesystem sauve
reads, with their modes, owners, times, symlinks and extended attributes;
the kernel checks modes and owners as for any filesystem (mount as root
to read every file). Filesystems read: %s. One backed up
while mounted has its journal replayed in memory (--no-replay: read it as
on disk).

Only the user who mounts can read the tree, unless --allow-other (for a
user other than root, /etc/fuse.conf needs user_allow_other): the images
hold every byte of the disks, secrets included. Mounting as a user other
than root needs fusermount3 (package fuse3).

sauve mount stays in the foreground until Ctrl-C or SIGTERM, then
unmounts. While a program uses the mount (an open file, a working folder,
a loop device on an image) it cannot: it says so and keeps serving; stop
those and press Ctrl-C again. Unmounting DIR from elsewhere (umount,
fusermount3 -u) ends it too.`, readerNames()),
		Example: `  mkdir -p /mnt/backup /mnt/p1
  sauve mount latest /mnt/backup &
  mount -o loop,ro /mnt/backup/2026-12-03T053000Z_web1_vda_1a2b3c4d/vda-part1.img /mnt/p1
  sauve mount --host web1 --after 7d --files /mnt/backup
  cp -a /mnt/backup/*_1a2b3c4d/vda-part1/etc/fstab /tmp/`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usageError{fmt.Errorf("%s: expects [SNAPSHOT] DIR", cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, dir := "", args[len(args)-1]
			if len(args) == 2 {
				spec = args[0]
			}
			return g.mount(cmd.Context(), spec, dir, &f)
		},
	}
	f.ff.add(cmd)
	f.ff.addDates(cmd)
	cmd.Flags().BoolVar(&f.files, "files", false, "also present the files of each partition ("+readerNames()+")")
	cmd.Flags().BoolVar(&f.noReplay, "no-replay", false, "with --files: do not replay the journal of a filesystem backed up while mounted (its metadata may be stale)")
	cmd.Flags().BoolVar(&f.allowOther, "allow-other", false, "let other users read the mount (FUSE allow_other), within the files' own permissions")
	cmd.Flags().BoolVar(&f.debug, "debug-fuse", false, "log every FUSE request on stderr")
	cmd.Flags().MarkHidden("debug-fuse")
	return cmd
}

// readerNames lists the filesystems files views read.
func readerNames() string {
	var names []string
	for _, r := range fsReaders() {
		names = append(names, r.name)
	}
	return strings.Join(names, ", ")
}

// mountCache is the cache budget of each disk's reader: a mount reads
// in order (an image copied, a loop device) as often as at random.
const mountCache = 32 << 20

// mountedSnap is a snapshot to mount and the repository that holds it.
type mountedSnap struct {
	r  *repo.Repository
	sn *repo.Snapshot
}

func (g *globals) mount(ctx context.Context, spec, dir string, f *mountFlags) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := snapfs.CheckMountPoint(dir); err != nil {
		return err
	}
	snaps, err := g.mountList(ctx, spec, &f.ff)
	if err != nil {
		return err
	}
	// Reads go on after Ctrl-C while the mount is busy: the readers must
	// outlive the command's context, until the mount is gone.
	var readers openReaders
	defer readers.closeAll()
	rctx := context.WithoutCancel(ctx)
	tree := make([]snapfs.Snapshot, 0, len(snaps))
	for _, s := range snaps {
		tree = append(tree, g.snapTree(rctx, s, f, &readers))
	}
	opts := snapfs.Options{Warn: g.warnf, UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
	if f.files {
		opts.OpenFS = func(r *io.SectionReader, p snapfs.Partition, what string) (snapfs.FileSystem, error) {
			return openFS(r, repo.Partition{Filesystem: p.Filesystem}, f.noReplay, func(s string) { g.warnf("%s: %s", what, s) })
		}
	}
	srv, err := snapfs.Mount(dir, snapfs.New(tree, opts), snapfs.MountOptions{AllowOther: f.allowOther, Debug: f.debug})
	if err != nil {
		return err
	}
	what := fmt.Sprintf("%d snapshots", len(snaps))
	if len(snaps) == 1 {
		what = "snapshot " + snaps[0].sn.ID.Short()
	}
	g.note("mounted %s read-only on %s; Ctrl-C unmounts", what, dir)
	return g.serveMount(ctx, srv, dir)
}

// mountList finds the snapshot spec names, or with spec empty all those
// the filters let through, in every repository of the set.
func (g *globals) mountList(ctx context.Context, spec string, ff *filterFlags) ([]mountedSnap, error) {
	if spec != "" {
		r, sn, err := g.openSnapshotData(ctx, "mount", spec, ff)
		if err != nil {
			return nil, err
		}
		return []mountedSnap{{r, sn}}, nil
	}
	flt, err := ff.filter()
	if err != nil {
		return nil, err
	}
	set, err := g.openSet(ctx, true)
	if err != nil {
		return nil, err
	}
	all, in, err := g.setSnapshots(ctx, set)
	if err != nil {
		return nil, err
	}
	var out []mountedSnap
	for _, sn := range all {
		if !flt.Match(sn) {
			continue
		}
		if r := in[sn]; !r.CanDecrypt() {
			return nil, fmt.Errorf("mount: %w", errWriteOnly(r))
		}
		out = append(out, mountedSnap{in[sn], sn})
	}
	if len(out) == 0 {
		if len(all) == 0 {
			return nil, errors.New("the repository has no snapshots to mount")
		}
		return nil, errors.New("no snapshot matches --host, --tag, --source, --before and --after")
	}
	return out, nil
}

// snapTree describes s for snapfs; each disk's reader opens on first
// read.
func (g *globals) snapTree(ctx context.Context, s mountedSnap, f *mountFlags, readers *openReaders) snapfs.Snapshot {
	sn := s.sn
	out := snapfs.Snapshot{ID: sn.ID.Short(), Time: sn.Time, Host: sn.Host}
	var names []string
	for i := range sn.Disks {
		d := &sn.Disks[i]
		names = append(names, d.Name)
		sd := snapfs.Disk{
			Name: d.Name, Size: d.Size,
			What: fmt.Sprintf("disk %s of snapshot %s", d.Name, sn.ID.Short()),
			Open: func() (io.ReaderAt, error) {
				dr, err := s.r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: mountCache, ReadAhead: mountCache / 4, Warn: g.warnf})
				if err != nil {
					return nil, err
				}
				return readers.add(dr), nil
			},
		}
		for _, p := range d.Partitions {
			sd.Partitions = append(sd.Partitions, snapfs.Partition{
				Number: p.Number, Start: p.Start, Size: p.Size, Extended: p.Extended, Filesystem: p.Filesystem,
				Files: f.files && p.Filesystem != "" && p.Filesystem != "swap",
			})
		}
		out.Disks = append(out.Disks, sd)
	}
	out.Source = strings.Join(names, ",")
	return out
}

// openReaders are the disk readers of a mount that are open: snapfs
// closes a reader when nothing uses it, and the mount's end closes the
// rest.
type openReaders struct {
	mu  sync.Mutex
	all map[*repo.DiskReader]bool
}

// mountReader is a disk reader that leaves the set when closed.
type mountReader struct {
	*repo.DiskReader
	set *openReaders
}

func (m mountReader) Close() error {
	m.set.mu.Lock()
	delete(m.set.all, m.DiskReader)
	m.set.mu.Unlock()
	return m.DiskReader.Close()
}

func (o *openReaders) add(dr *repo.DiskReader) mountReader {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.all == nil {
		o.all = map[*repo.DiskReader]bool{}
	}
	o.all[dr] = true
	return mountReader{dr, o}
}

func (o *openReaders) closeAll() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for dr := range o.all {
		dr.Close()
	}
	clear(o.all)
}

// serveMount serves until dir is unmounted: on Ctrl-C or SIGTERM it
// unmounts, or says why it cannot and goes on; an unmount from elsewhere
// ends it too.
func (g *globals) serveMount(ctx context.Context, srv *fuse.Server, dir string) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	served := make(chan struct{})
	go func() { srv.Wait(); close(served) }()
	stop := ctx.Done()
	for {
		select {
		case <-served:
			g.note("%s was unmounted", dir)
			return nil
		case <-stop:
			// The signal that ended ctx reaches sigs too: one attempt.
			stop = nil
			select {
			case <-sigs:
			case <-time.After(100 * time.Millisecond):
			}
		case <-sigs:
			stop = nil
		}
		err := snapfs.Unmount(srv, dir)
		switch {
		case err == nil:
			g.note("unmounted %s", dir)
			return nil
		case errors.Is(err, snapfs.ErrBusy):
			fmt.Fprintf(g.stderr, "sauve: %s is busy: a program has a file or its working folder in it, or an image is loop-mounted ('fuser -vm %s' lists them). Still serving: stop them and press Ctrl-C again (or detach it now with 'umount -l %s')\n", dir, dir, dir)
		default:
			return err
		}
	}
}

// note prints a line about what a long-running command does on stderr,
// unless --quiet.
func (g *globals) note(format string, args ...any) {
	if !g.quiet {
		fmt.Fprintf(g.stderr, format+"\n", args...)
	}
}
