package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// exportInfo is what the handshake learnt of the export.
type exportInfo struct {
	size       int64
	flags      uint16
	blocks     blockSizes
	hasBlocks  bool
	structured bool
	// contexts are the agreed meta contexts, in the server's order.
	contexts []metaContext
}

type metaContext struct {
	id   uint32
	name string
}

// handshaker runs the client side of the fixed newstyle handshake.
type handshaker struct {
	r        io.Reader
	w        io.Writer
	o        Options
	noZeroes bool
}

// handshake negotiates with the server on r and w until the transmission
// phase: structured replies, the meta contexts of o, then the export.
func handshake(r io.Reader, w io.Writer, o Options) (*exportInfo, error) {
	h := &handshaker{r: r, w: w, o: o}
	if err := h.greeting(); err != nil {
		return nil, err
	}
	info := &exportInfo{}
	var err error
	if info.structured, err = h.structuredReply(); err != nil {
		return nil, err
	}
	if info.structured && len(o.MetaContexts) > 0 {
		if info.contexts, err = h.setMetaContext(); err != nil {
			return nil, err
		}
	}
	fallback, err := h.goExport(info)
	if err != nil {
		return nil, err
	}
	if fallback {
		if err := h.exportName(info); err != nil {
			return nil, err
		}
	}
	return info, nil
}

func (h *handshaker) read(n int, what string) ([]byte, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(h.r, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("server closed the connection while sending %s", what)
		}
		return nil, fmt.Errorf("read %s: %w", what, err)
	}
	return b, nil
}

// greeting reads the server's magic and flags and sends the client flags.
func (h *handshaker) greeting() error {
	b, err := h.read(18, "its greeting")
	if err != nil {
		return fmt.Errorf("not an NBD server? %w", err)
	}
	if m := binary.BigEndian.Uint64(b); m != NBDMagic {
		return fmt.Errorf("not an NBD server: bad magic %#016x (want NBDMAGIC)", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case OptMagic:
	case CliservMagic:
		return errors.New("the server speaks oldstyle NBD negotiation, which is not supported (use a newstyle server, e.g. qemu-nbd without --old-style)")
	default:
		return fmt.Errorf("not an NBD server: bad second magic %#016x (want IHAVEOPT)", m)
	}
	flags := binary.BigEndian.Uint16(b[16:])
	if flags&FlagFixedNewstyle == 0 {
		return errors.New("the server does not offer fixed newstyle negotiation, which is required")
	}
	cf := uint32(FlagCFixedNewstyle)
	if flags&FlagNoZeroes != 0 {
		cf |= FlagCNoZeroes
		h.noZeroes = true
	}
	return h.write("client flags", binary.BigEndian.AppendUint32(nil, cf))
}

func (h *handshaker) write(what string, b []byte) error {
	if _, err := h.w.Write(b); err != nil {
		return fmt.Errorf("send %s: %w", what, err)
	}
	return nil
}

func (h *handshaker) sendOption(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 16+len(data)), OptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return h.write(optName(opt), append(b, data...))
}

// reply reads one reply to opt: its type and bounded payload.
func (h *handshaker) reply(opt uint32) (uint32, []byte, error) {
	what := "its reply to " + optName(opt)
	b, err := h.read(optReplyHeaderLen, what)
	if err != nil {
		return 0, nil, err
	}
	hdr, err := parseOptReplyHeader(b)
	if err != nil {
		return 0, nil, err
	}
	if hdr.opt != opt {
		return 0, nil, protoErr("reply to option %d while %s was asked", hdr.opt, optName(opt))
	}
	data, err := h.read(int(hdr.length), what)
	if err != nil {
		return 0, nil, err
	}
	return hdr.typ, data, nil
}

// refused is the error for an error reply to opt.
func refused(opt, typ uint32, data []byte) error {
	msg := printable(data)
	if msg != "" {
		msg = ": " + msg
	}
	return fmt.Errorf("server refused %s: %s%s", optName(opt), repName(typ), msg)
}

// unexpected is the error for a reply type that has no place here.
func unexpected(opt, typ uint32) error {
	return protoErr("%s in reply to %s", repName(typ), optName(opt))
}

// structuredReply asks for structured replies; a server that does not have
// them (or will not) is still read, with simple replies.
func (h *handshaker) structuredReply() (bool, error) {
	if err := h.sendOption(OptStructuredReply, nil); err != nil {
		return false, err
	}
	typ, data, err := h.reply(OptStructuredReply)
	switch {
	case err != nil:
		return false, err
	case typ == RepAck:
		return true, nil
	case typ == RepErrUnsup, typ == RepErrPolicy, typ == RepErrInvalid:
		return false, nil
	case typ&RepErrBit != 0:
		return false, refused(OptStructuredReply, typ, data)
	}
	return false, unexpected(OptStructuredReply, typ)
}

// appendString appends a 32-bit length and s.
func appendString(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint32(b, uint32(len(s))), s...)
}

