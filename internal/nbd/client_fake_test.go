package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeServer is a scripted NBD server for what qemu never does: simple
// replies, no NBD_OPT_GO, odd block sizes, broken replies. Its defaults
// serve data correctly; the hooks break it.
type fakeServer struct {
	data       []byte
	export     string
	structured bool
	noGo       bool
	noZeroes   bool
	minBlock   uint32 // 0: no NBD_INFO_BLOCK_SIZE
	maxBlock   uint32
	contexts   []string // the contexts it knows, ID 10+i
	// options, when set, answers the option phase after the greeting;
	// it returns whether transmission follows.
	options func(conn net.Conn) bool
	// read, when set, answers the nth read (from 0) instead.
	read func(w io.Writer, r fakeReq, n int)
	// status, when set, gives the (length, flags) pairs of a block
	// status reply for [off, off+length).
	status func(r fakeReq) []uint32

	reads    atomic.Int32
	agreed   []uint32
	agreedMu sync.Mutex
}

type fakeReq struct {
	flags, typ uint16
	cookie     uint64
	off        uint64
	length     uint32
}

// start serves fs on a unix socket and returns its path.
func (fs *fakeServer) start(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			wg.Go(func() { fs.serve(conn) })
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return sock
}

func (fs *fakeServer) serve(conn net.Conn) {
	defer conn.Close()
	flags := uint16(FlagFixedNewstyle)
	if fs.noZeroes {
		flags |= FlagNoZeroes
	}
	conn.Write(greetingMsg(flags))
	var cf [4]byte
	if _, err := io.ReadFull(conn, cf[:]); err != nil {
		return
	}
	if fs.options != nil {
		if !fs.options(conn) {
			return
		}
	} else if !fs.negotiate(conn, binary.BigEndian.Uint32(cf[:])&FlagCNoZeroes != 0) {
		return
	}
	fs.transmit(conn)
}

