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
	var f nbdFlags
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
Ctrl-C (or SIGTERM) stops the server and removes the socket.

Over TCP (--listen tcp:HOST:PORT) the disks leave the machine decrypted, so
TLS is required, with client certificates: --tls-creds DIR holds
ca-cert.pem, server-cert.pem and server-key.pem, the layout qemu-nbd's
tls-creds-x509 uses, and only clients whose certificate ca-cert.pem signed
are served (nbdinfo 'nbds://HOST:PORT/vda?tls-certificates=CLIENTDIR',
qemu with a tls-creds-x509 object of endpoint=client).

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
  qemu-system-x86_64 -m 2G -drive file=nbd:unix:/run/web1.sock:exportname=vda,format=raw,cache=writeback
  sauve serve nbd latest --listen tcp:0.0.0.0:10809 --tls-creds /etc/pki/sauve-nbd
  nbdinfo 'nbds://backup1:10809/vda?tls-certificates=/etc/pki/qemu'`,
		Args: exactArgs(1, "SNAPSHOT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.serveNBD(cmd.Context(), args[0], &f)
		},
	}
	f.ff.add(cmd)
	f.ff.addDates(cmd)
	cmd.Flags().StringVar(&f.diskName, "disk", "", "the disk that is the default export (the first one if not given)")
	cmd.Flags().StringVar(&f.listen, "listen", "", "where to listen: unix:PATH (default $XDG_RUNTIME_DIR/sauve/nbd-ID.sock) or tcp:HOST:PORT (needs --tls-creds)")
	cmd.Flags().StringVar(&f.tlsCreds, "tls-creds", "", "folder of PEM files ca-cert.pem, server-cert.pem, server-key.pem (as qemu-nbd's): require TLS, and client certificates signed by ca-cert.pem")
	cmd.Flags().IntVar(&f.maxConns, "max-connections", 16, "connections served at once; more are refused")
	cmd.Flags().BoolVar(&f.ov.writable, "writable", false, "let clients write; writes go to a local overlay file, never to the repository")
	cmd.Flags().StringVar(&f.ov.path, "overlay", "", "the overlay file of --writable, kept after the server stops (temporary if not given)")
	return cmd
}

// serveCache is the cache budget of each disk's reader: clients read at
// random as often as in order, so it holds more than an export's.
const serveCache = 64 << 20

// nbdFlags are serve nbd's options.
type nbdFlags struct {
	ff       filterFlags
	diskName string
	listen   string
	tlsCreds string
	maxConns int
	ov       overlayFlags
}

func (g *globals) serveNBD(ctx context.Context, spec string, f *nbdFlags) error {
	if f.ov.path != "" && !f.ov.writable {
		return usageError{errors.New("--overlay goes with --writable")}
	}
	l, err := parseListen(f.listen, f.tlsCreds)
	if err != nil {
		return err
	}
	tlsConf, err := loadTLSCreds(f.tlsCreds)
	if err != nil {
		return err
	}
	r, sn, disks, err := g.openDisks(ctx, "serve", spec, &f.ff, "")
	if err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("serve snapshot %s over NBD: %w", sn.ID.Short(), err) }
	exports, closeAll, err := g.nbdExports(ctx, r, sn, disks, f)
	defer closeAll()
	if err != nil {
		return fail(err)
	}
	ln, where, err := l.open(sn)
	if err != nil {
		return fail(err)
	}
	defer l.cleanup()
	for _, e := range exports {
		fmt.Fprintf(g.stderr, "export %-12s %s\n", e.Name, where(e.Name))
	}
	mode := "read-only"
	if f.ov.writable {
		mode = "writable (the repository is never written)"
	}
	fmt.Fprintf(g.stderr, "serving snapshot %s %s (default export: %s); Ctrl-C stops\n", sn.ID.Short(), mode, exports[0].Name)
	o := nbdserve.Options{Logf: g.warnf, TLS: tlsConf, MaxConns: f.maxConns}
	if err := nbdserve.Serve(ctx, ln, exports, o); err != nil {
		return fail(err)
	}
	return nil
}

// nbdExports opens a reader (and, writable, an overlay) for each disk
// and returns their exports, the default disk's first; closeAll closes
// what was opened, whatever the error.
func (g *globals) nbdExports(ctx context.Context, r *repo.Repository, sn *repo.Snapshot, disks []*repo.Disk, f *nbdFlags) (exports []nbdserve.Export, closeAll func(), err error) {
	var closers []func()
	closeAll = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	if f.diskName != "" {
		d, err := pickDisk(sn, f.diskName)
		if err != nil {
			return nil, closeAll, err
		}
		for i := range disks {
			if disks[i] == d {
				// The default export leads: the server takes the
				// first for "".
				disks[0], disks[i] = disks[i], disks[0]
			}
		}
	}
	for _, d := range disks {
		dr, err := r.NewDiskReader(ctx, d, repo.ReaderOptions{CacheSize: serveCache, ReadAhead: serveCache / 4, Warn: g.warnf})
		if err != nil {
			return nil, closeAll, err
		}
		closers = append(closers, func() { dr.Close() })
		var disk diskView = dr
		if f.ov.writable {
			o, err := f.ov.open(sn, d, dr, len(disks) > 1)
			if err != nil {
				return nil, closeAll, err
			}
			closers = append(closers, func() { g.closeOverlay(o, f.ov.path == "") })
			disk = o
			fmt.Fprintf(g.stderr, "disk %s: writes go to %s\n", d.Name, f.ov.describe(o))
		}
		exports = append(exports, diskExports(sn, d, disk, f.ov.writable)...)
	}
	return exports, closeAll, nil
}

// listenSpec is a parsed --listen: a unix socket (path "" for the
// default one) or a TCP address.
type listenSpec struct {
	network, addr string
	tls           bool
	cleanup       func()
}

// parseListen checks --listen against --tls-creds: TCP serves decrypted
// disks to a network, so it needs TLS with client certificates.
func parseListen(listen, tlsCreds string) (*listenSpec, error) {
	l := &listenSpec{network: "unix", tls: tlsCreds != "", cleanup: func() {}}
	switch {
	case listen == "":
	case strings.HasPrefix(listen, "unix:") && len(listen) > len("unix:"):
		l.addr = strings.TrimPrefix(listen, "unix:")
	case strings.HasPrefix(listen, "tcp:") && len(listen) > len("tcp:"):
		if tlsCreds == "" {
			return nil, usageError{errors.New("--listen tcp: serves decrypted disks to the network and needs --tls-creds DIR (TLS with client certificates)")}
		}
		l.network, l.addr = "tcp", strings.TrimPrefix(listen, "tcp:")
		if _, _, err := net.SplitHostPort(l.addr); err != nil {
			return nil, usageError{fmt.Errorf("--listen %q: want tcp:HOST:PORT: %v", listen, err)}
		}
	default:
		return nil, usageError{fmt.Errorf("--listen %q: want unix:PATH or tcp:HOST:PORT", listen)}
	}
	return l, nil
}

// open listens, and returns the function that gives an export's URI.
func (l *listenSpec) open(sn *repo.Snapshot) (net.Listener, func(name string) string, error) {
	if l.network == "tcp" {
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			return nil, nil, fmt.Errorf("listen on %s: %w", l.addr, err)
		}
		addr := ln.Addr().String()
		return ln, func(name string) string { return "nbds://" + addr + "/" + url.PathEscape(name) }, nil
	}
	socket := l.addr
	if socket == "" {
		dir := os.Getenv("XDG_RUNTIME_DIR")
		if dir == "" {
			dir = os.TempDir()
		}
		socket = filepath.Join(dir, "sauve", "nbd-"+sn.ID.Short()+".sock")
		if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
			return nil, nil, err
		}
	}
	ln, err := listenUnix(socket)
	if err != nil {
		return nil, nil, err
	}
	l.cleanup = func() { os.Remove(socket) }
	scheme := "nbd+unix"
	if l.tls {
		scheme = "nbds+unix"
	}
	return ln, func(name string) string {
		return scheme + ":///" + url.PathEscape(name) + "?socket=" + socket
	}, nil
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
