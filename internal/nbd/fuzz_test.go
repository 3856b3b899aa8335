package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// handshakeSeed is a server's side of a good negotiation: greeting,
// structured replies acknowledged, one meta context, an export of 1 MiB.
func handshakeSeed() []byte {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	rep := func(opt, typ uint32, data []byte) {
		b = binary.BigEndian.AppendUint64(b, replyMagic)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
	}
	rep(optStructuredRepl, repAck, nil)
	rep(optSetMetaContext, repMetaContext, append([]byte{0, 0, 0, 1}, "base:allocation"...))
	rep(optSetMetaContext, repAck, nil)
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, 1<<20)
	info = binary.BigEndian.AppendUint16(info, 1)
	rep(optGo, repInfo, info)
	rep(optGo, repAck, nil)
	return b
}

func FuzzHandshake(f *testing.F) {
	f.Add(handshakeSeed())
	f.Add([]byte("NBDMAGIC"))
	f.Add(handshakeSeed()[:40])
	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		go func() {
			server.Write(data)
			server.Close()
		}()
		go io.Copy(io.Discard, server)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := open(ctx, client, "fuzz", Options{MetaContexts: []string{"base:allocation"}})
		if err == nil {
			if c.Size() < 0 || c.maxReq < 512 || c.maxReq > defaultMaxReq {
				t.Fatalf("size %d, max request %d", c.Size(), c.maxReq)
			}
			c.Close()
		}
	})
}

// replySeed is a structured reply to a read of 4 KiB at 0 (cookie 1) in
// two chunks, and a block status reply (cookie 2).
func replySeed() []byte {
	var b []byte
	chunk := func(flags, typ uint16, cookie uint64, payload []byte) {
		b = binary.BigEndian.AppendUint32(b, structuredMagic)
		b = binary.BigEndian.AppendUint16(b, flags)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, cookie)
		b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
		b = append(b, payload...)
	}
	data := binary.BigEndian.AppendUint64(nil, 0)
	data = append(data, bytes.Repeat([]byte{9}, 2048)...)
	chunk(0, chunkOffsetData, 1, data)
	hole := binary.BigEndian.AppendUint64(nil, 2048)
	hole = binary.BigEndian.AppendUint32(hole, 2048)
	chunk(replyFlagDone, chunkOffsetHole, 1, hole)
	bs := binary.BigEndian.AppendUint32(nil, 1)
	bs = binary.BigEndian.AppendUint32(bs, 4096)
	bs = binary.BigEndian.AppendUint32(bs, StateZero)
	chunk(replyFlagDone, chunkBlockStat, 2, bs)
	return b
}

func FuzzReplies(f *testing.F) {
	f.Add(replySeed())
	f.Add([]byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &Client{calls: map[uint64]*call{}}
		read := &call{typ: cmdRead, off: 0, length: 4096, buf: make([]byte, 4096), done: make(chan struct{})}
		bs := &call{typ: cmdBlockStatus, off: 0, length: 4096, ctxID: 1, done: make(chan struct{})}
		c.calls[1], c.calls[2] = read, bs
		r := bytes.NewReader(data)
		for r.Len() > 0 {
			if err := c.readReply(r); err != nil {
				break
			}
		}
		if read.covered > read.length {
			t.Fatalf("covered %d of %d", read.covered, read.length)
		}
		var sum int64
		for _, e := range bs.extents {
			if e.Length <= 0 {
				t.Fatalf("extent %+v", e)
			}
			sum += e.Length
		}
		if len(bs.extents) > maxBlockDescs {
			t.Fatalf("%d extents", len(bs.extents))
		}
	})
}
