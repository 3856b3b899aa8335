package agent

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode"
)

// ProtocolVersion is the version a caller's hello names; an agent
// refuses any other, and says which it speaks.
const ProtocolVersion = 1

// PurposeFreeze is the purpose of a session that freezes: it is in the
// handshake's signed transcript, so a signature made for one purpose
// cannot open a session for another.
const PurposeFreeze = "sauve-agent freeze"

// nonceSize is the size of each side's random challenge.
const nonceSize = 32

// helloMsg opens a session (caller to agent).
type helloMsg struct {
	Version int    `json:"v"`
	Purpose string `json:"purpose"`
	Key     []byte `json:"key"`
	Nonce   []byte `json:"nonce"`
	Time    int64  `json:"time"` // Unix nanoseconds
}

// challengeMsg answers a hello (agent to caller): the agent's key, its
// nonce and time, and its signature of the transcript.
type challengeMsg struct {
	Key   []byte `json:"key"`
	Nonce []byte `json:"nonce"`
	Time  int64  `json:"time"`
	Sig   []byte `json:"sig"`
}

// authMsg completes the handshake (caller to agent).
type authMsg struct {
	Sig []byte `json:"sig"`
}

// refusedMsg ends a handshake that failed (agent to caller). It is not
// signed: there is no session yet, and whoever could forge it could as
// well cut the connection.
type refusedMsg struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Refusal codes, in refused and error messages.
const (
	codeProtocol     = "protocol"     // a malformed or unexpected message
	codeVersion      = "version"      // a protocol version the agent does not speak
	codeClock        = "clock"        // a timestamp too far from the agent's clock
	codeUnauthorized = "unauthorized" // an unknown key, an address not allowed, a bad signature
	codeUnavailable  = "unavailable"  // the agent cannot check keys now (its file is broken)
	codeBusy         = "busy"         // another freeze is in progress
	codeWindow       = "window"       // a window longer than the key may ask
	codeState        = "state"        // freeze while frozen, thaw while not frozen
	codeFailed       = "failed"       // freezing failed
)

// welcomeMsg opens the session (agent to caller, signed).
type welcomeMsg struct {
	Agent         string `json:"agent"` // software and version
	Host          string `json:"host,omitempty"`
	DefaultWindow int64  `json:"default_window_ns"`
	MaxWindow     int64  `json:"max_window_ns"` // for this caller's key
}

// freezeMsg asks for a freeze (caller to agent, signed); 0 asks for the
// agent's default window.
type freezeMsg struct {
	Window int64 `json:"window_ns"`
}

// frozenMsg says everything is frozen (agent to caller, signed).
type frozenMsg struct {
	Report FreezeReport `json:"report"`
}

// thawMsg asks for the thaw (caller to agent, signed).
type thawMsg struct{}

// thawedMsg says everything is thawed (agent to caller, signed).
type thawedMsg struct {
	Report ThawReport `json:"report"`
}

// errorMsg refuses or fails a request (agent to caller, signed).
type errorMsg struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// decodeJSON reads a message's JSON into v. Unknown fields are allowed,
// so that a later version may add some.
func decodeJSON(k kind, payload []byte, v any) error {
	if err := json.Unmarshal(payload, v); err != nil {
		return protoErr("a %s message that is not valid JSON: %v", k, err)
	}
	return nil
}

func decodeHello(p []byte) (helloMsg, error) {
	var m helloMsg
	if err := decodeJSON(kindHello, p, &m); err != nil {
		return m, err
	}
	if m.Version != ProtocolVersion {
		// Checked by the caller of decodeHello, which answers "version".
		return m, nil
	}
	if len(m.Key) != len(PublicKey{}) || len(m.Nonce) != nonceSize {
		return m, protoErr("a hello whose key is %d bytes and nonce %d (want %d and %d)", len(m.Key), len(m.Nonce), len(PublicKey{}), nonceSize)
	}
	if len(m.Purpose) > 64 {
		return m, protoErr("a hello whose purpose is %d bytes long", len(m.Purpose))
	}
	return m, nil
}