// setMetaContext selects the meta contexts of h.o and returns those the
// server agreed to.
func (h *handshaker) setMetaContext() ([]metaContext, error) {
	data := appendString(nil, h.o.Export)
	data = binary.BigEndian.AppendUint32(data, uint32(len(h.o.MetaContexts)))
	for _, q := range h.o.MetaContexts {
		data = appendString(data, q)
	}
	if err := h.sendOption(OptSetMetaContext, data); err != nil {
		return nil, err
	}
	var out []metaContext
	for range maxOptReplies {
		typ, data, err := h.reply(OptSetMetaContext)
		switch {
		case err != nil:
			return nil, err
		case typ == RepAck:
			return out, nil
		case typ == RepMetaContext:
			if out, err = addContext(out, data); err != nil {
				return nil, err
			}
		case typ == RepErrUnsup, typ == RepErrPolicy:
			return nil, nil
		case typ == RepErrUnknown:
			return nil, fmt.Errorf("export %q not found on the server", h.o.Export)
		case typ&RepErrBit != 0:
			return nil, refused(OptSetMetaContext, typ, data)
		default:
			return nil, unexpected(OptSetMetaContext, typ)
		}
	}
	return nil, protoErr("more than %d replies to %s", maxOptReplies, optName(OptSetMetaContext))
}

func addContext(have []metaContext, data []byte) ([]metaContext, error) {
	id, name, err := parseMetaContext(data)
	if err != nil {
		return nil, err
	}
	if len(have) >= maxContexts {
		return nil, protoErr("more than %d meta contexts agreed", maxContexts)
	}
	for _, c := range have {
		if c.id == id || c.name == name {
			return nil, protoErr("meta context %q (ID %d) agreed twice", name, id)
		}
	}
	return append(have, metaContext{id: id, name: name}), nil
}

// goExport sends NBD_OPT_GO asking for the block size constraints, and
// fills info from the replies. It says fallback when the server does not
// know NBD_OPT_GO, so NBD_OPT_EXPORT_NAME must be used.
func (h *handshaker) goExport(info *exportInfo) (fallback bool, err error) {
	data := appendString(nil, h.o.Export)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, InfoBlockSize)
	if err := h.sendOption(OptGo, data); err != nil {
		return false, err
	}
	gotExport := false
	for range maxOptReplies {
		typ, data, err := h.reply(OptGo)
		switch {
		case err != nil:
			return false, err
		case typ == RepInfo:
			if err := h.info(info, data, &gotExport); err != nil {
				return false, err
			}
		case typ == RepAck:
			if !gotExport {
				return false, protoErr("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return false, nil
		case typ == RepErrUnsup:
			return true, nil
		case typ == RepErrUnknown:
			return false, fmt.Errorf("export %q not found on the server%s", h.o.Export, serverSays(data))
		case typ&RepErrBit != 0:
			return false, refused(OptGo, typ, data)
		default:
			return false, unexpected(OptGo, typ)
		}
	}
	return false, protoErr("more than %d replies to %s", maxOptReplies, optName(OptGo))
}

func serverSays(data []byte) string {
	if msg := printable(data); msg != "" {
		return " (server says: " + msg + ")"
	}
	return ""
}

// info records one NBD_REP_INFO; types we did not ask for are ignored.
func (h *handshaker) info(info *exportInfo, data []byte, gotExport *bool) error {
	if len(data) < 2 {
		return protoErr("NBD_REP_INFO of %d bytes", len(data))
	}
	var err error
	switch binary.BigEndian.Uint16(data) {
	case InfoExport:
		info.size, info.flags, err = parseInfoExport(data[2:])
		*gotExport = err == nil
	case InfoBlockSize:
		info.blocks, err = parseBlockSize(data[2:])
		info.hasBlocks = err == nil
	}
	return err
}

// exportName enters transmission with the old NBD_OPT_EXPORT_NAME, whose
// only answer to an unknown export is a closed connection.
func (h *handshaker) exportName(info *exportInfo) error {
	if err := h.sendOption(OptExportName, []byte(h.o.Export)); err != nil {
		return err
	}
	n := 10
	if !h.noZeroes {
		n += 124
	}
	b, err := h.read(n, "the export's size")
	if err != nil {
		return fmt.Errorf("export %q: %w (no such export?)", h.o.Export, err)
	}
	info.size, info.flags, err = parseExportSize(b)
	return err
}

// maxRequest is the largest read to send: the server's maximum block size,
// at most 32 MiB and at most limit when limit > 0, a multiple of the
// minimum block size.
func (info *exportInfo) maxRequest(limit int) int64 {
	m := int64(defaultMaxRequest)
	if info.hasBlocks && info.blocks.max != math.MaxUint32 {
		m = min(m, int64(info.blocks.max))
	}
	if limit > 0 {
		m = min(m, int64(limit))
	}
	a := info.align()
	return max(m/a*a, a)
}

// align is the minimum block size every request's offset and length keep.
func (info *exportInfo) align() int64 {
	if info.hasBlocks {
		return int64(info.blocks.min)
	}
	return 1
}
