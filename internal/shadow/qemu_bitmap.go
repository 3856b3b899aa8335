package shadow

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Dirty bitmaps. Each backup of a qcow2 drive adds, at its instant, a
// persistent bitmap (a generation) that records every write after it,
// and stops the one before: the writes between two backups are in the
// generations from the earlier backup's onwards. A generation is named
//
//	sauve-<unix nanoseconds, 16 hex>-<random, 8 hex>[-<random of the generation before>]
//
// so that names sort by age, a bitmap of another tool is never taken for
// one (and is left alone), and a generation missing from the chain is
// noticed: its successor names it.

// TrackerPrefix starts the View.Tracker of a drive tracked by a QEMU
// dirty bitmap; the bitmap's name follows.
const TrackerPrefix = "qemu-bitmap:"

// bitmapGranularity is the unit of the dirty bitmaps: a write marks every
// 64 KiB block it touches.
const bitmapGranularity = 64 << 10

var generationRE = regexp.MustCompile(`^sauve-([0-9a-f]{16})-([0-9a-f]{8})(?:-([0-9a-f]{8}))?$`)

// generation is one of sauve's dirty bitmaps on a drive.
type generation struct {
	name       string
	nanos      uint64
	id, prev   string
	recording  bool
	consistent bool
}

func parseGeneration(b qBitmap) (generation, bool) {
	m := generationRE.FindStringSubmatch(b.Name)
	if m == nil || !b.Persistent {
		return generation{}, false
	}
	n, err := strconv.ParseUint(m[1], 16, 64)
	if err != nil {
		return generation{}, false
	}
	return generation{name: b.Name, nanos: n, id: m[2], prev: m[3], recording: b.Recording, consistent: !b.Inconsistent}, true
}

// generations returns sauve's bitmaps among bitmaps, oldest first.
func generations(bitmaps []qBitmap) []generation {
	var gens []generation
	for _, b := range bitmaps {
		if g, ok := parseGeneration(b); ok {
			gens = append(gens, g)
		}
	}
	sort.Slice(gens, func(i, j int) bool { return gens[i].name < gens[j].name })
	return gens
}

// newGeneration names the generation that follows gens (oldest first),
// made at now. Its time is after every existing one, so that it sorts
// last even if the clock went back.
func newGeneration(now time.Time, gens []generation) (string, error) {
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	n := uint64(now.UnixNano())
	name := fmt.Sprintf("sauve-%016x-%s", n, hex.EncodeToString(r[:]))
	if len(gens) > 0 {
		last := gens[len(gens)-1]
		if n <= last.nanos {
			n = last.nanos + 1
			name = fmt.Sprintf("sauve-%016x-%s", n, hex.EncodeToString(r[:]))
		}
		name += "-" + last.id
	}
	return name, nil
}

// changesSince returns the generations (of gens, oldest first, without
// the new one) whose union is every write to drive since the instant of
// tracker, the Tracker of the earlier backup; or why there are none.
func changesSince(gens []generation, tracker, drive string) (merge []string, fullRead string) {
	if tracker == "" {
		return nil, fmt.Sprintf("no earlier backup of %s through this VM", drive)
	}
	name, ok := strings.CutPrefix(tracker, TrackerPrefix)
	if !ok || !generationRE.MatchString(name) {
		return nil, fmt.Sprintf("the earlier backup of %s was not tracked by a sauve dirty bitmap (%s)", drive, tracker)
	}
	from := -1
	for i, g := range gens {
		if g.name == name {
			from = i
		}
	}
	if from < 0 {
		return nil, fmt.Sprintf("bitmap %s is missing from %s (QEMU stopped before saving it, it was removed, or the image was replaced)", name, drive)
	}
	for i := from; i < len(gens); i++ {
		g := gens[i]
		if !g.consistent {
			return nil, fmt.Sprintf("bitmap %s of %s is inconsistent (QEMU stopped uncleanly)", g.name, drive)
		}
		if i > from && g.prev != gens[i-1].id {
			return nil, fmt.Sprintf("bitmap %s of %s does not follow %s: a bitmap between them is missing (removed?)", g.name, drive, gens[i-1].name)
		}
		merge = append(merge, g.name)
	}
	return merge, ""
}
