package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Magic numbers of the handshake and of transmission messages.
const (
	NBDMagic             = 0x4e42444d41474943 // "NBDMAGIC"
	OptMagic             = 0x49484156454f5054 // "IHAVEOPT"
	CliservMagic         = 0x00420281861253   // oldstyle negotiation
	RepMagic             = 0x0003e889045565a9 // option replies
	RequestMagic         = 0x25609513
	SimpleReplyMagic     = 0x67446698
	StructuredReplyMagic = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle  = 1 << 0
	FlagNoZeroes       = 1 << 1
	FlagCFixedNewstyle = 1 << 0
	FlagCNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	TFlagHasFlags    = 1 << 0
	TFlagReadOnly    = 1 << 1
	TFlagSendFlush   = 1 << 2
	TFlagSendFUA     = 1 << 3
	TFlagRotational  = 1 << 4
	TFlagSendTrim    = 1 << 5
	TFlagWriteZeroes = 1 << 6
	TFlagSendDF      = 1 << 7
	TFlagMultiConn   = 1 << 8
	TFlagSendCache   = 1 << 10
	TFlagFastZero    = 1 << 11
)

// Options of the handshake.
const (
	OptExportName      = 1
	OptAbort           = 2
	OptList            = 3
	OptStartTLS        = 5
	OptInfo            = 6
	OptGo              = 7
	OptStructuredReply = 8
	OptListMetaContext = 9
	OptSetMetaContext  = 10
)

// Option reply types; errors have bit 31 set.
const (
	RepAck              = 1
	RepServer           = 2
	RepInfo             = 3
	RepMetaContext      = 4
	RepErrBit           = 1 << 31
	RepErrUnsup         = RepErrBit + 1
	RepErrPolicy        = RepErrBit + 2
	RepErrInvalid       = RepErrBit + 3
	RepErrPlatform      = RepErrBit + 4
	RepErrTLSReqd       = RepErrBit + 5
	RepErrUnknown       = RepErrBit + 6
	RepErrShutdown      = RepErrBit + 7
	RepErrBlockSizeReqd = RepErrBit + 8
	RepErrTooBig        = RepErrBit + 9
)

// Information types of NBD_REP_INFO.
const (
	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3
)

// Commands and command flags.
const (
	CmdRead         = 0
	CmdWrite        = 1
	CmdDisc         = 2
	CmdFlush        = 3
	CmdTrim         = 4
	CmdCache        = 5
	CmdWriteZeroes  = 6
	CmdBlockStatus  = 7
	CmdFlagFUA      = 1 << 0 // command flags from here on
	CmdFlagNoHole   = 1 << 1
	CmdFlagDF       = 1 << 2
	CmdFlagReqOne   = 1 << 3
	CmdFlagFastZero = 1 << 4
)

// Structured reply flags and chunk types; error chunks have bit 15 set.
const (
	ReplyFlagDone = 1 << 0

	ChunkNone        = 0
	ChunkOffsetData  = 1
	ChunkOffsetHole  = 2
	ChunkBlockStatus = 5
	ChunkErrBit      = 1 << 15
	ChunkError       = ChunkErrBit + 1
	ChunkErrorOffset = ChunkErrBit + 2
)

// Error values of replies.
const (
	ErrnoPerm     = 1
	ErrnoIO       = 5
	ErrnoNoMem    = 12
	ErrnoInval    = 22
	ErrnoNoSpc    = 28
	ErrnoOverflow = 75
	ErrnoNotSup   = 95
	ErrnoShutdown = 108
)

// Flags of the base:allocation context, and of qemu:dirty-bitmap contexts.
const (
	// StateHole says the extent is not allocated on the server.
	StateHole = 1
	// StateZero says the extent reads as zeros.
	StateZero = 2
	// StateDirty says a qemu:dirty-bitmap extent was written since the
	// bitmap was started.
	StateDirty = 1
)

// Bounds on what the wire may make us hold.
const (
	// maxString is the protocol's limit on names and messages.
	maxString = 4096
	// maxOptReply caps an option reply's payload: the largest one we
	// expect is a meta context name.
	maxOptReply = 64 << 10
	// maxOptReplies caps the replies to one option, so a server cannot
	// keep the handshake going for ever with NBD_REP_INFO.
	maxOptReplies = 1024
	// maxContexts caps the meta contexts asked for and agreed.
	maxContexts = 64
	// defaultMaxRequest is the read size every server must accept when
	// it advertises no maximum block size; we never ask more at once.
	defaultMaxRequest = 32 << 20
	// maxErrorChunk caps an error chunk's payload: a 16-bit message
	// length plus fixed fields.
	maxErrorChunk = 6 + 0xffff + 8
	// maxStatusChunk caps a block status chunk (qemu sends at most 1 MiB
	// of descriptors).
	maxStatusChunk = 4 + 8*(512<<10)
	// maxFragments caps the disjoint pieces a read reply may arrive in
	// before they join up, so tracking them stays small.
	maxFragments = 4096
	// maxStatusLength is the largest block status request length.
	maxStatusLength = 0xffffffff
)

