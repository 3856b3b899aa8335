// Package faultproxy is a TCP proxy for tests and benchmarks that stands
// between sauve and a storage server on the loopback interface. It counts
// the bytes that cross it each way and, when told to, injects the faults a
// real network has: connections reset in the middle of a transfer,
// transfers that stall, and responses cut short.
//
// Faults are scheduled by traffic, not per connection: after a random
// number of bytes (on average Faults.Every) has crossed the proxy, the
// connection carrying the next byte is struck. Clients that keep
// connections alive for many requests are hit as often as clients that
// open one per request, and a test that moves more than Every*3/2 bytes is
// sure to meet a fault. The random source is seeded, for replays.
package faultproxy

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Fault kinds.
const (
	None = iota
	Drop
	Stall
	Truncate
	Cut
)

// Faults says how often faults strike and which. The weights need not add
// up to anything; all zero means no faults.
type Faults struct {
	// Every is the mean number of bytes between faults (gaps are drawn
	// uniformly between half and one and a half of it).
	Every int64
	// Weights of the kinds: Drop resets the connection, Stall stops
	// forwarding it for StallFor (default 5s) and then goes on, Truncate
	// ends a response early (closes the connection; a request is dropped
	// instead), Cut ends a request early with a FIN, as the kernel of a
	// killed client does (a response is truncated instead).
	Drop, Stall, Truncate, Cut float64
	StallFor                   time.Duration
	Seed                       uint64
	// First, when set, places the first fault exactly: after this many
	// bytes.
	First int64
}

// Stats are the proxy's counters.
type Stats struct {
	Conns    int64
	Struck   int64 // faults injected
	Up, Down int64 // bytes client→server, server→client
}

// Proxy forwards connections from Addr to a target.
type Proxy struct {
	Addr   string
	target string
	ln     net.Listener
	quit   chan struct{}
	wg     sync.WaitGroup

	mu     sync.Mutex
	faults Faults
	rng    *rand.Rand
	left   int64 // bytes until the next fault
	conns  map[net.Conn]struct{}
	closed bool

	nconns, struck, up, down atomic.Int64
}

// Start listens on a free port of 127.0.0.1 and forwards to target.
func Start(target string, f Faults) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, quit: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	p.SetFaults(f)
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// SetFaults replaces the fault schedule (Faults{} turns faults off).
func (p *Proxy) SetFaults(f Faults) {
	if f.StallFor <= 0 {
		f.StallFor = 5 * time.Second
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults = f
	p.rng = rand.New(rand.NewPCG(f.Seed, 0x5a17e))
	if f.Every > 0 {
		p.left = p.rng.Int64N(f.Every) + 1
	}
	if f.First > 0 {
		p.left = f.First
	}
}

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	return Stats{Conns: p.nconns.Load(), Struck: p.struck.Load(), Up: p.up.Load(), Down: p.down.Load()}
}

// ResetStats zeroes the counters.
func (p *Proxy) ResetStats() {
	p.nconns.Store(0)
	p.struck.Store(0)
	p.up.Store(0)
	p.down.Store(0)
}

// Close stops listening and cuts every connection.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if !p.closed {
		close(p.quit)
	}
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn, add bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		if p.closed {
			return false
		}
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
	return true
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.handle(c)
		}()
	}
}

// take lets up to n bytes through; if a fault is due within them, it
// returns how many bytes pass first and the fault's kind.
func (p *Proxy) take(n int64, down bool) (int64, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.faults
	total := f.Drop + f.Stall + f.Truncate + f.Cut
	if (f.Every <= 0 && f.First <= 0) || total <= 0 || p.left <= 0 {
		return n, None
	}
	if n < p.left {
		p.left -= n
		return n, None
	}
	pass := p.left
	p.left = 0 // no more faults, unless Every schedules them
	if f.Every > 0 {
		p.left = f.Every/2 + p.rng.Int64N(f.Every+1)
	}
	x := p.rng.Float64() * total
	kind := Cut
	switch {
	case x < f.Drop:
		kind = Drop
	case x < f.Drop+f.Stall:
		kind = Stall
	case x < f.Drop+f.Stall+f.Truncate:
		kind = Truncate
	}
	switch {
	case kind == Truncate && !down:
		kind = Drop
	case kind == Cut && down:
		kind = Truncate
	}
	return pass, kind
}

func (p *Proxy) handle(client net.Conn) {
	server, err := net.DialTimeout("tcp", p.target, 10*time.Second)
	if err != nil {
		client.Close()
		return
	}
	if !p.track(client, true) || !p.track(server, true) {
		client.Close()
		server.Close()
		return
	}
	defer p.track(client, false)
	defer p.track(server, false)
	p.nconns.Add(1)
	var once sync.Once
	kill := func(reset bool) {
		once.Do(func() {
			if reset {
				for _, c := range []net.Conn{client, server} {
					if tc, ok := c.(*net.TCPConn); ok {
						tc.SetLinger(0) // RST, as a dropped route or a crashed peer
					}
				}
			}
			client.Close()
			server.Close()
		})
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn, down bool, count *atomic.Int64) {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 64<<10)
		for {
			n, err := src.Read(buf)
			for chunk := buf[:n]; len(chunk) > 0; {
				pass, kind := p.take(int64(len(chunk)), down)
				if pass > 0 {
					if _, werr := dst.Write(chunk[:pass]); werr != nil {
						kill(false)
						return
					}
					count.Add(pass)
				}
				chunk = chunk[pass:]
				if kind == None {
					continue
				}
				p.struck.Add(1)
				switch kind {
				case Drop:
					kill(true)
					return
				case Truncate:
					kill(false)
					return
				case Cut:
					// The server sees the end of the stream, not an
					// error, and must notice the body is incomplete.
					if tc, ok := dst.(*net.TCPConn); ok {
						tc.CloseWrite()
						io.Copy(io.Discard, src)
						return
					}
					kill(false)
					return
				case Stall:
					p.mu.Lock()
					d := p.faults.StallFor
					p.mu.Unlock()
					t := time.NewTimer(d)
					select {
					case <-t.C:
					case <-p.quit:
						t.Stop()
					}
				}
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					// Half-close: pass the end on, keep the other way open.
					if tc, ok := dst.(*net.TCPConn); ok {
						tc.CloseWrite()
						return
					}
				}
				kill(false)
				return
			}
		}
	}
	go pipe(server, client, false, &p.up)
	go pipe(client, server, true, &p.down)
	<-done
	<-done
	kill(false)
}
