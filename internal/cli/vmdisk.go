package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk"
	"github.com/sauve-backup/sauve/internal/vdisk/ova"
)

// outFlags are the flags export and convert share: what to write.
type outFlags struct {
	format     string
	subformat  string
	size       string
	force      bool
	cpus       int
	memory     string
	controller string
	name       string
}

func (o *outFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVarP(&o.format, "format", "O", "", "output format: "+strings.Join(vdisk.Formats, ", ")+" (default: from OUTPUT's extension)")
	f.StringVar(&o.subformat, "subformat", "", "vmdk: monolithicSparse (default) or streamOptimized; vhd, vdi: dynamic (default) or fixed")
	f.StringVar(&o.size, "size", "", "virtual size of the output, to grow the disk (e.g. 100G); never smaller than the source")
	f.BoolVarP(&o.force, "force", "f", false, "replace OUTPUT if it exists")
	f.IntVar(&o.cpus, "cpus", 1, "ova: number of virtual CPUs")
	f.StringVar(&o.memory, "memory", "1G", "ova: memory of the virtual machine (e.g. 2048M, 4G; a bare number is MiB)")
	f.StringVar(&o.controller, "controller", "ide", "ova: disk controller: ide, scsi (LSI Logic) or sata (AHCI)")
	f.StringVar(&o.name, "name", "", "ova: virtual machine name (default: OUTPUT's base name)")
}

// resolve checks the flags against OUTPUT and the disk's size and returns
// the writer options.
func (o *outFlags) resolve(output string, diskSize int64, flags *pflag.FlagSet) (vdisk.Options, error) {
	format := o.format
	if format == "" {
		format = vdisk.FromExtension(output)
		if format == "" {
			return vdisk.Options{}, usageError{fmt.Errorf("cannot tell the format from %q: give --format (%s)", filepath.Base(output), strings.Join(vdisk.Formats, ", "))}
		}
	}
	format, sub, err := vdisk.ParseFormat(format, o.subformat)
	if err != nil {
		return vdisk.Options{}, usageError{err}
	}
	opts := vdisk.Options{Format: format, Subformat: sub, Size: diskSize, FileName: filepath.Base(output)}
	if o.size != "" {
		s, err := parseSize(o.size)
		if err != nil {
			return opts, usageError{fmt.Errorf("--size: %w", err)}
		}
		if s < diskSize {
			return opts, usageError{fmt.Errorf("--size %s is smaller than the disk (%d bytes): refusing to cut it", o.size, diskSize)}
		}
		opts.Size = s
	}
	ovaOnly := []string{"cpus", "memory", "controller", "name"}
	if format != vdisk.OVA {
		for _, n := range ovaOnly {
			if flags.Changed(n) {
				return opts, usageError{fmt.Errorf("--%s applies to --format ova only", n)}
			}
		}
		return opts, nil
	}
	mem, err := parseSize(o.memory)
	if err != nil {
		return opts, usageError{fmt.Errorf("--memory: %w", err)}
	}
	if mem < 1<<20 {
		mem <<= 20 // a bare number is MiB
	}
	name := o.name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(output), filepath.Ext(output))
	}
	opts.OVA = ova.Options{Name: name, CPUs: o.cpus, MemoryMiB: mem >> 20, Controller: o.controller}
	return opts, nil
}

// machineDefaults fills an OVA's machine from what the snapshot
// recorded of the backed-up machine, where flags did not say: CPUs,
// memory, the disk's controller (OVF has IDE, SCSI and SATA: a virtio
// disk becomes SCSI, an NVMe one SATA), and always its network cards
// and firmware.
func machineDefaults(o *ova.Options, m *repo.Machine, disk string, flags *pflag.FlagSet) {
	if m == nil {
		return
	}
	if m.CPUs > 0 && !flags.Changed("cpus") {
		o.CPUs = min(m.CPUs, 768)
	}
	if m.MemoryMiB >= 4 && !flags.Changed("memory") {
		o.MemoryMiB = m.MemoryMiB
	}
	if c, ok := m.Controllers[disk]; ok && !flags.Changed("controller") {
		o.Controller = map[string]string{"ide": "ide", "sata": "sata", "scsi": "scsi", "virtio": "scsi", "nvme": "sata"}[c]
	}
	for _, n := range m.NICs {
		o.NICs = append(o.NICs, ova.NIC{MAC: n.MAC, Model: n.Model})
	}
	o.UEFI = m.Firmware == "uefi"
}

// outputFile is an image being written: a temporary file beside OUTPUT,
// renamed over it only once complete, so a failed or interrupted run
// leaves nothing behind (and an existing OUTPUT untouched).
type outputFile struct {
	path  string
	tmp   string
	f     *os.File
	force bool
	mode  os.FileMode // given to the file when it is put in place
}

