package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/nbdserve"
	"github.com/sauve-backup/sauve/internal/repo"
)

func newServeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve a snapshot's disks to other programs (NBD)",
	}
	cmd.AddCommand(newServeNBDCmd(g))
	return cmd
}

func newServeNBDCmd(g *globals) *cobra.Command {
	var (
		ff       filterFlags
		diskName string
		listen   string
		ov       overlayFlags
	)
	cmd := &cobra.Command{
		Use:   "nbd SNAPSHOT",
		Short: "Serve the disks of a snapshot read-only over NBD, without restoring them",
		Long: `Serve the disks of SNAPSHOT (an ID prefix, or 'latest' with optional --host,
--tag, --before and --after filters) read-only over the Network Block Device
protocol, straight from the repository: qemu-img, qemu, nbdinfo, nbdcopy and
nbdfuse read a backed-up disk in place, or boot it, without restoring it.

Each disk is an export named after it, and each of its partitions an export
NAME:N (partition N alone); the default export (the empty name) is the first
disk, or --disk. Chunks are read and verified as clients ask for them; holes
(zero chunks) are reported as such, so copies stay sparse. Reads that fail
verification get an I/O error; the server keeps running.

The server listens on a unix socket, by default
$XDG_RUNTIME_DIR/sauve/nbd-ID.sock (the temporary folder without
XDG_RUNTIME_DIR), or --listen unix:PATH, and prints the URI of each export.
Anyone who can open the socket reads the disks: it is made mode 0600.
Serving over TCP needs TLS with client certificates and is not available
yet. Ctrl-C (or SIGTERM) stops the server and removes the socket.

--writable lets clients write, so a VM can boot from the backup (instant
recovery): every write goes to a local copy-on-write overlay file, never to
the repository. The overlay is temporary (deleted when the server stops)
unless --overlay FILE names it: then it survives a restart and the next
'serve nbd --writable --overlay FILE' of the same snapshot goes on from it
(a file made for another snapshot or disk is refused). With several disks
each gets FILE.DISK. Writes are durable once the client flushes.`,
		Example: `  sauve serve nbd latest --host web1 --listen unix:/run/web1.sock
  qemu-img convert -O qcow2 'nbd+unix:///vda?socket=/run/web1.sock' web1.qcow2
  nbdinfo --map 'nbd+unix:///vda?socket=/run/web1.sock'
  nbdfuse /mnt/web1 'nbd+unix:///vda:1?socket=/run/web1.sock'   # partition 1 as /mnt/web1/nbd
  qemu-system-x86_64 -snapshot -drive file=nbd:unix:/run/web1.sock:exportname=vda,format=raw
  sauve serve nbd latest --writable --overlay /var/tmp/web1.overlay --listen unix:/run/web1.sock &
  qemu-system-x86_64 -m 2G -drive file=nbd:unix:/run/web1.sock:exportname=vda,format=raw,cache=writeback`,
		Args: exactArgs(1, "SNAPSHOT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.serveNBD(cmd.Context(), args[0], &ff, diskName, listen, &ov)
		},
	}
	ff.add(cmd)
	ff.addDates(cmd)
	cmd.Flags().StringVar(&diskName, "disk", "", "the disk that is the default export (the first one if not given)")
	cmd.Flags().StringVar(&listen, "listen", "", "where to listen: unix:PATH (default $XDG_RUNTIME_DIR/sauve/nbd-ID.sock)")
	cmd.Flags().BoolVar(&ov.writable, "writable", false, "let clients write; writes go to a local overlay file, never to the repository")
	cmd.Flags().StringVar(&ov.path, "overlay", "", "the overlay file of --writable, kept after the server stops (temporary if not given)")
	return cmd
}

// serveCache is the cache budget of each disk's reader: clients read at
// random as often as in order, so it holds more than an export's.
const serveCache = 64 << 20

