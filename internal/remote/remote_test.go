package remote

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// memTarget is a target in memory.
type memTarget struct {
	mu      sync.Mutex
	b       []byte
	syncs   int
	failAt  int64 // a write at this offset fails (-1: none)
	closed  bool
	created int64
}

func newMem(size int) *memTarget { return &memTarget{b: make([]byte, size), failAt: -1} }

func (m *memTarget) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off == m.failAt {
		return 0, errors.New("input/output error")
	}
	return copy(m.b[off:], p), nil
}
func (m *memTarget) Zero(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}
func (m *memTarget) Sync() error  { m.mu.Lock(); m.syncs++; m.mu.Unlock(); return nil }
func (m *memTarget) Close() error { m.closed = true; return nil }

func (m *memTarget) opener(path string, create int64) (Target, Info, error) {
	if path == "/busy" {
		return nil, Info{}, errors.New("target /busy is mounted on /mnt: refusing to write a disk in use")
	}
	m.created = create
	return m, Info{Size: int64(len(m.b)), Device: "253:16", Host: "far"}, nil
}

// pair runs Serve on one end of a pipe and dials the other.
func pair(t *testing.T, m *memTarget, path string, wrap func(io.Reader) io.Reader) (*Client, net.Conn, chan error) {
	t.Helper()
	a, b := net.Pipe()
	served := make(chan error, 1)
	go func() { served <- Serve(context.Background(), b, b, m.opener); b.Close() }()
	var r io.Reader = a
	if wrap != nil {
		r = wrap(a)
	}
	c, err := Dial(r, a, path, 1234)
	if err != nil {
		a.Close()
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { a.Close(); c.Close() })
	return c, a, served
}

