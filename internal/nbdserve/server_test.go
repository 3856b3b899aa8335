package nbdserve

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/nbd"
	"github.com/sauve-backup/sauve/internal/testpki"
)

// testSize is odd so the last chunk of a read is short.
const testSize = 1<<20 + 517

// testData are the data ranges of the test export; the rest is holes.
var testData = []extent.Range{{Start: 0, End: 64 << 10}, {Start: 256 << 10, End: 300<<10 + 13}, {Start: 1 << 20, End: testSize}}

// memExport is an export held in memory: random bytes in its data
// ranges, zeros elsewhere.
func memExport(name string, size int64, data []extent.Range, seed uint64) (Export, []byte) {
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 1))
	for _, r := range data {
		for i := r.Start; i < r.End; i++ {
			b[i] = byte(rng.Uint32()) | 1
		}
	}
	return Export{
		Name: name, Description: "test disk " + name, Size: size, ReaderAt: bytes.NewReader(b),
		Data: func(off, n int64) ([]extent.Range, error) {
			var out []extent.Range
			for _, r := range data {
				s, e := max(r.Start, off), min(r.End, off+n)
				if s < e {
					out = append(out, extent.Range{Start: s, End: e})
				}
			}
			return out, nil
		},
	}, b
}

// serve starts a server of exports on a fresh unix socket and returns
// its path; the server stops at the end of the test.
func serve(t *testing.T, exports []Export, o Options) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdserve")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	if o.Logf == nil {
		o.Logf = t.Logf
	}
	go func() { done <- Serve(ctx, ln, exports, o) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return sock
}

func dial(t *testing.T, sock, export string) *nbd.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", sock, nbd.Options{Export: export, MetaContexts: []string{"base:allocation"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestServeClientReadAndMap(t *testing.T) {
	e, want := memExport("vda", testSize, testData, 1)
	sock := serve(t, []Export{e}, Options{})
	for _, name := range []string{"vda", ""} {
		c := dial(t, sock, name)
		if c.Size() != testSize || !c.ReadOnly() {
			t.Fatalf("export %q: size %d read-only %v", name, c.Size(), c.ReadOnly())
		}
		got := make([]byte, testSize)
		if _, err := c.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("the export reads back different")
		}
		// Across a data/hole boundary and out again.
		p := make([]byte, 250<<10)
		if _, err := c.ReadAt(p, 60<<10); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, want[60<<10:310<<10]) {
			t.Fatal("a read across holes reads back different")
		}
		var exts []nbd.Extent
		if err := c.BlockStatus(context.Background(), "base:allocation", 0, testSize, func(x nbd.Extent) error {
			exts = append(exts, x)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		wantExts := []nbd.Extent{
			{Offset: 0, Length: 64 << 10, Flags: 0},
			{Offset: 64 << 10, Length: 192 << 10, Flags: 3},
			{Offset: 256 << 10, Length: 44<<10 + 13, Flags: 0},
			{Offset: 300<<10 + 13, Length: 1<<20 - (300<<10 + 13), Flags: 3},
			{Offset: 1 << 20, Length: 517, Flags: 0},
		}
		if fmt.Sprint(exts) != fmt.Sprint(wantExts) {
			t.Fatalf("block status %v, want %v", exts, wantExts)
		}
	}
}

// rawClient speaks the protocol byte by byte, to send what the client of
// package nbd never would.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

func rawDial(t *testing.T, sock string) *rawClient {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { conn.Close() })
	c := &rawClient{t: t, conn: conn, br: bufio.NewReader(conn)}
	g := c.read(18)
	if be.Uint64(g) != nbd.NBDMagic || be.Uint64(g[8:]) != nbd.OptMagic || be.Uint16(g[16:]) != nbd.FlagFixedNewstyle|nbd.FlagNoZeroes {
		t.Fatalf("greeting %x", g)
	}
	c.write(be.AppendUint32(nil, nbd.FlagCFixedNewstyle|nbd.FlagCNoZeroes))
	return c
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

type optReply struct {
	typ  uint32
	data []byte
}

