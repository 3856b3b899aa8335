package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Step is one stage of a Chain: an application writer, the filesystems.
type Step interface {
	Freezer
	// Name identifies the step in the state file; unique in a chain.
	Name() string
	// Record is what the state file keeps of the step before it
	// freezes: what Recover needs to undo the freeze, should the agent
	// die before it thaws.
	Record() (json.RawMessage, error)
	// Recover undoes a freeze that an earlier run of the agent recorded
	// (rec is its Record) and did not thaw. It must do no harm when
	// nothing is frozen any more (the thaw guard, or the application,
	// let go when the agent died).
	Recover(ctx context.Context, rec json.RawMessage) error
}

// Chain is the agent's Freezer: steps frozen in order (writers first,
// so that the applications have flushed when the filesystems freeze) and
// thawed in reverse. Before it freezes anything it records the steps in
// a state file, which the thaw removes: an agent started while the file
// exists knows a run before it died frozen, and Recover thaws.
type Chain struct {
	Steps []Step
	// StateFile is where the record is kept; "" keeps none (tests). It
	// should be on a filesystem that is never frozen (/run).
	StateFile string
}

// Freeze freezes every step in order; if one fails, those before it are
// thawed. The window runs from the call: each step gets what is left.
func (c *Chain) Freeze(ctx context.Context, window time.Duration) (Frozen, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(window)
	}
	if err := c.record(deadline); err != nil {
		return nil, err
	}
	z := &chainFrozen{c: c}
	for _, st := range c.Steps {
		left := time.Until(deadline)
		if left <= 0 {
			return nil, z.undo(fmt.Errorf("no time left in the window of %s to freeze %s", window, st.Name()))
		}
		f, err := freezeStep(ctx, st, left)
		if err != nil {
			return nil, z.undo(fmt.Errorf("freeze %s: %w", st.Name(), err))
		}
		z.frozen = append(z.frozen, f)
		z.names = append(z.names, st.Name())
		z.report.merge(f.Report())
	}
	return z, nil
}

// record writes the state file of a freeze about to start.
func (c *Chain) record(until time.Time) error {
	if c.StateFile == "" {
		return nil
	}
	st := stateFile{Version: stateVersion, Started: time.Now(), Until: until}
	for _, s := range c.Steps {
		rec, err := s.Record()
		if err != nil {
			return fmt.Errorf("record %s before freezing it: %w", s.Name(), err)
		}
		st.Steps = append(st.Steps, stateStep{Name: s.Name(), Record: rec})
	}
	return writeState(c.StateFile, &st)
}

// Recover thaws what the state file says an earlier run froze, in
// reverse order, and removes the file. It returns the steps it undid
// (none when there was no file). A step recorded but no longer in the
// chain is undone if it is the filesystems (mountStepName: their thaw
// needs nothing but the record), else reported.
func (c *Chain) Recover(ctx context.Context) ([]string, error) {
	if c.StateFile == "" {
		return nil, nil
	}
	st, err := readState(c.StateFile)
	if err != nil || st == nil {
		return nil, err
	}
	var done []string
	var errs []error
	for i := len(st.Steps) - 1; i >= 0; i-- {
		rs := st.Steps[i]
		var err error
		if s := c.step(rs.Name); s != nil {
			err = s.Recover(ctx, rs.Record)
		} else if rs.Name == mountStepName {
			err = recoverMounts(rs.Record)
		} else {
			err = fmt.Errorf("step %q is not configured in this run: undo it by hand", rs.Name)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("undo %s: %w", rs.Name, err))
			continue
		}
		done = append(done, rs.Name)
	}
	if len(errs) > 0 {
		return done, fmt.Errorf("the freeze an earlier run started at %s: %w (state kept in %s)", st.Started.Format(time.RFC3339), errors.Join(errs...), c.StateFile)
	}
	return done, removeState(c.StateFile)
}

func (c *Chain) step(name string) Step {
	for _, s := range c.Steps {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

// chainFrozen is a chain's freeze: the steps frozen so far.
type chainFrozen struct {
	c      *Chain
	frozen []Frozen
	names  []string
	report FreezeReport
}

func (z *chainFrozen) Report() FreezeReport { return z.report }

// Thaw thaws every step, last first, and removes the state file once all
// thawed. A step that fails does not keep the others frozen.
func (z *chainFrozen) Thaw(ctx context.Context) error {
	var errs []error
	for i := len(z.frozen) - 1; i >= 0; i-- {
		if err := thawStep(ctx, z.frozen[i]); err != nil {
			errs = append(errs, fmt.Errorf("thaw %s: %w", z.names[i], err))
		}
	}
	if len(errs) == 0 && z.c.StateFile != "" {
		if err := removeState(z.c.StateFile); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// undo thaws what a failed freeze froze and returns why it failed.
func (z *chainFrozen) undo(why error) error {
	ctx, cancel := context.WithTimeout(context.Background(), thawTimeout)
	defer cancel()
	if err := z.Thaw(ctx); err != nil {
		return fmt.Errorf("%w; then %v", why, err)
	}
	return why
}

// freezeStep runs a step's Freeze, and gives up on it when ctx ends (the
// window's time to freeze is up) even if the step ignores ctx: a writer
// that hangs must not hold the steps before it frozen past the window.
// What the step freezes after that is thawed as soon as it returns.
func freezeStep(ctx context.Context, st Step, window time.Duration) (Frozen, error) {
	type result struct {
		f   Frozen
		err error
	}
	done := make(chan result, 1)
	go func() {
		f, err := st.Freeze(ctx, window)
		done <- result{f, err}
	}()
	select {
	case r := <-done:
		return r.f, r.err
	case <-ctx.Done():
		go func() {
			if r := <-done; r.err == nil {
				tctx, cancel := context.WithTimeout(context.Background(), thawTimeout)
				defer cancel()
				_ = r.f.Thaw(tctx)
			}
		}()
		return nil, fmt.Errorf("did not finish within the window (%w)", ctx.Err())
	}
}

// thawStep runs a step's Thaw, and stops waiting for it when ctx ends: a
// step that hangs thawing must not keep the others frozen.
func thawStep(ctx context.Context, f Frozen) error {
	done := make(chan error, 1)
	go func() { done <- f.Thaw(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("did not finish thawing (%w)", ctx.Err())
	}
}
