package agent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// A frame is a header, then its payload:
//
//	magic   4 bytes  "SVAG"
//	kind    1 byte
//	length  4 bytes  big-endian, the payload's length
//	payload
//
// The magic lets a reader of the virtio-serial port, a stream that keeps
// what a previous session left in it, find where the next frame starts.
var frameMagic = [4]byte{'S', 'V', 'A', 'G'}

const headerSize = 9

// kind is a frame's type. The handshake's frames carry JSON; the
// session's (kindWelcome and after) carry a signature and JSON
// (session.go).
type kind byte

const (
	kindHello     kind = 1 // caller: its key, nonce and time
	kindChallenge kind = 2 // agent: its key, nonce, time and signature
	kindAuth      kind = 3 // caller: its signature
	kindRefused   kind = 4 // agent: the handshake failed (unsigned)

	kindWelcome kind = 16 // agent: the session is open; its limits
	kindFreeze  kind = 17 // caller: freeze, with a window
	kindFrozen  kind = 18 // agent: frozen, with what
	kindThaw    kind = 19 // caller: thaw
	kindThawed  kind = 20 // agent: thawed, and whether the window held
	kindError   kind = 21 // agent: a request failed or was refused
)

func (k kind) String() string {
	switch k {
	case kindHello:
		return "hello"
	case kindChallenge:
		return "challenge"
	case kindAuth:
		return "auth"
	case kindRefused:
		return "refused"
	case kindWelcome:
		return "welcome"
	case kindFreeze:
		return "freeze"
	case kindFrozen:
		return "frozen"
	case kindThaw:
		return "thaw"
	case kindThawed:
		return "thawed"
	case kindError:
		return "error"
	}
	return fmt.Sprintf("kind %d", byte(k))
}

// Payload limits: a peer is untrusted, so the length in a header is
// checked before anything is allocated. A handshake message is a few
// hundred bytes; a session message at most a freeze report.
const (
	maxHandshakePayload = 2 << 10
	maxSessionPayload   = 64 << 10
)

// maxPayload is the largest payload a frame of kind k may have; 0 for a
// kind that does not exist.
func maxPayload(k kind) int {
	switch k {
	case kindHello, kindChallenge, kindAuth, kindRefused:
		return maxHandshakePayload
	case kindWelcome, kindFreeze, kindFrozen, kindThaw, kindThawed, kindError:
		return maxSessionPayload
	}
	return 0
}

// errProtocol marks a peer that broke the protocol (garbage, an
// oversized or unexpected frame), as opposed to a transport failure.
var errProtocol = errors.New("protocol violation")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errProtocol, fmt.Sprintf(format, args...))
}

// appendFrame is the frame of kind k carrying payload.
func appendFrame(b []byte, k kind, payload []byte) []byte {
	b = append(b, frameMagic[:]...)
	b = append(b, byte(k))
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// writeFrame writes a frame in one Write, so that frames written by
// several goroutines could never interleave.
func writeFrame(w io.Writer, k kind, payload []byte) error {
	if len(payload) > maxPayload(k) {
		return fmt.Errorf("a %s message of %d bytes is larger than its limit of %d", k, len(payload), maxPayload(k))
	}
	_, err := w.Write(appendFrame(make([]byte, 0, headerSize+len(payload)), k, payload))
	return err
}

// readFrame reads one frame. A header that does not start with the
// magic, names an unknown kind or announces more than the kind's limit
// fails before its payload is read.
func readFrame(r io.Reader) (kind, []byte, error) {
	var h [headerSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	if [4]byte(h[:4]) != frameMagic {
		return 0, nil, protoErr("not a sauve agent frame (starts with %q)", h[:4])
	}
	return readRest(r, h)
}

// readRest reads the payload of the frame whose header is h.
func readRest(r io.Reader, h [headerSize]byte) (kind, []byte, error) {
	k := kind(h[4])
	n := binary.BigEndian.Uint32(h[5:])
	limit := maxPayload(k)
	if limit == 0 {
		return 0, nil, protoErr("unknown message kind %d", h[4])
	}
	if n > uint32(limit) {
		return 0, nil, protoErr("a %s message of %d bytes, more than its limit of %d", k, n, limit)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, fmt.Errorf("%s message cut short: %w", k, err)
	}
	return k, payload, nil
}

// syncFrame skips bytes up to the next frame's magic, then reads that
// frame; skipped says how many bytes it passed. It is for the start of a
// session on the virtio-serial port, where bytes a previous session left
// may come first. Skipping keeps no bytes, so it costs no memory whatever
// the peer sends; the caller's deadline bounds its time.
func syncFrame(br *bufio.Reader, maxSkip int) (k kind, payload []byte, skipped int, err error) {
	var h [headerSize]byte
	matched := 0
	for matched < len(frameMagic) {
		c, err := br.ReadByte()
		if err != nil {
			return 0, nil, skipped, err
		}
		switch {
		case c == frameMagic[matched]:
			matched++
		case c == frameMagic[0]:
			skipped += matched
			matched = 1
		default:
			skipped += matched + 1
			matched = 0
		}
		if maxSkip >= 0 && skipped > maxSkip {
			return 0, nil, skipped, protoErr("%d bytes without a frame", skipped)
		}
	}
	copy(h[:], frameMagic[:])
	if _, err := io.ReadFull(br, h[4:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, skipped, fmt.Errorf("frame header cut short: %w", err)
	}
	k, payload, err = readRest(br, h)
	return k, payload, skipped, err
}