// ErrProtocol is wrapped by every error that says the server broke the NBD
// protocol; the connection is dead after one.
var ErrProtocol = errors.New("NBD protocol violation")

// ErrClosed is returned for requests made after Close, and by requests
// still waiting when Close was called.
var ErrClosed = errors.New("nbd: client closed")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// ServerError is an error the server replied to a request with.
type ServerError struct {
	// Errno is the NBD error value (EIO is 5, EINVAL 22...).
	Errno uint32
	// Offset is where the error happened, -1 when the server did not say.
	Offset int64
	// Message is the server's text, if any.
	Message string
}

func (e *ServerError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "server error %s (errno %d)", errnoName(e.Errno), e.Errno)
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " at offset %d", e.Offset)
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	return b.String()
}

func errnoName(e uint32) string {
	switch e {
	case ErrnoPerm:
		return "EPERM"
	case ErrnoIO:
		return "EIO"
	case ErrnoNoMem:
		return "ENOMEM"
	case ErrnoInval:
		return "EINVAL"
	case ErrnoNoSpc:
		return "ENOSPC"
	case ErrnoOverflow:
		return "EOVERFLOW"
	case ErrnoNotSup:
		return "ENOTSUP"
	case ErrnoShutdown:
		return "ESHUTDOWN"
	}
	return "unknown error"
}

func repName(t uint32) string {
	switch t {
	case RepAck:
		return "NBD_REP_ACK"
	case RepServer:
		return "NBD_REP_SERVER"
	case RepInfo:
		return "NBD_REP_INFO"
	case RepMetaContext:
		return "NBD_REP_META_CONTEXT"
	case RepErrUnsup:
		return "NBD_REP_ERR_UNSUP (not supported)"
	case RepErrPolicy:
		return "NBD_REP_ERR_POLICY (forbidden by policy)"
	case RepErrInvalid:
		return "NBD_REP_ERR_INVALID (invalid)"
	case RepErrPlatform:
		return "NBD_REP_ERR_PLATFORM (not supported on the server's platform)"
	case RepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD (the server requires TLS)"
	case RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN (no such export)"
	case RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN (the server is shutting down)"
	case RepErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case RepErrTooBig:
		return "NBD_REP_ERR_TOO_BIG (too large)"
	}
	return fmt.Sprintf("reply type %#x", t)
}

