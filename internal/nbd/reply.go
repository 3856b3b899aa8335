package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// readReply reads one simple reply or structured reply chunk and hands
// it to its call. An error here is the connection's: it fails every
// call.
func (c *Client) readReply(r io.Reader) error {
	var m [4]byte
	if _, err := io.ReadFull(r, m[:]); err != nil {
		return err
	}
	switch binary.BigEndian.Uint32(m[:]) {
	case simpleMagic:
		return c.simpleReply(r)
	case structuredMagic:
		return c.structuredChunk(r)
	}
	return errors.New("protocol error: a reply with bad magic")
}

func (c *Client) simpleReply(r io.Reader) error {
	var h [12]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return err
	}
	errno := binary.BigEndian.Uint32(h[0:])
	cl, err := c.take(binary.BigEndian.Uint64(h[4:]), true)
	if err != nil {
		return err
	}
	if errno != 0 {
		finish(cl, fmt.Errorf("the server failed the request: %s (%d)", errnoName(errno), errno))
		return nil
	}
	if cl.typ != cmdRead {
		finish(cl, errors.New("protocol error: a simple reply to a block status request"))
		return errors.New("protocol error: a simple reply to a block status request")
	}
	if _, err := io.ReadFull(r, cl.buf); err != nil {
		finish(cl, err)
		return err
	}
	cl.covered = cl.length
	finish(cl, nil)
	return nil
}

// structuredChunk reads one chunk of a structured reply.
func (c *Client) structuredChunk(r io.Reader) error {
	var h [16]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint16(h[0:])
	typ := binary.BigEndian.Uint16(h[2:])
	length := binary.BigEndian.Uint32(h[12:])
	done := flags&replyFlagDone != 0
	cl, err := c.take(binary.BigEndian.Uint64(h[4:]), done)
	if err != nil {
		return err
	}
	if err := c.chunk(r, cl, typ, length); err != nil {
		finish(cl, err)
		if !done {
			c.mu.Lock()
			delete(c.calls, binary.BigEndian.Uint64(h[4:]))
			c.mu.Unlock()
		}
		return err
	}
	if done {
		finish(cl, nil)
	}
	return nil
}

// chunk reads a chunk's payload of length bytes into cl. A server error
// is the call's (returned through cl.err); a malformed chunk is the
// connection's.
func (c *Client) chunk(r io.Reader, cl *call, typ uint16, length uint32) error {
	switch {
	case typ == chunkNone:
		if length != 0 {
			return errors.New("protocol error: a NONE chunk with a payload")
		}
		return nil
	case typ == chunkOffsetData && cl.typ == cmdRead:
		return readData(r, cl, length)
	case typ == chunkOffsetHole && cl.typ == cmdRead:
		return readHole(r, cl, length)
	case typ == chunkBlockStat && cl.typ == cmdBlockStatus:
		return readBlockStatus(r, cl, length)
	case typ&chunkErrBit != 0:
		return readError(r, cl, typ, length)
	}
	return fmt.Errorf("protocol error: a chunk of type %d to a request of type %d", typ, cl.typ)
}

// within checks that [off, off+n) lies in the request's range and
// returns its offset in the call's buffer.
func within(cl *call, off uint64, n uint64) (int64, error) {
	if off < uint64(cl.off) || off-uint64(cl.off) > uint64(cl.length) || n > uint64(cl.length)-(off-uint64(cl.off)) {
		return 0, fmt.Errorf("protocol error: a reply for [%d, +%d) to a request for [%d, +%d)", off, n, cl.off, cl.length)
	}
	return int64(off) - cl.off, nil
}

func readData(r io.Reader, cl *call, length uint32) error {
	if length < 8 {
		return errors.New("protocol error: a short OFFSET_DATA chunk")
	}
	var o [8]byte
	if _, err := io.ReadFull(r, o[:]); err != nil {
		return err
	}
	n := uint64(length - 8)
	at, err := within(cl, binary.BigEndian.Uint64(o[:]), n)
	if err != nil {
		return err
	}
	if _, err := io.ReadFull(r, cl.buf[at:at+int64(n)]); err != nil {
		return err
	}
	cl.covered += int64(n)
	return nil
}

func readHole(r io.Reader, cl *call, length uint32) error {
	if length != 12 {
		return errors.New("protocol error: a malformed OFFSET_HOLE chunk")
	}
	var b [12]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return err
	}
	n := uint64(binary.BigEndian.Uint32(b[8:]))
	at, err := within(cl, binary.BigEndian.Uint64(b[:]), n)
	if err != nil {
		return err
	}
	clear(cl.buf[at : at+int64(n)])
	cl.covered += int64(n)
	return nil
}

func readBlockStatus(r io.Reader, cl *call, length uint32) error {
	if length < 4 || (length-4)%8 != 0 || (length-4)/8 > maxBlockDescs {
		return errors.New("protocol error: a malformed BLOCK_STATUS chunk")
	}
	var b [8]byte
	if _, err := io.ReadFull(r, b[:4]); err != nil {
		return err
	}
	ours := binary.BigEndian.Uint32(b[:4]) == cl.ctxID
	if ours && len(cl.extents) > 0 {
		return errors.New("protocol error: two BLOCK_STATUS chunks for one context")
	}
	// Descriptors are read one at a time: the length is the server's
	// word, and no buffer is sized by it.
	off := cl.off
	for i := uint32(0); i < (length-4)/8; i++ {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return err
		}
		if !ours {
			continue // another context's answer: not asked for, not used
		}
		n := int64(binary.BigEndian.Uint32(b[:4]))
		if n == 0 {
			return errors.New("protocol error: a block status extent of length 0")
		}
		cl.extents = append(cl.extents, Extent{Offset: off, Length: n, Flags: binary.BigEndian.Uint32(b[4:])})
		off += n
	}
	return nil
}

func readError(r io.Reader, cl *call, typ uint16, length uint32) error {
	if length < 6 || length > maxErrMessage+14 {
		return errors.New("protocol error: a malformed error chunk")
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	errno := binary.BigEndian.Uint32(b)
	mlen := int(binary.BigEndian.Uint16(b[4:]))
	if 6+mlen > len(b) {
		return errors.New("protocol error: an error chunk's message runs past it")
	}
	msg := printable(b[6 : 6+mlen])
	where := ""
	if typ == chunkErrorOff {
		if len(b) != 6+mlen+8 {
			return errors.New("protocol error: a malformed ERROR_OFFSET chunk")
		}
		where = fmt.Sprintf(" at offset %d", binary.BigEndian.Uint64(b[6+mlen:]))
	}
	if msg != "" {
		msg = ": " + msg
	}
	if cl.err == nil {
		cl.err = fmt.Errorf("the server failed the request%s: %s (%d)%s", where, errnoName(errno), errno, msg)
	}
	return nil
}
