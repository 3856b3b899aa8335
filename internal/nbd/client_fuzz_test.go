package nbd

import (
	"bufio"
	"bytes"
	"io"
	"testing"
)

// FuzzHandshake feeds the client's handshake arbitrary server bytes: it
// must end (the input does), never panic, and accept only sane exports.
func FuzzHandshake(f *testing.F) {
	f.Add(goodHandshake(1 << 20))
	f.Add(goodHandshake(1 << 20)[:60])
	fallback := greetingMsg(FlagFixedNewstyle)
	fallback = append(fallback, optReplyMsg(OptStructuredReply, RepErrUnsup, nil)...)
	fallback = append(fallback, optReplyMsg(OptGo, RepErrUnsup, []byte("old"))...)
	f.Add(append(be16(be64(fallback, 1<<30), TFlagHasFlags), make([]byte, 124)...))
	unknown := greetingMsg(FlagFixedNewstyle | FlagNoZeroes)
	unknown = append(unknown, optReplyMsg(OptStructuredReply, RepAck, nil)...)
	f.Add(append(unknown, optReplyMsg(OptSetMetaContext, RepErrUnknown, []byte("no export"))...))
	f.Add(append(be64(be64(nil, NBDMagic), CliservMagic), make([]byte, 134)...))
	f.Add([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
	o := Options{Export: "e", MetaContexts: []string{"base:allocation", "qemu:dirty-bitmap:b"}}
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := handshake(bytes.NewReader(b), io.Discard, o)
		if err != nil {
			return
		}
		if info.size < 0 || len(info.contexts) > maxContexts {
			t.Fatalf("accepted size %d, %d contexts", info.size, len(info.contexts))
		}
		a, m := info.align(), info.maxRequest(0)
		if a < 1 || a&(a-1) != 0 || m < a || m%a != 0 || m > defaultMaxRequest {
			t.Fatalf("alignment %d, maximum request %d", a, m)
		}
	})
}

// FuzzReply feeds the reply reader arbitrary server bytes with a read and
// a block status pending: it must never panic, and a request it
// completes without error must have got all it asked.
func FuzzReply(f *testing.F) {
	data := bytes.Repeat([]byte{7}, 8192)
	f.Add(append([]byte{1}, dataChunk(ReplyFlagDone, 1, 4096, data)...))
	two := append(holeChunk(0, 1, 4096, 4096), dataChunk(0, 1, 8192, data[:4096])...)
	two = append(two, noneChunk(1)...)
	f.Add(append([]byte{1}, two...))
	st := append(statusChunk(0, 2, 2, 65536, 1), statusChunk(ReplyFlagDone, 2, 1, 4096, 3, 8192, 0)...)
	f.Add(append([]byte{1}, st...))
	f.Add(append([]byte{1}, errorChunkMsg(ReplyFlagDone, 1, ErrnoIO, "bad", 5000)...))
	f.Add(append([]byte{0}, append(simpleMsg(0, 1), data...)...))
	f.Add(append([]byte{0}, simpleMsg(ErrnoInval, 2)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		info := &exportInfo{size: 1 << 20, structured: b[0]&1 != 0,
			contexts: []metaContext{{1, "base:allocation"}, {2, "qemu:dirty-bitmap:b"}}}
		c := newClient(nil, "fuzz", info, Options{})
		rd := &request{cmd: CmdRead, off: 4096, length: 8192, buf: make([]byte, 8192), done: make(chan struct{})}
		bs := &request{cmd: CmdBlockStatus, off: 0, length: 65536, ctxID: 1, done: make(chan struct{})}
		c.pending[1], c.pending[2] = rd, bs
		br := bufio.NewReader(bytes.NewReader(b[1:]))
		for c.readReply(br) == nil {
		}
		if isDone(rd) && rd.err == nil && info.structured && rd.got.total != int64(rd.length) {
			t.Fatalf("read done with %d of %d bytes", rd.got.total, rd.length)
		}
		if isDone(bs) && bs.err == nil {
			pos := bs.off
			for i, e := range bs.extents {
				if e.Offset != pos || e.Length <= 0 || i < len(bs.extents)-1 && e.End() >= bs.off+int64(bs.length) {
					t.Fatalf("extents %v for [%d, +%d)", bs.extents, bs.off, bs.length)
				}
				pos = e.End()
			}
			if len(bs.extents) == 0 {
				t.Fatal("block status done without extents")
			}
		}
	})
}

func isDone(r *request) bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}
