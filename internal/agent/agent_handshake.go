package agent

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"time"
)

// refusal is a handshake the agent refused: what the caller is told
// (code, message) and what the log says (reason, which may say more:
// whether a key is unknown or not allowed from an address is for the
// administrator, not for whoever tries keys).
type refusal struct {
	code, message string
	reason        string
	key           string // the caller's key fingerprint, once known
}

func (r *refusal) Error() string { return r.reason }

// errNoHello is the serial port's end before any byte: no host is
// connected. Not worth a log line; the agent opens the port again.
var errNoHello = errors.New("no caller")

// maxStaleFrames bounds the frames skipped, on the serial port, before a
// hello: leftovers of an earlier session.
const maxStaleFrames = 16

// handshake authenticates the caller and opens the session (protocol in
// docs/AGENT.md). A failure is a *refusal, or a transport error.
func (s *Server) handshake(ch *channel) (*agentSession, error) {
	k, p, err := s.readHello(ch)
	if err != nil {
		return nil, err
	}
	for restarts := 0; ; restarts++ {
		sess, next, err := s.handshakeFrom(ch, k, p)
		if next == nil || restarts == maxStaleFrames {
			return sess, err
		}
		// On the serial port, a hello while the agent waits for an auth
		// is a new caller after one that went away: start again.
		k, p = kindHello, next
		ch.setReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	}
}

// handshakeFrom runs the handshake from its hello (k, p). next is a
// hello that came instead of the auth on the serial port.
func (s *Server) handshakeFrom(ch *channel, k kind, p []byte) (sess *agentSession, next []byte, err error) {
	if k != kindHello {
		return nil, nil, &refusal{code: codeProtocol, message: "the first message must be a hello, not a " + k.String(), reason: "first message is a " + k.String()}
	}
	h, err := decodeHello(p)
	if err != nil {
		return nil, nil, &refusal{code: codeProtocol, message: "malformed hello", reason: err.Error()}
	}
	if h.Version != ProtocolVersion {
		msg := fmt.Sprintf("this agent speaks protocol version %d, not %d", ProtocolVersion, h.Version)
		return nil, nil, &refusal{code: codeVersion, message: msg, reason: msg}
	}
	if h.Purpose != PurposeFreeze {
		msg := fmt.Sprintf("unknown purpose %q", clean(h.Purpose, 64))
		return nil, nil, &refusal{code: codeProtocol, message: msg, reason: msg}
	}
	key := PublicKey(h.Key)
	fp := key.Fingerprint()
	now := s.cfg.Now()
	if skew := fromUnixNano(h.Time).Sub(now); skew > s.cfg.MaxSkew || skew < -s.cfg.MaxSkew {
		msg := fmt.Sprintf("the caller's clock is %s from the agent's (at most %s allowed): stale or replayed hello, or a clock to set right", skewText(skew), s.cfg.MaxSkew)
		return nil, nil, &refusal{code: codeClock, message: msg, reason: msg, key: fp}
	}
	notAllowed := fmt.Sprintf("key %s is not authorized from %s: an unknown key, or an address its from= does not allow (the agent's log says which)", fp, ch.peer.Addr)
	if ch.hasTLS && key != ch.tlsKey {
		return nil, nil, &refusal{code: codeUnauthorized, message: "the hello's key is not the TLS certificate's", key: fp,
			reason: "the hello names key " + fp + " but the TLS certificate carries " + ch.tlsKey.Fingerprint()}
	}
	ak, err := s.cfg.Authorized()
	if err != nil {
		return nil, nil, &refusal{code: codeUnavailable, message: "the agent cannot read its authorized keys (its log says why)", reason: err.Error(), key: fp}
	}
	auth, ok := ak.Lookup(key)
	if !ok {
		return nil, nil, &refusal{code: codeUnauthorized, message: notAllowed, reason: "unknown key (not in " + ak.Path + ")", key: fp}
	}
	if !auth.Allows(ch.peer) {
		return nil, nil, &refusal{code: codeUnauthorized, message: notAllowed, key: fp,
			reason: fmt.Sprintf("address not allowed: %s line %d allows from=%q", ak.Path, auth.Line, auth.fromList())}
	}

	tr := &transcript{purpose: h.Purpose, exporter: ch.exporter, callerKey: key, agentKey: s.pub,
		callerNon: h.Nonce, agentNon: make([]byte, nonceSize), callerTime: h.Time, agentTime: unixNano(now)}
	if _, err := rand.Read(tr.agentNon); err != nil {
		return nil, nil, fmt.Errorf("make a nonce: %w", err)
	}
	c := challengeMsg{Key: s.pub[:], Nonce: tr.agentNon, Time: tr.agentTime, Sig: tr.sign(roleAgent, s.cfg.Key)}
	if err := ch.write(kindChallenge, mustJSON(c), s.cfg.HandshakeTimeout); err != nil {
		return nil, nil, err
	}
	k, p, err = ch.read()
	if err != nil {
		return nil, nil, fmt.Errorf("waiting for the caller's signature: %w", err)
	}
	if k == kindHello && ch.resync {
		return nil, p, nil
	}
	if k != kindAuth {
		return nil, nil, &refusal{code: codeProtocol, message: "expected an auth, not a " + k.String(), reason: "a " + k.String() + " instead of an auth", key: fp}
	}
	a, err := decodeAuth(p)
	if err != nil {
		return nil, nil, &refusal{code: codeProtocol, message: "malformed auth", reason: err.Error(), key: fp}
	}
	if !tr.verify(roleCaller, key, a.Sig) {
		return nil, nil, &refusal{code: codeUnauthorized, message: "bad signature", key: fp,
			reason: "bad signature: a replayed or relayed exchange, a tampered message, or a caller without the private key"}
	}
	id := tr.sessionID()
	return &agentSession{
		s: s, ch: ch, key: key, auth: auth, id: id,
		out: sealer{priv: s.cfg.Key, id: id, dir: dirToCaller},
		in:  opener{key: key, id: id, dir: dirToAgent},
	}, nil, nil
}

// readHello reads the first frame within the handshake's time. On the
// serial port it waits, without a deadline, for a first byte (a host
// may connect at any time), then skips what earlier sessions left.
func (s *Server) readHello(ch *channel) (kind, []byte, error) {
	if !ch.resync {
		ch.setReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
		k, p, err := ch.read()
		if err != nil {
			return 0, nil, fmt.Errorf("waiting for a hello: %w", err)
		}
		return k, p, nil
	}
	ch.setReadDeadline(time.Time{})
	if _, err := ch.br.Peek(1); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, errNoHello
		}
		return 0, nil, fmt.Errorf("waiting for a hello: %w", readErr(err))
	}
	ch.setReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	for i := 0; ; i++ {
		k, p, _, err := syncFrame(ch.br, maxSessionPayload)
		if err != nil {
			return 0, nil, fmt.Errorf("waiting for a hello: %w", readErr(err))
		}
		if k == kindHello || i == maxStaleFrames {
			return k, p, nil
		}
	}
}

// skewText says how far ahead or behind a clock is.
func skewText(d time.Duration) string {
	if d < 0 {
		return (-d).Round(time.Second).String() + " behind"
	}
	return d.Round(time.Second).String() + " ahead"
}