func optName(o uint32) string {
	switch o {
	case OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case OptGo:
		return "NBD_OPT_GO"
	case OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option %d", o)
}

// printable makes a server's message safe to put in an error line: valid
// UTF-8, no control characters, not too long.
func printable(b []byte) string {
	const limit = 200
	var s strings.Builder
	for i, r := range strings.ToValidUTF8(string(b), "\uFFFD") {
		if i >= limit {
			s.WriteString("...")
			break
		}
		if r < 0x20 || r == 0x7f {
			r = ' '
		}
		s.WriteRune(r)
	}
	return strings.TrimSpace(s.String())
}

// optReplyHeader is the fixed part of an option reply.
type optReplyHeader struct {
	opt, typ, length uint32
}

const optReplyHeaderLen = 20

func parseOptReplyHeader(b []byte) (optReplyHeader, error) {
	if m := binary.BigEndian.Uint64(b); m != RepMagic {
		return optReplyHeader{}, fmt.Errorf("bad option reply magic %#x: not an NBD server, or out of step", m)
	}
	h := optReplyHeader{
		opt:    binary.BigEndian.Uint32(b[8:]),
		typ:    binary.BigEndian.Uint32(b[12:]),
		length: binary.BigEndian.Uint32(b[16:]),
	}
	if h.length > maxOptReply {
		return h, protoErr("%s reply of %d bytes exceeds the %d-byte limit", optName(h.opt), h.length, maxOptReply)
	}
	return h, nil
}

// blockSizes are an export's block size constraints.
type blockSizes struct {
	min, preferred, max uint32
}

// parseBlockSize parses the payload of NBD_INFO_BLOCK_SIZE after its type.
func parseBlockSize(b []byte) (blockSizes, error) {
	if len(b) != 12 {
		return blockSizes{}, protoErr("NBD_INFO_BLOCK_SIZE of %d bytes, want 12", len(b)+2)
	}
	bs := blockSizes{
		min:       binary.BigEndian.Uint32(b),
		preferred: binary.BigEndian.Uint32(b[4:]),
		max:       binary.BigEndian.Uint32(b[8:]),
	}
	if bs.min == 0 || bs.min&(bs.min-1) != 0 || bs.min > 64<<10 {
		return bs, protoErr("minimum block size %d is not a power of 2 up to 64 KiB", bs.min)
	}
	if bs.max < bs.min || bs.max != maxStatusLength && bs.max%bs.min != 0 {
		return bs, protoErr("maximum block size %d is not a multiple of the minimum %d", bs.max, bs.min)
	}
	return bs, nil
}

// parseInfoExport parses the payload of NBD_INFO_EXPORT after its type.
func parseInfoExport(b []byte) (size int64, flags uint16, err error) {
	if len(b) != 10 {
		return 0, 0, protoErr("NBD_INFO_EXPORT of %d bytes, want 12", len(b)+2)
	}
	return parseExportSize(b)
}

// parseExportSize parses the export size and transmission flags.
func parseExportSize(b []byte) (int64, uint16, error) {
	size := binary.BigEndian.Uint64(b)
	if size > 1<<62 {
		return 0, 0, protoErr("export size %d is out of range", size)
	}
	return int64(size), binary.BigEndian.Uint16(b[8:]), nil
}

// parseMetaContext parses an NBD_REP_META_CONTEXT payload.
func parseMetaContext(b []byte) (uint32, string, error) {
	if len(b) < 5 || len(b) > 4+maxString {
		return 0, "", protoErr("NBD_REP_META_CONTEXT of %d bytes", len(b))
	}
	name := b[4:]
	if !utf8.Valid(name) {
		return 0, "", protoErr("meta context name is not UTF-8")
	}
	return binary.BigEndian.Uint32(b), string(name), nil
}

// chunkHeader is a structured reply chunk's header after its magic.
type chunkHeader struct {
	flags, typ uint16
	cookie     uint64
	length     uint32
}

const chunkHeaderLen = 16 // after the magic

func parseChunkHeader(b []byte) chunkHeader {
	return chunkHeader{
		flags:  binary.BigEndian.Uint16(b),
		typ:    binary.BigEndian.Uint16(b[2:]),
		cookie: binary.BigEndian.Uint64(b[4:]),
		length: binary.BigEndian.Uint32(b[12:]),
	}
}

// parseErrorChunk parses the payload of an error chunk of type typ:
// error, message and, for NBD_REPLY_TYPE_ERROR_OFFSET, the offset.
func parseErrorChunk(typ uint16, b []byte) (*ServerError, error) {
	if len(b) < 6 {
		return nil, protoErr("error chunk of %d bytes", len(b))
	}
	e := &ServerError{Errno: binary.BigEndian.Uint32(b), Offset: -1}
	n := int(binary.BigEndian.Uint16(b[4:]))
	if n > len(b)-6 {
		return nil, protoErr("error message of %d bytes in a %d-byte chunk", n, len(b))
	}
	e.Message = printable(b[6 : 6+n])
	if e.Errno == 0 {
		return nil, protoErr("error chunk with error value 0")
	}
	if typ == ChunkErrorOffset {
		rest := b[6+n:]
		if len(rest) != 8 {
			return nil, protoErr("NBD_REPLY_TYPE_ERROR_OFFSET with %d bytes after its message, want 8", len(rest))
		}
		off := binary.BigEndian.Uint64(rest)
		if off > 1<<62 {
			return nil, protoErr("error offset %d is out of range", off)
		}
		e.Offset = int64(off)
	} else if typ != ChunkError {
		e.Message = strings.TrimSpace(fmt.Sprintf("unknown error chunk type %#x %s", typ, e.Message))
	}
	return e, nil
}

// parseDescriptor parses the block status descriptor b of a request for
// [start, start+reqLen): the extent at pos, where the previous one ended.
// Only the final extent may reach past the request, so every descriptor
// must start within it.
func parseDescriptor(b []byte, start, pos int64, reqLen uint32) (Extent, error) {
	l := binary.BigEndian.Uint32(b)
	if l == 0 {
		return Extent{}, protoErr("block status extent of length 0")
	}
	if pos-start >= int64(reqLen) {
		return Extent{}, protoErr("block status extents reach past the %d bytes asked", reqLen)
	}
	return Extent{Offset: pos, Length: int64(l), Flags: binary.BigEndian.Uint32(b[4:])}, nil
}