func (g *globals) serveNBD(ctx context.Context, spec string, ff *filterFlags, diskName, listen string, ov *overlayFlags) error {
	if ov.path != "" && !ov.writable {
		return usageError{errors.New("--overlay goes with --writable")}
	}
	socket, err := parseListen(listen)
	if errors.Is(err, errTCPListen) {
		fmt.Fprintf(g.stderr, "sauve: %v\n", err)
		return &ExitError{Code: 2}
	}
	if err != nil {
		return err
	}
	r, sn, disks, err := g.openDisks(ctx, "serve", spec, ff, "")
	if err != nil {
		return err
	}
	def := 0
	if diskName != "" {
		d, err := pickDisk(sn, diskName)
		if err != nil {
			return err
		}
		for i := range disks {
			if disks[i] == d {
				def = i
			}
		}
	}
	// The default export leads: the server takes the first for "".
	disks[0], disks[def] = disks[def], disks[0]
	fail := func(err error) error { return fmt.Errorf("serve snapshot %s over NBD: %w", sn.ID.Short(), err) }
	var exports []nbdserve.Export
	for _, d := range disks {
		dr, err := r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: serveCache, ReadAhead: serveCache / 4, Warn: g.warnf})
		if err != nil {
			return fail(err)
		}
		defer dr.Close()
		var disk diskView = dr
		if ov.writable {
			o, err := ov.open(sn, d, dr, len(disks) > 1)
			if err != nil {
				return fail(err)
			}
			defer g.closeOverlay(o, ov.path == "")
			disk = o
			fmt.Fprintf(g.stderr, "disk %s: writes go to %s\n", d.Name, ov.describe(o))
		}
		exports = append(exports, diskExports(sn, d, disk, ov.writable)...)
	}
	if socket == "" {
		dir := os.Getenv("XDG_RUNTIME_DIR")
		if dir == "" {
			dir = os.TempDir()
		}
		socket = filepath.Join(dir, "sauve", "nbd-"+sn.ID.Short()+".sock")
		if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
			return fail(err)
		}
	}
	ln, err := listenUnix(socket)
	if err != nil {
		return fail(err)
	}
	defer os.Remove(socket)
	for _, e := range exports {
		fmt.Fprintf(g.stderr, "export %-12s nbd+unix:///%s?socket=%s\n", e.Name, url.PathEscape(e.Name), socket)
	}
	mode := "read-only"
	if ov.writable {
		mode = "writable (the repository is never written)"
	}
	fmt.Fprintf(g.stderr, "serving snapshot %s %s (default export: %s); Ctrl-C stops\n", sn.ID.Short(), mode, exports[0].Name)
	if err := nbdserve.Serve(ctx, ln, exports, nbdserve.Options{Logf: g.warnf}); err != nil {
		return fail(err)
	}
	return nil
}

var errTCPListen = errors.New("serving over TCP needs TLS with client certificates, not available yet; use unix:PATH")

// parseListen returns the socket path of --listen ("" for the default).
func parseListen(listen string) (string, error) {
	switch {
	case listen == "":
		return "", nil
	case strings.HasPrefix(listen, "unix:") && len(listen) > len("unix:"):
		return strings.TrimPrefix(listen, "unix:"), nil
	case strings.HasPrefix(listen, "tcp:"):
		return "", errTCPListen
	}
	return "", usageError{fmt.Errorf("--listen %q: want unix:PATH", listen)}
}

// listenUnix listens on socket, replacing a socket file no server
// answers on (left by a server that was killed), and makes it private.
func listenUnix(socket string) (net.Listener, error) {
	if fi, err := os.Lstat(socket); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: the file exists and is not a socket", socket)
		}
		if c, err := net.DialTimeout("unix", socket, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on %s: a server answers there already", socket)
		}
		if err := os.Remove(socket); err != nil {
			return nil, fmt.Errorf("remove the stale socket %s: %w", socket, err)
		}
	}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("make %s private: %w", socket, err)
	}
	return ln, nil
}

// diskView is what an export reads a disk through: the snapshot's disk
// reader, or the overlay over it.
type diskView interface {
	io.ReaderAt
	extent.Map
}

// diskExports returns the export of disk d and those of its partitions;
// writable, disk also takes their writes.
func diskExports(sn *repo.Snapshot, d *repo.Disk, disk diskView, writable bool) []nbdserve.Export {
	var w nbdserve.Writer
	if writable {
		w = disk.(nbdserve.Writer)
	}
	out := []nbdserve.Export{{
		Name:        d.Name,
		Description: fmt.Sprintf("disk %s of snapshot %s", d.Name, sn.ID.Short()),
		Size:        d.Size, ReaderAt: disk, Data: disk.Data, Writer: w,
	}}
	for _, p := range d.Partitions {
		if p.Number <= 0 || p.Extended || p.Size <= 0 || p.Start < 0 || p.Start > d.Size-p.Size {
			continue
		}
		out = append(out, nbdserve.Export{
			Name:        fmt.Sprintf("%s:%d", d.Name, p.Number),
			Description: fmt.Sprintf("partition %d of disk %s of snapshot %s", p.Number, d.Name, sn.ID.Short()),
			Size:        p.Size,
			ReaderAt:    io.NewSectionReader(disk, p.Start, p.Size),
			Data:        shiftedData(disk, p.Start),
			Writer:      shiftedWriter(w, p.Start),
		})
	}
	return out
}

// shiftedWriter is w for the window starting at start; nil for nil.
func shiftedWriter(w nbdserve.Writer, start int64) nbdserve.Writer {
	if w == nil {
		return nil
	}
	return windowWriter{w, start}
}

type windowWriter struct {
	w     nbdserve.Writer
	start int64
}

func (ww windowWriter) WriteAt(p []byte, off int64) (int, error) {
	return ww.w.WriteAt(p, ww.start+off)
}
func (ww windowWriter) Zero(off, n int64) error { return ww.w.Zero(ww.start+off, n) }
func (ww windowWriter) Flush() error            { return ww.w.Flush() }

// shiftedData is the data map of the window of m starting at start.
func shiftedData(m extent.Map, start int64) func(off, n int64) ([]extent.Range, error) {
	return func(off, n int64) ([]extent.Range, error) {
		rs, err := m.Data(start+off, n)
		for i := range rs {
			rs[i].Start -= start
			rs[i].End -= start
		}
		return rs, err
	}
}
