package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// KnownAgent is one line of a known-agents file: the key an agent at an
// address must prove it holds.
type KnownAgent struct {
	Addr    string // as Address.Key gives it: "HOST:PORT" or "unix:PATH"
	Key     PublicKey
	Comment string
	Line    int
}

// String is the agent's line in a known-agents file.
func (k *KnownAgent) String() string { return k.Addr + " " + k.Key.Line(k.Comment) }

// KnownAgents is a parsed known-agents file.
type KnownAgents struct {
	Path   string
	Agents []KnownAgent
}

// Lookup finds the agent known at addr (an Address.Key).
func (ka *KnownAgents) Lookup(addr string) (*KnownAgent, bool) {
	for i := range ka.Agents {
		if ka.Agents[i].Addr == addr {
			return &ka.Agents[i], true
		}
	}
	return nil, false
}

// ParseKnownLine reads "ADDR sauve-ed25519 BASE64 [COMMENT]". Blank lines
// and # comments give ok false.
func ParseKnownLine(line string) (k KnownAgent, ok bool, err error) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return k, false, nil
	}
	if len(line) > maxListLine {
		return k, false, fmt.Errorf("longer than %d bytes", maxListLine)
	}
	addr, rest, found := strings.Cut(line, " ")
	if !found {
		return k, false, errors.New("want ADDRESS " + KeyType + " BASE64 [COMMENT]")
	}
	a, err := ParseAddress(addr)
	if err != nil {
		return k, false, err
	}
	key, comment, err := ParsePublicKey(rest)
	if err != nil {
		return k, false, err
	}
	return KnownAgent{Addr: a.Key(), Key: key, Comment: comment}, true, nil
}

// ParseKnown reads a whole file; name is used in errors. An address
// listed twice is an error: which key it must have would be a guess.
func ParseKnown(r io.Reader, name string) (*KnownAgents, error) {
	ka := &KnownAgents{Path: name}
	err := readLines(r, name, func(n int, line string) error {
		k, ok, err := ParseKnownLine(line)
		if err != nil || !ok {
			return err
		}
		if prev, dup := ka.Lookup(k.Addr); dup {
			return fmt.Errorf("agent %s is listed already on line %d", k.Addr, prev.Line)
		}
		k.Line = n
		ka.Agents = append(ka.Agents, k)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ka, nil
}

// LoadKnown reads the known-agents file at path; a missing file knows
// no agent.
func LoadKnown(path string) (*KnownAgents, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return &KnownAgents{Path: path}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the known agents: %w", err)
	}
	defer f.Close()
	return ParseKnown(f, path)
}

// AppendKnown records the key of the agent at addr in the file at path,
// refusing an address it lists already: a changed key is replaced by
// hand, never by a caller that just met it.
func AppendKnown(path string, k KnownAgent) error {
	ka, err := LoadKnown(path)
	if err != nil {
		return err
	}
	if prev, dup := ka.Lookup(k.Addr); dup {
		return fmt.Errorf("agent %s is in %s already (line %d)", k.Addr, path, prev.Line)
	}
	return appendLine(path, k.String())
}