// option sends an option and returns its replies up to the final one
// (an ACK or an error).
func (c *rawClient) option(opt uint32, data []byte) []optReply {
	c.t.Helper()
	b := be.AppendUint64(nil, nbd.OptMagic)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
	var out []optReply
	for {
		h := c.read(20)
		if be.Uint64(h) != nbd.RepMagic || be.Uint32(h[8:]) != opt {
			c.t.Fatalf("option %d: reply header %x", opt, h)
		}
		r := optReply{typ: be.Uint32(h[12:]), data: c.read(int(be.Uint32(h[16:])))}
		out = append(out, r)
		if r.typ == nbd.RepAck || r.typ&nbd.RepErrBit != 0 {
			return out
		}
	}
}

func nameData(name string, infos ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func (c *rawClient) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := be.AppendUint32(nil, nbd.RequestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	c.write(append(b, payload...))
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	data       []byte
}

// chunks reads one structured reply to its DONE chunk.
func (c *rawClient) chunks() []chunk {
	c.t.Helper()
	var out []chunk
	for {
		h := c.read(20)
		if be.Uint32(h) != nbd.StructuredReplyMagic {
			c.t.Fatalf("reply magic %x", h[:4])
		}
		ch := chunk{flags: be.Uint16(h[4:]), typ: be.Uint16(h[6:]), cookie: be.Uint64(h[8:])}
		ch.data = c.read(int(be.Uint32(h[16:])))
		out = append(out, ch)
		if ch.flags&nbd.ReplyFlagDone != 0 {
			return out
		}
	}
}

// simple reads a simple reply header and returns its error and cookie.
func (c *rawClient) simple() (uint32, uint64) {
	c.t.Helper()
	h := c.read(16)
	if be.Uint32(h) != nbd.SimpleReplyMagic {
		c.t.Fatalf("reply magic %x", h[:4])
	}
	return be.Uint32(h[4:]), be.Uint64(h[8:])
}

func twoExports() ([]Export, []byte) {
	a, want := memExport("vda", testSize, testData, 1)
	b, _ := memExport("vdb", 4096, nil, 2)
	return []Export{a, b}, want
}

func TestServeHandshakeOptions(t *testing.T) {
	exports, _ := twoExports()
	sock := serve(t, exports, Options{})
	c := rawDial(t, sock)

	r := c.option(nbd.OptList, nil)
	if len(r) != 3 || r[0].typ != nbd.RepServer || r[2].typ != nbd.RepAck {
		t.Fatalf("LIST replies %v", r)
	}
	for i, name := range []string{"vda", "vdb"} {
		d := r[i].data
		if n := be.Uint32(d); string(d[4:4+n]) != name || string(d[4+n:]) != "test disk "+name {
			t.Errorf("LIST entry %d: %q", i, d)
		}
	}
	if r := c.option(nbd.OptList, []byte("x")); r[0].typ != nbd.RepErrInvalid {
		t.Errorf("LIST with data: %#x", r[0].typ)
	}
	if r := c.option(nbd.OptInfo, nameData("nope")); len(r) != 1 || r[0].typ != nbd.RepErrUnknown {
		t.Errorf("INFO of an unknown export: %v", r)
	}
	if r := c.option(nbd.OptInfo, []byte{0, 0, 0, 9}); r[0].typ != nbd.RepErrInvalid {
		t.Errorf("INFO truncated: %#x", r[0].typ)
	}
	r = c.option(nbd.OptInfo, nameData("vdb", nbd.InfoName, nbd.InfoDescription, nbd.InfoBlockSize))
	got := map[uint16][]byte{}
	for _, x := range r[:len(r)-1] {
		if x.typ != nbd.RepInfo {
			t.Fatalf("INFO reply %#x", x.typ)
		}
		got[be.Uint16(x.data)] = x.data[2:]
	}
	if e := got[nbd.InfoExport]; len(e) != 10 || be.Uint64(e) != 4096 || be.Uint16(e[8:]) != transmissionFlags {
		t.Errorf("NBD_INFO_EXPORT %x", e)
	}
	if b := got[nbd.InfoBlockSize]; len(b) != 12 || be.Uint32(b) != 1 || be.Uint32(b[4:]) != 64<<10 || be.Uint32(b[8:]) != 32<<20 {
		t.Errorf("NBD_INFO_BLOCK_SIZE %x", b)
	}
	if string(got[nbd.InfoName]) != "vdb" || string(got[nbd.InfoDescription]) != "test disk vdb" {
		t.Errorf("name %q description %q", got[nbd.InfoName], got[nbd.InfoDescription])
	}
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepErrPolicy {
		t.Errorf("STARTTLS: %#x", r[0].typ)
	}
	if r := c.option(99, []byte("junk")); r[0].typ != nbd.RepErrUnsup {
		t.Errorf("unknown option: %#x", r[0].typ)
	}
	if r := c.option(nbd.OptSetMetaContext, metaData("vda", "base:allocation")); r[0].typ != nbd.RepErrInvalid {
		t.Errorf("SET_META_CONTEXT before structured replies: %#x", r[0].typ)
	}
	if r := c.option(nbd.OptStructuredReply, nil); r[0].typ != nbd.RepAck {
		t.Errorf("STRUCTURED_REPLY: %#x", r[0].typ)
	}
	r = c.option(nbd.OptListMetaContext, metaData("vda"))
	if len(r) != 2 || r[0].typ != nbd.RepMetaContext || string(r[0].data[4:]) != "base:allocation" {
		t.Errorf("LIST_META_CONTEXT: %v", r)
	}
	if r := c.option(nbd.OptSetMetaContext, metaData("vda", "qemu:dirty-bitmap:x")); len(r) != 1 || r[0].typ != nbd.RepAck {
		t.Errorf("SET_META_CONTEXT of an unknown context: %v", r)
	}
	if r := c.option(nbd.OptSetMetaContext, metaData("vda", "base:allocation")[:10]); r[0].typ != nbd.RepErrInvalid {
		t.Errorf("SET_META_CONTEXT truncated: %#x", r[0].typ)
	}
	if r := c.option(nbd.OptAbort, nil); r[0].typ != nbd.RepAck {
		t.Errorf("ABORT: %#x", r[0].typ)
	}
	if _, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after ABORT: %v, want EOF", err)
	}
}

