package shadow

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// The QEMU guest agent (qemu-ga) runs in the guest and answers JSON
// commands, one per line, on a virtio-serial port that QEMU exposes on the
// host as a chardev socket. The port is a pipe that outlives connections:
// what an earlier client left unread, or half sent, is still in it, so a
// conversation begins with guest-sync-delimited, whose answer is preceded
// by a 0xFF byte that no JSON text contains.
//
// qemu-ga thaws the guest's filesystems only when told to: not when the
// client that froze them goes away, nor after a delay (whatever its
// version does on its own, sauve does not count on it). A sauve killed
// (kill -9) while the guest is frozen would leave every writer in the
// guest blocked until someone sends guest-fsfreeze-thaw: the guest's thaw
// guard (guestguard.go) sends it then, and guestFreeze's handling of a
// guest it finds frozen repairs what even that missed (see freezeGuest).

const (
	// agentAnswer is how long each command waits for its answer.
	agentAnswer = 5 * time.Second
	// agentPoll is how often a guest found frozen by someone else is
	// looked at again.
	agentPoll = 500 * time.Millisecond
	// agentMaxLine bounds one answer of the agent.
	agentMaxLine = 1 << 20
	// agentMaxSkip bounds what is skipped before the sync marker: an
	// earlier client's unread answers.
	agentMaxSkip = 4 << 20
	// agentMarker precedes guest-sync-delimited's answer.
	agentMarker = 0xFF
)

// agentTimes are the delays of a conversation with the agent (tests
// shorten them).
type agentTimes struct {
	answer time.Duration // for each command
	poll   time.Duration // between looks at a guest frozen by someone else
	// guard is the command of the guest's thaw guard (sauve's
	// thaw-guard); nil runs none.
	guard []string
}

// guestFreeze connects to the guest agent at socket, freezes the guest's
// filesystems and returns thaw, which thaws them and says how long they
// were frozen. Should thaw not be called within timeout
// (DefaultFreezeTimeout when 0), the guest is thawed then and thaw says
// that the freeze window was exceeded.
func guestFreeze(ctx context.Context, socket string, timeout time.Duration) (thaw func() (time.Duration, error), err error) {
	guard, err := guardCommand(nil)
	if err != nil {
		return nil, err
	}
	return freezeGuest(ctx, socket, timeout, agentTimes{answer: agentAnswer, poll: agentPoll, guard: guard})
}

// errGuestWasFrozen marks the error of a guest found frozen, and left
// frozen for longer than the freeze timeout, which sauve then thawed.
var errGuestWasFrozen = errors.New("the guest's filesystems were left frozen")

// freezeGuest is guestFreeze with its delays as parameters.
//
// A guest found frozen is waited for, up to the freeze timeout, with the
// agent's socket closed between looks so that whoever froze it can
// connect and thaw it: someone else's freeze (another backup tool that
// connects for each command) lasts no longer than such a window, and is
// not disturbed. A guest still frozen after that has been abandoned -
// most likely by a sauve that was killed: qemu-ga thaws only on command
// and nobody is left to give it - and every writer in it is blocked, so
// sauve thaws it rather than leave the guest hung until someone notices.
// It then fails with errGuestWasFrozen instead of going on with a freeze
// of its own, so that the thaw of a freeze sauve did not make is heard of:
// with --guest-freeze auto the copy is taken without a freeze and the
// error is the warning; the next backup freezes as usual.
func freezeGuest(ctx context.Context, socket string, window time.Duration, times agentTimes) (func() (time.Duration, error), error) {
	if window <= 0 {
		window = DefaultFreezeTimeout
	}
	var frozenSince time.Time
	for {
		c, status, err := openAgent(ctx, socket, times.answer)
		if err != nil {
			if !frozenSince.IsZero() && ctx.Err() != nil {
				return nil, frozenByOthers(ctx, socket, frozenSince)
			}
			return nil, err
		}
		switch {
		case status == "thawed":
			return c.freeze(ctx, window, times.guard)
		case status != "frozen":
			c.close()
			return nil, fmt.Errorf("the guest agent at %s says the guest's filesystems are %q, neither thawed nor frozen", socket, status)
		case frozenSince.IsZero():
			frozenSince = time.Now()
		case time.Since(frozenSince) >= window:
			defer c.close()
			return nil, c.thawAbandoned(time.Since(frozenSince))
		}
		c.close()
		select {
		case <-ctx.Done():
			return nil, frozenByOthers(ctx, socket, frozenSince)
		case <-time.After(times.poll):
		}
	}
}