func (fs *fakeServer) negotiate(conn net.Conn, noZeroes bool) bool {
	for {
		var h [16]byte
		if _, err := io.ReadFull(conn, h[:]); err != nil {
			return false
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(conn, data); err != nil {
			return false
		}
		switch {
		case opt == OptStructuredReply && fs.structured:
			conn.Write(optReplyMsg(opt, RepAck, nil))
		case opt == OptSetMetaContext:
			fs.setMeta(conn, data)
		case opt == OptGo && !fs.noGo:
			n := binary.BigEndian.Uint32(data)
			if string(data[4:4+n]) != fs.export {
				conn.Write(optReplyMsg(opt, RepErrUnknown, []byte("no such export")))
				continue
			}
			conn.Write(infoExportMsg(uint64(len(fs.data)), TFlagHasFlags|TFlagReadOnly))
			if fs.minBlock > 0 {
				conn.Write(infoBlockSizeMsg(fs.minBlock, max(fs.minBlock, 4096), fs.maxBlock))
			}
			conn.Write(optReplyMsg(opt, RepAck, nil))
			return true
		case opt == OptExportName:
			if string(data) != fs.export {
				return false
			}
			b := be16(be64(nil, uint64(len(fs.data))), TFlagHasFlags)
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			conn.Write(b)
			return true
		default:
			conn.Write(optReplyMsg(opt, RepErrUnsup, nil))
		}
	}
}

func (fs *fakeServer) setMeta(conn net.Conn, data []byte) {
	n := binary.BigEndian.Uint32(data)
	rest := data[4+n:]
	count := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	fs.agreedMu.Lock()
	defer fs.agreedMu.Unlock()
	fs.agreed = nil
	for range count {
		l := binary.BigEndian.Uint32(rest)
		q := string(rest[4 : 4+l])
		rest = rest[4+l:]
		for i, c := range fs.contexts {
			if c == q {
				conn.Write(metaContextMsg(uint32(10+i), c))
				fs.agreed = append(fs.agreed, uint32(10+i))
			}
		}
	}
	conn.Write(optReplyMsg(OptSetMetaContext, RepAck, nil))
}

func (fs *fakeServer) transmit(conn net.Conn) {
	for {
		var b [28]byte
		if _, err := io.ReadFull(conn, b[:]); err != nil {
			return
		}
		r := fakeReq{
			flags:  binary.BigEndian.Uint16(b[4:]),
			typ:    binary.BigEndian.Uint16(b[6:]),
			cookie: binary.BigEndian.Uint64(b[8:]),
			off:    binary.BigEndian.Uint64(b[16:]),
			length: binary.BigEndian.Uint32(b[24:]),
		}
		if binary.BigEndian.Uint32(b[:]) != RequestMagic || r.typ == CmdDisc {
			return
		}
		if fs.misaligned(r) {
			conn.Write(fs.fail(r, ErrnoInval))
			continue
		}
		switch r.typ {
		case CmdRead:
			n := int(fs.reads.Add(1)) - 1
			if fs.read != nil {
				fs.read(conn, r, n)
			} else {
				conn.Write(fs.readReply(r))
			}
		case CmdBlockStatus:
			conn.Write(fs.statusReply(r))
		default:
			conn.Write(fs.fail(r, ErrnoInval))
		}
	}
}

// misaligned says r breaks the advertised block size constraints.
func (fs *fakeServer) misaligned(r fakeReq) bool {
	if r.off+uint64(r.length) > uint64(len(fs.data)) {
		return true
	}
	if fs.minBlock == 0 {
		return false
	}
	m := uint64(fs.minBlock)
	tail := r.off+uint64(r.length) == uint64(len(fs.data)) // the export's last, partial block
	return r.off%m != 0 || uint64(r.length)%m != 0 && !tail || r.typ == CmdRead && r.length > fs.maxBlock
}

func (fs *fakeServer) fail(r fakeReq, errno uint32) []byte {
	if !fs.structured {
		return simpleMsg(errno, r.cookie)
	}
	return errorChunkMsg(ReplyFlagDone, r.cookie, errno, "refused", -1)
}

func (fs *fakeServer) readReply(r fakeReq) []byte {
	data := fs.data[r.off : r.off+uint64(r.length)]
	if !fs.structured {
		return append(simpleMsg(0, r.cookie), data...)
	}
	return dataChunk(ReplyFlagDone, r.cookie, r.off, data)
}

func (fs *fakeServer) statusReply(r fakeReq) []byte {
	exts := []uint32{r.length, 0}
	if fs.status != nil {
		exts = fs.status(r)
	}
	fs.agreedMu.Lock()
	ids := fs.agreed
	fs.agreedMu.Unlock()
	var b []byte
	for i, id := range ids {
		flags := uint16(0)
		if i == len(ids)-1 {
			flags = ReplyFlagDone
		}
		b = append(b, statusChunk(flags, r.cookie, id, exts...)...)
	}
	return b
}

func randomData(n int, seed uint64) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

func dialFake(t *testing.T, sock string, o Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkReads reads random ranges of c, some past its end, and compares
// them with want.
func checkReads(t *testing.T, c *Client, want []byte, count, maxLen int, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	for range count {
		off := rng.IntN(len(want))
		n := 1 + rng.IntN(maxLen)
		buf := bytes.Repeat([]byte{0xee}, n)
		got, err := c.ReadAt(buf, int64(off))
		wantN := min(n, len(want)-off)
		if got != wantN || (wantN < n) != errors.Is(err, io.EOF) || err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v; want %d bytes", n, off, got, err, wantN)
		}
		if !bytes.Equal(buf[:got], want[off:off+got]) {
			t.Fatalf("ReadAt(%d bytes at %d) returned other bytes than the export's", n, off)
		}
	}
}

func TestFakeServerModes(t *testing.T) {
	data := randomData(3<<20+777, 1)
	tests := []struct {
		name     string
		fs       *fakeServer
		o        Options
		contexts []string
	}{
		{"structured, go, block sizes", &fakeServer{structured: true, minBlock: 512, maxBlock: 128 << 10, contexts: []string{"base:allocation"}},
			Options{MetaContexts: []string{"base:allocation", "qemu:nope"}}, []string{"base:allocation"}},
		{"simple replies", &fakeServer{contexts: []string{"base:allocation"}},
			Options{MetaContexts: []string{"base:allocation"}}, []string{}},
		{"export name fallback, no zeroes", &fakeServer{structured: true, noGo: true, noZeroes: true, export: "disk"},
			Options{Export: "disk"}, []string{}},
		{"export name fallback, zero padding, simple replies", &fakeServer{noGo: true, export: "disk"},
			Options{Export: "disk"}, []string{}},
		{"minimum block 4096, small maximum", &fakeServer{structured: true, minBlock: 4096, maxBlock: 8192},
			Options{}, []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fs.data = data
			c := dialFake(t, tt.fs.start(t), tt.o)
			if c.Size() != int64(len(data)) {
				t.Fatalf("Size = %d, want %d", c.Size(), len(data))
			}
			if got := c.Contexts(); strings.Join(got, ",") != strings.Join(tt.contexts, ",") {
				t.Fatalf("Contexts = %q, want %q", got, tt.contexts)
			}
			checkReads(t, c, data, 40, 300<<10, 2)
			if len(tt.contexts) == 0 {
				err := c.BlockStatus(context.Background(), "base:allocation", 0, 4096, func(Extent) error { return nil })
				if err == nil || !strings.Contains(err.Error(), "not agreed") {
					t.Fatalf("BlockStatus on a context not agreed: %v", err)
				}
			}
		})
	}
}

