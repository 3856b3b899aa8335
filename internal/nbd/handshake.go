package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// handshake runs the fixed newstyle negotiation: structured replies, the
// meta contexts, then NBD_OPT_GO (or NBD_OPT_EXPORT_NAME on a server
// without it).
func (c *Client) handshake(r *bufio.Reader, o Options) error {
	var greet [18]byte
	if _, err := io.ReadFull(r, greet[:16]); err != nil {
		return fmt.Errorf("read the server's greeting: %w", err)
	}
	if binary.BigEndian.Uint64(greet[0:]) != nbdMagic {
		return errors.New("not an NBD server (no NBDMAGIC in its greeting)")
	}
	switch binary.BigEndian.Uint64(greet[8:]) {
	case optMagic:
	case oldstyleMagic:
		return errors.New("the server speaks the oldstyle handshake, which sauve does not: use a newstyle NBD server")
	default:
		return errors.New("not an NBD server (bad magic after NBDMAGIC)")
	}
	if _, err := io.ReadFull(r, greet[16:18]); err != nil {
		return fmt.Errorf("read the server's handshake flags: %w", err)
	}
	flags := binary.BigEndian.Uint16(greet[16:])
	if flags&flagFixedNewstyle == 0 {
		return errors.New("the server does not speak the fixed newstyle handshake")
	}
	var cf [4]byte
	binary.BigEndian.PutUint32(cf[:], uint32(flagFixedNewstyle|flags&flagNoZeroes))
	if _, err := c.conn.Write(cf[:]); err != nil {
		return fmt.Errorf("send client flags: %w", err)
	}
	if err := c.structured(r); err != nil {
		return err
	}
	if len(o.MetaContexts) > 0 {
		if err := c.setMeta(r, o); err != nil {
			return err
		}
	}
	return c.goExport(r, o, flags&flagNoZeroes != 0)
}

// sendOption writes one option request.
func (c *Client) sendOption(opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], optMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	if _, err := c.conn.Write(b); err != nil {
		return fmt.Errorf("send option %d: %w", opt, err)
	}
	return nil
}

// optReply is one option reply.
type optReply struct {
	typ  uint32
	data []byte
}

// readOptReply reads one reply to option opt, bounded in size.
func readOptReply(r io.Reader, opt uint32) (optReply, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return optReply{}, fmt.Errorf("read the reply to option %d: %w", opt, err)
	}
	if binary.BigEndian.Uint64(h[0:]) != replyMagic {
		return optReply{}, fmt.Errorf("protocol error: bad magic in the reply to option %d", opt)
	}
	if got := binary.BigEndian.Uint32(h[8:]); got != opt {
		return optReply{}, fmt.Errorf("protocol error: a reply to option %d where %d was asked", got, opt)
	}
	rep := optReply{typ: binary.BigEndian.Uint32(h[12:])}
	n := binary.BigEndian.Uint32(h[16:])
	if n > maxOptReply {
		return optReply{}, fmt.Errorf("protocol error: a reply of %d bytes to option %d (at most %d)", n, opt, maxOptReply)
	}
	rep.data = make([]byte, n)
	if _, err := io.ReadFull(r, rep.data); err != nil {
		return optReply{}, fmt.Errorf("read the reply to option %d: %w", opt, err)
	}
	return rep, nil
}

// optError turns an error reply into an error.
func optError(rep optReply, what string) error {
	msg := ""
	if len(rep.data) > 0 {
		msg = ": " + printable(rep.data)
	}
	switch rep.typ {
	case repErrUnsup:
		return fmt.Errorf("the server does not support %s%s", what, msg)
	case repErrUnknown:
		return fmt.Errorf("the server has no such export%s", msg)
	}
	return fmt.Errorf("the server refused %s (error %#x)%s", what, rep.typ, msg)
}

// printable keeps a server's message short and free of control bytes.
func printable(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	out := make([]rune, 0, len(b))
	for _, r := range string(b) {
		if r < 0x20 || r == 0x7f {
			r = '?'
		}
		out = append(out, r)
	}
	return string(out)
}

func (c *Client) structured(r *bufio.Reader) error {
	if err := c.sendOption(optStructuredRepl, nil); err != nil {
		return err
	}
	rep, err := readOptReply(r, optStructuredRepl)
	if err != nil {
		return err
	}
	if rep.typ != repAck {
		return optError(rep, "structured replies")
	}
	return nil
}

func nameBytes(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

func (c *Client) setMeta(r *bufio.Reader, o Options) error {
	data := nameBytes(nil, o.Export)
	data = binary.BigEndian.AppendUint32(data, uint32(len(o.MetaContexts)))
	for _, m := range o.MetaContexts {
		data = nameBytes(data, m)
	}
	if err := c.sendOption(optSetMetaContext, data); err != nil {
		return err
	}
	for i := 0; ; i++ {
		rep, err := readOptReply(r, optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case rep.typ == repAck:
			return nil
		case rep.typ == repMetaContext:
			if len(rep.data) < 5 || i >= len(o.MetaContexts) {
				return errors.New("protocol error: a malformed meta context reply")
			}
			c.contexts[string(rep.data[4:])] = binary.BigEndian.Uint32(rep.data)
		case rep.typ&repErrBit != 0:
			return optError(rep, "meta contexts")
		}
	}
}

// goExport opens the export with NBD_OPT_GO, asking for its block sizes.
func (c *Client) goExport(r *bufio.Reader, o Options, noZeroes bool) error {
	data := nameBytes(nil, o.Export)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	if err := c.sendOption(optGo, data); err != nil {
		return err
	}
	gotSize := false
	for {
		rep, err := readOptReply(r, optGo)
		if err != nil {
			return err
		}
		switch {
		case rep.typ == repAck:
			if !gotSize {
				return errors.New("protocol error: the server opened the export without saying its size")
			}
			return nil
		case rep.typ == repInfo:
			if err := c.info(rep.data, &gotSize); err != nil {
				return err
			}
		case rep.typ == repErrUnsup:
			return c.exportName(r, o, noZeroes)
		case rep.typ&repErrBit != 0:
			return optError(rep, "the export")
		}
	}
}

// info reads one NBD_REP_INFO.
func (c *Client) info(d []byte, gotSize *bool) error {
	if len(d) < 2 {
		return errors.New("protocol error: a short info reply")
	}
	switch binary.BigEndian.Uint16(d) {
	case infoExport:
		if len(d) != 12 {
			return errors.New("protocol error: a malformed export info")
		}
		return c.setSize(binary.BigEndian.Uint64(d[2:]), gotSize)
	case infoBlockSize:
		if len(d) != 14 {
			return errors.New("protocol error: a malformed block size info")
		}
		if m := int64(binary.BigEndian.Uint32(d[10:])); m >= 512 && m < c.maxReq {
			c.maxReq = m
		}
	}
	return nil
}

func (c *Client) setSize(n uint64, gotSize *bool) error {
	if n > 1<<62 {
		return fmt.Errorf("protocol error: an export of %d bytes", n)
	}
	c.size, *gotSize = int64(n), true
	return nil
}

// exportName opens the export the old way, for a server without GO.
func (c *Client) exportName(r *bufio.Reader, o Options, noZeroes bool) error {
	if len(c.contexts) > 0 {
		return errors.New("the server knows meta contexts but not NBD_OPT_GO")
	}
	if err := c.sendOption(optExportName, []byte(o.Export)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("open the export: %w (does it exist?)", err)
	}
	var got bool
	return c.setSize(binary.BigEndian.Uint64(b), &got)
}
