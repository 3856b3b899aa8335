// Package remote is the wire protocol between sauve migrate and the sauve
// on the other end of an SSH session (sauve migrate-receive), which
// writes a migration's target there. It is written by hand because the
// exchange is small and one way: the local end sends a hello, then writes,
// zeroings and syncs in order without waiting (so that a link's latency
// costs one round trip per sync, not per write); the remote end answers
// the hello with what the target is, each sync with an ack once every
// earlier write is durable, and any failure with its text, after which it
// stops.
//
// A message is a frame: a type byte, a big-endian uint32 payload length,
// the payload. Every length is checked against a bound before anything
// is allocated for it, and a write's payload (zstd-compressed unless that
// would not shrink it) never decodes to more than it declares.
package remote

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Version is the protocol version; both ends must speak the same.
const Version = 1

// Bounds of what a frame may hold.
const (
	// MaxWrite is the most data one write message carries, decoded.
	MaxWrite = 1 << 20
	// maxPath bounds the target path of a hello, maxText an error's text
	// and an info's strings.
	maxPath = 4096
	maxText = 64 << 10
	// maxFrame bounds a frame's payload: a write's header and its data
	// (sent raw when compression would not shrink it).
	maxFrame = MaxWrite + 64
)

// Message types.
const (
	msgHello = 'H' // local → remote: version, create size, path
	msgWrite = 'W' // off, decoded length, encoding, data
	msgZero  = 'Z' // off, n
	msgSync  = 'S' // sequence number
	msgInfo  = 'I' // remote → local: the target's size and identity
	msgAck   = 'A' // sequence number of a sync done
	msgError = 'E' // the text of a failure; the sender stops
)

// Write payload encodings.
const (
	encRaw  = 0
	encZstd = 1
)

// Info is what the remote end says of its target.
type Info struct {
	Size int64
	// Device is a block device's major:minor; FileDev and Inode a
	// file's st_dev and st_ino.
	Device         string
	FileDev, Inode uint64
	// Host is the remote machine's host name.
	Host string
	// Created says the target did not exist and was made, all zeros.
	Created bool
}

// hello is the first message.
type hello struct {
	version uint16
	// create is the size of the file to make when the target does not
	// exist (0: it must exist).
	create int64
	path   string
}

// frame is one decoded message.
type frame struct {
	typ     byte
	payload []byte
}

// readFrame reads one frame, its length bounded before allocation.
func readFrame(r *bufio.Reader, buf []byte) (frame, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return frame{}, buf, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > maxFrame {
		return frame{}, buf, fmt.Errorf("message of type %q holds %d bytes, more than the %d a message may hold", h[0], n, maxFrame)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return frame{}, buf, fmt.Errorf("read a message of type %q: %w", h[0], err)
	}
	return frame{typ: h[0], payload: buf}, buf, nil
}

// writeFrame writes a frame of type typ made of parts.
func writeFrame(w *bufio.Writer, typ byte, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	var h [5]byte
	h[0] = typ
	binary.BigEndian.PutUint32(h[1:], uint32(n))
	w.Write(h[:])
	for _, p := range parts {
		w.Write(p)
	}
	// bufio.Writer keeps its first error.
	_, err := w.Write(nil)
	return err
}

// decoder reads a payload's fields, remembering the first shortfall.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil || len(d.b) < n {
		if d.err == nil {
			d.err = errors.New("message too short")
		}
		return make([]byte, n)
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8() byte    { return d.take(1)[0] }
func (d *decoder) u16() uint16 { return binary.BigEndian.Uint16(d.take(2)) }
func (d *decoder) u32() uint32 { return binary.BigEndian.Uint32(d.take(4)) }
func (d *decoder) u64() uint64 { return binary.BigEndian.Uint64(d.take(8)) }

// str reads a string of a uint16 length, at most max bytes.
func (d *decoder) str(max int) string {
	n := int(d.u16())
	if n > max && d.err == nil {
		d.err = fmt.Errorf("string of %d bytes, more than %d", n, max)
	}
	if d.err != nil {
		return ""
	}
	return string(d.take(n))
}