// goStructured takes a raw client to transmission of export name with
// structured replies and base:allocation.
func goStructured(t *testing.T, sock, name string) *rawClient {
	c := rawDial(t, sock)
	if r := c.option(nbd.OptStructuredReply, nil); r[0].typ != nbd.RepAck {
		t.Fatalf("STRUCTURED_REPLY: %#x", r[0].typ)
	}
	r := c.option(nbd.OptSetMetaContext, metaData(name, "base:allocation"))
	if len(r) != 2 || be.Uint32(r[0].data) != metaAllocation {
		t.Fatalf("SET_META_CONTEXT: %v", r)
	}
	r = c.option(nbd.OptGo, nameData(name))
	if r[len(r)-1].typ != nbd.RepAck {
		t.Fatalf("GO: %v", r)
	}
	if d := r[0].data; be.Uint16(d) != nbd.InfoExport || be.Uint16(d[10:]) != transmissionFlags|nbd.TFlagSendDF {
		t.Fatalf("GO: NBD_INFO_EXPORT %x, want the DF flag with structured replies", d)
	}
	return c
}

func wantError(t *testing.T, what string, chs []chunk, cookie uint64, errno uint32) {
	t.Helper()
	if len(chs) != 1 || chs[0].typ != nbd.ChunkError || chs[0].cookie != cookie || be.Uint32(chs[0].data) != errno {
		t.Errorf("%s: %+v, want error %d", what, chs, errno)
	}
}