// TestUnalignedBlockStatus checks that block status requests keep the
// server's minimum block size and that extents come clipped, in order.
func TestUnalignedBlockStatus(t *testing.T) {
	fs := &fakeServer{data: make([]byte, 1<<20), structured: true, minBlock: 4096, maxBlock: 1 << 20, contexts: []string{"base:allocation"}}
	// One 4 KiB extent per reply, hole and data in turn.
	fs.status = func(r fakeReq) []uint32 { return []uint32{4096, uint32(r.off/4096) % 2} }
	c := dialFake(t, fs.start(t), Options{MetaContexts: []string{"base:allocation"}})
	var got []Extent
	err := c.BlockStatus(context.Background(), "base:allocation", 1000, 20000, func(e Extent) error {
		got = append(got, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{1000, 3096, 0}, {4096, 4096, 1}, {8192, 4096, 0}, {12288, 4096, 1}, {16384, 4096, 0}, {20480, 520, 1}}
	if len(got) != len(want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("extents %v, want %v", got, want)
		}
	}
	m := c.Map(context.Background(), "base:allocation", func(f uint32) bool { return f&StateHole == 0 })
	rs, err := m.Data(5000, 10000)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].Start != 8192 || rs[0].End != 12288 {
		t.Fatalf("Data(5000, 10000) = %v, want [{8192 12288}]", rs)
	}
}

func TestChunkedReadReply(t *testing.T) {
	data := randomData(64<<10, 3)
	copy(data[8192:16384], make([]byte, 8192))
	fs := &fakeServer{data: data, structured: true}
	// Out of order: the tail, a hole, the head, then NONE.
	fs.read = func(w io.Writer, r fakeReq, _ int) {
		mid := r.off + uint64(r.length)/2
		w.Write(dataChunk(0, r.cookie, mid, data[mid:r.off+uint64(r.length)]))
		w.Write(holeChunk(0, r.cookie, r.off+8192, 8192))
		w.Write(dataChunk(0, r.cookie, r.off, data[r.off:r.off+8192]))
		w.Write(dataChunk(0, r.cookie, r.off+16384, data[r.off+16384:mid]))
		w.Write(noneChunk(r.cookie))
	}
	c := dialFake(t, fs.start(t), Options{})
	buf := bytes.Repeat([]byte{0xff}, len(data))
	if _, err := c.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data) {
		t.Fatal("reassembled read differs from the export")
	}
}

func TestServerErrors(t *testing.T) {
	data := randomData(1<<20, 4)
	tests := []struct {
		name       string
		structured bool
		reply      func(r fakeReq) []byte
		want       []string
		offset     int64
	}{
		{"error at offset", true, func(r fakeReq) []byte {
			b := dataChunk(0, r.cookie, r.off, data[r.off:r.off+100])
			return append(b, errorChunkMsg(ReplyFlagDone, r.cookie, ErrnoIO, "bad sector", int64(r.off)+100)...)
		}, []string{"EIO (errno 5)", "at offset 5100", "bad sector"}, 5100},
		{"error without offset", true, func(r fakeReq) []byte {
			return errorChunkMsg(ReplyFlagDone, r.cookie, ErrnoInval, "", -1)
		}, []string{"EINVAL (errno 22)", "at offset 5000"}, -1},
		{"unknown error type", true, func(r fakeReq) []byte {
			return chunkMsg(ReplyFlagDone, ChunkErrBit+77, r.cookie, append(be16(be32(nil, ErrnoNoMem), 2), "oh"...))
		}, []string{"ENOMEM", "unknown error chunk type 0x804d oh"}, -1},
		{"simple reply error", false, func(r fakeReq) []byte { return simpleMsg(ErrnoPerm, r.cookie) },
			[]string{"EPERM (errno 1)"}, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := &fakeServer{data: data, structured: tt.structured}
			fs.read = func(w io.Writer, r fakeReq, n int) {
				if n == 0 {
					w.Write(tt.reply(r))
				} else {
					w.Write(fs.readReply(r))
				}
			}
			c := dialFake(t, fs.start(t), Options{})
			_, err := c.ReadAt(make([]byte, 1000), 5000)
			var se *ServerError
			if !errors.As(err, &se) || se.Offset != tt.offset {
				t.Fatalf("ReadAt: %v, want a ServerError at offset %d", err, tt.offset)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			// The connection survives an error the server reported.
			checkReads(t, c, data, 5, 10000, 5)
		})
	}
}

