package agent

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// agentSession is an authenticated connection, on the agent's side.
type agentSession struct {
	s    *Server
	ch   *channel
	key  PublicKey
	auth *AuthorizedKey
	id   [32]byte
	out  sealer
	in   opener
	log  *slog.Logger
}

// request is a checked message from the caller.
type request struct {
	kind kind
	body []byte
}

// freezeState is the freeze a session holds.
type freezeState struct {
	z        Frozen
	holder   *holder
	start    time.Time // the freeze request
	deadline time.Time // start + window: the agent thaws then
	window   time.Duration
	timer    *time.Timer
	// expired is the report of a freeze that the window ended, kept for
	// the thaw request that must learn it.
	expired *ThawReport
}

// serve runs one connection: the handshake, then requests until it ends.
// Whatever ends it, nothing it froze stays frozen.
func (s *Server) serve(ctx context.Context, ch *channel) {
	defer ch.close()
	stop := context.AfterFunc(ctx, ch.close)
	sess, err := s.handshake(ch)
	stop()
	if err != nil {
		s.refuse(ch, err)
		return
	}
	sess.log = s.log.With(logKey, sess.key.Fingerprint(), logAddr, ch.peer.Addr, logSession, hex.EncodeToString(sess.id[:4]))
	sess.run(ctx)
}

// refuse logs a failed handshake and tells the caller why, if it can.
func (s *Server) refuse(ch *channel, err error) {
	if errors.Is(err, errNoHello) {
		return // the serial port's host side is not connected
	}
	var r *refusal
	if !errors.As(err, &r) {
		s.log.Info("handshake failed", logAddr, ch.peer.Addr, logOutcome, outcomeRefused, logReason, err.Error())
		return
	}
	attrs := []any{logAddr, ch.peer.Addr, logOutcome, outcomeRefused, logReason, r.reason, "code", r.code}
	if r.key != "" {
		attrs = append(attrs, logKey, r.key)
	}
	s.log.Warn("auth", attrs...)
	_ = ch.write(kindRefused, mustJSON(refusedMsg{Code: r.code, Message: r.message}), time.Second)
}

// maxWindow is the longest freeze this session's key may ask.
func (a *agentSession) maxWindow() time.Duration {
	if a.auth.Window > 0 {
		return a.auth.Window
	}
	return a.s.cfg.MaxWindow
}

func (a *agentSession) defaultWindow() time.Duration {
	return min(a.s.cfg.DefaultWindow, a.maxWindow())
}

// send signs and sends one message.
func (a *agentSession) send(k kind, v any) error {
	return a.ch.write(k, a.out.seal(k, mustJSON(v)), a.s.cfg.HandshakeTimeout)
}

func (a *agentSession) sendError(code, msg string) error {
	return a.send(kindError, errorMsg{Code: code, Message: msg})
}

// run serves requests until the connection ends, then thaws what is
// still frozen. A goroutine reads (so that a dropped connection is seen
// while frozen); this one acts.
func (a *agentSession) run(ctx context.Context) {
	connCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer a.ch.close()
	reqs := make(chan request)
	var readErr error // written before reqs is closed
	go a.readLoop(connCtx, cancel, reqs, &readErr)

	a.log.Info("auth", logOutcome, outcomeAccepted, "max_window", a.maxWindow().String())
	err := a.send(kindWelcome, welcomeMsg{Agent: a.s.cfg.Version, Host: a.s.cfg.Host,
		DefaultWindow: int64(a.defaultWindow()), MaxWindow: int64(a.maxWindow())})
	if err != nil {
		a.log.Info("session end", logReason, err.Error())
		return
	}
	var f *freezeState
	for {
		var expiry <-chan time.Time
		switch {
		case f == nil || f.expired != nil:
			a.ch.setReadDeadline(time.Now().Add(a.s.cfg.IdleTimeout))
		default:
			// While frozen, the caller has until the window's end to
			// ask the thaw, and the idle time after to learn it ended.
			a.ch.setReadDeadline(f.deadline.Add(a.s.cfg.IdleTimeout))
			expiry = f.timer.C
		}
		select {
		case r, ok := <-reqs:
			if !ok {
				if f != nil && f.expired == nil {
					a.thaw(f, ThawConnection)
				}
				a.log.Info("session end", logReason, readErr.Error())
				return
			}
			if f, err = a.handle(connCtx, f, r); err != nil {
				a.log.Info("session end", logReason, err.Error())
				return
			}
		case <-expiry:
			rep := a.thaw(f, ThawWindow)
			f.expired = &rep
		case <-ctx.Done():
			if f != nil && f.expired == nil {
				a.thaw(f, ThawStopping)
			}
			a.log.Info("session end", logReason, "the agent is stopping")
			return
		}
	}
}

// readLoop reads and checks the caller's messages. On any failure it
// records why, cancels the session's context (a freeze in progress
// stops) and closes reqs.
func (a *agentSession) readLoop(ctx context.Context, cancel func(), reqs chan<- request, errp *error) {
	defer close(reqs)
	for {
		k, p, err := a.ch.read()
		var body []byte
		if err == nil {
			body, err = a.in.open(k, p)
		}
		if err == nil && k != kindFreeze && k != kindThaw {
			err = protoErr("a %s message from the caller", k)
		}
		if err != nil {
			*errp = err
			cancel()
			return
		}
		select {
		case reqs <- request{k, body}:
		case <-ctx.Done():
			*errp = ctx.Err()
			return
		}
	}
}