func TestServeTransmission(t *testing.T) {
	exports, want := twoExports()
	sock := serve(t, exports, Options{})
	c := goStructured(t, sock, "vda")

	// A read across data and holes: a hole chunk between two data ones.
	c.request(nbd.CmdRead, 0, 1, 60<<10, 200<<10, nil)
	chs := c.chunks()
	type piece struct {
		typ       uint16
		off, n    uint64
		done, bad bool
	}
	var ps []piece
	for _, ch := range chs {
		p := piece{typ: ch.typ, off: be.Uint64(ch.data), done: ch.flags&nbd.ReplyFlagDone != 0, bad: ch.cookie != 1}
		switch ch.typ {
		case nbd.ChunkOffsetData:
			p.n = uint64(len(ch.data) - 8)
			if !bytes.Equal(ch.data[8:], want[p.off:p.off+p.n]) {
				t.Errorf("data chunk at %d differs", p.off)
			}
		case nbd.ChunkOffsetHole:
			p.n = uint64(be.Uint32(ch.data[8:]))
		}
		ps = append(ps, p)
	}
	wantPs := []piece{
		{nbd.ChunkOffsetData, 60 << 10, 4 << 10, false, false},
		{nbd.ChunkOffsetHole, 64 << 10, 192 << 10, false, false},
		{nbd.ChunkOffsetData, 256 << 10, 4 << 10, true, false},
	}
	if fmt.Sprint(ps) != fmt.Sprint(wantPs) {
		t.Errorf("read chunks %v, want %v", ps, wantPs)
	}
	// All hole, and DF: one data chunk.
	c.request(nbd.CmdRead, 0, 2, 100<<10, 10, nil)
	if chs := c.chunks(); len(chs) != 1 || chs[0].typ != nbd.ChunkOffsetHole {
		t.Errorf("read of a hole: %+v", chs)
	}
	c.request(nbd.CmdRead, nbd.CmdFlagDF, 3, 60<<10, 200<<10, nil)
	if chs := c.chunks(); len(chs) != 1 || chs[0].typ != nbd.ChunkOffsetData || !bytes.Equal(chs[0].data[8:], want[60<<10:260<<10]) {
		t.Errorf("read with DF: %d chunks", len(chs))
	}

	// Block status, whole and REQ_ONE.
	c.request(nbd.CmdBlockStatus, 0, 4, 0, testSize, nil)
	chs = c.chunks()
	if len(chs) != 1 || chs[0].typ != nbd.ChunkBlockStatus || be.Uint32(chs[0].data) != metaAllocation {
		t.Fatalf("block status: %+v", chs)
	}
	if d := chs[0].data[4:]; len(d) != 5*8 || be.Uint32(d[8:]) != 192<<10 || be.Uint32(d[12:]) != 3 || be.Uint32(d[4:]) != 0 {
		t.Errorf("block status descriptors %x", d)
	}
	c.request(nbd.CmdBlockStatus, nbd.CmdFlagReqOne, 5, 100<<10, 500<<10, nil)
	chs = c.chunks()
	if d := chs[0].data[4:]; len(d) != 8 || be.Uint32(d) != 156<<10 || be.Uint32(d[4:]) != 3 {
		t.Errorf("block status REQ_ONE descriptors %x", d)
	}

	// Bad requests get EINVAL, writes EPERM, and the connection goes on.
	c.request(nbd.CmdRead, 0, 6, 0, 33<<20, nil)
	wantError(t, "read over 32 MiB", c.chunks(), 6, nbd.ErrnoInval)
	c.request(nbd.CmdRead, 0, 7, testSize-1, 2, nil)
	wantError(t, "read past the end", c.chunks(), 7, nbd.ErrnoInval)
	c.request(nbd.CmdRead, 0, 8, 1<<63, 2, nil)
	wantError(t, "read far past the end", c.chunks(), 8, nbd.ErrnoInval)
	c.request(nbd.CmdRead, 0, 9, 0, 0, nil)
	wantError(t, "read of nothing", c.chunks(), 9, nbd.ErrnoInval)
	c.request(nbd.CmdBlockStatus, 0, 10, testSize, 1, nil)
	wantError(t, "block status past the end", c.chunks(), 10, nbd.ErrnoInval)
	c.request(nbd.CmdWrite, 0, 11, 0, 4096, make([]byte, 4096))
	if errno, cookie := c.simple(); errno != nbd.ErrnoPerm || cookie != 11 {
		t.Errorf("write: error %d cookie %d", errno, cookie)
	}
	for i, typ := range []uint16{nbd.CmdTrim, nbd.CmdWriteZeroes} {
		c.request(typ, 0, uint64(12+i), 0, 4096, nil)
		if errno, _ := c.simple(); errno != nbd.ErrnoPerm {
			t.Errorf("command %d: error %d", typ, errno)
		}
	}
	c.request(nbd.CmdFlush, 0, 14, 0, 0, nil)
	c.request(nbd.CmdCache, 0, 15, 0, 4096, nil)
	c.request(77, 0, 16, 0, 0, nil)
	got := map[uint64]uint32{}
	for range 3 {
		errno, cookie := c.simple()
		got[cookie] = errno
	}
	if fmt.Sprint(got) != fmt.Sprint(map[uint64]uint32{14: 0, 15: 0, 16: nbd.ErrnoInval}) {
		t.Errorf("flush, cache, unknown: %v", got)
	}
	c.request(nbd.CmdRead, 0, 17, 0, 16, nil)
	if chs := c.chunks(); len(chs) != 1 || !bytes.Equal(chs[0].data[8:], want[:16]) {
		t.Errorf("read after errors: %+v", chs)
	}
	c.request(nbd.CmdDisc, 0, 18, 0, 0, nil)
	if _, err := c.br.ReadByte(); err != io.EOF {
		t.Errorf("after DISC: %v, want EOF", err)
	}
}

