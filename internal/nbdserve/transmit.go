package nbdserve

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/nbd"
)

// request is one command of the transmission phase.
type request struct {
	flags, typ uint16
	cookie     uint64
	off        uint64
	length     uint32
	// data is a write's payload, held against the read budget.
	data []byte
}

// transmit reads requests until the client disconnects and hands them
// to the workers; replies go out as each is ready, in any order.
func (c *session) transmit() error {
	work := make(chan request)
	var wg sync.WaitGroup
	for range c.s.o.Workers {
		wg.Go(func() {
			for r := range work {
				c.handle(r)
			}
		})
	}
	err := c.readRequests(work)
	close(work)
	wg.Wait()
	return err
}

func (c *session) readRequests(work chan<- request) error {
	var h [28]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil // gone without NBD_CMD_DISC: tolerated
			}
			return fmt.Errorf("read a request: %w", err)
		}
		if m := be.Uint32(h[:]); m != nbd.RequestMagic {
			return fmt.Errorf("bad request magic %#x", m)
		}
		r := request{
			flags:  be.Uint16(h[4:]),
			typ:    be.Uint16(h[6:]),
			cookie: be.Uint64(h[8:]),
			off:    be.Uint64(h[16:]),
			length: be.Uint32(h[24:]),
		}
		switch r.typ {
		case nbd.CmdDisc:
			return nil
		case nbd.CmdWrite:
			if err := c.readPayload(&r); err != nil {
				return err
			}
		}
		work <- r
	}
}

// readPayload reads a write's payload when the export takes it and
// skips it otherwise: it follows the header whatever the answer, and
// the next request must be framed right.
func (c *session) readPayload(r *request) error {
	if c.export.Writer == nil || c.check(*r) != 0 || r.length > maxRequest {
		if _, err := io.CopyN(io.Discard, c.br, int64(r.length)); err != nil {
			return fmt.Errorf("skip a write's payload: %w", err)
		}
		return nil
	}
	if err := c.s.budget.Acquire(c.s.ctx, int64(r.length)); err != nil {
		return err // the server is stopping
	}
	r.data = make([]byte, r.length)
	if _, err := io.ReadFull(c.br, r.data); err != nil {
		c.s.budget.Release(int64(r.length))
		return fmt.Errorf("read a write's payload: %w", err)
	}
	return nil
}

// handle answers one request; a failure to send closes the connection,
// which ends the reading too.
func (c *session) handle(r request) {
	var err error
	switch r.typ {
	case nbd.CmdRead:
		err = c.read(r)
	case nbd.CmdBlockStatus:
		err = c.blockStatus(r)
	case nbd.CmdFlush:
		err = c.simple(r.cookie, c.flushExport())
	case nbd.CmdCache:
		err = c.simple(r.cookie, c.check(r))
	case nbd.CmdWrite, nbd.CmdTrim, nbd.CmdWriteZeroes:
		err = c.simple(r.cookie, c.write(r))
	default:
		err = c.simple(r.cookie, nbd.ErrnoInval)
	}
	if err != nil {
		c.conn.Close()
	}
}

// write carries out a write, trim or write-zeroes, and a flush after
// it when the client asked for FUA; it returns the errno to answer.
func (c *session) write(r request) uint32 {
	w := c.export.Writer
	if r.data != nil {
		defer c.s.budget.Release(int64(len(r.data)))
	}
	if w == nil {
		return nbd.ErrnoPerm
	}
	if e := c.check(r); e != 0 {
		return e
	}
	if r.typ == nbd.CmdWrite && r.data == nil {
		return nbd.ErrnoInval // longer than a read may be: skipped
	}
	var err error
	switch r.typ {
	case nbd.CmdWrite:
		_, err = w.WriteAt(r.data, int64(r.off))
	default:
		// A trim need not zero, but zeroing is what keeps the
		// overlay's space small, so both do it.
		err = w.Zero(int64(r.off), int64(r.length))
	}
	if err == nil && r.flags&nbd.CmdFlagFUA != 0 {
		err = w.Flush()
	}
	return c.errno(err, "write")
}

// flushExport flushes a writable export; it returns the errno to answer.
func (c *session) flushExport() uint32 {
	if c.export.Writer == nil {
		return 0
	}
	return c.errno(c.export.Writer.Flush(), "flush")
}

// errno maps a Writer's error to the errno a client gets, and logs it.
func (c *session) errno(err error, what string) uint32 {
	if err == nil {
		return 0
	}
	if c.s.o.Logf != nil {
		c.s.o.Logf("nbd server: %s to export %q: %v", what, c.export.Name, err)
	}
	if errors.Is(err, syscall.ENOSPC) {
		return nbd.ErrnoNoSpc
	}
	return nbd.ErrnoIO
}

// check returns EINVAL for a range outside the export or too long to
// read at once, 0 for one that is fine.
func (c *session) check(r request) uint32 {
	size := uint64(c.export.Size)
	if r.length == 0 || r.off > size || uint64(r.length) > size-r.off {
		return nbd.ErrnoInval
	}
	if r.typ == nbd.CmdRead && r.length > maxRequest {
		return nbd.ErrnoInval
	}
	return 0
}

// simple sends a simple reply without data.
func (c *session) simple(cookie uint64, errno uint32) error {
	var b [16]byte
	be.PutUint32(b[:], nbd.SimpleReplyMagic)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], cookie)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.bw.Write(b[:])
	return c.flush("a reply")
}

// chunkHeader appends a structured reply chunk's header.
func chunkHeader(b []byte, flags, typ uint16, cookie uint64, length int) []byte {
	b = be.AppendUint32(b, nbd.StructuredReplyMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, uint32(length))
}

