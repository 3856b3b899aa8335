package shadow

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/sauve-backup/sauve/internal/extent"
)

// nbdExport is what a view reads: the NBD client of one export.
type nbdExport interface {
	io.ReaderAt
	Size() int64
	// Map returns the ranges of the export for which data(flags) holds,
	// flags being those of metaContext's block status.
	Map(ctx context.Context, metaContext string, data func(flags uint32) bool) extent.Map
	Close() error
}

// nbdServer is where the copies are exported.
type nbdServer struct {
	network, address string
	ours             bool   // sauve started it
	dir              string // the private folder of its socket, "" once removed
}

// startNBD starts the NBD server of the copies: on a socket in a private
// folder, that sauve makes and passes to QEMU as a file descriptor (so
// that a QEMU running as another user can serve on it), or the server
// the VM already runs (QEMUOptions.NBDServer).
func (q *QEMUBackup) startNBD(ctx context.Context) error {
	if a := q.opts.NBDServer; a != "" {
		s := &nbdServer{network: "tcp", address: a}
		if p, ok := strings.CutPrefix(a, "unix:"); ok {
			s.network, s.address = "unix", p
		} else if strings.HasPrefix(a, "/") {
			s.network = "unix"
		}
		q.nbd = s
		return nil
	}
	dir, err := os.MkdirTemp("", "sauve-nbd-")
	if err != nil {
		return fmt.Errorf("NBD server of the copies: %w", err)
	}
	s := &nbdServer{network: "unix", address: filepath.Join(dir, "nbd.sock"), ours: true, dir: dir}
	if err := q.serveOn(ctx, s.address); err != nil {
		os.RemoveAll(dir)
		return err
	}
	q.nbd = s
	return nil
}

// serveOn makes QEMU's NBD server listen on the unix socket path.
func (q *QEMUBackup) serveOn(ctx context.Context, path string) error {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("NBD server of the copies: %w", err)
	}
	l.SetUnlinkOnClose(false)
	file, err := l.File()
	l.Close()
	if err != nil {
		return fmt.Errorf("NBD server of the copies: %w", err)
	}
	defer file.Close()
	fdname := fmt.Sprintf("sauve-P%d-%s", q.pid, kindListener)
	if err := q.c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdname}, nil, file); err != nil {
		return fmt.Errorf("VM %s: pass the NBD socket: %w", q.label, err)
	}
	err = q.c.Execute(ctx, "nbd-server-start", map[string]any{"addr": map[string]any{"type": "fd", "data": map[string]any{"str": fdname}}}, nil)
	if err == nil {
		return nil
	}
	q.c.Execute(ctx, "closefd", map[string]any{"fdname": fdname}, nil)
	if isQMPError(err, "already running") {
		return fmt.Errorf("VM %s already runs an NBD server: give its address (--nbd-server) for sauve to export its copies there, or stop it (QMP nbd-server-stop) if nothing uses it", q.label)
	}
	return fmt.Errorf("VM %s: start the NBD server of the copies: %w", q.label, err)
}

// unlink removes the server's socket once every client is connected:
// nothing else may connect, and nothing is left if sauve dies.
func (s *nbdServer) unlink() {
	if s.dir != "" {
		os.RemoveAll(s.dir)
		s.dir = ""
	}
}

func (s *nbdServer) stop(ctx context.Context, q *QEMUBackup) error {
	s.unlink()
	if !s.ours {
		return nil
	}
	r := &remover{q: q}
	r.stopServer(ctx)
	if r.err == nil {
		s.ours = false
	}
	return r.err
}
