package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
)

// readReply reads one simple reply or structured reply chunk and applies
// it to its request. An error means the connection cannot go on.
func (c *Client) readReply(br *bufio.Reader) error {
	var b [4 + chunkHeaderLen]byte
	if _, err := io.ReadFull(br, b[:4]); err != nil {
		return err
	}
	switch m := binary.BigEndian.Uint32(b[:4]); m {
	case SimpleReplyMagic:
		if _, err := io.ReadFull(br, b[4:16]); err != nil {
			return noEOF(err)
		}
		return c.simpleReply(br, binary.BigEndian.Uint32(b[4:]), binary.BigEndian.Uint64(b[8:]))
	case StructuredReplyMagic:
		if !c.info.structured {
			return protoErr("structured reply chunk, but structured replies were not negotiated")
		}
		if _, err := io.ReadFull(br, b[4:]); err != nil {
			return noEOF(err)
		}
		return c.chunk(br, parseChunkHeader(b[4:]))
	default:
		return protoErr("bad reply magic %#08x", m)
	}
}

// noEOF turns an end of stream inside a message into a short read.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// lookup returns the pending request of cookie.
func (c *Client) lookup(cookie uint64) (*request, error) {
	c.mu.Lock()
	r := c.pending[cookie]
	c.mu.Unlock()
	if r == nil {
		return nil, protoErr("reply for unknown cookie %#x", cookie)
	}
	return r, nil
}

// complete ends r: it leaves the pending set and its waiter wakes.
func (c *Client) complete(cookie uint64, r *request) {
	c.mu.Lock()
	delete(c.pending, cookie)
	c.mu.Unlock()
	close(r.done)
}

func (c *Client) simpleReply(br *bufio.Reader, errno uint32, cookie uint64) error {
	r, err := c.lookup(cookie)
	if err != nil {
		return err
	}
	switch {
	case errno != 0:
		r.err = &ServerError{Errno: errno, Offset: -1}
	case r.cmd == CmdRead && c.info.structured:
		return protoErr("simple reply to a read after structured replies were negotiated")
	case r.cmd == CmdRead:
		if _, err := io.ReadFull(br, r.buf); err != nil {
			return noEOF(err)
		}
	case r.cmd == CmdBlockStatus:
		return protoErr("simple reply without status to a block status request")
	}
	c.complete(cookie, r)
	return nil
}

// chunk applies one structured reply chunk to its request.
func (c *Client) chunk(br *bufio.Reader, h chunkHeader) error {
	r, err := c.lookup(h.cookie)
	if err != nil {
		return err
	}
	switch {
	case h.typ == ChunkNone:
		if h.length != 0 || h.flags&ReplyFlagDone == 0 {
			return protoErr("NBD_REPLY_TYPE_NONE of %d bytes, flags %#x", h.length, h.flags)
		}
	case h.typ == ChunkOffsetData && r.cmd == CmdRead:
		err = r.data(br, h.length)
	case h.typ == ChunkOffsetHole && r.cmd == CmdRead:
		err = r.hole(br, h.length)
	case h.typ == ChunkBlockStatus && r.cmd == CmdBlockStatus:
		err = c.status(br, r, h.length)
	case h.typ&ChunkErrBit != 0:
		err = r.errorChunk(br, h)
	default:
		return protoErr("reply chunk type %d to command %d", h.typ, r.cmd)
	}
	if err != nil {
		return err
	}
	if h.flags&ReplyFlagDone == 0 {
		return nil
	}
	if err := r.finish(); err != nil {
		return err
	}
	c.complete(h.cookie, r)
	return nil
}

// payload reads a chunk payload of n bytes, at most limit.
func payload(br *bufio.Reader, n uint32, limit int, what string) ([]byte, error) {
	if int64(n) > int64(limit) {
		return nil, protoErr("%s chunk of %d bytes exceeds the %d-byte limit", what, n, limit)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return nil, noEOF(err)
	}
	return b, nil
}

// place checks that [off, off+n) lies within the request and overlaps no
// earlier content, records it, and returns where it starts in buf.
func (r *request) place(off uint64, n uint64, what string) (int, error) {
	start := uint64(r.off)
	if off < start || off-start > uint64(r.length) || n > uint64(r.length)-(off-start) {
		return 0, protoErr("%s [%d, +%d) outside the request [%d, +%d)", what, off, n, r.off, r.length)
	}
	at := int64(off - start)
	if err := r.got.add(at, at+int64(n)); err != nil {
		return 0, fmt.Errorf("%s at %d: %w", what, off, err)
	}
	return int(at), nil
}

