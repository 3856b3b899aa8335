package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrNotQuiesced says a freeze did not hold until the thaw request (its
// window ended, or something thawed early): a copy taken meanwhile is
// crash-consistent only.
var ErrNotQuiesced = errors.New("the freeze did not hold until the thaw: the copy is not quiesced")

// Session is an authenticated connection to an agent, on the caller's
// side. Its methods run one at a time.
type Session struct {
	ch       *channel
	addr     string
	cfg      ClientConfig
	agentKey PublicKey
	info     AgentInfo
	out      sealer
	in       opener

	mu     sync.Mutex
	broken error // the session cannot go on (its connection is closed)
}

// Info is what the agent said of itself.
func (s *Session) Info() AgentInfo { return s.info }

// Addr is the agent's address, as errors name it.
func (s *Session) Addr() string { return s.addr }

// Close ends the session; the agent thaws what it still holds frozen for
// it.
func (s *Session) Close() error {
	s.ch.close()
	return nil
}

// receive reads and checks the agent's next message. Before the welcome,
// a refusal (unsigned: there is no session yet) is an answer too.
func (s *Session) receive(deadline time.Time) (kind, []byte, error) {
	s.ch.setReadDeadline(deadline)
	k, p, err := s.ch.read()
	if err != nil {
		return 0, nil, fmt.Errorf("agent %s: %w", s.addr, err)
	}
	if k == kindRefused && s.in.seq == 0 {
		r, err := decodeRefused(p)
		if err != nil {
			return 0, nil, fmt.Errorf("agent %s: %w", s.addr, err)
		}
		return 0, nil, &RefusedError{Addr: s.addr, Code: r.Code, Message: r.Message}
	}
	body, err := s.in.open(k, p)
	if err != nil {
		return 0, nil, fmt.Errorf("agent %s: %w", s.addr, err)
	}
	return k, body, nil
}

// request sends one request and waits for its answer until wait has
// passed; ctx abandons it (and the session: the agent then thaws).
func (s *Session) request(ctx context.Context, k kind, v any, wait time.Duration) (kind, []byte, error) {
	if s.broken != nil {
		return 0, nil, s.broken
	}
	stop := context.AfterFunc(ctx, s.ch.abort)
	defer stop()
	err := s.ch.write(k, s.out.seal(k, mustJSON(v)), s.cfg.timeout())
	var ak kind
	var body []byte
	if err == nil {
		ak, body, err = s.receive(time.Now().Add(wait))
	} else {
		err = fmt.Errorf("agent %s: %w", s.addr, err)
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("agent %s: %s: %w", s.addr, k, ctx.Err())
	}
	if err != nil {
		s.broken = fmt.Errorf("agent %s: the session ended: %w", s.addr, err)
		s.ch.close()
		return 0, nil, err
	}
	return ak, body, nil
}

// answerError reads an error answer.
func (s *Session) answerError(body []byte) error {
	m, err := decodeError(body)
	if err != nil {
		return s.fail(err)
	}
	return &RefusedError{Addr: s.addr, Code: m.Code, Message: m.Message}
}

// fail breaks the session for an answer that makes no sense.
func (s *Session) fail(err error) error {
	err = fmt.Errorf("agent %s: %w", s.addr, err)
	s.broken = fmt.Errorf("agent %s: the session ended: %w", s.addr, err)
	s.ch.close()
	return err
}

// Freeze asks the agent to freeze for at most window (0: the agent's
// default) and returns once everything is frozen, with what was. The
// agent thaws when Thaw asks, when the window ends, and when the session
// ends, whichever comes first; a copy taken before Thaw's answer says
// Held is application-consistent. A refusal (another freeze in progress,
// a window too long) is a *RefusedError and leaves the session usable.
func (s *Session) Freeze(ctx context.Context, window time.Duration) (FreezeReport, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if window < 0 {
		return FreezeReport{}, fmt.Errorf("agent %s: a freeze window of %s", s.addr, window)
	}
	wait := window
	if wait == 0 {
		wait = s.info.DefaultWindow
	}
	// The agent answers within the window (it fails a freeze that takes
	// longer), so the wait is bounded by it.
	k, body, err := s.request(ctx, kindFreeze, freezeMsg{Window: int64(window)}, wait+s.cfg.timeout())
	if err != nil {
		return FreezeReport{}, err
	}
	switch k {
	case kindFrozen:
		m, err := decodeFrozen(body)
		if err != nil {
			return FreezeReport{}, s.fail(err)
		}
		return m.Report, nil
	case kindError:
		return FreezeReport{}, s.answerError(body)
	}
	return FreezeReport{}, s.fail(protoErr("a %s answer to a freeze", k))
}

// Thaw asks the agent to thaw and says whether the freeze held until the
// request. When it did not (the window ended first, something thawed
// early), the report says why and the error wraps ErrNotQuiesced: treat
// the copy as crash-consistent.
func (s *Session) Thaw(ctx context.Context) (ThawReport, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, body, err := s.request(ctx, kindThaw, thawMsg{}, s.cfg.timeout()+thawTimeout)
	if err != nil {
		return ThawReport{}, err
	}
	switch k {
	case kindThawed:
		m, err := decodeThawed(body)
		if err != nil {
			return ThawReport{}, s.fail(err)
		}
		if !m.Report.Held {
			why := m.Report.Error
			if why == "" {
				why = "thawed for " + m.Report.Reason
			}
			return m.Report, fmt.Errorf("agent %s: %w (%s)", s.addr, ErrNotQuiesced, why)
		}
		return m.Report, nil
	case kindError:
		return ThawReport{}, s.answerError(body)
	}
	return ThawReport{}, s.fail(protoErr("a %s answer to a thaw", k))
}