func createOutput(path string, force bool) (*outputFile, error) {
	if path == "-" {
		return nil, usageError{errors.New("VM disk images cannot be written to stdout: name an output file")}
	}
	if fi, err := os.Stat(path); err == nil {
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("output %s exists and is not a regular file: refusing to write to it", path)
		}
		if !force {
			return nil, fmt.Errorf("output %s exists: refusing to overwrite it (use --force)", path)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("output: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".sauve-*")
	if err != nil {
		return nil, fmt.Errorf("create output: %w", err)
	}
	return &outputFile{path: path, tmp: f.Name(), f: f, force: force, mode: 0o644}, nil
}

// commit syncs the file and puts it in place.
func (o *outputFile) commit() error {
	if err := o.f.Sync(); err != nil {
		o.abort()
		return fmt.Errorf("sync %s: %w", o.path, err)
	}
	if err := o.f.Chmod(o.mode); err != nil {
		o.abort()
		return fmt.Errorf("chmod %s: %w", o.path, err)
	}
	if err := o.f.Close(); err != nil {
		os.Remove(o.tmp)
		return fmt.Errorf("close %s: %w", o.path, err)
	}
	if o.force {
		if err := os.Rename(o.tmp, o.path); err != nil {
			os.Remove(o.tmp)
			return fmt.Errorf("rename output into place: %w", err)
		}
		return nil
	}
	// A hard link fails if OUTPUT appeared meanwhile: never overwrite.
	if err := os.Link(o.tmp, o.path); err != nil {
		if errors.Is(err, os.ErrExist) {
			os.Remove(o.tmp)
			return fmt.Errorf("output %s appeared while writing: refusing to overwrite it (use --force)", o.path)
		}
		if _, serr := os.Lstat(o.path); serr == nil {
			os.Remove(o.tmp)
			return fmt.Errorf("output %s exists: refusing to overwrite it (use --force)", o.path)
		}
		if rerr := os.Rename(o.tmp, o.path); rerr != nil {
			os.Remove(o.tmp)
			return fmt.Errorf("rename output into place: %w", rerr)
		}
		return nil
	}
	os.Remove(o.tmp)
	return nil
}

func (o *outputFile) abort() {
	o.f.Close()
	os.Remove(o.tmp)
}

// fileUsage returns a file's size and the bytes it occupies on disk.
func fileUsage(path string) (size, allocated int64) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		allocated = st.Blocks * 512
	}
	return fi.Size(), allocated
}

// writeResult prints what export and convert made.
func (g *globals) writeResult(from string, fields map[string]any, opts vdisk.Options, out string, data, read int64, secs float64) error {
	size, alloc := fileUsage(out)
	vsize := vdisk.RoundSize(opts.Format, opts.Size)
	if g.json {
		m := map[string]any{
			"output": out, "format": opts.Format, "subformat": opts.Subformat, "virtual_size": vsize,
			"file_size": size, "allocated_bytes": alloc, "data_bytes": data, "bytes_read": read, "seconds": secs,
		}
		for k, v := range fields {
			m[k] = v
		}
		return g.printJSON(m)
	}
	kind := opts.Format
	if opts.Subformat != "" {
		kind += " " + opts.Subformat
	}
	g.printf("wrote %s: %s, virtual size %s, file %s (%s on disk)\n", out, kind, bytesIEC(vsize), bytesIEC(size), bytesIEC(alloc))
	g.printf("  from %s: %s of data, read %s\n", from, bytesIEC(data), bytesIEC(read))
	g.printf("  took %s (%s)\n", seconds(secs), rate(vsize, secs))
	return nil
}