// data reads an NBD_REPLY_TYPE_OFFSET_DATA chunk into the read's buffer.
func (r *request) data(br *bufio.Reader, length uint32) error {
	if length < 9 {
		return protoErr("NBD_REPLY_TYPE_OFFSET_DATA of %d bytes", length)
	}
	var b [8]byte
	if _, err := io.ReadFull(br, b[:]); err != nil {
		return noEOF(err)
	}
	n := uint64(length - 8)
	at, err := r.place(binary.BigEndian.Uint64(b[:]), n, "data")
	if err != nil {
		return err
	}
	if _, err := io.ReadFull(br, r.buf[at:at+int(n)]); err != nil {
		return noEOF(err)
	}
	return nil
}

// hole applies an NBD_REPLY_TYPE_OFFSET_HOLE chunk: zeros in the buffer.
func (r *request) hole(br *bufio.Reader, length uint32) error {
	if length != 12 {
		return protoErr("NBD_REPLY_TYPE_OFFSET_HOLE of %d bytes, want 12", length)
	}
	var b [12]byte
	if _, err := io.ReadFull(br, b[:]); err != nil {
		return noEOF(err)
	}
	n := uint64(binary.BigEndian.Uint32(b[8:]))
	if n == 0 {
		return protoErr("hole of length 0")
	}
	at, err := r.place(binary.BigEndian.Uint64(b[:]), n, "hole")
	if err != nil {
		return err
	}
	clear(r.buf[at : at+int(n)])
	return nil
}

// status applies an NBD_REPLY_TYPE_BLOCK_STATUS chunk, keeping the
// extents of the context asked for. Descriptors are read one by one, so
// what is held grows with what the server really sent.
func (c *Client) status(br *bufio.Reader, r *request, length uint32) error {
	if length < 12 || (length-4)%8 != 0 || length > maxStatusChunk {
		return protoErr("block status chunk of %d bytes", length)
	}
	var b [8]byte
	if _, err := io.ReadFull(br, b[:4]); err != nil {
		return noEOF(err)
	}
	id := binary.BigEndian.Uint32(b[:4])
	if !slices.ContainsFunc(c.info.contexts, func(m metaContext) bool { return m.id == id }) {
		return protoErr("block status for meta context ID %d, which was not agreed", id)
	}
	if slices.Contains(r.seen, id) {
		return protoErr("two block status chunks for meta context ID %d", id)
	}
	r.seen = append(r.seen, id)
	keep := id == r.ctxID
	pos := r.off
	for range (length - 4) / 8 {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return noEOF(err)
		}
		e, err := parseDescriptor(b[:], r.off, pos, r.length)
		if err != nil {
			return err
		}
		if keep {
			r.extents = append(r.extents, e)
		}
		pos = e.End()
	}
	return nil
}

// errorChunk records an error chunk; the first error of a request wins.
func (r *request) errorChunk(br *bufio.Reader, h chunkHeader) error {
	b, err := payload(br, h.length, maxErrorChunk, "error")
	if err != nil {
		return err
	}
	e, err := parseErrorChunk(h.typ, b)
	if err != nil {
		return err
	}
	if e.Offset >= 0 && (e.Offset < r.off || e.Offset-r.off >= int64(r.length)) {
		return protoErr("error at offset %d outside the request [%d, +%d)", e.Offset, r.off, r.length)
	}
	if r.err == nil {
		r.err = e
	}
	return nil
}

// finish checks a request whose final chunk arrived: a successful reply
// must have said all it was asked.
func (r *request) finish() error {
	if r.err != nil {
		return nil
	}
	switch r.cmd {
	case CmdRead:
		if r.got.total != int64(r.length) {
			return protoErr("read reply [%d, +%d) done with %d bytes of it sent", r.off, r.length, r.got.total)
		}
	case CmdBlockStatus:
		if !slices.Contains(r.seen, r.ctxID) {
			return protoErr("block status reply without the status of meta context ID %d", r.ctxID)
		}
	}
	return nil
}

// spans are disjoint, sorted, non-adjacent ranges [start, end).
type spans struct {
	s     [][2]int64
	total int64
}

// add records [a, b), which must overlap nothing recorded.
func (sp *spans) add(a, b int64) error {
	i := sort.Search(len(sp.s), func(i int) bool { return sp.s[i][1] > a })
	if i < len(sp.s) && sp.s[i][0] < b {
		return protoErr("overlaps content sent before")
	}
	sp.total += b - a
	left := i > 0 && sp.s[i-1][1] == a
	right := i < len(sp.s) && sp.s[i][0] == b
	switch {
	case left && right:
		sp.s[i-1][1] = sp.s[i][1]
		sp.s = slices.Delete(sp.s, i, i+1)
	case left:
		sp.s[i-1][1] = b
	case right:
		sp.s[i][0] = a
	case len(sp.s) >= maxFragments:
		return protoErr("read reply in more than %d separate pieces", maxFragments)
	default:
		sp.s = slices.Insert(sp.s, i, [2]int64{a, b})
	}
	return nil
}
