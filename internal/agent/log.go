package agent

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// LogWriter passes log lines to w from a goroutine of its own, through a
// bounded queue. The agent must never wait on its log: the file may be
// on a filesystem it froze (a write there waits for the thaw the agent
// is about to make), and stderr may be a pipe to a journald that writes
// to one. A line that finds the queue full is dropped and counted; the
// count is logged as soon as the writer catches up.
type LogWriter struct {
	w       io.Writer
	lines   chan []byte
	done    chan struct{}
	dropped atomic.Int64
	mu      sync.Mutex // guards closed, and sends against close
	closed  bool
}

// logQueue is how many lines wait for a slow log before lines drop.
const logQueue = 4096

// NewLogWriter starts writing to w; Close stops.
func NewLogWriter(w io.Writer) *LogWriter {
	l := &LogWriter{w: w, lines: make(chan []byte, logQueue), done: make(chan struct{})}
	go l.run()
	return l
}

// Write queues one line (slog's handlers write a record in one call).
func (l *LogWriter) Write(p []byte) (int, error) {
	line := append([]byte(nil), p...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return len(p), nil
	}
	select {
	case l.lines <- line:
	default:
		l.dropped.Add(1)
	}
	return len(p), nil
}

func droppedLine(n int64) []byte {
	return fmt.Appendf(nil, `{"time":%q,"level":"WARN","msg":"log lines dropped: the log could not keep up","count":%d}`+"\n",
		time.Now().Format(time.RFC3339Nano), n)
}

func (l *LogWriter) run() {
	defer close(l.done)
	for line := range l.lines {
		_, _ = l.w.Write(line)
		if n := l.dropped.Swap(0); n > 0 {
			_, _ = l.w.Write(droppedLine(n))
		}
	}
	if n := l.dropped.Swap(0); n > 0 {
		_, _ = l.w.Write(droppedLine(n))
	}
}

// Close writes what is queued and stops. It waits at most timeout: a log
// held by a frozen filesystem must not keep the agent from exiting.
func (l *LogWriter) Close(timeout time.Duration) {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.lines)
	}
	l.mu.Unlock()
	select {
	case <-l.done:
	case <-time.After(timeout):
	}
}

// NewLogger is the agent's log: JSON lines, one per event, through w.
func NewLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// Log attribute names, the same for every event so that the log can be
// searched by caller: key is the caller's key fingerprint, addr its
// address, outcome what the agent did.
const (
	logKey     = "key"
	logAddr    = "addr"
	logOutcome = "outcome"
	logReason  = "reason"
	logSession = "session"
)

// Outcomes in the log.
const (
	outcomeAccepted = "accepted"
	outcomeRefused  = "refused"
	outcomeFrozen   = "frozen"
	outcomeFailed   = "failed"
	outcomeThawed   = "thawed"
)

// discardLogger is the log of a server configured without one.
func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
