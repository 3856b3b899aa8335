package cli

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/agent"
	"github.com/sauve-backup/sauve/internal/agent/writer"
)

// addAgentFlags adds backup's flags for --quiesce agent://: the same as
// 'sauve agent freeze' has, named so as not to clash with backup's own
// (--key is the repository's key there).
func (a *agentCallerFlags) addForBackup(f *pflag.FlagSet) {
	f.StringVar(&a.key, "agent-caller-key", "", "with --quiesce: this caller's private key ('sauve agent keygen'; default $XDG_CONFIG_HOME/sauve/agent/caller.key)")
	f.StringVar(&a.agentKey, "agent-key", "", "with --quiesce: the agent's public key, its line or its .pub file (instead of --agent-known)")
	f.StringVar(&a.known, "agent-known", "", "with --quiesce: known-agents file, the agents' keys by address (default $XDG_CONFIG_HOME/sauve/agent/known_agents)")
	f.BoolVar(&a.trustNew, "agent-trust-new", false, "with --quiesce: accept and record the key of an agent the known-agents file does not list (first use: not authenticated)")
	f.DurationVar(&a.timeout, "agent-timeout", agent.DefaultClientTimeout, "with --quiesce: longest wait to connect and authenticate to an agent")
}

// agentWriter is a writer.Writer that asks a sauve agent (in a guest, on
// a database host) to freeze its writers and filesystems for the copy.
type agentWriter struct {
	addr   string
	cfg    agent.ClientConfig
	window time.Duration

	mu     sync.Mutex
	s      *agent.Session
	detail string
}

// newAgentWriter reads a --quiesce value: agent://HOST:PORT, HOST:PORT
// or unix:PATH.
func newAgentWriter(spec string, cfg agent.ClientConfig, window time.Duration) (*agentWriter, error) {
	if _, err := agent.ParseAddress(spec); err != nil {
		return nil, err
	}
	return &agentWriter{addr: spec, cfg: cfg, window: window}, nil
}

func (w *agentWriter) Name() string { return "agent " + strings.TrimPrefix(w.addr, "agent://") }

// Detail says what the agent froze.
func (w *agentWriter) Detail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.detail
}

// Freeze connects, authenticates both ways and asks the agent to freeze.
func (w *agentWriter) Freeze(ctx context.Context) error {
	s, err := agent.Dial(ctx, w.addr, w.cfg)
	if err != nil {
		return w.unnamed(err)
	}
	w.mu.Lock()
	w.s = s
	w.mu.Unlock()
	rep, err := s.Freeze(ctx, w.window)
	if err != nil {
		return w.unnamed(err)
	}
	var parts []string
	for _, x := range rep.Writers {
		parts = append(parts, x.Name)
	}
	parts = append(parts, rep.Mounts...)
	w.mu.Lock()
	w.detail = fmt.Sprintf("froze %s (window %s)", strings.Join(parts, ", "), rep.Window)
	w.mu.Unlock()
	return nil
}

// Thaw asks the thaw and hangs up; a freeze that did not hold until then
// (the window ended, the connection broke) is a lost hold: the copy is
// crash-consistent.
func (w *agentWriter) Thaw(ctx context.Context) error {
	w.mu.Lock()
	s := w.s
	w.s = nil
	w.mu.Unlock()
	if s == nil {
		return nil
	}
	defer s.Close()
	th, err := s.Thaw(ctx)
	if err == nil && !th.Held {
		err = fmt.Errorf("the agent thawed first (%s)", th.Reason)
	}
	if err != nil {
		return fmt.Errorf("agent %s: %w: %w", w.addr, writer.ErrLost, err)
	}
	return nil
}

// unnamed drops the agent's address from the front of the client's error:
// the writer's name, which the Set puts in front, says it already.
func (w *agentWriter) unnamed(err error) error {
	msg, name := err.Error(), w.Name()
	for _, p := range []string{name + ": ", name + " "} {
		if rest, ok := strings.CutPrefix(msg, p); ok {
			return &renamed{msg: rest, err: err}
		}
	}
	return err
}

// renamed is an error with another message, still wrapping the first.
type renamed struct {
	msg string
	err error
}

func (e *renamed) Error() string { return e.msg }
func (e *renamed) Unwrap() error { return e.err }
