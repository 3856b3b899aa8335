package repo

import (
	"time"

	"github.com/sauve-backup/sauve/internal/crypto"
)

// Clock is the writer's clock of write sessions, for tests that drive it.
type Clock = clock

// SetSessionTiming makes r's write sessions state lifetime, renew every
// renew and measure time with c, so that tests play hours of a session
// without sleeping.
func SetSessionTiming(r *Repository, lifetime, renew time.Duration, c Clock) {
	r.timing = sessionTiming{lifetime: lifetime, renew: renew, clock: c}
}

// EncodeAnnouncement signs an announcement with keys and seals it with
// r's metadata key, as a writer holding keys could without sauve.
func EncodeAnnouncement(r *Repository, keys *crypto.Keys, a *Announcement) []byte {
	data, err := encodeAnnouncement(r.meta, keys, a)
	if err != nil {
		panic(err)
	}
	return data
}

// SetIndexBuildBatch bounds the entries a build of the local index file
// holds in memory, so that a test builds it through many runs.
func SetIndexBuildBatch(r *Repository, n int) { r.dbBuildEntries = n }