// TestProtocolViolations checks that a broken reply fails the connection:
// the request it answered, the other pending one, and every later one.
func TestProtocolViolations(t *testing.T) {
	data := randomData(1<<20, 6)
	tests := []struct {
		name  string
		reply func(r fakeReq) []byte
		want  string
	}{
		{"unknown cookie", func(r fakeReq) []byte { return dataChunk(ReplyFlagDone, r.cookie+1000, r.off, data[r.off:r.off+10]) }, "unknown cookie"},
		{"data before the request", func(r fakeReq) []byte { return dataChunk(ReplyFlagDone, r.cookie, r.off-1, data[:r.length]) }, "outside the request"},
		{"data past the request", func(r fakeReq) []byte { return dataChunk(ReplyFlagDone, r.cookie, r.off, data[:r.length+1]) }, "outside the request"},
		{"overlapping data", func(r fakeReq) []byte {
			b := dataChunk(0, r.cookie, r.off, data[:r.length/2+1])
			return append(b, dataChunk(ReplyFlagDone, r.cookie, r.off+uint64(r.length)/2, data[:r.length/2])...)
		}, "overlaps"},
		{"done without all the data", func(r fakeReq) []byte { return dataChunk(ReplyFlagDone, r.cookie, r.off, data[:r.length-1]) }, "done with"},
		{"hole of length 0", func(r fakeReq) []byte { return holeChunk(ReplyFlagDone, r.cookie, r.off, 0) }, "hole of length 0"},
		{"bad magic", func(r fakeReq) []byte { return []byte("HTTP/1.1 400 Bad Request\r\n\r\n") }, "bad reply magic"},
		{"simple reply to a structured read", func(r fakeReq) []byte { return simpleMsg(0, r.cookie) }, "simple reply to a read"},
		{"status chunk to a read", func(r fakeReq) []byte { return statusChunk(ReplyFlagDone, r.cookie, 10, r.length, 0) }, "chunk type 5"},
		{"huge error chunk", func(r fakeReq) []byte {
			return append(be32(be64(be16(be16(be32(nil, StructuredReplyMagic), ReplyFlagDone), ChunkError), r.cookie), 1<<30), 0, 0, 0, 5)
		}, "limit"},
		{"error message longer than its chunk", func(r fakeReq) []byte {
			return chunkMsg(ReplyFlagDone, ChunkError, r.cookie, append(be16(be32(nil, ErrnoIO), 100), "short"...))
		}, "error message of 100 bytes"},
		{"error offset outside the request", func(r fakeReq) []byte { return errorChunkMsg(ReplyFlagDone, r.cookie, ErrnoIO, "", 0) }, "outside the request"},
		{"none without done", func(r fakeReq) []byte { return chunkMsg(0, ChunkNone, r.cookie, nil) }, "NBD_REPLY_TYPE_NONE"},
		{"truncated reply", func(r fakeReq) []byte { return dataChunk(ReplyFlagDone, r.cookie, r.off, data[:r.length])[:50] }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := &fakeServer{data: data, structured: true}
			closeAfter := tt.want == ""
			fs.read = func(w io.Writer, r fakeReq, n int) {
				if n == 0 {
					return // held: never answered
				}
				w.Write(tt.reply(r))
				if closeAfter {
					w.(net.Conn).Close()
				}
			}
			c := dialFake(t, fs.start(t), Options{})
			errs := make(chan error, 2)
			go func() { _, err := c.ReadAt(make([]byte, 4096), 8192); errs <- err }()
			waitFor(t, func() bool { return fs.reads.Load() == 1 })
			go func() { _, err := c.ReadAt(make([]byte, 4096), 65536); errs <- err }()
			for range 2 {
				select {
				case err := <-errs:
					if err == nil || tt.want != "" && (!errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want)) {
						t.Fatalf("ReadAt: %v, want a protocol violation saying %q", err, tt.want)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("ReadAt still waiting 5 s after a broken reply")
				}
			}
			if _, err := c.ReadAt(make([]byte, 10), 0); err == nil {
				t.Fatal("ReadAt after a broken reply succeeded")
			}
		})
	}
}