func frozenByOthers(ctx context.Context, socket string, since time.Time) error {
	return fmt.Errorf("the guest agent at %s: the guest's filesystems are frozen by someone else; waited %s for them to be thawed: %w",
		socket, time.Since(since).Round(time.Millisecond), context.Cause(ctx))
}

// agentConn is a conversation with a guest agent.
type agentConn struct {
	socket string
	conn   net.Conn
	r      agentReader
	answer time.Duration
	id     int64 // of the last command
}

// openAgent connects to the agent at socket, synchronises and asks
// whether the guest's filesystems are frozen.
func openAgent(ctx context.Context, socket string, answer time.Duration) (*agentConn, string, error) {
	d := net.Dialer{Timeout: answer}
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, "", fmt.Errorf("connect to the guest agent at %s: %w", socket, err)
	}
	// A random first id: an answer left in the port by an earlier client
	// (an earlier sauve) is not taken for ours.
	c := &agentConn{socket: socket, conn: conn, r: agentReader{r: bufio.NewReaderSize(conn, 64<<10)},
		answer: answer, id: int64(rand.Uint32())}
	var status string
	err = c.sync(ctx)
	if err == nil {
		err = c.call(ctx, "guest-ping", nil, answer, nil)
	}
	if err == nil {
		err = c.call(ctx, "guest-fsfreeze-status", nil, answer, &status)
	}
	if err != nil {
		c.close()
		return nil, "", err
	}
	return c, status, nil
}

func (c *agentConn) close() { c.conn.Close() }

// sync sends guest-sync-delimited after a 0xFF, which makes the agent
// drop whatever an earlier client left half sent, and skips what precedes
// its answer.
func (c *agentConn) sync(ctx context.Context) error {
	c.id++
	id := c.id
	req := fmt.Sprintf("\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":%d}}\n", id)
	return c.exchange(ctx, "guest-sync-delimited", []byte(req), c.answer, func() error { return c.r.readSync(id) })
}

// call runs command and decodes its "return" into result (unless nil).
// It waits wait for the answer, less if ctx ends sooner.
func (c *agentConn) call(ctx context.Context, command string, args any, wait time.Duration, result any) error {
	c.id++
	id := c.id
	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("the guest agent at %s: encode %s: %w", c.socket, command, err)
	}
	var rep agentReply
	if err := c.exchange(ctx, command, append(b, '\n'), wait, func() (err error) {
		rep, err = c.r.readReply(id)
		return err
	}); err != nil {
		return err
	}
	if rep.err != nil {
		return &agentRefusal{socket: c.socket, command: command, agentError: *rep.err}
	}
	if result != nil {
		if err := json.Unmarshal(rep.ret, result); err != nil {
			return fmt.Errorf("the guest agent at %s answered %s with %q: %w", c.socket, command, abbreviateAgent(rep.ret), err)
		}
	}
	return nil
}

// agentRefusal is the agent's error answer to a command.
type agentRefusal struct {
	socket, command string
	agentError
}

func (e *agentRefusal) Error() string {
	return fmt.Sprintf("the guest agent at %s refused %s: %s (%s)", e.socket, e.command, e.Desc, e.Class)
}

// exchange writes req and runs read under one deadline: wait from now,
// or ctx's end if sooner.
func (c *agentConn) exchange(ctx context.Context, command string, req []byte, wait time.Duration, read func() error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("the guest agent at %s: %s: %w", c.socket, command, context.Cause(ctx))
	}
	start := time.Now()
	if err := c.conn.SetDeadline(start.Add(wait)); err != nil {
		return fmt.Errorf("the guest agent at %s: %w", c.socket, err)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		c.conn.SetDeadline(time.Unix(1, 0))
	})
	_, err := c.conn.Write(req)
	if err == nil {
		err = read()
	}
	if !stop() {
		// The deadline moved to the past must not outlive this command.
		<-fired
	}
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("the guest agent at %s: %s: %w", c.socket, command, context.Cause(ctx))
	case errors.Is(err, os.ErrDeadlineExceeded):
		return c.noAnswer(command, wait)
	case errors.Is(err, errAgentGarbage), errors.Is(err, errAgentTooLong):
		return fmt.Errorf("the guest agent at %s answered %s with %w", c.socket, command, err)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("the guest agent at %s closed the connection during %s", c.socket, command)
	}
	return fmt.Errorf("the guest agent at %s: %s: %w", c.socket, command, err)
}