// handle acts on one request; f is the session's freeze, before and
// after. An error ends the session.
func (a *agentSession) handle(ctx context.Context, f *freezeState, r request) (*freezeState, error) {
	switch r.kind {
	case kindFreeze:
		if f != nil {
			msg := "a freeze of this session is in progress: thaw it first"
			if f.expired != nil {
				msg = "the window of this session's freeze ended: ask the thaw to learn it first"
			}
			a.log.Warn("freeze", logOutcome, outcomeRefused, logReason, msg)
			return f, a.sendError(codeState, msg)
		}
		m, err := decodeFreeze(r.body)
		if err != nil {
			return nil, err
		}
		return a.freeze(ctx, time.Duration(m.Window))
	case kindThaw:
		if _, err := decodeThaw(r.body); err != nil {
			return f, err
		}
		if f == nil {
			a.log.Warn("thaw", logOutcome, outcomeRefused, logReason, "nothing is frozen")
			return nil, a.sendError(codeState, "nothing is frozen")
		}
		rep := f.expired
		if rep == nil {
			r := a.thaw(f, ThawRequest)
			rep = &r
		}
		return nil, a.send(kindThawed, thawedMsg{Report: *rep})
	}
	return f, protoErr("a %s request", r.kind)
}

// minWindow is the shortest window a caller may ask: less leaves no time
// to freeze.
const minWindow = 10 * time.Millisecond

// freeze freezes for the caller and answers. It returns the freeze, or
// nil when it refused or failed (and answered so).
func (a *agentSession) freeze(ctx context.Context, asked time.Duration) (*freezeState, error) {
	window := asked
	if window == 0 {
		window = a.defaultWindow()
	}
	if window > a.maxWindow() || window < minWindow {
		msg := fmt.Sprintf("a window of %s: this key may ask from %s to %s", window, minWindow, a.maxWindow())
		a.log.Warn("freeze", logOutcome, outcomeRefused, logReason, msg)
		return nil, a.sendError(codeWindow, msg)
	}
	start := time.Now()
	h := &holder{key: a.key.Fingerprint(), addr: a.ch.peer.Addr, since: start, until: start.Add(window)}
	if prev, ok := a.s.take(h); !ok {
		msg := fmt.Sprintf("another freeze is in progress: key %s from %s, since %s, for at most %s more",
			prev.key, prev.addr, start.Sub(prev.since).Round(time.Millisecond), max(prev.until.Sub(start), 0).Round(time.Millisecond))
		a.log.Warn("freeze", logOutcome, outcomeRefused, logReason, msg, "window", window.String())
		return nil, a.sendError(codeBusy, msg)
	}
	deadline := start.Add(window)
	// Freezing may take the whole window, longer than the idle time: the
	// reader must not take that silence for a dead caller.
	a.ch.setReadDeadline(deadline.Add(a.s.cfg.IdleTimeout))
	fctx, cancel := context.WithDeadline(ctx, deadline)
	z, err := a.s.cfg.Freezer.Freeze(fctx, window)
	cancel()
	if err != nil {
		a.s.drop(h)
		a.log.Error("freeze", logOutcome, outcomeFailed, logReason, err.Error(), "window", window.String())
		return nil, a.sendError(codeFailed, "freeze failed: "+err.Error())
	}
	f := &freezeState{z: z, holder: h, start: start, deadline: deadline, window: window}
	switch {
	case ctx.Err() != nil:
		// The caller left while it froze.
		a.thaw(f, ThawConnection)
		return nil, errors.New("the caller left during the freeze")
	case !time.Now().Before(deadline):
		rep := a.thaw(f, ThawFailed)
		a.log.Error("freeze", logOutcome, outcomeFailed, logReason, "freezing took the whole window", "window", window.String())
		return nil, a.sendError(codeFailed, fmt.Sprintf("freezing took longer than the window of %s: thawed (%s)", window, rep.Error))
	}
	rep := z.Report()
	rep.Window, rep.Took = window, time.Since(start)
	f.timer = time.NewTimer(time.Until(deadline))
	a.log.Info("freeze", logOutcome, outcomeFrozen, "window", window.String(), "took", rep.Took.String(),
		"mounts", rep.Mounts, "writers", writerNames(rep.Writers))
	if err := a.send(kindFrozen, frozenMsg{Report: rep}); err != nil {
		a.thaw(f, ThawConnection)
		return nil, err
	}
	return f, nil
}

// thaw ends f's freeze and says how it went. Its own context: it must
// run also once the session's has ended.
func (a *agentSession) thaw(f *freezeState, reason string) ThawReport {
	asked := time.Now()
	if f.timer != nil {
		f.timer.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), thawTimeout)
	err := f.z.Thaw(ctx)
	cancel()
	a.s.drop(f.holder)
	rep := ThawReport{Reason: reason, Frozen: time.Since(f.start)}
	rep.Held = reason == ThawRequest && asked.Before(f.deadline) && err == nil
	switch {
	case err != nil:
		rep.Error = err.Error()
	case reason == ThawWindow || reason == ThawRequest && !rep.Held:
		rep.Error = fmt.Sprintf("the window of %s ended before the thaw request, and the agent thawed then", f.window)
	}
	attrs := []any{logOutcome, outcomeThawed, logReason, reason, "held", rep.Held, "frozen", rep.Frozen.Round(time.Millisecond).String()}
	if rep.Error != "" {
		attrs = append(attrs, "error", rep.Error)
	}
	level := slog.LevelInfo
	if !rep.Held {
		level = slog.LevelWarn
	}
	a.log.Log(context.Background(), level, "thaw", attrs...)
	return rep
}

func writerNames(ws []WriterReport) []string {
	out := make([]string, len(ws))
	for i, w := range ws {
		out[i] = w.Name
	}
	return out
}
