// Package nbd speaks the Network Block Device protocol (the NBD project's
// doc/proto.md): today a client that reads exports, which sauve uses to
// read a running QEMU VM's fleecing exports with their allocation and
// dirty-bitmap maps.
//
// It is written by hand: the maintained clients are libnbd (C; its Go
// bindings need cgo and libnbd on every host, which a static sauve binary
// must not require) and a few Go packages that stop at the old handshake
// or at simple replies, without structured replies or block status. The
// part of the protocol a reader needs is small: the fixed newstyle
// handshake, NBD_OPT_GO, structured replies and NBD_CMD_BLOCK_STATUS.
package nbd

// Protocol constants (doc/proto.md).
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic      = 0x49484156454f5054 // "IHAVEOPT"
	oldstyleMagic = 0x0000420281861253
	replyMagic    = 0x0003e889045565a9 // option replies

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName     = 1
	optAbort          = 2
	optGo             = 7
	optStructuredRepl = 8
	optSetMetaContext = 10

	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrUnknown  = repErrBit | 6

	infoExport    = 0
	infoBlockSize = 3

	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef

	cmdRead        = 0
	cmdDisc        = 2
	cmdBlockStatus = 7

	replyFlagDone   = 1 << 0
	chunkNone       = 0
	chunkOffsetData = 1
	chunkOffsetHole = 2
	chunkBlockStat  = 5
	chunkErrBit     = 1 << 15
	chunkError      = chunkErrBit | 1
	chunkErrorOff   = chunkErrBit | 2
)

// StateHole and StateZero are the flags of the base:allocation context: a
// range not allocated, a range that reads as zeros. In a
// qemu:dirty-bitmap context, flag 1 marks a dirty range.
const (
	StateHole = 1
	StateZero = 2
)

// Limits on what the client accepts from a server.
const (
	maxOptReply   = 64 << 10 // an option reply's payload
	maxErrMessage = 4 << 10
	defaultMaxReq = 32 << 20 // largest request when the server names none
	maxBlockDescs = 1 << 20  // descriptors in one block status chunk
)

// errnoName names the NBD error values (doc/proto.md, "Error values").
func errnoName(e uint32) string {
	switch e {
	case 1:
		return "EPERM"
	case 5:
		return "EIO"
	case 12:
		return "ENOMEM"
	case 22:
		return "EINVAL"
	case 28:
		return "ENOSPC"
	case 75:
		return "EOVERFLOW"
	case 95:
		return "ENOTSUP"
	case 108:
		return "ESHUTDOWN"
	}
	return "error"
}
