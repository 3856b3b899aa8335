package agent

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
)

const sigSize = ed25519.SignatureSize

// Signature domains: every signature starts with one, so that no
// signature this protocol makes can be taken for another kind (a
// handshake for a session message, the agent's for the caller's), nor
// for a signature some other use of the same key makes.
const (
	domainHandshake = "sauve-agent handshake v1"
	domainSession   = "sauve-agent session v1"
	roleAgent       = "agent"
	roleCaller      = "caller"
)

// transcript is what both sides of a handshake sign: everything either
// side chose or saw. The caller's nonce makes the agent's signature
// fresh, the agent's nonce the caller's; the keys bind who talks to
// whom; the TLS exporter binds the handshake to this TLS connection, so
// that a party in the middle, which holds two TLS connections, cannot
// pass the messages on (the exporter is empty on the serial port, which
// has no TLS).
type transcript struct {
	purpose    string
	exporter   []byte
	callerKey  PublicKey
	agentKey   PublicKey
	callerNon  []byte
	agentNon   []byte
	callerTime int64
	agentTime  int64
}

// bytes encodes the transcript for one role's signature, every field
// length-prefixed so that no two transcripts encode alike.
func (t *transcript) bytes(role string) []byte {
	var b []byte
	field := func(p []byte) {
		b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	field([]byte(domainHandshake))
	field([]byte(role))
	field([]byte(t.purpose))
	field(t.exporter)
	field(t.callerKey[:])
	field(t.agentKey[:])
	field(t.callerNon)
	field(t.agentNon)
	b = binary.BigEndian.AppendUint64(b, uint64(t.callerTime))
	b = binary.BigEndian.AppendUint64(b, uint64(t.agentTime))
	return b
}

func (t *transcript) sign(role string, priv ed25519.PrivateKey) []byte {
	return ed25519.Sign(priv, t.bytes(role))
}

func (t *transcript) verify(role string, key PublicKey, sig []byte) bool {
	return len(sig) == sigSize && ed25519.Verify(key.ed25519(), t.bytes(role), sig)
}

// sessionID names the session that the handshake opened; session
// messages are signed under it.
func (t *transcript) sessionID() [32]byte { return sha256.Sum256(t.bytes("session")) }

// Directions of session messages, in their signatures: a message the
// agent signed cannot be reflected back to it as the caller's.
const (
	dirToCaller byte = 'A'
	dirToAgent  byte = 'C'
)

// sessionSigned is what signs a session message: the session, its
// direction, its number in that direction, its kind and body. Numbers
// are implicit (both sides count), so a message replayed, dropped or
// moved within a session, or from another session, fails to verify.
func sessionSigned(id [32]byte, dir byte, seq uint64, k kind, body []byte) []byte {
	b := make([]byte, 0, len(domainSession)+len(id)+10+len(body))
	b = append(b, domainSession...)
	b = append(b, id[:]...)
	b = append(b, dir)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = append(b, byte(k))
	return append(b, body...)
}

// sealSession is the payload of a session message: the signature, then
// the body.
func sealSession(priv ed25519.PrivateKey, id [32]byte, dir byte, seq uint64, k kind, body []byte) []byte {
	sig := ed25519.Sign(priv, sessionSigned(id, dir, seq, k, body))
	return append(sig, body...)
}

var errBadSignature = errors.New("bad signature")

// openSession checks a session message's signature and returns its body.
func openSession(key PublicKey, id [32]byte, dir byte, seq uint64, k kind, payload []byte) ([]byte, error) {
	if len(payload) < sigSize {
		return nil, protoErr("a %s message of %d bytes, shorter than its signature", k, len(payload))
	}
	sig, body := payload[:sigSize], payload[sigSize:]
	if !ed25519.Verify(key.ed25519(), sessionSigned(id, dir, seq, k, body), sig) {
		return nil, errBadSignature
	}
	return body, nil
}
