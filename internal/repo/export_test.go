package repo

import "time"

// Clock is the writer's clock of write sessions, for tests that drive it.
type Clock = clock

// SetSessionTiming makes r's write sessions state lifetime, renew every
// renew and measure time with c, so that tests play hours of a session
// without sleeping.
func SetSessionTiming(r *Repository, lifetime, renew time.Duration, c Clock) {
	r.timing = sessionTiming{lifetime: lifetime, renew: renew, clock: c}
}