func decodeChallenge(p []byte) (challengeMsg, error) {
	var m challengeMsg
	if err := decodeJSON(kindChallenge, p, &m); err != nil {
		return m, err
	}
	if len(m.Key) != len(PublicKey{}) || len(m.Nonce) != nonceSize || len(m.Sig) != sigSize {
		return m, protoErr("a challenge whose key is %d bytes, nonce %d and signature %d (want %d, %d and %d)", len(m.Key), len(m.Nonce), len(m.Sig), len(PublicKey{}), nonceSize, sigSize)
	}
	return m, nil
}

func decodeAuth(p []byte) (authMsg, error) {
	var m authMsg
	if err := decodeJSON(kindAuth, p, &m); err != nil {
		return m, err
	}
	if len(m.Sig) != sigSize {
		return m, protoErr("an auth whose signature is %d bytes (want %d)", len(m.Sig), sigSize)
	}
	return m, nil
}

func decodeRefused(p []byte) (refusedMsg, error) {
	var m refusedMsg
	if err := decodeJSON(kindRefused, p, &m); err != nil {
		return m, err
	}
	m.Code, m.Message = clean(m.Code, 32), clean(m.Message, 512)
	return m, nil
}

func decodeWelcome(p []byte) (welcomeMsg, error) {
	var m welcomeMsg
	if err := decodeJSON(kindWelcome, p, &m); err != nil {
		return m, err
	}
	if m.DefaultWindow <= 0 || m.MaxWindow <= 0 || m.DefaultWindow > int64(MaxWindow) || m.MaxWindow > int64(MaxWindow) {
		return m, protoErr("a welcome with windows %d and %d ns", m.DefaultWindow, m.MaxWindow)
	}
	m.Agent, m.Host = clean(m.Agent, 64), clean(m.Host, 256)
	return m, nil
}

func decodeFreeze(p []byte) (freezeMsg, error) {
	var m freezeMsg
	if err := decodeJSON(kindFreeze, p, &m); err != nil {
		return m, err
	}
	if m.Window < 0 {
		return m, protoErr("a freeze window of %d ns", m.Window)
	}
	return m, nil
}

func decodeFrozen(p []byte) (frozenMsg, error) {
	var m frozenMsg
	if err := decodeJSON(kindFrozen, p, &m); err != nil {
		return m, err
	}
	if m.Report.Window <= 0 || m.Report.Window > MaxWindow {
		return m, protoErr("a frozen answer with a window of %d ns", m.Report.Window)
	}
	m.Report.clean()
	return m, nil
}

func decodeThaw(p []byte) (thawMsg, error) {
	var m thawMsg
	return m, decodeJSON(kindThaw, p, &m)
}

func decodeThawed(p []byte) (thawedMsg, error) {
	var m thawedMsg
	if err := decodeJSON(kindThawed, p, &m); err != nil {
		return m, err
	}
	if m.Report.Frozen < 0 {
		return m, protoErr("a thawed answer with a freeze of %d ns", m.Report.Frozen)
	}
	r := &m.Report
	r.Reason, r.Error = clean(r.Reason, 32), clean(r.Error, 1024)
	return m, nil
}

func decodeError(p []byte) (errorMsg, error) {
	var m errorMsg
	if err := decodeJSON(kindError, p, &m); err != nil {
		return m, err
	}
	m.Code, m.Message = clean(m.Code, 32), clean(m.Message, 1024)
	return m, nil
}

// clean makes a string from the peer safe to print: at most max bytes,
// control characters (terminal escapes, newlines that would forge log
// lines) replaced.
func clean(s string, max int) string {
	if len(s) > max {
		s = s[:max] + "..."
	}
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return '?'
		}
		return r
	}, s)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own message types are marshalled: none can fail.
		panic(fmt.Sprintf("agent: marshal %T: %v", v, err))
	}
	return b
}

// unixNano and fromUnixNano carry times in messages.
func unixNano(t time.Time) int64 { return t.UnixNano() }

func fromUnixNano(n int64) time.Time { return time.Unix(0, n) }