func newConvertCmd(g *globals) *cobra.Command {
	var (
		o          outFlags
		skipFree   bool
		allowEmpty bool
	)
	cmd := &cobra.Command{
		Use:   "convert SOURCE OUTPUT",
		Short: "Convert a device or disk image to a VM disk format (raw, qcow2, vmdk, vhd, vhdx, vdi, ova)",
		Long: `Convert SOURCE to OUTPUT in one pass, sparse.

SOURCE is a block device (P2V: /dev/sda), a raw disk image, or an image in
any format sauve reads (qcow2, vmdk, vhd, vhdx, vdi, or the disk of an ova:
V2V), recognised by its headers whatever its name; only the regions it holds
data for are read. Formats sauve does not read (parallels, dmg, qed, gzip,
ntfsclone, ...) are refused, saying what to do; --source-format raw reads
the bytes as they are.
OUTPUT's format is --format, or guessed from its extension (.img .qcow2
.vmdk .vhd .vhdx .vdi .ova). Zeros stay unallocated in the output, and
--size makes the virtual disk larger than the source.

  raw     a sparse image file
  qcow2   QEMU/KVM, Proxmox, OpenStack (version 3, compat=1.1)
  vmdk    VMware: monolithicSparse (Workstation, Player, ESXi after
          vmkfstools -i), or --subformat streamOptimized
  vhd     Hyper-V, Azure, Virtual PC: dynamic, or --subformat fixed
  vhdx    Hyper-V (dynamic)
  vdi     VirtualBox: dynamic, or --subformat fixed
  ova     a virtual machine to import into VirtualBox or VMware: OVF
          descriptor, manifest of SHA-256 digests and a streamOptimized
          VMDK; --cpus, --memory, --controller, --name describe it

With --skip-free, the partition table and filesystems of the disk are read
(as 'sauve backup' does) and the blocks the filesystems mark free are
neither read nor written: the output holds the same files, and free space
reads as zeros.

OUTPUT is written under a temporary name and renamed into place when
complete; an existing OUTPUT is refused unless --force. An empty SOURCE
(0 bytes) is refused unless --allow-empty, as 'sauve backup' refuses one.`,
		Example: `  sauve convert /dev/sda /srv/vm/web.vmdk --skip-free
  sauve convert web.qcow2 web.vhdx
  sauve convert disk.img web.vhd --subformat fixed --size 64G
  sauve convert /dev/nvme0n1 web.ova --cpus 2 --memory 4G --controller sata`,
		Args: exactArgs(2, "SOURCE and OUTPUT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			start := time.Now()
			sopts, err := sourceOptions(cmd)
			if err != nil {
				return err
			}
			src, err := source.Open(ctx, args[0])
			if err != nil {
				return err
			}
			defer src.Close()
			if src.Kind == source.Stream {
				return usageError{fmt.Errorf("convert needs a file or block device, not a stream: %s", args[0])}
			}
			const doing, hint = "write an empty disk image", "--allow-empty writes one"
			if !allowEmpty {
				if err := src.RefuseEmpty(doing, hint); err != nil {
					return err
				}
			}
			img, err := source.OpenDisk(source.Live(src), sopts)
			if err != nil {
				return err
			}
			defer img.Close()
			if !allowEmpty {
				if err := img.RefuseEmpty(doing, hint); err != nil {
					return err
				}
			}
			opts, err := o.resolve(args[1], img.Size, cmd.Flags())
			if err != nil {
				return err
			}
			m := img.Alloc
			var layout *source.Layout
			if skipFree {
				if layout, err = img.Map(source.MapOptions{Warn: g.warn}); err != nil {
					return err
				}
				m = layout.Map()
			}
			prog := new(vdisk.Progress)
			data, err := g.writeImage(ctx, args[1], o.force, opts, "convert "+filepath.Base(args[0]), prog.Done.Load, func(w vdisk.Writer) error {
				return vdisk.Copy(ctx, w, img.At, m, img.Size, prog)
			})
			if err != nil {
				return fmt.Errorf("convert %s to %s: %w", args[0], args[1], err)
			}
			srcDesc := img.Format
			if img.Detail != "" {
				srcDesc += " " + img.Detail
			}
			fields := map[string]any{"source": args[0], "source_format": img.Format, "source_size": img.Size}
			if layout != nil {
				layout.WarnLate()
				skipped := layout.Skipped()
				fields["bytes_skipped"] = skipped
				g.printf("free space of the filesystems left unallocated: %s\n", bytesIEC(skipped))
			}
			return g.writeResult(fmt.Sprintf("%s (%s, %s)", args[0], srcDesc, bytesIEC(img.Size)), fields,
				opts, args[1], data, prog.Read.Load(), time.Since(start).Seconds())
		},
	}
	o.add(cmd)
	addImportFlags(cmd)
	cmd.Flags().BoolVar(&allowEmpty, "allow-empty", false, "convert an empty source (0 bytes) into an empty disk image instead of refusing it")
	cmd.Flags().BoolVar(&skipFree, "skip-free", false, "leave the free space of ext2/3/4, XFS, NTFS, FAT and swap unallocated (it reads as zeros): a smaller output, made faster")
	return cmd
}

// writeImage creates OUTPUT, runs fill to write the disk into it, and
// puts it in place; it returns the bytes of data written.
func (g *globals) writeImage(ctx context.Context, path string, force bool, opts vdisk.Options, label string, current func() int64, fill func(vdisk.Writer) error) (int64, error) {
	out, err := createOutput(path, force)
	if err != nil {
		return 0, err
	}
	w, err := vdisk.Create(out.f, opts)
	if err != nil {
		out.abort()
		return 0, err
	}
	total := opts.Size
	m := startMeter(g.stderr, g.showProgress(), meterSource{
		label: label, total: func() int64 { return total }, current: current,
		extra: func() string { return "data " + bytesIEC(w.DataBytes()) },
	})
	err = fill(w)
	if err == nil {
		err = w.Close()
	} else if a, ok := w.(interface{ Abort() }); ok {
		a.Abort()
	}
	m.Stop()
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		out.abort()
		return 0, err
	}
	if err := out.commit(); err != nil {
		return 0, err
	}
	return w.DataBytes(), nil
}