func TestRoundTrip(t *testing.T) {
	m := newMem(8 << 20)
	c, conn, served := pair(t, m, "/dev/vdb", nil)
	if i := c.Info(); i.Size != 8<<20 || i.Device != "253:16" || i.Host != "far" || m.created != 1234 {
		t.Fatalf("info %+v, created %d", i, m.created)
	}
	want := make([]byte, 8<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range want[:3<<20] {
		want[i] = byte(rng.Uint32())
	}
	copy(want[4<<20:], bytes.Repeat([]byte("compressible text "), 100000))
	copy(m.b[6<<20:], bytes.Repeat([]byte{9}, 1<<20)) // zeroed below
	// One write larger than MaxWrite, split; an odd-sized one.
	if _, err := c.WriteAt(want[:3<<20], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(want[4<<20:4<<20+1800000], 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.Zero(6<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.b, want) || m.syncs != 1 {
		t.Fatalf("target differs after sync (syncs %d)", m.syncs)
	}
	if d, w := c.Data.Load(), c.Wire.Load(); d != 3<<20+1800000 || w >= d || w < 3<<20 {
		t.Errorf("data %d bytes, on the wire %d", d, w)
	}
	conn.Close()
	if err := <-served; err != nil {
		t.Errorf("serve after the local end closed: %v", err)
	}
	if !m.closed {
		t.Error("target not closed")
	}
}

// A write the remote target refuses is reported, with its text, at the
// next call or sync at the latest.
func TestRemoteWriteError(t *testing.T) {
	m := newMem(4 << 20)
	m.failAt = 1 << 20
	c, _, served := pair(t, m, "/dev/vdb", nil)
	c.WriteAt(make([]byte, 2<<20), 0)
	err := c.Sync()
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), "input/output error") || !strings.Contains(err.Error(), "at 1048576") {
		t.Fatalf("sync after a failed write: %v", err)
	}
	if _, err := c.WriteAt([]byte{1}, 0); err == nil {
		t.Error("a write after the failure succeeded")
	}
	if err := <-served; err == nil {
		t.Error("serve returned no error")
	}
}

func TestRefusedTarget(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	go func() { Serve(context.Background(), b, b, newMem(1).opener); b.Close() }()
	_, err := Dial(a, a, "/busy", 0)
	if err == nil || !strings.Contains(err.Error(), "mounted on /mnt") {
		t.Fatalf("dial of a mounted target: %v", err)
	}
}

// The connection cut before a sync's ack fails the sync clearly.
func TestConnectionCut(t *testing.T) {
	m := newMem(4 << 20)
	c, conn, _ := pair(t, m, "/dev/vdb", nil)
	if _, err := c.WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	err := c.Sync()
	if err == nil || !strings.Contains(err.Error(), "remote end") {
		t.Fatalf("sync over a cut connection: %v", err)
	}
}

// slowReader delays each read: a link's latency on the way back.
type slowReader struct {
	r     io.Reader
	delay time.Duration
}

func (s slowReader) Read(p []byte) (int, error) { time.Sleep(s.delay); return s.r.Read(p) }

// Writes do not wait for the remote end: 40 writes and a sync over a
// link with 50 ms of latency back cost about one round trip, not 40.
func TestPipelined(t *testing.T) {
	m := newMem(4 << 20)
	c, _, _ := pair(t, m, "/dev/vdb", func(r io.Reader) io.Reader { return slowReader{r, 50 * time.Millisecond} })
	t0 := time.Now()
	for i := 0; i < 40; i++ {
		if _, err := c.WriteAt(bytes.Repeat([]byte{byte(i)}, 64<<10), int64(i)*64<<10); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 1500*time.Millisecond {
		t.Fatalf("40 writes and a sync took %v: writes wait for the remote end", d)
	}
	if m.b[39<<16] != 39 {
		t.Fatal("last write missing")
	}
}

func frameBytes(typ byte, payload []byte) []byte {
	h := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(h[1:], uint32(len(payload)))
	return append(h, payload...)
}

func helloBytes(version uint16, path string) []byte {
	return frameBytes(msgHello, encodeHello(hello{version: version, path: path}))
}

// Bad messages from the local end: a clear error, sent back as text.
func TestServeBadMessages(t *testing.T) {
	hi := helloBytes(Version, "/dev/vdb")
	wr := func(off int64, n int, enc byte, data []byte) []byte {
		return frameBytes(msgWrite, append(encodeWriteHeader(writeHeader{off: off, n: n, enc: enc}), data...))
	}
	huge := []byte{msgWrite, 0xff, 0xff, 0xff, 0xff}
	tests := []struct {
		name, in, want string
	}{
		{"not a hello", string(frameBytes(msgSync, encodeSeq(1))), "not a hello"},
		{"other version", string(helloBytes(9, "/x")), "protocol version 9"},
		{"empty path", string(helloBytes(Version, "")), "no target path"},
		{"oversized hello", string([]byte{msgHello, 0x7f, 0, 0, 0}), "more than the"},
		{"oversized write", string(hi) + string(huge), "more than the"},
		{"cut write", string(hi) + string([]byte{msgWrite, 0, 0, 0, 40, 1, 2}), "unexpected EOF"},
		{"garbage type", string(hi) + string(frameBytes('?', nil)), "unexpected message"},
		{"write past the end", string(hi) + string(wr(1<<20-1, 2, encRaw, []byte{1, 2})), "beyond the end"},
		{"negative offset", string(hi) + string(wr(-5, 1, encRaw, []byte{1})), "out of range"},
		{"short raw data", string(hi) + string(wr(0, 10, encRaw, []byte{1})), "declared"},
		{"zero length write", string(hi) + string(wr(0, 0, encRaw, nil)), "1 to"},
		{"too large write", string(hi) + string(wr(0, MaxWrite+1, encZstd, []byte{1})), "1 to"},
		{"bad encoding", string(hi) + string(wr(0, 1, 7, []byte{1})), "encoding 7"},
		{"bad zstd", string(hi) + string(wr(0, 100, encZstd, []byte("not zstd at all"))), "decompress"},
		{"zero past the end", string(hi) + string(frameBytes(msgZero, encodeZero(0, 1<<20+1))), "beyond the end"},
		{"short zero", string(hi) + string(frameBytes(msgZero, []byte{1})), "too short"},
		{"long sync", string(hi) + string(frameBytes(msgSync, make([]byte, 9))), "too many"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := Serve(context.Background(), strings.NewReader(tc.in), &out, newMem(1<<20).opener)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("serve: %v, want %q", err, tc.want)
			}
			// The last frame sent is the error's text.
			if i := bytes.Index(out.Bytes(), []byte{msgError, 0, 0}); i < 0 || !strings.Contains(out.String()[i:], tc.want) {
				t.Fatalf("the error was not sent back: %q", out.String())
			}
		})
	}
}

// A zstd payload that decodes to more than it declares is refused
// without being decoded whole.
func TestServeZstdBomb(t *testing.T) {
	var in bytes.Buffer
	in.Write(helloBytes(Version, "/dev/vdb"))
	c := &Client{w: bufio.NewWriter(&in)}
	enc, _ := newTestEncoder()
	big := enc.EncodeAll(make([]byte, 4<<20), nil)
	writeFrame(c.w, msgWrite, encodeWriteHeader(writeHeader{off: 0, n: 10, enc: encZstd}), big)
	c.w.Flush()
	err := Serve(context.Background(), &in, io.Discard, newMem(8<<20).opener)
	if err == nil || !strings.Contains(err.Error(), "decompress") {
		t.Fatalf("serve of a zstd bomb: %v", err)
	}
}

// Bad answers from the remote end: a clear error from Dial.
func TestDialBadAnswers(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"nothing", "", "EOF"},
		{"garbage", "hello there, I am a shell banner", "more than the"},
		{"other type", string(frameBytes(msgAck, encodeSeq(1))), "is it sauve migrate-receive"},
		{"short info", string(frameBytes(msgInfo, []byte{1, 2})), "too short"},
		{"error", string(frameBytes(msgError, []byte("no such file"))), "remote end: no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Dial(strings.NewReader(tc.in), io.Discard, "/x", 0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("dial: %v, want %q", err, tc.want)
			}
		})
	}
}