func (c *agentConn) noAnswer(command string, wait time.Duration) error {
	if command == "guest-fsfreeze-freeze" {
		return fmt.Errorf("the guest agent at %s did not freeze the guest's filesystems within %s", c.socket, wait)
	}
	if skipped := c.r.skipped; skipped > 0 {
		return fmt.Errorf("the guest agent at %s did not answer %s within %s (is it a guest agent? it sent %d bytes that are no answer, ending %q)",
			c.socket, command, wait, skipped, abbreviateAgent(c.r.tail))
	}
	return fmt.Errorf("the guest agent at %s did not answer within %s (is qemu-ga running in the guest?)", c.socket, wait)
}

// freeze freezes the guest's filesystems and arms the timer that thaws
// them after window. c is closed by thaw, or on error.
func (c *agentConn) freeze(ctx context.Context, window time.Duration, guard []string) (func() (time.Duration, error), error) {
	gg, err := startGuestGuard(guard, c.socket)
	if err != nil {
		c.close()
		return nil, err
	}
	start := time.Now()
	var n int64
	if err := c.call(ctx, "guest-fsfreeze-freeze", nil, window, &n); err != nil {
		// Unless the agent does not have the command, some filesystems
		// may be frozen (the agent may even be still freezing): thaw
		// whatever is; the agent answers thaw after freeze.
		var r *agentRefusal
		if !errors.As(err, &r) || r.Class != "CommandNotFound" {
			if _, terr := c.thaw(); terr != nil {
				err = fmt.Errorf("%w; then, thawing: %v", err, terr)
			}
		}
		c.close()
		gg.release()
		return nil, err
	}
	g := &guestThaw{c: c, start: start, window: window, guard: gg}
	g.timer = time.AfterFunc(window-time.Since(start), g.expire)
	return g.thaw, nil
}

// thaw thaws the guest's filesystems, whatever became of the context of
// the freeze: a backup interrupted must not leave its guest frozen.
func (c *agentConn) thaw() (int64, error) {
	var n int64
	err := c.call(context.Background(), "guest-fsfreeze-thaw", nil, c.answer, &n)
	return n, err
}

// thawAbandoned thaws a guest found frozen for so long.
func (c *agentConn) thawAbandoned(d time.Duration) error {
	n, err := c.thaw()
	if err != nil {
		return fmt.Errorf("the guest agent at %s: %w, for %s at least, and thawing them failed: %v",
			c.socket, errGuestWasFrozen, d.Round(time.Second), err)
	}
	return fmt.Errorf("the guest agent at %s: %w (for %s at least, most likely by a backup that was interrupted: qemu-ga thaws only when told to); sauve thawed them (%s): back up again to freeze them around the copy",
		c.socket, errGuestWasFrozen, d.Round(time.Second), filesystems(n))
}

func filesystems(n int64) string {
	if n == 1 {
		return "1 filesystem"
	}
	return strconv.FormatInt(n, 10) + " filesystems"
}

// guestThaw is a freeze under way: thaw ends it, or the timer when the
// window ends first.
type guestThaw struct {
	c      *agentConn
	start  time.Time
	window time.Duration
	timer  *time.Timer
	guard  *guestGuard

	mu      sync.Mutex
	done    bool
	expired bool // the timer thawed
	d       time.Duration
	err     error
}

func (g *guestThaw) thaw() (time.Duration, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.timer.Stop()
	g.finish()
	if g.expired {
		err := fmt.Errorf("the guest agent at %s: the freeze lasted longer than the freeze timeout (%s): sauve thawed the guest's filesystems after %s",
			g.c.socket, g.window, g.d.Round(time.Millisecond))
		if g.err != nil {
			err = fmt.Errorf("%w, or tried to: %v", err, g.err)
		}
		return g.d, err
	}
	return g.d, g.err
}

func (g *guestThaw) expire() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.done {
		g.expired = true
		g.finish()
	}
}

// finish thaws, once.
func (g *guestThaw) finish() {
	if g.done {
		return
	}
	g.done = true
	_, g.err = g.c.thaw()
	g.d = time.Since(g.start)
	g.c.close()
	g.guard.release()
}

// agentReader reads the agent's answers. A line cut by a deadline is
// kept, so that the next read goes on with it rather than with half an
// answer.
type agentReader struct {
	r       *bufio.Reader
	partial []byte
	skipped int    // bytes skipped before the sync marker
	tail    []byte // the last of them, for an error message
}

