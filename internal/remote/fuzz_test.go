package remote

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

func newTestEncoder() (*zstd.Encoder, error) { return zstd.NewWriter(nil) }

// FuzzServe feeds the remote end arbitrary bytes from the local end: it
// must fail cleanly, never panic, write out of range or allocate beyond
// the bounds.
func FuzzServe(f *testing.F) {
	hi := helloBytes(Version, "/dev/vdb")
	enc, _ := newTestEncoder()
	z := enc.EncodeAll(bytes.Repeat([]byte("ab"), 500), nil)
	f.Add(hi)
	f.Add(append(append([]byte{}, hi...), frameBytes(msgWrite, append(encodeWriteHeader(writeHeader{off: 10, n: 1000, enc: encZstd}), z...))...))
	f.Add(append(append([]byte{}, hi...), frameBytes(msgZero, encodeZero(0, 4096))...))
	f.Add(append(append([]byte{}, hi...), frameBytes(msgSync, encodeSeq(7))...))
	f.Add(append(append([]byte{}, hi...), frameBytes(msgBoot, encodeBoot(testReq))...))
	f.Fuzz(func(t *testing.T, in []byte) {
		m := newMem(64 << 10)
		Serve(context.Background(), bytes.NewReader(in), io.Discard, m.opener)
		b := &bootMem{memTarget: newMem(64 << 10), res: &BootResult{Reached: true, Tail: "login:"}}
		Serve(context.Background(), bytes.NewReader(in), io.Discard, func(string, int64) (Target, Info, error) {
			return b, Info{Size: 64 << 10}, nil
		})
	})
}

// FuzzDial feeds the local end arbitrary answers.
func FuzzDial(f *testing.F) {
	f.Add(frameBytes(msgInfo, encodeInfo(Info{Size: 1 << 30, Device: "8:16", Host: "h", Created: true})))
	f.Add(frameBytes(msgError, []byte("refused")))
	f.Add(append(frameBytes(msgInfo, encodeInfo(Info{Size: 5})), frameBytes(msgAck, encodeSeq(1))...))
	f.Add(append(frameBytes(msgInfo, encodeInfo(Info{Size: 5})), append(frameBytes(msgAck, encodeSeq(1)),
		frameBytes(msgBootResult, encodeBootResult(&BootResult{Reached: true, Seconds: 3, Tail: "login:"}, nil))...)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := Dial(bytes.NewReader(in), io.Discard, "/x", 0)
		if err != nil {
			return
		}
		defer c.Close()
		c.WriteAt([]byte{1, 2, 3}, 0)
		c.Sync()
		c.Boot(context.Background(), BootRequest{Marker: "m", Timeout: time.Millisecond})
	})
}
