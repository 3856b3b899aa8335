package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/shadow"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

func newBackupCmd(g *globals) *cobra.Command {
	var (
		stdinName  string
		stdinSize  string
		host       string
		tags       []string
		noFSSkip   bool
		snapshot   string
		allowEmpty bool
	)
	cmd := &cobra.Command{
		Use:   "backup SOURCE",
		Short: "Back up a disk, partition, image file or standard input",
		Long: `Back up SOURCE into the repository as a new snapshot.

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

An image file that is written while it is backed up (a running VM's disk)
would be read torn between old and new writes. On XFS (mkfs.xfs -m
reflink=1) and btrfs, --snapshot auto (the default) first makes an instant
reflink copy of it beside it, reads the copy and drops it: the snapshot is
the file as it was at one instant, and the copy costs no space but what is
rewritten meanwhile. A qcow2 that a running QEMU holds open is refused (its
copy would not be an instant of the VM's disk). Elsewhere auto reads the
source as it is; --snapshot reflink fails instead, --snapshot none never
copies.

The snapshot manifest is written last: an interrupted backup leaves no
snapshot, and the next backup reuses what it had uploaded.`,
		Example: `  sauve backup /dev/vda --tag nightly
  sauve backup /var/lib/libvirt/images/web.img   # a reflink copy on XFS or btrfs
  sauve backup /dev/sda --no-fs-skip          # every byte, free space included
  dd if=/dev/sdb bs=1M | sauve backup - --stdin-name sdb.img --stdin-size 500G
  sauve backup /srv/empty.img --allow-empty    # a 0-byte file: store it anyway
  sauve backup /dev/vda --repo 'https://acct.blob.core.windows.net/backups?sp=rcwl&se=...&sig=...'
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... sauve backup /dev/vda --repo s3://bucket/vm1`,
		Args: exactArgs(1, "one SOURCE (a device, an image file, or - for stdin)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			sopts, err := sourceOptions(cmd)
			if err != nil {
				return err
			}
			mode, err := shadow.ParseMode(snapshot)
			if err != nil {
				return usageError{err}
			}
			src, err := source.Open(ctx, args[0])
			if err != nil {
				return err
			}
			defer src.Close()
			const doing, hint = "store an empty snapshot", "--allow-empty stores one"
			if !allowEmpty {
				if err := src.RefuseEmpty(doing, hint); err != nil {
					return err
				}
			}
			if host == "" {
				host, _ = os.Hostname()
			}
			name := filepath.Base(src.Path)
			path := src.Path
			if src.Kind == source.Stream {
				name, path = stdinName, "-"
			} else if abs, err := filepath.Abs(src.Path); err == nil {
				path = abs
			}
			r, err := g.openRepo(ctx, true, true)
			if err != nil {
				return err
			}
			if n, err := r.AdoptOrphanPacks(ctx); err != nil {
				return err
			} else if n > 0 {
				g.warnf("indexed %d packs left by an interrupted backup; their chunks are reused", n)
			}
			var parent *repo.ID
			if all, err := g.snapshots(ctx, r); err == nil {
				if p, err := repo.FindSnapshot(all, "latest", repo.Filter{Host: host, Path: path}); err == nil {
					parent = &p.ID
				}
			}
			// The point-in-time copy is taken once the repository is open
			// and before anything of the source is read.
			views, err := shadow.New(shadow.Options{Mode: mode, Warn: g.warn}).Views(ctx, []*source.Source{src})
			if err != nil {
				return err
			}
			defer shadow.Release(views)
			sd, err := source.OpenDisk(views[0], sopts)
			if err != nil {
				return err
			}
			defer sd.Close()
			if sd.Format != vdisk.Raw {
				g.printf("reading %s as a %s image (virtual size %s)\n", src.Path, strings.TrimSpace(sd.Format+" "+sd.Detail), bytesIEC(sd.Size))
			}
			layout, err := sd.Map(source.MapOptions{NoSkip: noFSSkip, Warn: g.warn})
			if err != nil {
				return err
			}
			bs := backup.Source{Name: name, Path: path, Kind: string(src.Kind), Size: sd.Size,
				At: sd.At, Stream: sd.Stream, Map: layout.Map(), Describe: func(d *repo.Disk) {
					layout.Describe(d)
					d.PointInTime = views[0].Copy
				}}
			if !allowEmpty {
				if err := sd.RefuseEmpty(doing, hint); err != nil {
					return err
				}
			}
			prog := new(backup.Progress)
			prog.Total.Store(src.Size)
			if stdinSize != "" {
				n, err := parseSize(stdinSize)
				if err != nil || n <= 0 {
					return usageError{fmt.Errorf("--stdin-size %q: want a size such as 20G", stdinSize)}
				}
				bs.SizeHint = n
				prog.Total.Store(n)
			}
			m := startMeter(g.stderr, g.showProgress(), meterSource{
				label: "backup " + name,
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
			res, err := backup.Run(ctx, r, bs, backup.Options{
				Host: host, Tags: tags, Parent: parent, Progress: prog, Program: "sauve " + Version,
			})
			m.Stop()
			if err != nil {
				return fmt.Errorf("backup of %s: %w", src.Path, err)
			}
			layout.WarnLate()
			sn, st := res.Snapshot, res.Stats
			d := sn.Disks[0]
			if g.json {
				tags := sn.Tags
				if tags == nil {
					tags = []string{}
				}
				return g.printJSON(map[string]any{
					"snapshot": sn.ID.String(), "short_id": sn.ID.Short(), "time": sn.Time, "host": sn.Host, "tags": tags,
					"disk": d.Name, "source": d.Source, "size": d.Size, "bytes_read": st.BytesRead,
					"bytes_new": st.BytesNew, "bytes_new_compressed": st.BytesNewCoded, "bytes_stored": st.BytesStored,
					"chunks_new": st.ChunksNew, "chunks_reused": st.ChunksReused, "chunks_zero": st.ChunksZero,
					"packs": res.Packs, "seconds": st.Seconds,
					"partition_table": d.PartitionTable, "partitions": partitionsOf(&d),
					"bytes_skipped": skippedOf(&d), "bytes_outside_partitions": d.BytesOutside,
					"point_in_time_copy": copyName(views[0]),
				})
			}
			g.printf("snapshot %s saved: %s, %s (%d chunks of %s)\n", sn.ID.Short(), d.Name, bytesIEC(d.Size), d.Chunks(), bytesIEC(int64(d.ChunkSize)))
			g.printf("  read %s, new %s (%s compressed), chunks %d new / %d reused / %d zero\n",
				bytesIEC(st.BytesRead), bytesIEC(st.BytesNew), bytesIEC(st.BytesNewCoded), st.ChunksNew, st.ChunksReused, st.ChunksZero)
			if len(d.Partitions) > 0 && !g.quiet {
				printPartitions(g.stdout, &d, true)
				g.printf("  outside partitions: read %s; skipped as free space: %s\n", bytesIEC(d.BytesOutside), bytesIEC(skippedOf(&d)))
			}
			if views[0].Copy != "" {
				g.printf("  read from a %s copy of %s taken before the backup read it (one instant)\n", views[0].Copy, src.Path)
			}
			g.printf("  took %s (%s)\n", seconds(st.Seconds), rate(d.Size, st.Seconds))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&stdinName, "stdin-name", "stdin", "name of the disk read from standard input")
	f.StringVar(&stdinSize, "stdin-size", "", "expected size of standard input (e.g. 20G), for progress and ETA")
	f.StringVar(&host, "host", "", "host name recorded in the snapshot (default: this machine's)")
	f.StringArrayVar(&tags, "tag", nil, "tag the snapshot (repeatable)")
	f.StringVar(&snapshot, "snapshot", "auto", "point-in-time copy to read: auto (a reflink copy of an image file on XFS or btrfs where the filesystem can make one, else the source as it is), reflink (fail where no reflink copy can be made), none")
	f.BoolVar(&noFSSkip, "no-fs-skip", false, "read and store free space too (filesystems are still found and reported)")
	f.BoolVar(&allowEmpty, "allow-empty", false, "store a snapshot of an empty source (0 bytes) instead of refusing it")
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