var (
	errAgentGarbage = errors.New("something that is no answer")
	errAgentTooLong = fmt.Errorf("an answer longer than %d MiB", agentMaxLine>>20)
)

// agentError is an error answer of the agent.
type agentError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// agentReply is one answer of the agent.
type agentReply struct {
	ret   json.RawMessage // "return"
	err   *agentError     // "error"
	id    json.RawMessage // nil when the agent sent none
	hasID bool
}

// readLine reads one line of at most agentMaxLine bytes, without its
// newline.
func (a *agentReader) readLine() ([]byte, error) {
	for {
		frag, err := a.r.ReadSlice('\n')
		if len(a.partial)+len(frag) > agentMaxLine+1 {
			a.partial = nil
			return nil, errAgentTooLong
		}
		a.partial = append(a.partial, frag...)
		switch {
		case err == nil:
			line := a.partial
			a.partial = nil
			return bytes.TrimRight(line, "\r\n"), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(a.partial) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// skipToMarker discards what comes before the next sync marker.
func (a *agentReader) skipToMarker() error {
	for {
		frag, err := a.r.ReadSlice(agentMarker)
		n := len(frag)
		if err == nil {
			n-- // the marker
		}
		a.skipped += n
		if n > 0 {
			a.tail = append(a.tail, frag[:n]...)
			if len(a.tail) > 120 {
				a.tail = append(a.tail[:0], a.tail[len(a.tail)-60:]...)
			}
		}
		if a.skipped > agentMaxSkip {
			return fmt.Errorf("%w: more than %d MiB without the sync marker", errAgentGarbage, agentMaxSkip>>20)
		}
		switch {
		case err == nil:
			return nil
		case !errors.Is(err, bufio.ErrBufferFull):
			return err
		}
	}
}

// readSync skips to the answer {"return": id} that follows a sync
// marker. Before it, anything goes: answers to an earlier client,
// an earlier sync's answer, what the agent said of the 0xFF.
func (a *agentReader) readSync(id int64) error {
	a.partial = nil
	want := strconv.FormatInt(id, 10)
	for {
		if err := a.skipToMarker(); err != nil {
			return err
		}
		line, err := a.readLine()
		if errors.Is(err, errAgentTooLong) {
			a.skipped += agentMaxLine
			continue
		}
		if err != nil {
			return err
		}
		if rep, err := parseAgentReply(line); err == nil && rep.err == nil && string(bytes.TrimSpace(rep.ret)) == want {
			// What came before was not for this client.
			a.skipped, a.tail = 0, nil
			return nil
		}
		a.skipped += len(line)
		a.tail = append(a.tail[:0], line[max(0, len(line)-60):]...)
	}
}

// readReply reads the answer to the command of the given id. After a
// sync, the only answers that are not the one awaited are late answers to
// earlier commands (one that timed out), which carry their ids; an
// answer without an id is that of an agent that does not echo them.
func (a *agentReader) readReply(id int64) (agentReply, error) {
	want := strconv.FormatInt(id, 10)
	for {
		line, err := a.readLine()
		if err != nil {
			return agentReply{}, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		rep, err := parseAgentReply(line)
		if err != nil {
			return agentReply{}, err
		}
		if !rep.hasID || string(bytes.TrimSpace(rep.id)) == want {
			return rep, nil
		}
	}
}

// parseAgentReply parses one line from the agent: {"return": ...} or
// {"error": {"class": ..., "desc": ...}}, with an "id" if the command
// had one.
func parseAgentReply(line []byte) (agentReply, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil || m == nil {
		return agentReply{}, fmt.Errorf("%w: %q", errAgentGarbage, abbreviateAgent(line))
	}
	var rep agentReply
	if id, ok := m["id"]; ok {
		rep.id, rep.hasID = id, true
	}
	if e, ok := m["error"]; ok {
		if err := json.Unmarshal(e, &rep.err); err != nil || rep.err == nil {
			return agentReply{}, fmt.Errorf("%w: %q", errAgentGarbage, abbreviateAgent(line))
		}
		return rep, nil
	}
	ret, ok := m["return"]
	if !ok {
		return agentReply{}, fmt.Errorf("%w (neither return nor error): %q", errAgentGarbage, abbreviateAgent(line))
	}
	rep.ret = ret
	return rep, nil
}

// abbreviateAgent returns the start of what the agent sent, for an error
// message.
func abbreviateAgent(b []byte) string {
	b = bytes.TrimSpace(b)
	if len(b) > 60 {
		return string(b[:60]) + "..."
	}
	return string(b)
}
