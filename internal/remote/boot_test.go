package remote

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// bootMem is a memory target that test-boots: it records the request
// and what its writes made of it, and answers with res, or waits for
// its context when block is set.
type bootMem struct {
	*memTarget
	req     BootRequest
	synced  int // syncs before the boot
	res     *BootResult
	err     error
	block   bool
	aborted chan struct{}
}

func (b *bootMem) Boot(ctx context.Context, req BootRequest) (*BootResult, error) {
	b.req, b.synced = req, b.syncs
	if b.block {
		<-ctx.Done()
		close(b.aborted)
		return nil, ctx.Err()
	}
	return b.res, b.err
}

func bootPair(t *testing.T, tgt Target) (*Client, net.Conn, chan error) {
	t.Helper()
	a, b := net.Pipe()
	served := make(chan error, 1)
	open := func(string, int64) (Target, Info, error) { return tgt, Info{Size: 1 << 20, Host: "far"}, nil }
	go func() { served <- Serve(context.Background(), b, b, open); b.Close() }()
	c, err := Dial(a, a, "/dev/vdb", 0)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { a.Close(); c.Close() })
	return c, a, served
}

var testReq = BootRequest{Marker: "web1 login:", Timeout: 90 * time.Second, Memory: "512M", Accel: "tcg", Firmware: "/usr/share/OVMF/OVMF_CODE.fd"}

// A boot request reaches the remote end's target once the writes before
// it are synced, with every field; its verdict comes back, and the
// session goes on.
func TestBootRoundTrip(t *testing.T) {
	for _, want := range []BootResult{
		{Reached: true, Seconds: 12.5, Tail: "Debian 12\r\nweb1 login: "},
		{Reached: false, Seconds: 90, Tail: strings.Repeat("x", maxBootTail+100)},
	} {
		m := &bootMem{memTarget: newMem(1 << 20), res: &want}
		c, _, _ := bootPair(t, m)
		c.WriteAt([]byte("boot sector"), 0)
		res, err := c.Boot(context.Background(), testReq)
		if err != nil {
			t.Fatal(err)
		}
		if m.req != testReq || m.synced != 1 || !bytes.HasPrefix(m.b, []byte("boot sector")) {
			t.Errorf("the remote end booted with %+v after %d syncs", m.req, m.synced)
		}
		wantTail := want.Tail[max(0, len(want.Tail)-maxBootTail):]
		if res.Reached != want.Reached || res.Seconds != want.Seconds || res.Tail != wantTail {
			t.Errorf("result %+v, want %+v", res, want)
		}
		if _, err := c.WriteAt([]byte("more"), 100); err != nil {
			t.Fatal(err)
		}
		if err := c.Sync(); err != nil {
			t.Fatalf("the session after the boot: %v", err)
		}
	}
}

// A boot the remote end cannot run (no QEMU there, a target that does
// not boot) is an error of its words, and the session goes on.
func TestBootRefused(t *testing.T) {
	for _, tc := range []struct {
		tgt  Target
		want string
	}{
		{&bootMem{memTarget: newMem(1 << 20), err: errors.New("the remote host has no qemu-system-x86_64")}, "no qemu-system-x86_64"},
		{newMem(1 << 20), "cannot be test-booted"},
	} {
		c, _, _ := bootPair(t, tc.tgt)
		_, err := c.Boot(context.Background(), testReq)
		var re *RemoteError
		if !errors.As(err, &re) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("boot: %v, want a remote error with %q", err, tc.want)
		}
		if err := c.Sync(); err != nil {
			t.Errorf("the session after a refused boot: %v", err)
		}
	}
}

// The local end going away during a boot ends the boot there.
func TestBootAbandoned(t *testing.T) {
	m := &bootMem{memTarget: newMem(1 << 20), block: true, aborted: make(chan struct{})}
	c, conn, served := bootPair(t, m)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := c.Boot(ctx, testReq); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("boot with an ending context: %v", err)
	}
	conn.Close()
	select {
	case <-m.aborted:
	case <-time.After(5 * time.Second):
		t.Fatal("the boot went on after the local end left")
	}
	if err := <-served; err != nil {
		t.Errorf("serve: %v", err)
	}
}

// Bad boot requests and results: refused, never trusted.
func TestBootBadMessages(t *testing.T) {
	hi := helloBytes(Version, "/dev/vdb")
	long := BootRequest{Marker: "m", Timeout: MaxBootTimeout + time.Second}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"no timeout", frameBytes(msgBoot, encodeBoot(BootRequest{Marker: "m"})), "timeout"},
		{"timeout too long", frameBytes(msgBoot, encodeBoot(long)), "timeout"},
		{"no marker", frameBytes(msgBoot, encodeBoot(BootRequest{Timeout: time.Second})), "no marker"},
		{"short", frameBytes(msgBoot, []byte{0, 0, 1}), "too short"},
		{"result from the local end", frameBytes(msgBootResult, encodeBootResult(&BootResult{}, nil)), "unexpected message"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			m := &bootMem{memTarget: newMem(4096), res: &BootResult{}}
			err := Serve(context.Background(), bytes.NewReader(append(append([]byte{}, hi...), tc.in...)), &out,
				func(string, int64) (Target, Info, error) { return m, Info{Size: 4096}, nil })
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("serve: %v, want %q", err, tc.want)
			}
		})
	}
	info := frameBytes(msgInfo, encodeInfo(Info{Size: 4096}))
	for _, tc := range []struct {
		name, want string
		answer     []byte
		ask        bool
	}{
		{"unasked", "unasked", frameBytes(msgBootResult, encodeBootResult(&BootResult{Reached: true}, nil)), false},
		{"bad state", "state 7", frameBytes(msgBootResult, append([]byte{7}, make([]byte, 10)...)), true},
		{"trailing bytes", "too many", frameBytes(msgBootResult, append(encodeBootResult(&BootResult{}, nil), 0)), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The remote end: info, an ack for each sync, and the answer
			// after a boot request (or the first sync, unasked).
			inR, inW := io.Pipe()
			outR, outW := io.Pipe()
			defer inW.Close()
			defer outR.Close()
			go func() {
				br := bufio.NewReader(outR)
				if _, _, err := readFrame(br, nil); err != nil { // the hello
					return
				}
				inW.Write(info)
				for {
					f, _, err := readFrame(br, nil)
					if err != nil {
						return
					}
					switch f.typ {
					case msgSync:
						inW.Write(frameBytes(msgAck, f.payload))
						if !tc.ask {
							inW.Write(tc.answer)
						}
					case msgBoot:
						inW.Write(tc.answer)
					}
				}
			}()
			c, err := Dial(inR, outW, "/x", 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.ask {
				_, err = c.Boot(context.Background(), BootRequest{Marker: "m", Timeout: time.Second})
			} else {
				c.Sync()
				time.Sleep(50 * time.Millisecond)
				err = c.failure()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}
