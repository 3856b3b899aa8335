package agent

import (
	"crypto/rand"
	"errors"
	"fmt"
	"time"
)

// RefusedError is an agent's refusal of a handshake or a request.
type RefusedError struct {
	Addr    string
	Code    string // codeUnauthorized, codeBusy... (docs/AGENT.md)
	Message string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("agent %s refused: %s", e.Addr, e.Message)
}

// pinCheck decides whether the agent's key is the expected one: it
// returns nil to go on.
type pinCheck func(PublicKey) error

// callerHandshake authenticates to the agent on ch and checks it (protocol
// in docs/AGENT.md). addr names the agent in errors.
func callerHandshake(ch *channel, addr string, cfg *ClientConfig, check pinCheck) (*Session, error) {
	now := cfg.now()
	tr := &transcript{purpose: PurposeFreeze, exporter: ch.exporter, callerKey: PublicOf(cfg.Key),
		callerNon: make([]byte, nonceSize), callerTime: unixNano(now)}
	if _, err := rand.Read(tr.callerNon); err != nil {
		return nil, fmt.Errorf("make a nonce: %w", err)
	}
	hello := helloMsg{Version: ProtocolVersion, Purpose: tr.purpose, Key: tr.callerKey[:], Nonce: tr.callerNon, Time: tr.callerTime}
	ch.setReadDeadline(time.Now().Add(cfg.timeout()))
	if err := ch.write(kindHello, mustJSON(hello), cfg.timeout()); err != nil {
		return nil, fmt.Errorf("agent %s: %w", addr, err)
	}
	c, err := readChallenge(ch, addr, tr, check)
	if err != nil {
		return nil, err
	}
	if skew := fromUnixNano(c.Time).Sub(cfg.now()); skew > cfg.maxSkew() || skew < -cfg.maxSkew() {
		return nil, fmt.Errorf("agent %s: its clock is %s from ours (at most %s allowed): a stale or replayed answer, or a clock to set right", addr, skewText(skew), cfg.maxSkew())
	}
	auth := authMsg{Sig: tr.sign(roleCaller, cfg.Key)}
	if err := ch.write(kindAuth, mustJSON(auth), cfg.timeout()); err != nil {
		return nil, fmt.Errorf("agent %s: %w", addr, err)
	}
	id := tr.sessionID()
	s := &Session{ch: ch, addr: addr, cfg: *cfg, agentKey: tr.agentKey,
		out: sealer{priv: cfg.Key, id: id, dir: dirToAgent},
		in:  opener{key: tr.agentKey, id: id, dir: dirToCaller}}
	k, body, err := s.receive(time.Now().Add(cfg.timeout()))
	if err != nil {
		return nil, err
	}
	if k != kindWelcome {
		return nil, fmt.Errorf("agent %s: %w", addr, protoErr("a %s instead of the welcome", k))
	}
	w, err := decodeWelcome(body)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", addr, err)
	}
	s.info = AgentInfo{Key: tr.agentKey, Agent: w.Agent, Host: w.Host,
		DefaultWindow: time.Duration(w.DefaultWindow), MaxWindow: time.Duration(w.MaxWindow)}
	return s, nil
}

// readChallenge waits for the agent's challenge and checks its key and
// signature, filling in tr. On the unix socket of a serial port it skips
// what an earlier session left: frames of other kinds, and challenges
// that are not for this hello (their signature does not verify).
func readChallenge(ch *channel, addr string, tr *transcript, check pinCheck) (challengeMsg, error) {
	var stale error
	for i := 0; ; i++ {
		var k kind
		var p []byte
		var err error
		if ch.resync {
			k, p, _, err = syncFrame(ch.br, maxSessionPayload)
			err = readErrIf(err)
		} else {
			k, p, err = ch.read()
		}
		if err != nil {
			if stale != nil {
				err = fmt.Errorf("%w (after skipping an answer that was not for us: %v)", err, stale)
			}
			return challengeMsg{}, fmt.Errorf("agent %s: waiting for its challenge: %w", addr, err)
		}
		c, err := checkChallenge(k, p, addr, tr, check)
		if err == nil || !ch.resync || i == maxStaleFrames {
			return c, err
		}
		var re *RefusedError
		if errors.As(err, &re) || errors.Is(err, errPinned) {
			return c, err
		}
		stale = err
	}
}

func readErrIf(err error) error {
	if err != nil {
		return readErr(err)
	}
	return nil
}

// errPinned marks an agent whose key is not the expected one.
var errPinned = errors.New("not the pinned key")

// pinError is an agent whose key is not the expected one; it says which
// keys and is errPinned.
type pinError struct{ msg string }

func (e *pinError) Error() string        { return e.msg }
func (e *pinError) Is(target error) bool { return target == errPinned }

// checkChallenge reads one frame as the challenge.
func checkChallenge(k kind, p []byte, addr string, tr *transcript, check pinCheck) (challengeMsg, error) {
	switch k {
	case kindRefused:
		r, err := decodeRefused(p)
		if err != nil {
			return challengeMsg{}, fmt.Errorf("agent %s: %w", addr, err)
		}
		return challengeMsg{}, &RefusedError{Addr: addr, Code: r.Code, Message: r.Message}
	case kindChallenge:
	default:
		return challengeMsg{}, fmt.Errorf("agent %s: %w", addr, protoErr("a %s instead of a challenge", k))
	}
	c, err := decodeChallenge(p)
	if err != nil {
		return c, fmt.Errorf("agent %s: %w", addr, err)
	}
	key := PublicKey(c.Key)
	if err := check(key); err != nil {
		return c, err
	}
	tr.agentKey, tr.agentNon, tr.agentTime = key, c.Nonce, c.Time
	if !tr.verify(roleAgent, key, c.Sig) {
		return c, fmt.Errorf("agent %s: bad signature on its challenge: a replayed, relayed or tampered answer", addr)
	}
	return c, nil
}
