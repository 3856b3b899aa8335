// Package retention decides which snapshots keep rules keep: the policy
// of 'sauve forget' (--keep-last, --keep-hourly ... --keep-yearly,
// --keep-within, --keep-tag), applied to each group of snapshots (by host
// and source by default) on its own. It knows nothing of repositories:
// it takes snapshot descriptions and returns, for each, whether it is
// kept and which rules keep it, so that --dry-run can say why.
//
// The calendar rules work as in restic and borg: walking a group from
// the newest snapshot to the oldest, the first snapshot of each new hour
// (day, ISO week, month, year) is kept, until N such periods have one.
// Times are compared in the location the caller gives (the user's local
// time), since "daily" means the user's days.
package retention

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Snapshot is what the rules look at of one snapshot.
type Snapshot struct {
	ID   string
	Time time.Time
	Host string
	// Sources are the paths of its disks, in order: the group key.
	Sources []string
	Tags    []string
}

// Policy is a set of keep rules; a snapshot any rule keeps is kept. The
// zero Policy keeps nothing, and Empty says so, so that a forget with no
// rule is refused rather than deleting everything.
type Policy struct {
	Last, Hourly, Daily, Weekly, Monthly, Yearly int
	// Within keeps every snapshot younger than this, counted from the
	// newest snapshot of its group (not from now: a host that stopped
	// backing up keeps its last ones).
	Within time.Duration
	// Tags keeps every snapshot that has one of these tags.
	Tags []string
}

// Empty reports whether the policy keeps nothing.
func (p Policy) Empty() bool {
	return p.Last <= 0 && p.Hourly <= 0 && p.Daily <= 0 && p.Weekly <= 0 && p.Monthly <= 0 && p.Yearly <= 0 &&
		p.Within <= 0 && len(p.Tags) == 0
}

// Validate refuses negative counts and durations.
func (p Policy) Validate() error {
	for _, r := range []struct {
		name string
		n    int
	}{{"last", p.Last}, {"hourly", p.Hourly}, {"daily", p.Daily}, {"weekly", p.Weekly}, {"monthly", p.Monthly}, {"yearly", p.Yearly}} {
		if r.n < 0 {
			return fmt.Errorf("--keep-%s %d: a count cannot be negative", r.name, r.n)
		}
	}
	if p.Within < 0 {
		return fmt.Errorf("--keep-within %s: a duration cannot be negative", p.Within)
	}
	return nil
}

// GroupBy says what makes two snapshots members of one group.
type GroupBy struct {
	Host, Sources, Tags bool
}

// DefaultGroupBy groups by host and sources: each machine's disks are
// rotated on their own.
func DefaultGroupBy() GroupBy { return GroupBy{Host: true, Sources: true} }

// ParseGroupBy reads --group-by: a comma-separated list of host, source
// (or sources, paths), tags; "" groups everything together.
func ParseGroupBy(s string) (GroupBy, error) {
	var g GroupBy
	if strings.TrimSpace(s) == "" {
		return g, nil
	}
	for _, f := range strings.Split(s, ",") {
		switch strings.TrimSpace(f) {
		case "host":
			g.Host = true
		case "source", "sources", "paths":
			g.Sources = true
		case "tags", "tag":
			g.Tags = true
		default:
			return g, fmt.Errorf("--group-by %q: %q is not host, source or tags", s, f)
		}
	}
	return g, nil
}

// key is the group of sn.
func (g GroupBy) key(sn Snapshot) string {
	var parts []string
	if g.Host {
		parts = append(parts, "host="+sn.Host)
	}
	if g.Sources {
		parts = append(parts, "sources="+strings.Join(sn.Sources, "\x00"))
	}
	if g.Tags {
		tags := slices.Clone(sn.Tags)
		slices.Sort(tags)
		parts = append(parts, "tags="+strings.Join(tags, ","))
	}
	return strings.Join(parts, "\x01")
}

// Decision is what the policy decided of one snapshot.
type Decision struct {
	Snapshot Snapshot
	Group    string
	Keep     bool
	// Reasons are the rules that keep it ("last 2/3", "daily 2026-11-30",
	// "within 7d", "tag monthly"), empty for one that goes.
	Reasons []string
}

// ErrNoRule is Apply's error for an empty policy.
var ErrNoRule = errors.New("no keep rule given: that would remove every snapshot; give --keep-last, --keep-daily ... or name the snapshots to remove")

// Apply decides each snapshot's fate, in groups; the result lists every
// snapshot once, groups in the order their first member came, each
// group from the newest snapshot to the oldest (ties broken by ID, so
// the result does not depend on the input's order).
func Apply(snaps []Snapshot, p Policy, by GroupBy, loc *time.Location) ([]Decision, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if p.Empty() {
		return nil, ErrNoRule
	}
	if loc == nil {
		loc = time.Local
	}
	var order []string
	groups := map[string][]Snapshot{}
	for _, sn := range snaps {
		k := by.key(sn)
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], sn)
	}
	var out []Decision
	for _, k := range order {
		out = append(out, applyGroup(groups[k], k, p, loc)...)
	}
	return out, nil
}

// period is one calendar rule: how many periods to keep, and the name of
// the period a time falls in.
type period struct {
	name string
	n    int
	of   func(time.Time) string
}

func periods(p Policy) []period {
	return []period{
		{"hourly", p.Hourly, func(t time.Time) string { return t.Format("2006-01-02 15h") }},
		{"daily", p.Daily, func(t time.Time) string { return t.Format("2006-01-02") }},
		{"weekly", p.Weekly, func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-W%02d", y, w) }},
		{"monthly", p.Monthly, func(t time.Time) string { return t.Format("2006-01") }},
		{"yearly", p.Yearly, func(t time.Time) string { return t.Format("2006") }},
	}
}

func applyGroup(snaps []Snapshot, key string, p Policy, loc *time.Location) []Decision {
	snaps = slices.Clone(snaps)
	slices.SortStableFunc(snaps, func(a, b Snapshot) int {
		if c := b.Time.Compare(a.Time); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	out := make([]Decision, len(snaps))
	newest := snaps[0].Time
	ps := periods(p)
	seen := make([]map[string]bool, len(ps))
	for i := range seen {
		seen[i] = map[string]bool{}
	}
	for i, sn := range snaps {
		d := Decision{Snapshot: sn, Group: key}
		if i < p.Last {
			d.Reasons = append(d.Reasons, fmt.Sprintf("last %d/%d", i+1, p.Last))
		}
		t := sn.Time.In(loc)
		for j, pr := range ps {
			name := pr.of(t)
			if pr.n > 0 && len(seen[j]) < pr.n && !seen[j][name] {
				seen[j][name] = true
				d.Reasons = append(d.Reasons, pr.name+" "+name)
			}
		}
		if p.Within > 0 && newest.Sub(sn.Time) <= p.Within {
			d.Reasons = append(d.Reasons, "within "+p.Within.String())
		}
		for _, tag := range p.Tags {
			if slices.Contains(sn.Tags, tag) {
				d.Reasons = append(d.Reasons, "tag "+tag)
			}
		}
		d.Keep = len(d.Reasons) > 0
		out[i] = d
	}
	return out
}