// int63 reads a uint64 that must fit an int64.
func (d *decoder) int63(what string) int64 {
	v := d.u64()
	if v > 1<<62 && d.err == nil {
		d.err = fmt.Errorf("%s %d is out of range", what, v)
	}
	return int64(v)
}

// end fails if bytes are left over.
func (d *decoder) end(what string) error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%d bytes too many", len(d.b))
	}
	if d.err != nil {
		return fmt.Errorf("bad %s message: %w", what, d.err)
	}
	return nil
}

type encoder struct{ b []byte }

func (e *encoder) u8(v byte)    { e.b = append(e.b, v) }
func (e *encoder) u16(v uint16) { e.b = binary.BigEndian.AppendUint16(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }
func (e *encoder) str(s string, max int) {
	if len(s) > max {
		s = s[:max]
	}
	e.u16(uint16(len(s)))
	e.b = append(e.b, s...)
}

func encodeHello(h hello) []byte {
	var e encoder
	e.u16(h.version)
	e.u64(uint64(h.create))
	e.str(h.path, maxPath)
	return e.b
}

func decodeHello(p []byte) (hello, error) {
	d := decoder{b: p}
	h := hello{version: d.u16(), create: d.int63("size"), path: d.str(maxPath)}
	if err := d.end("hello"); err != nil {
		return hello{}, err
	}
	if h.path == "" {
		return hello{}, errors.New("bad hello message: no target path")
	}
	return h, nil
}

func encodeInfo(i Info) []byte {
	var e encoder
	e.u64(uint64(i.Size))
	e.u64(i.FileDev)
	e.u64(i.Inode)
	c := byte(0)
	if i.Created {
		c = 1
	}
	e.u8(c)
	e.str(i.Device, 64)
	e.str(i.Host, 255)
	return e.b
}

func decodeInfo(p []byte) (Info, error) {
	d := decoder{b: p}
	i := Info{Size: d.int63("size"), FileDev: d.u64(), Inode: d.u64()}
	c := d.u8()
	i.Device, i.Host = d.str(64), d.str(255)
	if err := d.end("info"); err != nil {
		return Info{}, err
	}
	if c > 1 {
		return Info{}, fmt.Errorf("bad info message: created flag %d", c)
	}
	i.Created = c == 1
	return i, nil
}

// writeHeader is a write message's fields before its data.
type writeHeader struct {
	off int64
	n   int // decoded length
	enc byte
}

const writeHeaderLen = 8 + 4 + 1

func encodeWriteHeader(h writeHeader) []byte {
	var e encoder
	e.u64(uint64(h.off))
	e.u32(uint32(h.n))
	e.u8(h.enc)
	return e.b
}

func decodeWrite(p []byte) (writeHeader, []byte, error) {
	d := decoder{b: p}
	h := writeHeader{off: d.int63("offset"), n: int(d.u32()), enc: d.u8()}
	data := d.b
	d.b = nil
	if err := d.end("write"); err != nil {
		return writeHeader{}, nil, err
	}
	switch {
	case h.n == 0 || h.n > MaxWrite:
		return writeHeader{}, nil, fmt.Errorf("bad write message: %d bytes (1 to %d)", h.n, MaxWrite)
	case h.enc == encRaw && len(data) != h.n:
		return writeHeader{}, nil, fmt.Errorf("bad write message: %d bytes of data, %d declared", len(data), h.n)
	case h.enc != encRaw && h.enc != encZstd:
		return writeHeader{}, nil, fmt.Errorf("bad write message: encoding %d", h.enc)
	}
	return h, data, nil
}

func encodeZero(off, n int64) []byte {
	var e encoder
	e.u64(uint64(off))
	e.u64(uint64(n))
	return e.b
}

func decodeZero(p []byte) (off, n int64, err error) {
	d := decoder{b: p}
	off, n = d.int63("offset"), d.int63("length")
	return off, n, d.end("zero")
}

func encodeSeq(seq uint64) []byte {
	var e encoder
	e.u64(seq)
	return e.b
}

func decodeSeq(p []byte, what string) (uint64, error) {
	d := decoder{b: p}
	s := d.u64()
	return s, d.end(what)
}

func decodeText(p []byte) string {
	if len(p) > maxText {
		p = p[:maxText]
	}
	return string(p)
}
