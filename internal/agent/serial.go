package agent

import (
	"context"
	"io"
	"os"
	"time"
)

// serialRetry is how long the agent waits before opening the serial port
// again after a session that ended at once (a port whose host side is
// not connected reads its end right away) or an open that failed.
const serialRetry = time.Second

// ServeSerial serves the virtio-serial port at path, the guest's end of
// a QEMU chardev (/dev/virtio-ports/org.sauve.agent.0), until ctx ends.
// The port is one stream that outlives callers: each session runs on it
// in turn, and it is opened again after each, so that nothing a session
// left half-read confuses the next (which also skips what it finds
// before its hello).
func (s *Server) ServeSerial(ctx context.Context, path string) error {
	return s.serveSerial(ctx, "serial:"+path, func() (io.ReadWriteCloser, error) {
		return os.OpenFile(path, os.O_RDWR, 0)
	})
}

func (s *Server) serveSerial(ctx context.Context, name string, open func() (io.ReadWriteCloser, error)) error {
	peer := Peer{Addr: name, Serial: true}
	var lastErr string
	for ctx.Err() == nil {
		began := time.Now()
		rwc, err := open()
		if err != nil {
			if err.Error() != lastErr {
				s.log.Error("serial port", logAddr, name, logReason, err.Error())
				lastErr = err.Error()
			}
		} else {
			lastErr = ""
			ch := newChannel(rwc, peer)
			ch.resync = true
			s.serve(ctx, ch)
		}
		if wait := s.serialRetry - time.Since(began); wait > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
	}
	return nil
}
