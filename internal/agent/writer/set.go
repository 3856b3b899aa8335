package writer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// A Writer flushes one application and holds it still until Thaw.
type Writer interface {
	// Name says which application, for reports and errors: "hooks",
	// "postgresql (/var/run/postgresql)", "mariadb (/run/mysqld/mysqld.sock)".
	// It never holds a password.
	Name() string
	// Freeze returns once the application is flushed and held, or, by
	// ctx's deadline or cancellation, with an error. What it took before
	// it failed stays taken until Thaw, which the caller always calls.
	Freeze(ctx context.Context) error
	// Thaw releases what Freeze took. It is safe after a failed or partial
	// Freeze, and calling it again does nothing. ctx bounds only how long
	// it waits: what needs no waiting (closing a connection) happens even
	// when ctx is already done. An error that wraps ErrLost says the
	// application was released before Thaw, so the window was not covered.
	Thaw(ctx context.Context) error
}

// A Detailer is a Writer that has more to say about its last Freeze than
// how long it took, such as how long PostgreSQL's CHECKPOINT ran. A Set puts
// it in the writer's Result.
type Detailer interface {
	// Detail is one line on the last Freeze, "" when there is nothing to
	// say.
	Detail() string
}

// ErrLost is wrapped by the error of a Writer's Thaw when what Freeze held
// was released before Thaw (a MySQL connection killed during the window): a
// copy taken during the window may not be application-consistent. Held
// records such a snapshot as crash-consistent.
var ErrLost = errors.New("released before thaw")

// Policy is what a writer that fails to freeze does to the snapshot.
type Policy int

const (
	// Abort (the default) thaws every writer and fails: no snapshot is taken.
	Abort Policy = iota
	// Degrade thaws the failing writer, keeps the others frozen, and lets
	// the snapshot be taken as crash-consistent.
	Degrade
)

// String is the name ParsePolicy reads.
func (p Policy) String() string {
	switch p {
	case Abort:
		return "abort"
	case Degrade:
		return "degrade"
	}
	return fmt.Sprintf("Policy(%d)", int(p))
}

// ParsePolicy reads a policy from a flag: "abort", or "degrade" (also
// "continue", the word of --hook-failure).
func ParsePolicy(s string) (Policy, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "abort":
		return Abort, nil
	case "degrade", "continue":
		return Degrade, nil
	}
	return Abort, fmt.Errorf("unknown writer failure policy %q: want abort or continue", s)
}

// DefaultDeadline is how long each writer's Freeze may take when
// Set.Deadline is 0. It matches the filesystems' default freeze window
// (shadow.DefaultFreezeTimeout): a writer slower than that would outlast the
// copy it is meant to cover.
const DefaultDeadline = 10 * time.Second

// The consistencies a Report records.
const (
	// Application: every writer was frozen for the whole window.
	Application = "application"
	// Crash: at least one writer was not (or there were none): the copy is
	// what a power cut would have left.
	Crash = "crash"
)

// A Set freezes its writers in order, each under Deadline, and applies
// Policy to those that fail.
type Set struct {
	// Writers are frozen in this order and thawed in the reverse one, so a
	// writer may rely on those before it being frozen (hooks that stop a
	// service before its database is flushed, say).
	Writers []Writer
	// Deadline bounds each writer's Freeze, and each writer's Thaw
	// (DefaultDeadline when 0).
	Deadline time.Duration
	// Policy says what a writer that fails to freeze does.
	Policy Policy
}

// Report says what a Set's freeze achieved, for the snapshot's metadata.
type Report struct {
	// Consistency is Application or Crash.
	Consistency string `json:"consistency"`
	// Reason says why the snapshot is crash-consistent; empty when it is
	// application-consistent.
	Reason string `json:"reason,omitempty"`
	// Writers has one Result per writer of the Set, in its order; a
	// writer never started (after an abort) has none.
	Writers []Result `json:"writers"`
	// WindowSeconds is how long applications were held at most: from the
	// start of the first Freeze to the end of the last Thaw. 0 until Thaw.
	WindowSeconds float64 `json:"window_seconds,omitempty"`
}

// Result is what one writer did.
type Result struct {
	Name string `json:"name"`
	// Frozen is true when Freeze succeeded (and false under Degrade for a
	// writer that failed and was thawed again).
	Frozen bool `json:"frozen"`
	// Seconds is how long Freeze took, to success or failure.
	Seconds float64 `json:"seconds"`
	// Detail is what a Detailer said, such as how long a CHECKPOINT took.
	Detail string `json:"detail,omitempty"`
	// Error is why Freeze failed.
	Error string `json:"error,omitempty"`
	// ThawError is why Thaw failed.
	ThawError string `json:"thaw_error,omitempty"`
}

