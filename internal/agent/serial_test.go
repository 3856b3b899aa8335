package agent

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// fakePort is a serial port for serveSerial: each open gives the agent a
// fresh pipe, whose other end the test takes from ends.
type fakePort struct {
	ends chan net.Conn
}

func (w *world) serial() *fakePort {
	p := &fakePort{ends: make(chan net.Conn, 1)}
	w.srv.serialRetry = 50 * time.Millisecond
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		w.srv.serveSerial(w.ctx, "serial:/dev/virtio-ports/org.sauve.agent.0", func() (io.ReadWriteCloser, error) {
			a, b := socketPair(w.t)
			select {
			case p.ends <- b:
			case <-w.ctx.Done():
			}
			return a, nil
		})
	}()
	return p
}

func (p *fakePort) next(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-p.ends:
		return c
	case <-time.After(3 * time.Second):
		t.Fatal("the agent did not open the serial port again")
	}
	return nil
}

// socketPair is a connected pair of unix sockets: unlike net.Pipe, it
// holds what is written until it is read, as a serial port does.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// junkFirst is a transport whose first reads return junk, then the
// real stream: what a serial port holds from an earlier session.
type junkFirst struct {
	net.Conn
	junk []byte
}

func (j *junkFirst) Read(p []byte) (int, error) {
	if len(j.junk) > 0 {
		n := copy(p, j.junk)
		j.junk = j.junk[n:]
		return n, nil
	}
	return j.Conn.Read(p)
}

// staleFrames is what an earlier session may leave: half a frame, junk, a
// whole frame of another kind.
func staleFrames() []byte {
	b := appendFrame(nil, kindThawed, make([]byte, 80))
	b = append([]byte("SVA\x01garbage"), b[:20]...) // cut short: its length swallows what follows
	b = append(b, make([]byte, 200)...)
	return appendFrame(b, kindThaw, make([]byte, 70))
}

// On the serial port the agent skips what it finds before a hello, and
// serves one session after another, the port reopened between them.
func TestSerialSessions(t *testing.T) {
	w := newWorld(t, `from="serial"`)
	port := w.serial()
	for i := 0; i < 3; i++ {
		c := port.next(t)
		go c.Write(staleFrames())
		time.Sleep(20 * time.Millisecond)
		s, err := NewSession(context.Background(), c, "unix:/run/vm1-agent.sock", w.callerCfg())
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		if _, err := s.Freeze(context.Background(), time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Thaw(context.Background()); err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	w.log.find(t, "auth", map[string]any{logOutcome: outcomeAccepted, logAddr: "serial:/dev/virtio-ports/org.sauve.agent.0"})
}

// The caller skips what the agent left on the port before its challenge,
// including a challenge that answered an earlier caller's hello.
func TestSerialCallerSkipsStale(t *testing.T) {
	w := newWorld(t, "")
	port := w.serial()
	c := port.next(t)
	// An earlier caller's hello, which the agent answers first.
	old := mustKey(t)
	w.auth.Keys = append(w.auth.Keys, AuthorizedKey{Key: PublicOf(old)})
	nonce := make([]byte, nonceSize)
	hello := helloMsg{Version: 1, Purpose: PurposeFreeze, Key: PublicOf(old).ed25519(), Nonce: nonce, Time: time.Now().UnixNano()}
	if err := writeFrame(c, kindHello, mustJSON(hello)); err != nil {
		t.Fatal(err)
	}
	jc := &junkFirst{Conn: c, junk: staleFrames()}
	s, err := NewSession(context.Background(), jc, "unix:/run/vm1-agent.sock", w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.Close()
}

// The serial port's host side closing while frozen thaws, like a TCP
// connection's.
func TestSerialDropThaws(t *testing.T) {
	w := newWorld(t, "")
	port := w.serial()
	s, err := NewSession(context.Background(), port.next(t), "unix:/run/vm1-agent.sock", w.callerCfg())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	w.fake.waitEvent(t, "freeze", time.Second)
	s.Close()
	w.fake.waitEvent(t, "thaw", time.Second)
	port.next(t).Close() // reopened, ready for the next caller
}
