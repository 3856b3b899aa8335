// Package faultproxy is a TCP proxy for tests and benchmarks that stands
// between sauve and a storage server on the loopback interface. It counts
// the bytes that cross it each way and, when told to, injects the faults a
// real network has: connections dropped (reset) in the middle of a
// transfer, transfers that stall, and responses cut short.
//
// Faults are drawn per connection from a seeded random source, so a
// failing run can be replayed with its seed. A fault strikes after a random
// number of bytes (up to Faults.Within) in a random direction.
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

// Faults says how often each fault strikes a new connection. The
// probabilities add up to at most 1; the rest of the connections pass
// untouched.
type Faults struct {
	Drop     float64       // reset both sides after some bytes
	Stall    float64       // stop forwarding for StallFor after some bytes
	Truncate float64       // forward part of a response, then close
	StallFor time.Duration // default 5s
	Within   int64         // faults strike within this many bytes (default 4 MiB)
	Seed     uint64
	// FaultFirst makes the first connection always faulty (with one of
	// the kinds above), so that a test over one long connection (SSH)
	// meets at least one fault.
	FaultFirst bool
}

// Stats are the proxy's counters.
type Stats struct {
	Conns    int64
	Faulted  int64 // connections drawn to fail
	Struck   int64 // faults that happened (a connection may end first)
	Up, Down int64 // bytes client→server, server→client
}

// Proxy forwards connections from Addr to a target.
type Proxy struct {
	Addr   string
	target string
	ln     net.Listener

	mu     sync.Mutex
	faults Faults
	rng    *rand.Rand
	conns  map[net.Conn]struct{}
	closed bool
	quit   chan struct{}
	wg     sync.WaitGroup

	nconns, faulted, struck, up, down atomic.Int64
	drawn                             int
}

// Start listens on a free port of 127.0.0.1 and forwards to target.
func Start(target string, f Faults) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, conns: map[net.Conn]struct{}{}, quit: make(chan struct{})}
	p.SetFaults(f)
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// SetFaults changes the faults for new connections.
func (p *Proxy) SetFaults(f Faults) {
	if f.StallFor <= 0 {
		f.StallFor = 5 * time.Second
	}
	if f.Within <= 0 {
		f.Within = 4 << 20
	}
	p.mu.Lock()
	p.faults = f
	p.rng = rand.New(rand.NewPCG(f.Seed, 0x5a17e))
	p.drawn = 0
	p.mu.Unlock()
}

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	return Stats{Conns: p.nconns.Load(), Faulted: p.faulted.Load(), Struck: p.struck.Load(), Up: p.up.Load(), Down: p.down.Load()}
}

// ResetStats zeroes the byte and connection counters.
func (p *Proxy) ResetStats() {
	p.nconns.Store(0)
	p.faulted.Store(0)
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

type plan struct {
	kind  int // 0 none, 1 drop, 2 stall, 3 truncate
	up    bool
	after int64
	stall time.Duration
}

func (p *Proxy) draw() plan {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.faults
	x := p.rng.Float64()
	if total := f.Drop + f.Stall + f.Truncate; f.FaultFirst && p.drawn == 0 && total > 0 {
		x *= total
	}
	p.drawn++
	pl := plan{after: p.rng.Int64N(f.Within) + 1, up: p.rng.IntN(2) == 0, stall: f.StallFor}
	switch {
	case x < f.Drop:
		pl.kind = 1
	case x < f.Drop+f.Stall:
		pl.kind = 2
	case x < f.Drop+f.Stall+f.Truncate:
		pl.kind, pl.up = 3, false
	}
	return pl
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
	pl := p.draw()
	if pl.kind != 0 {
		p.faulted.Add(1)
	}
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
	pipe := func(dst, src net.Conn, up bool, count *atomic.Int64) {
		defer func() { done <- struct{}{} }()
		var moved int64
		buf := make([]byte, 64<<10)
		armed := pl.kind != 0 && pl.up == up
		for {
			n, err := src.Read(buf)
			if n > 0 {
				chunk := buf[:n]
				if armed && moved+int64(n) >= pl.after {
					k := pl.after - moved
					if _, werr := dst.Write(chunk[:k]); werr != nil {
						kill(false)
						return
					}
					count.Add(k)
					moved += k
					chunk = chunk[k:]
					armed = false
					p.struck.Add(1)
					switch pl.kind {
					case 1:
						kill(true)
						return
					case 3:
						kill(false)
						return
					case 2:
						t := time.NewTimer(pl.stall)
						select {
						case <-t.C:
						case <-p.quit:
							t.Stop()
						}
					}
				}
				if len(chunk) > 0 {
					if _, werr := dst.Write(chunk); werr != nil {
						kill(false)
						return
					}
					count.Add(int64(len(chunk)))
					moved += int64(len(chunk))
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
	go pipe(server, client, true, &p.up)
	go pipe(client, server, false, &p.down)
	<-done
	<-done
	kill(false)
}