// Held is a set of writers frozen by Set.Freeze, until Thaw.
type Held struct {
	deadline time.Duration
	start    time.Time

	mu      sync.Mutex
	held    []int // indexes in report.Writers (and writers) still frozen, in freeze order
	writers []Writer
	report  Report
	thawed  bool
	thawErr error
}

func (s *Set) deadline() time.Duration {
	if s.Deadline <= 0 {
		return DefaultDeadline
	}
	return s.Deadline
}

// Freeze freezes the writers in order, giving each Deadline.
//
// Under Abort, the first failure thaws (in reverse order) every writer whose
// Freeze was started, the failing one included since it may have taken
// something before it failed, and returns an error that names the writer
// and says what it said. Under Degrade the failing writer is thawed, the
// others stay frozen, and the Held's report says crash-consistent and why.
// Whatever the policy, a cancelled ctx (Ctrl-C) thaws everything and fails:
// the user asked for no snapshot.
func (s *Set) Freeze(ctx context.Context) (*Held, error) {
	h := &Held{deadline: s.deadline(), start: time.Now()}
	h.report.Consistency = Application
	if len(s.Writers) == 0 {
		h.report.Consistency = Crash
		h.report.Reason = "no writer"
	}
	var reasons []string
	for _, w := range s.Writers {
		if err := ctx.Err(); err != nil {
			return nil, h.abort(ctx, fmt.Errorf("freeze writers: %w before %s", err, w.Name()))
		}
		h.writers = append(h.writers, w)
		i := len(h.report.Writers)
		h.report.Writers = append(h.report.Writers, Result{Name: w.Name()})
		h.held = append(h.held, i) // started: thawed from now on, whatever happens
		wctx, cancel := context.WithTimeout(ctx, h.deadline)
		t0 := time.Now()
		err := w.Freeze(wctx)
		cancel()
		r := &h.report.Writers[i]
		r.Seconds = time.Since(t0).Seconds()
		if d, ok := w.(Detailer); ok {
			r.Detail = d.Detail()
		}
		if err == nil {
			r.Frozen = true
			continue
		}
		r.Error = err.Error()
		ferr := fmt.Errorf("freeze %s: %w", w.Name(), err)
		if s.Policy != Degrade || ctx.Err() != nil {
			return nil, h.abort(ctx, ferr)
		}
		// Degrade: this one goes back to running; the others stay held.
		h.held = h.held[:len(h.held)-1]
		if terr := h.thawOne(ctx, i); terr != nil {
			ferr = errors.Join(ferr, terr)
		}
		reasons = append(reasons, ferr.Error())
	}
	if len(reasons) > 0 {
		h.report.Consistency = Crash
		h.report.Reason = strings.Join(reasons, "; ")
	}
	return h, nil
}

// abort thaws every writer started so far and returns err with whatever
// the thaws said.
func (h *Held) abort(ctx context.Context, err error) error {
	if terr := h.Thaw(ctx); terr != nil {
		err = errors.Join(err, fmt.Errorf("thaw after failed freeze: %w", terr))
	}
	return err
}

// thawOne thaws writer i under the deadline, on a context that ctx's
// cancellation does not reach, and records what it said.
func (h *Held) thawOne(ctx context.Context, i int) error {
	w := h.writers[i]
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.deadline)
	defer cancel()
	err := w.Thaw(tctx)
	if err == nil {
		return nil
	}
	h.report.Writers[i].ThawError = err.Error()
	if errors.Is(err, ErrLost) {
		h.report.Consistency = Crash
		reason := fmt.Sprintf("%s was released before thaw", w.Name())
		if h.report.Reason != "" {
			reason = h.report.Reason + "; " + reason
		}
		h.report.Reason = reason
	}
	return fmt.Errorf("thaw %s: %w", w.Name(), err)
}

// Thaw thaws every writer still frozen, in reverse order, each one even if
// another fails (the errors are joined). ctx's cancellation does not stop
// it, so the backup's own context is fine even after Ctrl-C cancelled it;
// each writer's Thaw is bounded by the Set's Deadline instead. Thaw again
// returns what the first said and thaws nothing.
func (h *Held) Thaw(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.thawed {
		return h.thawErr
	}
	h.thawed = true
	var errs []error
	for k := len(h.held) - 1; k >= 0; k-- {
		if err := h.thawOne(ctx, h.held[k]); err != nil {
			errs = append(errs, err)
		}
	}
	h.held = nil
	h.report.WindowSeconds = time.Since(h.start).Seconds()
	h.thawErr = errors.Join(errs...)
	return h.thawErr
}

// Report says what the freeze achieved; after Thaw it also has the window,
// and says crash-consistent if a writer was released early.
func (h *Held) Report() Report {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.report
	r.Writers = append([]Result(nil), h.report.Writers...)
	return r
}