// fail sends an error: an error chunk when structured replies are on,
// the only way to fail a read then.
func (c *session) fail(cookie uint64, errno uint32, msg string) error {
	if !c.structured {
		return c.simple(cookie, errno)
	}
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	b := chunkHeader(nil, nbd.ReplyFlagDone, nbd.ChunkError, cookie, 6+len(msg))
	b = be.AppendUint32(b, errno)
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.bw.Write(b)
	return c.flush("an error reply")
}

// dataRanges returns the export's data ranges within [off, end), clipped
// and in order whatever Data returned.
func (c *session) dataRanges(off, end int64) ([]extent.Range, error) {
	if c.export.Data == nil {
		return []extent.Range{{Start: off, End: end}}, nil
	}
	rs, err := c.export.Data(off, end-off)
	if err != nil {
		return nil, err
	}
	out := rs[:0]
	pos := off
	for _, r := range rs {
		r.Start, r.End = max(r.Start, pos), min(r.End, end)
		if r.Start >= r.End {
			continue
		}
		out, pos = append(out, r), r.End
	}
	return out, nil
}

func (c *session) read(r request) error {
	if e := c.check(r); e != 0 {
		return c.fail(r.cookie, e, "read outside the export or longer than 32 MiB")
	}
	off, end := int64(r.off), int64(r.off)+int64(r.length)
	var ranges []extent.Range
	var err error
	if c.structured && r.flags&nbd.CmdFlagDF == 0 {
		ranges, err = c.dataRanges(off, end)
	} else {
		// One piece: simple replies carry all the bytes anyway, and DF
		// asks for them in one chunk.
		ranges = []extent.Range{{Start: off, End: end}}
	}
	if err := c.s.budget.Acquire(c.s.ctx, int64(r.length)); err != nil {
		return err // the server is stopping
	}
	defer c.s.budget.Release(int64(r.length))
	buf := make([]byte, r.length)
	if err == nil {
		for _, rg := range ranges {
			if _, err = c.export.ReaderAt.ReadAt(buf[rg.Start-off:rg.End-off], rg.Start); err != nil {
				break
			}
		}
	}
	if err != nil {
		return c.fail(r.cookie, nbd.ErrnoIO, fmt.Sprintf("read of export %q at %d+%d: %v", c.export.Name, off, r.length, err))
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if !c.structured {
		var b [16]byte
		be.PutUint32(b[:], nbd.SimpleReplyMagic)
		be.PutUint64(b[8:], r.cookie)
		c.bw.Write(b[:])
		c.bw.Write(buf)
		return c.flush("a read reply")
	}
	// Data chunks for the ranges, hole chunks between them; DONE on the
	// last.
	var hdr []byte
	pos := off
	for pos < end {
		var rg extent.Range
		if len(ranges) > 0 {
			rg = ranges[0]
		} else {
			rg = extent.Range{Start: end, End: end}
		}
		if pos < rg.Start {
			flags := uint16(0)
			if rg.Start == end {
				flags = nbd.ReplyFlagDone
			}
			hdr = chunkHeader(hdr[:0], flags, nbd.ChunkOffsetHole, r.cookie, 12)
			hdr = be.AppendUint64(hdr, uint64(pos))
			hdr = be.AppendUint32(hdr, uint32(rg.Start-pos))
			c.bw.Write(hdr)
			pos = rg.Start
			continue
		}
		flags := uint16(0)
		if rg.End == end {
			flags = nbd.ReplyFlagDone
		}
		hdr = chunkHeader(hdr[:0], flags, nbd.ChunkOffsetData, r.cookie, 8+int(rg.Len()))
		hdr = be.AppendUint64(hdr, uint64(rg.Start))
		c.bw.Write(hdr)
		c.bw.Write(buf[rg.Start-off : rg.End-off])
		pos, ranges = rg.End, ranges[1:]
	}
	return c.flush("a read reply")
}

func (c *session) blockStatus(r request) error {
	if !c.structured || !c.allocation {
		return c.fail(r.cookie, nbd.ErrnoInval, "no meta context was selected")
	}
	if e := c.check(r); e != 0 {
		return c.fail(r.cookie, e, "block status outside the export")
	}
	off, end := int64(r.off), int64(r.off)+int64(r.length)
	ranges, err := c.dataRanges(off, end)
	if err != nil {
		return c.fail(r.cookie, nbd.ErrnoIO, fmt.Sprintf("map of export %q at %d+%d: %v", c.export.Name, off, r.length, err))
	}
	one := r.flags&nbd.CmdFlagReqOne != 0
	var desc []byte
	n := 0
	add := func(length int64, flags uint32) bool {
		desc = be.AppendUint32(desc, uint32(length))
		desc = be.AppendUint32(desc, flags)
		n++
		return !one && n < maxDescriptors
	}
	pos := off
	for pos < end {
		next := extent.Range{Start: end, End: end}
		if len(ranges) > 0 {
			next = ranges[0]
		}
		if pos < next.Start {
			ok := add(next.Start-pos, nbd.StateHole|nbd.StateZero)
			pos = next.Start
			if !ok {
				break
			}
			continue
		}
		ok := add(next.Len(), 0)
		pos, ranges = next.End, ranges[1:]
		if !ok {
			break
		}
	}
	b := chunkHeader(nil, nbd.ReplyFlagDone, nbd.ChunkBlockStatus, r.cookie, 4+len(desc))
	b = be.AppendUint32(b, metaAllocation)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.bw.Write(b)
	c.bw.Write(desc)
	return c.flush("a block status reply")
}
