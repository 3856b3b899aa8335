package migrate

import "time"

// Stalls is how many passes in a row may fail to shrink the delta
// before Convergence says the source changes faster than the copy.
const Stalls = 3

// shrink is how much smaller than the best delta so far a pass's delta
// must be to count as progress: noise of a few chunks is not.
const shrink = 0.9

// Verdict is what Convergence says after a pass.
type Verdict int

// Verdicts.
const (
	Continue  Verdict = iota // run another pass
	Converged                // the delta is at most the goal
	Diverging                // the delta has not shrunk over Stalls passes
)

// Convergence follows the deltas of successive passes towards a goal
// (--until-delta).
type Convergence struct {
	Goal   int64 // bytes
	best   int64
	stalls int
	passes int
}

// Add takes a pass's delta and says what to do next. The first pass
// copies everything and is only the reference of the next ones.
func (c *Convergence) Add(delta int64) Verdict {
	c.passes++
	if c.passes > 1 && delta <= c.Goal {
		return Converged
	}
	if c.passes == 1 || float64(delta) < shrink*float64(c.best) {
		c.best, c.stalls = delta, 0
		return Continue
	}
	c.stalls++
	if c.stalls >= Stalls {
		return Diverging
	}
	return Continue
}

// Rates are a pass's rates and the estimate of the next pass.
type Rates struct {
	// ChangeRate is the bytes of the source changed per second between
	// the previous pass and this one (0 for the first pass).
	ChangeRate float64 `json:"change_rate"`
	// CopyRate is the bytes a second the pass read and wrote.
	CopyRate float64 `json:"copy_rate"`
	// NextSeconds estimates the next pass: reading and hashing every
	// used block again, and writing what changes meanwhile at this
	// pass's change rate.
	NextSeconds float64 `json:"next_seconds"`
}

// Estimate returns the rates of cur, whose previous pass started at
// prevStart (zero for the first pass).
func Estimate(prevStart time.Time, cur Pass) Rates {
	var r Rates
	moved := float64(cur.BytesRead + cur.BytesWritten + cur.BytesZeroed)
	if cur.Seconds > 0 {
		r.CopyRate = moved / cur.Seconds
	}
	if !prevStart.IsZero() {
		if d := cur.Start.Sub(prevStart).Seconds(); d > 0 {
			r.ChangeRate = float64(cur.BytesChanged) / d
		}
	}
	writeRate := 0.0
	if cur.WriteSeconds > 0 {
		writeRate = float64(cur.BytesWritten+cur.BytesZeroed) / cur.WriteSeconds
	}
	if writeRate == 0 && cur.ReadSeconds > 0 {
		writeRate = float64(cur.BytesRead) / cur.ReadSeconds
	}
	r.NextSeconds = cur.ReadSeconds
	if writeRate > 0 {
		next := r.ChangeRate * cur.Seconds
		if prevStart.IsZero() {
			next = 0 // nothing known yet of the churn
		}
		r.NextSeconds += next / writeRate
	}
	return r
}
