package nbd

import "encoding/binary"

// Builders of server messages, for the fake server and the fuzz seeds.

func be16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func be32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func be64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// greetingMsg is a fixed newstyle greeting with handshake flags.
func greetingMsg(flags uint16) []byte {
	return be16(be64(be64(nil, NBDMagic), OptMagic), flags)
}

func optReplyMsg(opt, typ uint32, data []byte) []byte {
	b := be32(be32(be32(be64(nil, RepMagic), opt), typ), uint32(len(data)))
	return append(b, data...)
}

func infoExportMsg(size uint64, flags uint16) []byte {
	return optReplyMsg(OptGo, RepInfo, be16(be64(be16(nil, InfoExport), size), flags))
}

func infoBlockSizeMsg(minB, pref, maxB uint32) []byte {
	return optReplyMsg(OptGo, RepInfo, be32(be32(be32(be16(nil, InfoBlockSize), minB), pref), maxB))
}

func metaContextMsg(id uint32, name string) []byte {
	return optReplyMsg(OptSetMetaContext, RepMetaContext, append(be32(nil, id), name...))
}

func chunkMsg(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := be32(be64(be16(be16(be32(nil, StructuredReplyMagic), flags), typ), cookie), uint32(len(payload)))
	return append(b, payload...)
}

func dataChunk(flags uint16, cookie, off uint64, data []byte) []byte {
	return chunkMsg(flags, ChunkOffsetData, cookie, append(be64(nil, off), data...))
}

func holeChunk(flags uint16, cookie, off uint64, n uint32) []byte {
	return chunkMsg(flags, ChunkOffsetHole, cookie, be32(be64(nil, off), n))
}

func statusChunk(flags uint16, cookie uint64, id uint32, exts ...uint32) []byte {
	b := be32(nil, id)
	for _, e := range exts {
		b = be32(b, e)
	}
	return chunkMsg(flags, ChunkBlockStatus, cookie, b)
}

func errorChunkMsg(flags uint16, cookie uint64, errno uint32, msg string, off int64) []byte {
	b := append(be16(be32(nil, errno), uint16(len(msg))), msg...)
	typ := uint16(ChunkError)
	if off >= 0 {
		b, typ = be64(b, uint64(off)), ChunkErrorOffset
	}
	return chunkMsg(flags, typ, cookie, b)
}

func noneChunk(cookie uint64) []byte { return chunkMsg(ReplyFlagDone, ChunkNone, cookie, nil) }

func simpleMsg(errno uint32, cookie uint64) []byte {
	return be64(be32(be32(nil, SimpleReplyMagic), errno), cookie)
}

// goodHandshake is a server's side of a successful handshake with one
// agreed meta context, for a client that asks for one.
func goodHandshake(size uint64) []byte {
	b := greetingMsg(FlagFixedNewstyle | FlagNoZeroes)
	b = append(b, optReplyMsg(OptStructuredReply, RepAck, nil)...)
	b = append(b, metaContextMsg(1, "base:allocation")...)
	b = append(b, optReplyMsg(OptSetMetaContext, RepAck, nil)...)
	b = append(b, infoExportMsg(size, TFlagHasFlags|TFlagReadOnly)...)
	b = append(b, infoBlockSizeMsg(512, 4096, 1<<20)...)
	return append(b, optReplyMsg(OptGo, RepAck, nil)...)
}