func TestServeSimpleReplies(t *testing.T) {
	exports, want := twoExports()
	sock := serve(t, exports, Options{})
	c := rawDial(t, sock)
	c.write(append(append(be.AppendUint64(nil, nbd.OptMagic), 0, 0, 0, nbd.OptExportName, 0, 0, 0, 3), "vda"...))
	if b := c.read(10); be.Uint64(b) != testSize || be.Uint16(b[8:]) != transmissionFlags {
		t.Fatalf("EXPORT_NAME: %x", b)
	}
	c.request(nbd.CmdRead, 0, 1, 60<<10, 200<<10, nil)
	if errno, cookie := c.simple(); errno != 0 || cookie != 1 {
		t.Fatalf("read: error %d cookie %d", errno, cookie)
	}
	if !bytes.Equal(c.read(200<<10), want[60<<10:260<<10]) {
		t.Error("simple read differs")
	}
	c.request(nbd.CmdBlockStatus, 0, 2, 0, 4096, nil)
	if errno, _ := c.simple(); errno != nbd.ErrnoInval {
		t.Errorf("block status without structured replies: error %d", errno)
	}
	c.request(nbd.CmdRead, 0, 3, testSize, 1, nil)
	if errno, _ := c.simple(); errno != nbd.ErrnoInval {
		t.Errorf("read past the end: error %d", errno)
	}
}

// failingReader fails reads that touch [bad, bad+1).
type failingReader struct {
	io.ReaderAt
	bad int64
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off <= f.bad && f.bad < off+int64(len(p)) {
		return 0, errors.New("checksum mismatch")
	}
	return f.ReaderAt.ReadAt(p, off)
}

func TestServeReadError(t *testing.T) {
	e, want := memExport("vda", testSize, testData, 1)
	e.ReaderAt = failingReader{e.ReaderAt, 4096}
	sock := serve(t, []Export{e}, Options{})
	c := dial(t, sock, "vda")
	var se *nbd.ServerError
	if _, err := c.ReadAt(make([]byte, 8192), 0); !errors.As(err, &se) || se.Errno != nbd.ErrnoIO {
		t.Fatalf("read of a bad chunk: %v, want EIO", err)
	}
	p := make([]byte, 4096)
	if _, err := c.ReadAt(p, 8192); err != nil || !bytes.Equal(p, want[8192:12288]) {
		t.Fatalf("read after an error: %v", err)
	}
}

