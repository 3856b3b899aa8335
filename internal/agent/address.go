package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultPort is the agent's TCP port when an address names none.
const DefaultPort = 7412

// Address is where a caller finds an agent: TCP (with TLS), or the unix
// socket that is the host side of a QEMU guest's virtio-serial port.
type Address struct {
	Network string // "tcp" or "unix"
	Addr    string // HOST:PORT, or the socket's path
}

// ParseAddress reads HOST[:PORT], tcp:HOST[:PORT], agent://HOST[:PORT]
// (the form of backup's --quiesce) or unix:PATH.
func ParseAddress(s string) (Address, error) {
	if s == "" {
		return Address{}, errors.New("empty agent address")
	}
	if len(s) > 1024 {
		return Address{}, fmt.Errorf("agent address %.40q...: longer than 1024 bytes", s)
	}
	if p, ok := strings.CutPrefix(s, "unix:"); ok {
		if p == "" {
			return Address{}, errors.New("unix: wants the socket's path, as in unix:/run/vm1-agent.sock")
		}
		return Address{Network: "unix", Addr: p}, nil
	}
	hp := s
	for _, pre := range []string{"agent://", "tcp:"} {
		if rest, ok := strings.CutPrefix(s, pre); ok {
			hp = strings.TrimSuffix(rest, "/")
			break
		}
	}
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		// No port: the default one. A bare IPv6 address has colons of
		// its own and must be bracketed to carry a port.
		if strings.Count(hp, ":") > 1 && !strings.HasPrefix(hp, "[") {
			host, port = hp, strconv.Itoa(DefaultPort)
		} else if !strings.Contains(hp, ":") {
			host, port = hp, strconv.Itoa(DefaultPort)
		} else {
			return Address{}, fmt.Errorf("agent address %.80q: want HOST:PORT, tcp:HOST:PORT or unix:PATH", s)
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || !validHost(host) {
		return Address{}, fmt.Errorf("agent address %.80q: want HOST:PORT, tcp:HOST:PORT or unix:PATH", s)
	}
	return Address{Network: "tcp", Addr: net.JoinHostPort(strings.ToLower(host), strconv.Itoa(n))}, nil
}

// Key is the address as a known-agents file lists it: HOST:PORT or
// unix:PATH.
func (a Address) Key() string {
	if a.Network == "unix" {
		return "unix:" + a.Addr
	}
	return a.Addr
}

func (a Address) String() string { return a.Key() }

// validHost accepts an IP address or a DNS name.
func validHost(h string) bool {
	if _, err := netip.ParseAddr(h); err == nil {
		return true
	}
	// "tcp" and "unix" are the prefixes: HOST:PORT of such a host would
	// read back as another address.
	if h == "" || len(h) > 253 || strings.EqualFold(h, "tcp") || strings.EqualFold(h, "unix") {
		return false
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}
