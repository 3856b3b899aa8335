package agent

import (
	"context"
	"time"
)

// Freezer is what the agent freezes when a caller asks: application
// writers, then filesystems (Chain). The agent calls it once at a time.
type Freezer interface {
	// Freeze freezes and returns once everything is frozen, or fails
	// leaving nothing frozen. window is the longest the freeze may last:
	// a Freezer that can thaw by itself (the thaw guard) does at the end
	// of it, so that a freeze outlives neither the window nor the agent.
	// ctx ends with the window's time to freeze, and when the caller is
	// gone.
	Freeze(ctx context.Context, window time.Duration) (Frozen, error)
}

// Frozen is a freeze in progress.
type Frozen interface {
	// Report says what is frozen.
	Report() FreezeReport
	// Thaw thaws everything. It returns an error when something did not
	// stay frozen until now (its own timeout passed, its guard died) or
	// could not be thawed: a copy taken meanwhile is then not quiesced.
	Thaw(ctx context.Context) error
}

// FreezeReport says what a freeze froze; the caller records it with its
// snapshot.
type FreezeReport struct {
	// Writers are the applications flushed and frozen, in order.
	Writers []WriterReport `json:"writers,omitempty"`
	// Mounts are the filesystems frozen (FIFREEZE), in order.
	Mounts []string `json:"mounts,omitempty"`
	// Window is the longest the freeze lasts, from the freeze request:
	// the agent thaws at its end whatever happens.
	Window time.Duration `json:"window_ns"`
	// Took is how long freezing took, from the freeze request.
	Took time.Duration `json:"took_ns"`
}

// WriterReport is one application writer of a freeze.
type WriterReport struct {
	Name   string `json:"name"`
	Detail string `json:"detail,omitempty"`
}

// merge adds what another step froze.
func (r *FreezeReport) merge(o FreezeReport) {
	r.Writers = append(r.Writers, o.Writers...)
	r.Mounts = append(r.Mounts, o.Mounts...)
}

// clean bounds what a caller prints of a report the agent sent.
func (r *FreezeReport) clean() {
	for i := range r.Writers {
		r.Writers[i].Name, r.Writers[i].Detail = clean(r.Writers[i].Name, 128), clean(r.Writers[i].Detail, 1024)
	}
	for i := range r.Mounts {
		r.Mounts[i] = clean(r.Mounts[i], 4096)
	}
}

// Thaw reasons, in ThawReport.Reason and the log.
const (
	ThawRequest    = "request"    // the caller asked
	ThawWindow     = "window"     // the window ended first
	ThawConnection = "connection" // the connection dropped or broke the protocol
	ThawStopping   = "stopping"   // the agent is stopping
	ThawFailed     = "failed"     // freezing failed or took the whole window
)

// ThawReport is the agent's answer to a thaw.
type ThawReport struct {
	// Held says the freeze lasted, unbroken, from the frozen answer to
	// the thaw request: a copy taken in between is application
	// consistent. False: treat the copy as crash-consistent only.
	Held bool `json:"held"`
	// Reason is why the agent thawed (ThawRequest, ThawWindow...).
	Reason string `json:"reason"`
	// Frozen is how long the freeze lasted, from the freeze request to
	// the thaw.
	Frozen time.Duration `json:"frozen_ns"`
	// Error says what went wrong thawing, or why the freeze did not
	// hold.
	Error string `json:"error,omitempty"`
}