func TestServeTwoConnections(t *testing.T) {
	exports, want := twoExports()
	sock := serve(t, exports, Options{Workers: 2})
	c1, c2 := dial(t, sock, "vda"), dial(t, sock, "vda")
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, c := range []*nbd.Client{c1, c2} {
		wg.Go(func() {
			for off := int64(0); off < testSize; off += 100 << 10 {
				p := make([]byte, min(100<<10, testSize-off))
				if _, err := c.ReadAt(p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[off:off+int64(len(p))]) {
					errs <- fmt.Errorf("read at %d differs", off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestServeCancelClosesConnections(t *testing.T) {
	exports, _ := twoExports()
	dir := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Skipf("unix socket in %s: %v", dir, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, exports, Options{}) }()
	c := goStructured(t, ln.Addr().String(), "vda")
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
	if _, err := c.br.ReadByte(); err == nil {
		t.Error("the connection is still open")
	}
}

func TestServeRejectsBadExports(t *testing.T) {
	e, _ := memExport("a", 10, nil, 1)
	for _, exports := range [][]Export{nil, {e, e}, {{Name: "x", Size: 1}}} {
		if err := checkExports(exports); err == nil {
			t.Errorf("exports %v accepted", exports)
		}
	}
}

// FuzzServeHandshake feeds random bytes as a client: the server must
// neither panic nor hang.
func FuzzServeHandshake(f *testing.F) {
	var seed []byte
	seed = be.AppendUint32(seed, nbd.FlagCFixedNewstyle|nbd.FlagCNoZeroes)
	opt := func(b []byte, o uint32, data []byte) []byte {
		b = be.AppendUint64(b, nbd.OptMagic)
		b = be.AppendUint32(b, o)
		b = be.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	f.Add(opt(seed, nbd.OptList, nil))
	f.Add(opt(opt(opt(seed, nbd.OptStructuredReply, nil), nbd.OptSetMetaContext, metaData("vda", "base:allocation")), nbd.OptInfo, nameData("vda", 3)))
	g := opt(opt(seed, nbd.OptStructuredReply, nil), nbd.OptGo, nameData(""))
	for _, r := range [][4]uint64{{nbd.CmdRead, 0, 0, 4096}, {nbd.CmdBlockStatus, nbd.CmdFlagReqOne, 100, 1 << 20}, {nbd.CmdWrite, 0, 0, 8}} {
		g = be.AppendUint32(g, nbd.RequestMagic)
		g = be.AppendUint16(g, uint16(r[1]))
		g = be.AppendUint16(g, uint16(r[0]))
		g = be.AppendUint64(g, 7)
		g = be.AppendUint64(g, r[2])
		g = be.AppendUint32(g, uint32(r[3]))
	}
	f.Add(g)
	f.Add(opt(seed, nbd.OptExportName, []byte("vdb")))
	exports, _ := twoExports()
	s := newServer(context.Background(), exports, Options{Workers: 2, HandshakeTimeout: 2 * time.Second})
	f.Fuzz(func(t *testing.T, in []byte) {
		srv, cli := net.Pipe()
		deadline := time.Now().Add(5 * time.Second)
		srv.SetDeadline(deadline)
		cli.SetDeadline(deadline)
		go io.Copy(io.Discard, cli)
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.serveConn(srv)
		}()
		cli.Write(in)
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server hangs")
		}
	})
}

// memDisk is a writable export's disk in memory.
type memDisk struct {
	mu      sync.Mutex
	b       []byte
	flushes int
}

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}

func (m *memDisk) Zero(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}

func (m *memDisk) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return nil
}

func TestServeWritable(t *testing.T) {
	d := &memDisk{b: make([]byte, testSize)}
	sock := serve(t, []Export{{Name: "vda", Size: testSize, ReaderAt: d, Writer: d}}, Options{})
	c := rawDial(t, sock)
	r := c.option(nbd.OptGo, nameData("vda"))
	if be.Uint16(r[0].data) != nbd.InfoExport || be.Uint16(r[0].data[10:]) != writableFlags {
		t.Fatalf("GO: NBD_INFO_EXPORT %x, want the writable flags", r[0].data)
	}
	payload := bytes.Repeat([]byte("sauve"), 1000)
	c.request(nbd.CmdWrite, 0, 1, 4093, uint32(len(payload)), payload)
	c.request(nbd.CmdWrite, nbd.CmdFlagFUA, 2, 100, 3, []byte("abc"))
	c.request(nbd.CmdWriteZeroes, 0, 3, 4096, 10, nil)
	c.request(nbd.CmdFlush, 0, 4, 0, 0, nil)
	got := map[uint64]uint32{}
	for range 4 {
		errno, cookie := c.simple()
		got[cookie] = errno
	}
	if fmt.Sprint(got) != fmt.Sprint(map[uint64]uint32{1: 0, 2: 0, 3: 0, 4: 0}) {
		t.Fatalf("write, FUA write, zeroes, flush: %v", got)
	}
	want := make([]byte, testSize)
	copy(want[4093:], payload)
	copy(want[100:], "abc")
	clear(want[4096:4106])
	if !bytes.Equal(d.b, want) {
		t.Fatal("the disk does not hold what was written")
	}
	if d.flushes != 2 {
		t.Errorf("%d flushes, want 2 (FUA and FLUSH)", d.flushes)
	}
	c.request(nbd.CmdRead, 0, 5, 4090, 10, nil)
	if errno, _ := c.simple(); errno != 0 || !bytes.Equal(c.read(10), want[4090:4100]) {
		t.Fatal("read back of a write differs")
	}
	// Writes out of bounds or too long are refused, their payload
	// skipped: the next request is still understood.
	c.request(nbd.CmdWrite, 0, 6, testSize-1, 2, []byte("xy"))
	if errno, _ := c.simple(); errno != nbd.ErrnoInval {
		t.Errorf("write past the end: errno %d", errno)
	}
	big := make([]byte, maxRequest+1)
	c.request(nbd.CmdWrite, 0, 7, 0, uint32(len(big)), big)
	if errno, _ := c.simple(); errno != nbd.ErrnoInval {
		t.Errorf("write over 32 MiB: errno %d", errno)
	}
	c.request(nbd.CmdRead, 0, 8, 100, 3, nil)
	if errno, cookie := c.simple(); errno != 0 || cookie != 8 || string(c.read(3)) != "abc" {
		t.Fatal("read after refused writes")
	}
}

// tlsConfigs returns a server config requiring a client certificate and
// the config of a client holding one.
func tlsConfigs(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	dir := t.TempDir()
	ca, err := testpki.NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteServer(filepath.Join(dir, "s")); err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteClient(filepath.Join(dir, "c")); err != nil {
		t.Fatal(err)
	}
	load := func(role string) (tls.Certificate, *x509.CertPool) {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, role[:1], role+"-cert.pem"), filepath.Join(dir, role[:1], role+"-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		pem, _ := os.ReadFile(filepath.Join(dir, role[:1], "ca-cert.pem"))
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		return cert, pool
	}
	sc, sp := load("server")
	cc, cp := load("client")
	return &tls.Config{Certificates: []tls.Certificate{sc}, ClientCAs: sp, ClientAuth: tls.RequireAndVerifyClientCert},
		&tls.Config{Certificates: []tls.Certificate{cc}, RootCAs: cp, ServerName: "localhost"}
}

func TestServeRequiresTLS(t *testing.T) {
	e, want := memExport("vda", testSize, testData, 1)
	sconf, cconf := tlsConfigs(t)
	sock := serve(t, []Export{e}, Options{TLS: sconf})

	c := rawDial(t, sock)
	for _, opt := range []uint32{nbd.OptList, nbd.OptGo, nbd.OptStructuredReply} {
		if r := c.option(opt, nameData("vda")); r[0].typ != nbd.RepErrTLSReqd {
			t.Errorf("option %d before STARTTLS: reply %#x, want TLS required", opt, r[0].typ)
		}
	}
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepAck {
		t.Fatalf("STARTTLS: %#x", r[0].typ)
	}
	tc := tls.Client(c.conn, cconf)
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	c.conn, c.br = tc, bufio.NewReader(tc)
	if r := c.option(nbd.OptStartTLS, nil); r[0].typ != nbd.RepErrInvalid {
		t.Errorf("a second STARTTLS: %#x", r[0].typ)
	}
	if r := c.option(nbd.OptGo, nameData("vda")); r[len(r)-1].typ != nbd.RepAck {
		t.Fatalf("GO over TLS: %v", r)
	}
	c.request(nbd.CmdRead, 0, 1, 0, 100, nil)
	if errno, _ := c.simple(); errno != 0 || !bytes.Equal(c.read(100), want[:100]) {
		t.Fatal("read over TLS")
	}

	// Without a client certificate the handshake fails; EXPORT_NAME
	// before TLS closes the connection.
	c = rawDial(t, sock)
	c.option(nbd.OptStartTLS, nil)
	anon := cconf.Clone()
	anon.Certificates = nil
	tc = tls.Client(c.conn, anon)
	if err := tc.Handshake(); err == nil {
		if _, err = tc.Read(make([]byte, 1)); err == nil {
			t.Error("a client without a certificate was let in")
		}
	}
	c = rawDial(t, sock)
	b := be.AppendUint64(nil, nbd.OptMagic)
	b = be.AppendUint32(b, nbd.OptExportName)
	b = be.AppendUint32(b, 3)
	c.write(append(b, "vda"...))
	if _, err := c.br.ReadByte(); err == nil {
		t.Error("EXPORT_NAME before STARTTLS was answered")
	}
}

func TestServeMaxConns(t *testing.T) {
	e, _ := memExport("vda", testSize, testData, 1)
	sock := serve(t, []Export{e}, Options{MaxConns: 2})
	rawDial(t, sock)
	rawDial(t, sock)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("a third connection over the limit of 2: %v, want it closed", err)
	}
}