// TestBlockStatusViolations checks the block status replies a client must
// refuse.
func TestBlockStatusViolations(t *testing.T) {
	tests := []struct {
		name   string
		status func(r fakeReq) []uint32
		want   string
	}{
		{"extent of length 0", func(r fakeReq) []uint32 { return []uint32{0, 0} }, "length 0"},
		{"extents past the request", func(r fakeReq) []uint32 { return []uint32{r.length, 0, 4096, 0} }, "reach past"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := &fakeServer{data: make([]byte, 1<<20), structured: true, contexts: []string{"base:allocation"}, status: tt.status}
			c := dialFake(t, fs.start(t), Options{MetaContexts: []string{"base:allocation"}})
			err := c.BlockStatus(context.Background(), "base:allocation", 0, 65536, func(Extent) error { return nil })
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("BlockStatus: %v, want a protocol violation saying %q", err, tt.want)
			}
		})
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestHandshakeViolations checks that a broken option phase is refused
// with a clear error, quickly.
func TestHandshakeViolations(t *testing.T) {
	tests := []struct {
		name    string
		replies func() []byte
		want    string
		hangUp  bool // close at once rather than wait for the client
	}{
		{"option reply too long", func() []byte {
			return be32(be32(be32(be64(nil, RepMagic), OptStructuredReply), RepAck), 1<<20)
		}, "exceeds the 65536-byte limit", false},
		{"reply to another option", func() []byte { return optReplyMsg(OptList, RepAck, nil) }, "reply to option 3", false},
		{"bad reply magic", func() []byte { return []byte("garbage garbage garbage garbage") }, "bad option reply magic", false},
		{"endless info", func() []byte {
			b := optReplyMsg(OptStructuredReply, RepAck, nil)
			for range maxOptReplies + 1 {
				b = append(b, optReplyMsg(OptGo, RepInfo, be16(nil, 99))...)
			}
			return b
		}, "more than 1024 replies", false},
		{"go without export info", func() []byte {
			return append(optReplyMsg(OptStructuredReply, RepAck, nil), optReplyMsg(OptGo, RepAck, nil)...)
		}, "without NBD_INFO_EXPORT", false},
		{"bad block size", func() []byte {
			b := optReplyMsg(OptStructuredReply, RepAck, nil)
			return append(b, infoBlockSizeMsg(3, 4096, 1<<20)...)
		}, "not a power of 2", false},
		{"server requires TLS", func() []byte {
			return optReplyMsg(OptStructuredReply, RepErrTLSReqd, []byte("use TLS\x00\x01"))
		}, "requires TLS): use TLS", false},
		{"closes mid-handshake", func() []byte { return optReplyMsg(OptStructuredReply, RepAck, nil)[:7] }, "closed the connection", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := &fakeServer{options: func(conn net.Conn) bool {
				if tt.hangUp {
					io.ReadFull(conn, make([]byte, 16)) // the first option
				}
				conn.Write(tt.replies())
				if !tt.hangUp {
					io.Copy(io.Discard, conn) // until the client gives up
				}
				return false
			}}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := Dial(ctx, "unix", fs.start(t), Options{})
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Dial: %v, want it to say %q", err, tt.want)
			}
		})
	}
}

// TestCloseUnblocks checks that Close fails waiting reads promptly.
func TestCloseUnblocks(t *testing.T) {
	fs := &fakeServer{data: make([]byte, 1<<20), structured: true}
	fs.read = func(io.Writer, fakeReq, int) {} // never answers
	c := dialFake(t, fs.start(t), Options{})
	errs := make(chan error, 4)
	for i := range 4 {
		go func() { _, err := c.ReadAt(make([]byte, 4096), int64(i)*4096); errs <- err }()
	}
	waitFor(t, func() bool { return fs.reads.Load() == 4 })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for range 4 {
		select {
		case err := <-errs:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("waiting ReadAt after Close: %v, want ErrClosed", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("ReadAt still waiting 2 s after Close")
		}
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadAt after Close: %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestBlockStatusContext checks that a block status the server does not
// answer gives up when its context ends.
func TestBlockStatusContext(t *testing.T) {
	fs := &fakeServer{data: make([]byte, 1<<20), structured: true, contexts: []string{"base:allocation"}}
	fs.status = func(fakeReq) []uint32 { time.Sleep(500 * time.Millisecond); return []uint32{4096, 0} }
	c := dialFake(t, fs.start(t), Options{MetaContexts: []string{"base:allocation"}})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.BlockStatus(ctx, "base:allocation", 0, 4096, func(Extent) error { return nil })
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 400*time.Millisecond {
		t.Fatalf("BlockStatus = %v after %v, want the deadline well before the server answers", err, time.Since(start))
	}
}
