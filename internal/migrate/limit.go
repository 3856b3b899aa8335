package migrate

import (
	"context"
	"sync"
	"time"
)

// Limiter throttles the bytes a pass reads and writes to a rate, for
// links and disks shared with production. A nil Limiter does not
// throttle.
type Limiter struct {
	rate float64 // bytes per second
	mu   sync.Mutex
	// next is when the bytes granted so far are paid for.
	next time.Time
}

// NewLimiter returns a Limiter of rate bytes per second (nil when
// rate <= 0: no limit).
func NewLimiter(rate int64) *Limiter {
	if rate <= 0 {
		return nil
	}
	return &Limiter{rate: float64(rate)}
}

// Wait waits until n more bytes fit in the rate, or ctx ends.
func (l *Limiter) Wait(ctx context.Context, n int64) error {
	if l == nil || n <= 0 {
		return ctx.Err()
	}
	l.mu.Lock()
	now := time.Now()
	// At most a quarter second of burst after a pause.
	if l.next.Before(now.Add(-250 * time.Millisecond)) {
		l.next = now.Add(-250 * time.Millisecond)
	}
	l.next = l.next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	wait := l.next.Sub(now)
	l.mu.Unlock()
	if wait <= 0 {
		return ctx.Err()
	}
	tm := time.NewTimer(wait)
	defer tm.Stop()
	select {
	case <-tm.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
