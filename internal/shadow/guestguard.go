package shadow

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The guest's thaw guard covers what the in-process timer of guestThaw
// cannot: a sauve killed (kill -9) while the guest is frozen. qemu-ga
// never thaws on its own, so without it every writer in the guest would
// stay blocked until the next backup. It is sauve's thaw-guard command
// with --guest-agent SOCKET: started before guest-fsfreeze-freeze, it
// waits on a pipe from sauve; "done" (sauve thawed) ends it quietly, and
// the pipe's end without it (sauve died) makes it connect to the agent
// and thaw the guest. QEMU serves one client at a time on the agent's
// socket, so its connection is served once sauve's is gone.

// guestGuardReady is the guest guard's first line.
const guestGuardReady = "sauve-guest-thaw-guard ready"

// guestGuardMain runs the guest's thaw guard on socket.
func guestGuardMain(socket string, stdin io.Reader, stdout io.Writer) int {
	signal.Ignore(syscall.SIGPIPE, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)
	_, _ = unix.Setsid()
	out := guardOut{stdout}
	out.line(guestGuardReady)
	sc := bufio.NewScanner(stdin)
	if sc.Scan() && sc.Text() == "done" {
		return 0
	}
	// sauve is gone: its connection to the agent closes with it.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n, err := thawAgent(ctx, socket)
	if err != nil {
		out.line("error " + guardText(err.Error()))
		return 1
	}
	out.line(fmt.Sprintf("thawed %d", n))
	return 0
}

// thawAgent thaws the guest through its agent at socket, retrying while
// the socket still serves the dead client's connection.
func thawAgent(ctx context.Context, socket string) (int64, error) {
	for {
		c, _, err := openAgent(ctx, socket, agentAnswer)
		if err == nil {
			defer c.close()
			return c.thaw()
		}
		select {
		case <-ctx.Done():
			return 0, err
		case <-time.After(agentPoll):
		}
	}
}

// guestGuard is a running guest thaw guard.
type guestGuard struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan error
}

// startGuestGuard starts argv (sauve's thaw-guard) for socket and waits
// for it to say it is ready; nil argv starts none.
func startGuestGuard(argv []string, socket string) (*guestGuard, error) {
	if len(argv) == 0 {
		return nil, nil
	}
	args := append(append(argv[1:len(argv):len(argv)], "--guest-agent"), socket)
	cmd := exec.Command(argv[0], args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start the guest's thaw guard: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start the guest's thaw guard: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the guest's thaw guard %s: %w", argv[0], err)
	}
	g := &guestGuard{cmd: cmd, stdin: stdin, done: make(chan error, 1)}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(io.LimitReader(stdout, maxGuardLine))
		line := ""
		if sc.Scan() {
			line = sc.Text()
		}
		ready <- line
		_, _ = io.Copy(io.Discard, stdout)
		g.done <- cmd.Wait()
	}()
	select {
	case line := <-ready:
		if line == guestGuardReady {
			return g, nil
		}
		g.kill()
		return nil, fmt.Errorf("the guest's thaw guard %s did not start: it said %.80q", argv[0], line)
	case <-time.After(guardGrace):
		g.kill()
		return nil, errors.New("the guest's thaw guard did not start within " + guardGrace.String())
	}
}

// release tells the guard that sauve thawed the guest, and waits for it.
func (g *guestGuard) release() {
	if g == nil {
		return
	}
	_, _ = io.WriteString(g.stdin, "done\n")
	g.stdin.Close()
	select {
	case <-g.done:
	case <-time.After(guardGrace):
		g.kill()
	}
}

func (g *guestGuard) kill() {
	_ = g.cmd.Process.Kill()
	g.stdin.Close()
}
